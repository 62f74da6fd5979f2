"""The serving engine: continuous batching over the paged latent cache gives each request exactly what
`generate` gives it alone; pages come back; bad requests are refused; sharded == single device."""

import dataclasses
import threading

import jax
import numpy as np
import pytest

from kimi_jax.demo import demo_model
from kimi_jax.generate import generate
from kimi_jax.serve import Engine, EngineConfig, QueueFull, Request, RequestError
from kimi_jax.serve.engine import wait_idle

# Small pages and chunks, so prompts span pages and the longer ones are prefilled in several chunks; fewer
# pages than 8 slots at full context, so admission waits for pages as well as slots. One decode batch size
# (compiles cost CI time); the sampling test adds a second.
CONFIG = EngineConfig(max_batch=8, page_size=8, max_context=128, num_pages=48, prefill_chunk=16, batch_buckets=(8,))
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def demo():
    return demo_model()


@pytest.fixture(scope="module")
def prompts(demo):
    _, tok = demo
    words = "def main ( self ) : return x = [ 1 , 2 ] # import os sys class Parser with open as f".split()
    rng = np.random.default_rng(0)
    # 32 prompts of 32 different lengths (2 to 63 tokens), all within two of generate's prompt buckets.
    texts = [" ".join(rng.choice(words, size=n)) for n in range(1, 33)]
    return [tok.encode(t)[:2 + 2 * i] for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def engine_outputs(demo, prompts):
    model, tok = demo
    engine = Engine(model, tok, CONFIG).start()
    try:
        results = [None] * len(prompts)

        def client(i):  # each request from its own thread, all at once
            results[i] = engine.submit(Request(tuple(prompts[i]), max_tokens=MAX_TOKENS,
                                               stop_ids=tuple(tok.stop_ids))).result()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        wait_idle(engine)
        return results, len(engine.free_pages)
    finally:
        engine.stop()


def test_concurrent_greedy_requests_equal_generate_alone(demo, prompts, engine_outputs):
    model, tok = demo
    results, free_pages = engine_outputs
    assert len({len(p) for p in prompts}) == 32
    for prompt, result in zip(prompts, results):
        alone = generate(model, [prompt], max_new_tokens=MAX_TOKENS, stop_ids=tok.stop_ids).tokens[0]
        assert result.token_ids == alone, f"prompt of {len(prompt)} tokens"
        assert result.text == tok.decode(alone, skip_special=True)
        assert result.finish_reason == ("stop" if alone[-1] in tok.stop_ids else "length")
    assert free_pages == CONFIG.total_pages  # every page returned


def test_sharded_engine_equals_single_device(demo, prompts, engine_outputs):
    from kimi_jax.demo import DEMO_DIR
    from kimi_jax.loading import load
    from sharding import make_mesh

    _, tok = demo
    mesh = make_mesh({"expert": 8})  # the demo's 8 routed experts, one per device
    model = load(DEMO_DIR, dtype="float32", mesh=mesh, progress=False)
    assert len(model.moe_layers.layers.mlp.w_gate.get_value().sharding.device_set) == 8
    engine = Engine(model, tok, CONFIG, mesh=mesh)
    chosen = [0, 9, 20, 31]
    results = engine.generate([Request(tuple(prompts[i]), max_tokens=MAX_TOKENS, stop_ids=tuple(tok.stop_ids))
                               for i in chosen])
    assert [r.token_ids for r in results] == [engine_outputs[0][i].token_ids for i in chosen]
    assert len(engine.free_pages) == CONFIG.total_pages


def test_cancel_returns_pages_and_sampling_is_per_request(demo, prompts):
    model, tok = demo
    engine = Engine(model, tok, dataclasses.replace(CONFIG, batch_buckets=(2, 8)))
    long_request = engine.submit(Request(tuple(prompts[5]), max_tokens=100))
    for _ in range(4):
        engine.step()
    assert len(engine.free_pages) < CONFIG.total_pages
    long_request.cancel()
    engine.step()
    assert len(engine.free_pages) == CONFIG.total_pages
    events = list(long_request)
    assert events[-1].finish_reason == "cancelled" and 1 <= sum(len(e.token_ids) for e in events) < 100

    # A seeded sampled request draws the same tokens alone (decode batch 2) and beside others (batch 8);
    # top_k=1 sampling is greedy.
    sampled = Request(tuple(prompts[3]), max_tokens=8, temperature=1.0, seed=7)
    alone = engine.generate([sampled])[0].token_ids
    mixed = engine.generate([Request(tuple(prompts[4]), max_tokens=8), sampled,
                             Request(tuple(prompts[3]), max_tokens=8, temperature=0.8, top_k=1, seed=1),
                             Request(tuple(prompts[3]), max_tokens=8)])
    assert mixed[1].token_ids == alone
    assert mixed[2].token_ids == mixed[3].token_ids
    assert alone != mixed[3].token_ids  # the demo model is not that sure of itself at temperature 1
    assert len(engine.free_pages) == CONFIG.total_pages


def test_stop_strings_end_the_text_before_them(demo, prompts):
    model, tok = demo
    engine = Engine(model, tok, CONFIG)
    full = engine.generate([Request(tuple(prompts[6]), max_tokens=12)])[0]
    stop = full.text[3:5]
    assert len(full.text) >= 5 and stop
    cut = engine.generate([Request(tuple(prompts[6]), max_tokens=12, stop_strings=(stop,))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert len(engine.free_pages) == CONFIG.total_pages


def test_bad_requests_are_refused_with_the_field_named(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineConfig(max_batch=2, page_size=8, max_context=64, max_queue=2))
    cases = [(Request(()), "prompt: needs at least one token"),
             (Request(tuple(range(64))), "prompt: 64 tokens leave no room"),
             (Request((1, 2, 999)), r"prompt: token ids must be integers in \[0, 275\)"),
             (Request((1, 2.5)), "prompt: token ids must be integers"),
             (Request((1,), temperature=-1.0), "temperature"),
             (Request((1,), temperature=float("nan")), "temperature"),
             (Request((1,), top_p=0.0), "top_p"),
             (Request((1,), top_k=-2), "top_k"),
             (Request((1,), seed=-1), "seed"),
             (Request((1,), seed=2**32), "seed"),
             (Request((1,), max_tokens=0), "max_tokens")]
    for request, message in cases:
        with pytest.raises(RequestError, match=message):
            engine.submit(request)
    engine.submit(Request((1,)))
    engine.submit(Request((2,)))
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit(Request((3,)))
    with pytest.raises(ValueError, match="multiple of page_size"):
        EngineConfig(page_size=16, max_context=100)
    assert jax.device_count() == 8
