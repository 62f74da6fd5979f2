"""Batched sampling over the latent KV cache: one prefill, then a jitted decode loop.

Prompts of different lengths are right-padded; each sequence writes its cache rows at its own positions and
attends only to positions up to its own length, so padding never leaks into a sequence.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax.cache import init_cache
from kimi_jax.model import KimiForCausalLM
from kimi_jax.views import split_layer_views
from sharding.distributed import gather


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0: greedy
    top_k: int = 0             # 0: no top-k cut
    top_p: float = 1.0         # 1: no nucleus cut


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]    # new tokens per prompt, up to and including a stop id
    compile_s: float
    prefill_s: float
    decode_s: float
    texts: list[str] | None = None  # decoded continuations, when generate was given a tokenizer

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode loop (all but each prompt's first) per second of decode."""
        return max(self.new_tokens - len(self.tokens), 0) / self.decode_s if self.decode_s > 0 else float("nan")


def greedy(logits_BV):
    """jnp.argmax over the vocabulary (the first best id; the first NaN where there is one) as two plain
    reductions: XLA:CPU's fused argmax (one reduction over value-index pairs) took 0.15 ms for a row of 32000
    logits and 1.2 ms for 8 rows (bench-mini decode, jax.profiler), this form a quarter to a half of that."""
    V = logits_BV.shape[-1]
    best_B1 = logits_BV.max(axis=-1, keepdims=True)  # NaN if the row has one
    hit_BV = (logits_BV == best_B1) | jnp.isnan(logits_BV)
    return jnp.min(jnp.where(hit_BV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def sample(logits_BV, key, params: SamplingParams):
    """Next tokens [B] from logits, one set of sampling parameters for the whole batch."""
    if params.temperature <= 0:
        return greedy(logits_BV)
    B = logits_BV.shape[0]
    full = lambda value, dtype: jnp.full((B,), value, dtype)  # noqa: E731
    return sample_rows(logits_BV, jax.random.split(key, B), full(params.temperature, jnp.float32),
                       full(params.top_k, jnp.int32), full(params.top_p, jnp.float32))


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, top_p_B):
    """Next tokens [B] with sampling parameters per row (a serving batch mixes requests): temperature 0 is
    greedy, top_k 0 and top_p 1 cut nothing. The sort that the cuts need runs only if some row samples."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = greedy(logits_BV)

    def sampled():
        V = logits_BV.shape[-1]
        scaled_BV = logits_BV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
        sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
        kth_B1 = jnp.take_along_axis(sorted_BV, jnp.clip(top_k_B - 1, 0, V - 1)[:, None], axis=-1)
        below_kth = lambda x: (top_k_B > 0)[:, None] & (x < kth_B1)  # noqa: E731
        # Nucleus over what top-k kept: the smallest prefix whose mass reaches top_p (at least the best token).
        kept_sorted_BV = jnp.where(below_kth(sorted_BV), -jnp.inf, sorted_BV)
        cum_BV = jnp.cumsum(jax.nn.softmax(kept_sorted_BV, axis=-1), axis=-1)
        cutoff_index_B = jnp.minimum(jnp.sum(cum_BV < top_p_B[:, None], axis=-1), V - 1)
        cutoff_B1 = jnp.take_along_axis(kept_sorted_BV, cutoff_index_B[:, None], axis=-1)
        cut_BV = below_kth(scaled_BV) | ((top_p_B < 1.0)[:, None] & (scaled_BV < cutoff_B1))
        draws_B = jax.vmap(jax.random.categorical)(keys_B, jnp.where(cut_BV, -jnp.inf, scaled_BV))
        return jnp.where(temperature_B > 0, draws_B.astype(jnp.int32), greedy_B)

    return jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda: greedy_B)


def _prefill(graphdef, state, ids_BT, lengths_B, cache):
    model = nnx.merge(graphdef, state)
    positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1], dtype=jnp.int32), ids_BT.shape)
    out = model.forward(ids_BT, positions_BT, cache, attend_cache=False, logits_index_B=lengths_B - 1)
    return out.logits_BTV[:, 0], out.cache


def _decode(graphdef, params, max_new_tokens, state, logits_BV, lengths_B, cache, key, stop_ids, pad_id):
    """Samples token 0 from the prefill logits, then forwards each sampled token to sample the next."""
    B = logits_BV.shape[0]

    def emit(step, logits_BV, key, done_B, out_BN):
        key, sub = jax.random.split(key)
        tok_B = jnp.where(done_B, pad_id, sample(logits_BV, sub, params))
        out_BN = out_BN.at[:, step].set(tok_B)
        return tok_B, key, done_B | jnp.isin(tok_B, stop_ids), out_BN

    out_BN = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    tok_B, key, done_B, out_BN = emit(0, logits_BV, key, jnp.zeros((B,), bool), out_BN)

    def cond(carry):
        step, _, _, _, done_B, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        step, tok_B, cache, key, done_B, out_BN = carry
        model = nnx.merge(graphdef, state)
        positions_B1 = (lengths_B + step - 1)[:, None]
        out = model.forward(tok_B[:, None], positions_B1, cache, attend_cache=True)
        tok_B, key, done_B, out_BN = emit(step, out.logits_BTV[:, 0], key, done_B, out_BN)
        return step + 1, tok_B, out.cache, key, done_B, out_BN

    carry = jax.lax.while_loop(cond, body, (jnp.int32(1), tok_B, cache, key, done_B, out_BN))
    return carry[-1]


_COMPILED: dict = {}
# Prompts are right-padded to a multiple of this, so prompts of nearby lengths share one compiled program
# (padding is masked out: a sequence never attends to positions past its own length).
PROMPT_BUCKET = 32


def _compiled(name, fn, static, args, donate):
    """AOT-compiles `fn` once per (static config, argument shapes); returns (executable, seconds spent)."""
    # Placement is part of the key: the same shapes on another mesh (or under another ambient mesh, which
    # expert-parallel MoE traces against) need their own executable. So is the tree: views of a matrix stored
    # out major or row-major (kimi_jax.views) have the same leaves when it is square.
    key = (name, static, jax.sharding.get_abstract_mesh(), jax.tree.structure(args),
           tuple((a.shape, a.dtype, getattr(a, "sharding", None)) for a in jax.tree.leaves(args)))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    if len(_COMPILED) > 32:  # bound the executables kept alive across many shapes
        _COMPILED.clear()
    start = time.perf_counter()
    jitted = jax.jit(lambda *a: fn(*static, *a), donate_argnums=donate)
    _COMPILED[key] = jitted.lower(*args).compile()
    return _COMPILED[key], time.perf_counter() - start


# Greedy decoding on a CPU splits the batch into this many groups decoded side by side in threads. XLA:CPU runs a
# decode step's small matrix-vector products one after another on one core (the expert tiles, measured with
# jax.profiler: one thread busy, the other waiting), so two programs at once keep both cores of the 2-core
# machine this was measured on busy. bench-mini, float32, 1024-token prompts, 32 new tokens, medians of 6
# alternating runs: batch 8 decodes in 2.01 s instead of 2.36 (127.7 against 108.5 tokens/s), batch 2 in 0.83 s
# instead of 1.17, the same tokens. Each group reads the shared weights again, so more groups than cores only
# adds memory traffic (four groups on the two cores took 2.4x as long as two).
CPU_DECODE_STREAMS = 2


def cpu_streams(model: KimiForCausalLM, batch: int, params: SamplingParams) -> int:
    """How many equal groups `generate` decodes side by side: CPU_DECODE_STREAMS for a greedy batch that it
    divides, whose weights sit on one CPU device, else 1. (With sampling, groups would draw other random numbers
    than one batch does, so the tokens would depend on the machine; an uneven split would pad a group with rows
    that cost as much as real ones: batch 5 as 3 + 3 decoded no faster and prefilled 30% slower.)"""
    streams = min(CPU_DECODE_STREAMS, os.cpu_count() or 1)
    if params.temperature > 0 or streams < 2 or batch % streams:
        return 1
    leaf = jax.tree.leaves(nnx.state(model))[0]
    if len(leaf.devices()) != 1 or next(iter(leaf.devices())).platform != "cpu":
        return 1
    return streams


def _each(fn, items: list) -> list:
    """fn over items, in threads when there are several (XLA releases the GIL while a program runs)."""
    if len(items) == 1:
        return [fn(items[0])]
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def generate(model: KimiForCausalLM, prompts: Sequence[Sequence[int] | str], max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: Sequence[int] | None = None, pad_id: int = 0, tokenizer=None) -> GenerationResult:
    """Generates up to `max_new_tokens` for each prompt: lists of token ids (any lengths), or text when a
    `tokenizer` is given (then its stop ids apply unless `stop_ids` is given, and `GenerationResult.texts`
    holds the decoded continuations)."""
    if any(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: generate(model, ['...'], tokenizer=load_tokenizer(dir))")
        prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    if tokenizer is not None and stop_ids is None:
        stop_ids = tokenizer.stop_ids
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"invalid sampling parameters: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")
    vocab = model.cfg.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={vocab})")
    params = SamplingParams(float(temperature), int(top_k), float(top_p))
    streams = cpu_streams(model, len(prompts), params)
    size = len(prompts) // streams
    graphdef, state = split_layer_views(model, rows=size)
    stop = jnp.asarray(list(stop_ids) if stop_ids else [-1], jnp.int32)
    groups = [list(prompts[i:i + size]) for i in range(0, len(prompts), size)]
    T = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET  # one length: one compiled program

    def prefill_args(group):
        lengths = np.array([len(p) for p in group], np.int32)
        ids_BT = np.full((len(group), T), pad_id, np.int32)
        for b, p in enumerate(group):
            ids_BT[b, :len(p)] = p
        cache = init_cache(model.cfg, len(group), T + max_new_tokens, model.dtype)
        return state, jnp.asarray(ids_BT), jnp.asarray(lengths), cache

    # Every group has the same shapes, so one compiled prefill and one decode serve them all (compiled here,
    # before any thread runs).
    inputs = [prefill_args(g) for g in groups]
    prefill, prefill_compile_s = _compiled("prefill", _prefill, (graphdef,), inputs[0], donate=(3,))
    start = time.perf_counter()
    prefilled = _each(lambda args: jax.block_until_ready(prefill(*args)), inputs)
    prefill_s = time.perf_counter() - start

    decode_inputs = [(state, logits_BV, lengths_B, cache, jax.random.key(seed), stop, jnp.int32(pad_id))
                     for (logits_BV, cache), (_, _, lengths_B, _) in zip(prefilled, inputs)]
    decode, decode_compile_s = _compiled("decode", _decode, (graphdef, params, max_new_tokens), decode_inputs[0],
                                         donate=())
    start = time.perf_counter()
    outs = _each(lambda args: gather(jax.block_until_ready(decode(*args))), decode_inputs)  # every process: all rows
    decode_s = time.perf_counter() - start
    out_BN = np.concatenate([np.asarray(o) for o in outs])

    stops = set(stop_ids or ())
    tokens = []
    for row in out_BN.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        tokens.append(row[:end])
    texts = [tokenizer.decode(t, skip_special=True) for t in tokens] if tokenizer is not None else None
    return GenerationResult(tokens, prefill_compile_s + decode_compile_s, prefill_s, decode_s, texts)
