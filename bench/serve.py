"""Serving throughput and latency: the continuous-batching engine at concurrency 1, 8 and 32 against
`generate` run on the same requests one after another, in one run.

Every request has its own prompt (random lengths) and generates exactly `max_tokens` tokens (no stop ids,
so both sides do the same work). Concurrency c means c client threads, each submitting its next request
when the previous one finishes. Time to first token (TTFT) runs from submit to the first token; inter-token
latency (ITL) is the gap between later tokens. Both sides are warmed up first (every program compiled: the
engine's prefill and decode batch sizes, generate's prompt buckets), and compile time is not timed.

    python -m bench.serve --json                       # the embedded demo model
    python -m bench.serve --preset bench-mini --requests 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from bench.report import save


def _model(preset_name: str | None):
    """float32, as every CPU benchmark here."""
    from flax import nnx

    from kimi_jax.config import preset
    from kimi_jax.demo import demo_model
    from kimi_jax.model import KimiForCausalLM

    if preset_name is None:
        return demo_model("float32")[0], "demo"
    return KimiForCausalLM(preset(preset_name), rngs=nnx.Rngs(0)), preset_name


def _percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def run_engine(engine, requests, concurrency: int) -> dict:
    pending = list(enumerate(requests))
    lock = threading.Lock()
    ttft, itl, tokens = [], [], 0

    def client():
        nonlocal tokens
        while True:
            with lock:
                if not pending:
                    return
                _, request = pending.pop(0)
            start = last = time.perf_counter()
            first = True
            for event in engine.submit(request):
                now = time.perf_counter()
                if event.token_ids:
                    with lock:
                        (ttft if first else itl).append(now - (start if first else last))
                        tokens += len(event.token_ids)
                    first, last = False, now

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
            "requests_per_s": len(requests) / wall, "ttft_ms_p50": 1e3 * _percentile(ttft, 50),
            "ttft_ms_p90": 1e3 * _percentile(ttft, 90), "itl_ms_p50": 1e3 * _percentile(itl, 50),
            "itl_ms_p90": 1e3 * _percentile(itl, 90)}


def run(preset_name=None, num_requests=32, max_tokens=32, min_prompt=16, max_prompt=200, concurrency=(1, 8, 32),
        seed=0) -> dict:
    from kimi_jax.generate import generate
    from kimi_jax.serve import Engine, EngineConfig, Request

    model, name = _model(preset_name)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_prompt, max_prompt + 1, size=num_requests)
    prompts = [rng.integers(3, min(model.cfg.vocab_size, 250), size=n).tolist() for n in lengths]
    requests = [Request(tuple(p), max_tokens=max_tokens) for p in prompts]

    # Sequential reference: each request alone through generate (compiles warmed per prompt bucket first).
    compile_start = time.perf_counter()
    for p in {-(-len(p) // 32): p for p in prompts}.values():
        generate(model, [p], max_new_tokens=max_tokens)
    start = time.perf_counter()
    ttft, itl = [], []
    for p in prompts:
        r = generate(model, [p], max_new_tokens=max_tokens)
        ttft.append(r.prefill_s)
        itl.append(r.decode_s / max(len(r.tokens[0]) - 1, 1))
    sequential_s = time.perf_counter() - start
    sequential = {"wall_s": sequential_s, "tokens_per_s": num_requests * max_tokens / sequential_s,
                  "ttft_ms_p50": 1e3 * _percentile(ttft, 50), "itl_ms_p50": 1e3 * _percentile(itl, 50)}

    max_context = -(-(max_prompt + max_tokens) // 16) * 16
    engine = Engine(model, None, EngineConfig(max_batch=max(concurrency), page_size=16, max_context=max_context,
                                              prefill_chunk=128))
    for b in engine.config.decode_batches:  # warm-up: every decode batch size and both prefill programs
        engine.generate([Request(tuple(prompts[0]), max_tokens=2)] * b)
    compile_s = time.perf_counter() - compile_start - sequential_s
    engine.start()
    try:
        levels = [run_engine(engine, requests, c) for c in concurrency]
    finally:
        engine.stop()
    for level in levels:
        level["speedup_vs_sequential"] = level["tokens_per_s"] / sequential["tokens_per_s"]
    best = max(levels, key=lambda lv: lv["tokens_per_s"])
    return {"benchmark": "serve", "model": name, "requests": num_requests, "max_tokens": max_tokens,
            "prompt_tokens": [int(lengths.min()), int(lengths.max())], "sequential": sequential,
            "engine": levels, "kimi_jax_tokens_per_s": best["tokens_per_s"],
            "reference_tokens_per_s": sequential["tokens_per_s"], "speedup": best["speedup_vs_sequential"],
            "compile_and_warmup_s": compile_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-jax bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="a preset with random weights (default: the embedded demo model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.preset, args.requests, args.max_tokens,
                 concurrency=tuple(int(c) for c in args.concurrency.split(",")))
    bars = {"sequential generate": result["sequential"]["tokens_per_s"],
            **{f"engine, concurrency {lv['concurrency']}": lv["tokens_per_s"] for lv in result["engine"]}}
    save(result, f"serve-{result['model']}", bars, "output tokens/s",
         f"{result['model']}, {result['requests']} requests x {result['max_tokens']} tokens, float32")
    if args.json:
        print(json.dumps(result))
    else:
        seq = result["sequential"]
        print(f"sequential generate: {seq['tokens_per_s']:.1f} tokens/s")
        for lv in result["engine"]:
            print(f"engine c={lv['concurrency']:>2}: {lv['tokens_per_s']:.1f} tokens/s "
                  f"({lv['speedup_vs_sequential']:.2f}x), TTFT p50 {lv['ttft_ms_p50']:.1f} ms, "
                  f"ITL p50 {lv['itl_ms_p50']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
