"""Our logits and greedy generations equal transformers' DeepseekV3ForCausalLM on tiny random checkpoints."""

import pytest
import torch

from hf_checkpoints import CONFIGS, random_ids, save_kimi_layout
from kimi_jax.generate import generate
from kimi_jax.loading import load
from numerics import our_logits, reference_logits, rel


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(hf_checkpoint, name):
    hf_model, directory = hf_checkpoint(name)
    ids = random_ids(hf_model.config.vocab_size, batch=2, length=70, seed=1)
    model = load(directory, dtype="float32", progress=False)
    assert rel(our_logits(model, ids), reference_logits(hf_model, ids)) <= 1e-5


def test_scan_and_unrolled_layers_agree(hf_checkpoint):
    hf_model, directory = hf_checkpoint("dense2_groups_yarn")
    ids = random_ids(hf_model.config.vocab_size, batch=2, length=33, seed=2)
    unrolled = our_logits(load(directory, dtype="float32", progress=False, layer_loop="unroll"), ids)
    scanned = our_logits(load(directory, dtype="float32", progress=False, layer_loop="scan"), ids)
    assert rel(scanned, unrolled) <= 1e-6


def test_real_kimi_layout_loads_and_matches(hf_checkpoint, tmp_path):
    """Nested K2.6 config (text_config, kimi_k25 / kimi_k2, rope_scaling with `type`), `language_model.`-prefixed
    per-expert tensors in two shards with an index."""
    hf_model, _ = hf_checkpoint("k2_like")
    directory = save_kimi_layout(hf_model, tmp_path / "kimi")
    ids = random_ids(hf_model.config.vocab_size, batch=2, length=64, seed=3)
    model = load(directory, dtype="float32", progress=False)
    assert model.cfg.rope.kind == "yarn" and model.cfg.rope.factor == 32.0
    assert rel(our_logits(model, ids), reference_logits(hf_model, ids)) <= 1e-5


@pytest.mark.parametrize("name", ["qlora_yarn", "no_qlora_groups"])
def test_greedy_generate_matches_transformers(hf_checkpoint, name):
    hf_model, directory = hf_checkpoint(name)
    model = load(directory, dtype="float32", progress=False)
    prompts = [random_ids(hf_model.config.vocab_size, 1, n, seed=n)[0].tolist() for n in (5, 23, 11)]
    result = generate(model, prompts, max_new_tokens=32)
    for prompt, ours in zip(prompts, result.tokens):
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == ref


def test_greedy_generate_in_cpu_streams_equals_one_batch(hf_checkpoint, monkeypatch):
    """An even greedy batch on a CPU is decoded as CPU_DECODE_STREAMS groups side by side (threads): the same
    tokens as one batch, and as transformers; sampling and uneven batches stay one batch."""
    import kimi_jax.generate as gen

    hf_model, directory = hf_checkpoint("qlora_yarn")
    model = load(directory, dtype="float32", progress=False)
    prompts = [random_ids(hf_model.config.vocab_size, 1, n, seed=n)[0].tolist() for n in (5, 23, 11, 17)]
    monkeypatch.setattr(gen.os, "cpu_count", lambda: 2)
    assert gen.cpu_streams(model, 4, gen.SamplingParams()) == 2
    assert gen.cpu_streams(model, 3, gen.SamplingParams()) == 1
    assert gen.cpu_streams(model, 4, gen.SamplingParams(temperature=0.7)) == 1
    split = generate(model, prompts, max_new_tokens=24).tokens
    monkeypatch.setattr(gen, "CPU_DECODE_STREAMS", 1)
    assert gen.cpu_streams(model, 4, gen.SamplingParams()) == 1
    assert generate(model, prompts, max_new_tokens=24).tokens == split
    for prompt, ours in zip(prompts, split):
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == ref
