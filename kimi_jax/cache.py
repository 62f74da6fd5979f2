"""The latent KV cache: per layer only the normed latent (kv_lora_rank) and the rotated rope key per token.

Its structure follows the layer loop: stacked [layers, B, S, .] arrays per stack under scan; a list of
per-layer (latent_BSL, rope_BSK) pairs when unrolled, so that XLA:CPU updates each layer's arrays in place
instead of copying a stacked cache every step (SPEC.md section 7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.config import KimiConfig


def init_cache(cfg: KimiConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    return _latent_arrays(cfg, (batch, max_len), dtype)


def init_paged_cache(cfg: KimiConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> dict:
    """The same structure with [num_pages, page_size, .] arrays in place of [batch, max_len, .]: pages that any
    sequence can own, addressed through a page table (`KimiForCausalLM.forward(..., page_table_BP=...)`)."""
    return _latent_arrays(cfg, (num_pages, page_size), dtype)


def _latent_arrays(cfg: KimiConfig, rows: tuple[int, int], dtype) -> dict:
    def layer_pair(*lead):
        return (jnp.zeros((*lead, *rows, cfg.kv_lora_rank), dtype),
                jnp.zeros((*lead, *rows, cfg.qk_rope_head_dim), dtype))

    cache = {}
    for name, n in (("dense", cfg.num_dense_layers), ("moe", cfg.num_moe_layers)):
        if n:
            cache[name] = layer_pair(n) if cfg.layer_loop == "scan" else [layer_pair() for _ in range(n)]
    return cache


def cache_bytes(cache: dict) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
