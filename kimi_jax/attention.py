"""Multi-head Latent Attention (MLA): the naive form with expanded K/V, and the weight-absorbed form that
attends directly over the compressed latent cache (kv_lora_rank latent + shared rope key per token).

Weights are stored per head in the layout the math uses: `w_uk_HKL` (kv_b's k_nope half) and `w_uv_HLK`
(its v half), so absorbed decode needs no reshaping at run time.

attention_impl="pallas" runs the kernels of kernels_pallas/. XLA's SPMD partitioner cannot split a
pallas_call (it would gather the operands onto every chip), so under a mesh the kernels run per shard inside
jax.shard_map: sequences over the batch axes and the cache positions as sharding.rules.sequence_axes lays the
cache out, heads over "tensor" (and over axes that neither batch nor positions use). A cache split by position
is attended flash-decoding style: each device attends over its own rows and the partial results merge by
log-sum-exp across the position axes (two small all-reduces of [B, H] and [B, H, v_head_dim] per layer).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kernels_pallas._common import target_device
from kernels_pallas.mla_decode import merge_partials, mla_decode  # attention_impl="pallas" (interpreted off TPU)
from kernels_pallas.mla_prefill import mla_prefill
from kimi_jax.config import KimiConfig
from kimi_jax.layers import apply_rope, param, rms_norm
from sharding.rules import BATCH_AXES, sequence_axes

# transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm default, not rms_norm_eps.
INNER_NORM_EPS = 1e-6


def _compiling_for_cpu() -> bool:
    """Whether the program being traced runs on XLA:CPU (not an accelerator, nor a deviceless pod plan)."""
    return target_device()[0] == "cpu"


def _softmax_f32(scores, valid):
    scores = jnp.where(valid, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def naive_attention(q_nope_BTHK, q_rope_BTHK, latent_BSL, k_rope_BSK, w_uk_HKL, w_uv_HLK, valid_BTS, scale,
                    return_max_logit=False):
    """Reference MLA: expand the latent into per-head keys and values, then ordinary attention.
    `return_max_logit` also returns each head's largest valid pre-softmax logit [H] (for QK-Clip)."""
    k_nope_BSHK = jnp.einsum("bsl,hkl->bshk", latent_BSL, w_uk_HKL)
    v_BSHK = jnp.einsum("bsl,hlk->bshk", latent_BSL, w_uv_HLK)
    scores_BHTS = (jnp.einsum("bthk,bshk->bhts", q_nope_BTHK, k_nope_BSHK)
                   + jnp.einsum("bthk,bsk->bhts", q_rope_BTHK, k_rope_BSK)) * scale
    probs_BHTS = _softmax_f32(scores_BHTS, valid_BTS[:, None]).astype(v_BSHK.dtype)
    out_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)
    return (out_BTHK, _max_logit(scores_BHTS, valid_BTS)) if return_max_logit else out_BTHK


def _max_logit(scores_BHTS, valid_BTS):
    """Each head's largest valid pre-softmax logit [H] (QK-Clip reads it; no gradient)."""
    masked = jnp.where(valid_BTS[:, None], scores_BHTS.astype(jnp.float32), -jnp.inf)
    return jax.lax.stop_gradient(masked.max(axis=(0, 2, 3)))


# Query rows per block of causal_attention. CPU: 256 (T=2048: 3.4x the unblocked form). Accelerators: whole
# sequences up to 4096 tokens, since each block is another copy of the attention graph, and when the sequence is
# split over a mesh axis each block's slices become collective permutes (full K2.6 train plan on v5p-256, T=2048:
# 1784 fusions and 218 s of TPU compile with blocks of 256, 671 and 114-120 s with one block).
CAUSAL_QUERY_BLOCK = {"cpu": 256, "accelerator": 4096}


def causal_attention(q_nope_BTHK, q_rope_BTHK, latent_BTL, k_rope_BTK, w_uk_HKL, w_uv_HLK, positions_BT, scale,
                     block: int | None = None):
    """`naive_attention` among the T tokens of a step with the causal mask of their positions, in blocks of
    `block` queries (default: CAUSAL_QUERY_BLOCK for the target) that each see only the keys up to the block's
    last token, so the masked upper triangle (half the scores and softmax at long T) is never computed. Equal to
    naive_attention with valid = positions_k <= positions_q whenever positions strictly increase along T, as they
    do for every caller (a full forward, the prefill of an empty cache). Returns (out_BTHK, max logit per head
    [H])."""
    T = q_nope_BTHK.shape[1]
    if block is None:
        block = CAUSAL_QUERY_BLOCK["cpu" if _compiling_for_cpu() else "accelerator"]
    k_nope_BHSK = jnp.einsum("bsl,hkl->bhsk", latent_BTL, w_uk_HKL)
    v_BHSK = jnp.einsum("bsl,hlk->bhsk", latent_BTL, w_uv_HLK)
    q_nope_BHTK, q_rope_BHTK = q_nope_BTHK.transpose(0, 2, 1, 3), q_rope_BTHK.transpose(0, 2, 1, 3)
    outs, max_logits = [], []
    for start in range(0, T, block):
        end = min(start + block, T)
        scores_BHtS = (jnp.einsum("bhtk,bhsk->bhts", q_nope_BHTK[:, :, start:end], k_nope_BHSK[:, :, :end])
                       + jnp.einsum("bhtk,bsk->bhts", q_rope_BHTK[:, :, start:end], k_rope_BTK[:, :end])) * scale
        valid_BtS = positions_BT[:, None, :end] <= positions_BT[:, start:end, None]
        scores_BHtS = jnp.where(valid_BtS[:, None], scores_BHtS.astype(jnp.float32), -jnp.inf)
        max_logits.append(scores_BHtS.max(axis=(0, 2, 3)))
        probs_BHtS = jax.nn.softmax(scores_BHtS, axis=-1).astype(v_BHSK.dtype)
        outs.append(jnp.einsum("bhts,bhsk->bthk", probs_BHtS, v_BHSK[:, :, :end]))
    return jnp.concatenate(outs, axis=1), jax.lax.stop_gradient(jnp.stack(max_logits).max(axis=0))


def absorbed_attention(q_nope_BTHK, q_rope_BTHK, latent_BSL, k_rope_BSK, w_uk_HKL, w_uv_HLK, valid_BTS, scale,
                       return_max_logit=False):
    """Weight-absorbed MLA: fold w_uk into the query and w_uv after the weighted sum, so attention runs over
    the latent rows themselves. Equal to `naive_attention` up to summation order (`return_max_logit` as there)."""
    q_latent_BTHL = _per_head_matmul(q_nope_BTHK, w_uk_HKL)
    scores_BHTS = (jnp.einsum("bthl,bsl->bhts", q_latent_BTHL, latent_BSL)
                   + jnp.einsum("bthk,bsk->bhts", q_rope_BTHK, k_rope_BSK)) * scale
    probs_BHTS = _softmax_f32(scores_BHTS, valid_BTS[:, None]).astype(latent_BSL.dtype)
    if probs_BHTS.shape[2] == 1 and _compiling_for_cpu():
        # One query (decode) on CPU: a multiply-reduce over the rows. As a dot, XLA:CPU first transposes the
        # whole latent cache (its dot kernels want the contracted dimension minor), which cost more than the dot.
        # Accelerators (and deviceless pod plans) keep the dot for their matrix units.
        context_BTHL = jnp.sum(probs_BHTS[:, :, 0, :, None] * latent_BSL[:, None], axis=2)[:, None]
    else:
        context_BTHL = jnp.einsum("bhts,bsl->bthl", probs_BHTS, latent_BSL)
    out_BTHK = _per_head_matmul(context_BTHL, w_uv_HLK)
    return (out_BTHK, _max_logit(scores_BHTS, valid_BTS)) if return_max_logit else out_BTHK


def _per_head_matmul(x_BTHI, w_HIO):
    """Each head's rows times that head's matrix: [B, T, H, I] x [H, I, O] -> [B, T, H, O]. On CPU the product
    is asked for heads first, then transposed: XLA:CPU's dot with the heads as its batch dimension and the
    tokens minor ran at 1.3-3 GB/s (bench-mini decode, 4 sequences: 1.5 ms for w_uk's 2 MB, 0.3 ms this way)."""
    if _compiling_for_cpu():
        return jnp.einsum("bthi,hio->hbto", x_BTHI, w_HIO).transpose(1, 2, 0, 3)
    return jnp.einsum("bthi,hio->btho", x_BTHI, w_HIO)


def _sequence_split(batch: int, length: int) -> bool:
    """Whether the ambient mesh splits sequences of this length over devices (sharding.rules.sequence_axes: the
    rule `kimi-jax plan` lays a training step's tokens out by)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Manual in mesh.axis_types:
        return False
    return bool(sequence_axes(mesh.shape, batch, length)[1])


def _kernel_mesh():
    """The ambient mesh (`jax.set_mesh`) when it has more than one device; None: run the kernels on the arrays
    as given (no mesh, or already inside a shard_map, where arrays are per-device shards)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or jax.sharding.AxisType.Manual in mesh.axis_types:
        return None
    return mesh


def _kernel_axes(mesh, batch: int, length: int | None, heads: int):
    """PartitionSpec entries (batch, positions, heads) of the kernels' shards: sequences and cache positions as
    sharding.rules.sequence_axes lays them out, heads over "tensor" and then over the batch axes left unused,
    each while it divides the heads (so no chip computes another's heads)."""
    batch_axes, seq_axes = sequence_axes(mesh.shape, batch, length)
    head_axes, used = [], 1
    for axis in ("tensor", *BATCH_AXES):
        size = mesh.shape.get(axis, 1)
        if size > 1 and axis not in batch_axes + seq_axes and heads % (used * size) == 0:
            head_axes.append(axis)
            used *= size
    return batch_axes or None, seq_axes or None, tuple(head_axes) or None


def _absorbed_decode_pallas(q_nope_BTHK, q_rope_BTHK, latent_BSL, k_rope_BSK, w_uk_HKL, w_uv_HLK, positions_BT,
                            scale, layer=None):
    """`absorbed_attention` for one token per sequence through the Pallas decode kernel: the token at
    position p sees cache rows 0..p (clipped to S), exactly the mask the XLA path builds. `layer`: the caches
    are [layers, B, S, .] stacks, read in place at that layer. Under a mesh, per shard (see the module
    docstring)."""
    S = latent_BSL.shape[-2]
    lengths_B = jnp.minimum(positions_BT[:, 0] + 1, S)
    args = (q_nope_BTHK, q_rope_BTHK, latent_BSL, k_rope_BSK, w_uk_HKL, w_uv_HLK, lengths_B, layer)
    mesh = _kernel_mesh()
    if mesh is None:
        return _decode_shard(*args, scale=scale, seq_axes=None)
    b, s, h = _kernel_axes(mesh, latent_BSL.shape[-3], S, w_uk_HKL.shape[0])
    q, cache = P(b, None, h, None), P(*(None,) * (latent_BSL.ndim - 3), b, s, None)
    return jax.shard_map(partial(_decode_shard, scale=scale, seq_axes=s), mesh=mesh,
                         in_specs=(q, q, cache, cache, P(h), P(h), P(b), P()), out_specs=q,
                         check_vma=False)(*args)


def _decode_shard(q_nope_BTHK, q_rope_BTHK, latent_BSL, k_rope_BSK, w_uk_HKL, w_uv_HLK, lengths_B, layer, *,
                  scale, seq_axes):
    """One device's decode attention over its cache rows. With `seq_axes` its rows are positions
    [i * S, (i + 1) * S) of each sequence (i: the device's index along those axes) and the partial results
    merge across them (after w_uv, the smallest per-head width to reduce)."""
    q_latent_BHL = jnp.einsum("bhk,hkl->bhl", q_nope_BTHK[:, 0], w_uk_HKL)
    if seq_axes is None:
        context_BHL = mla_decode(q_latent_BHL, q_rope_BTHK[:, 0], latent_BSL, k_rope_BSK, lengths_B, scale,
                                 layer=layer)
        return jnp.einsum("bhl,hlk->bhk", context_BHL, w_uv_HLK)[:, None]
    S = latent_BSL.shape[-2]
    local_B = jnp.clip(lengths_B - jax.lax.axis_index(seq_axes) * S, 0, S)
    context_BHL, lse_BH = mla_decode(q_latent_BHL, q_rope_BTHK[:, 0], latent_BSL, k_rope_BSK, local_B, scale,
                                     layer=layer, return_lse=True)
    out_BHK = jnp.einsum("bhl,hlk->bhk", context_BHL, w_uv_HLK.astype(jnp.float32))
    merged_BHK = merge_partials(out_BHK, lse_BH, partial(jax.lax.psum, axis_name=seq_axes),
                                partial(jax.lax.pmax, axis_name=seq_axes))
    return merged_BHK.astype(q_nope_BTHK.dtype)[:, None]


def _naive_prefill_pallas(q_nope_BTHK, q_rope_BTHK, latent_BTL, k_rope_BTK, w_uk_HKL, w_uv_HLK, scale):
    """`naive_attention` through the Pallas causal kernel. The kernel's mask is by index (token t sees
    0..t), which equals the XLA path's positions mask whenever positions increase along T, as they do for
    every caller of the naive path (a full forward, the prefill of an empty cache). Under a mesh, per shard of
    sequences and heads (the positions stay whole: a query needs every key before it)."""
    args = (q_nope_BTHK, q_rope_BTHK, latent_BTL, k_rope_BTK, w_uk_HKL, w_uv_HLK)
    mesh = _kernel_mesh()
    if mesh is None:
        return _prefill_shard(*args, scale=scale)
    b, _, h = _kernel_axes(mesh, latent_BTL.shape[0], None, w_uk_HKL.shape[0])
    q = P(b, None, h, None)
    return jax.shard_map(partial(_prefill_shard, scale=scale), mesh=mesh,
                         in_specs=(q, q, P(b), P(b), P(h), P(h)), out_specs=q, check_vma=False)(*args)


def _prefill_shard(q_nope_BTHK, q_rope_BTHK, latent_BTL, k_rope_BTK, w_uk_HKL, w_uv_HLK, *, scale):
    k_nope_BHTK = jnp.einsum("btl,hkl->bhtk", latent_BTL, w_uk_HKL)
    v_BHTK = jnp.einsum("btl,hlk->bhtk", latent_BTL, w_uv_HLK)
    out_BHTK = mla_prefill(q_nope_BTHK.transpose(0, 2, 1, 3), q_rope_BTHK.transpose(0, 2, 1, 3), k_nope_BHTK,
                           k_rope_BTK, v_BHTK, scale)
    return out_BHTK.transpose(0, 2, 1, 3)


class MLA(nnx.Module):
    """One MLA layer. `q_lora_rank=None` configs use a single q projection."""

    def __init__(self, cfg: KimiConfig, rngs: nnx.Rngs, dtype):
        D, H, L = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        Kq, Kn, Kr, Kv = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.cfg = cfg
        if cfg.q_lora_rank:
            Q = cfg.q_lora_rank
            self.wq_a = param(rngs, (D, Q), ("embed", "q_lora"), dtype)
            self.q_norm = param(rngs, (Q,), ("q_lora",), dtype, init="ones")
            self.wq_b = param(rngs, (Q, H, Kq), ("q_lora", "heads", "head_dim"), dtype)
            self.wq = None
        else:
            self.wq_a = self.q_norm = self.wq_b = None
            self.wq = param(rngs, (D, H, Kq), ("embed", "heads", "head_dim"), dtype)
        self.wkv_a = param(rngs, (D, L + Kr), ("embed", "latent"), dtype)
        self.kv_norm = param(rngs, (L,), ("latent",), dtype, init="ones")
        self.w_uk = param(rngs, (H, Kn, L), ("heads", "head_dim", "latent"), dtype)
        self.w_uv = param(rngs, (H, L, Kv), ("heads", "latent", "head_dim"), dtype)
        self.wo = param(rngs, (H, Kv, D), ("heads", "head_dim", "embed"), dtype)

    def queries(self, x_BTD, cos, sin):
        if self.wq is not None:
            q_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, self.wq[...])
        else:
            q_lora_BTQ = rms_norm(x_BTD @ self.wq_a[...], self.q_norm[...], INNER_NORM_EPS)
            q_BTHK = jnp.einsum("btq,qhk->bthk", q_lora_BTQ, self.wq_b[...])
        q_nope_BTHK, q_rope_BTHK = jnp.split(q_BTHK, [self.cfg.qk_nope_head_dim], axis=-1)
        return q_nope_BTHK, apply_rope(q_rope_BTHK, cos[:, :, None], sin[:, :, None])

    def latents(self, x_BTD, cos, sin):
        """The values a token contributes to the cache: normed latent [B,T,L] and rotated rope key [B,T,K]."""
        kv_BTC = x_BTD @ self.wkv_a[...]
        latent_BTL, k_rope_BTK = jnp.split(kv_BTC, [self.cfg.kv_lora_rank], axis=-1)
        return rms_norm(latent_BTL, self.kv_norm[...], INNER_NORM_EPS), apply_rope(k_rope_BTK, cos, sin)

    def __call__(self, x_BTD, positions_BT, cos, sin, cache=None, attend_cache=True, page_table_BP=None,
                 layer=None):
        """Returns (output [B,T,D], updated cache or None, max logit per head [H] or None).

        No cache: causal attention among the T tokens (naive form; absorbed where the mesh splits the
        sequence). With a cache (latent_BSL, rope_BSK), this step's rows are written at their positions first;
        then `attend_cache` attends over the whole cache in the absorbed form (decode, chunked prefill), otherwise
        the naive form runs over the T tokens alone (a prefill into an empty cache, where expanded K/V cost fewer
        FLOPs). With `page_table_BP` the cache is paged, (latent_NGL, rope_NGK) over N pages of G rows, and each
        sequence's pages are gathered into a contiguous [B, P*G, .] view to attend over. `layer`: the cache arrays
        are the whole [layers, ...] stacks of a scanned LayerStack and this layer's rows are written and read in
        place."""
        q_nope_BTHK, q_rope_BTHK = self.queries(x_BTD, cos, sin)
        latent_BTL, k_rope_BTK = self.latents(x_BTD, cos, sin)
        scale = self.cfg.softmax_scale
        max_logit_H = None  # each head's largest logit, reported by the naive path (QK-Clip reads it)
        if cache is not None and page_table_BP is not None:
            cache = write_paged_cache(cache, latent_BTL, k_rope_BTK, positions_BT, page_table_BP, layer)
        elif cache is not None:
            cache = write_cache(cache, latent_BTL, k_rope_BTK, positions_BT, layer)
        if cache is not None and attend_cache:
            if page_table_BP is not None:  # each sequence's pages gathered into contiguous rows
                view, view_layer = gather_pages(tuple(layer_of(c, layer) for c in cache), page_table_BP), None
            else:  # the (stacked) arrays as they are: the kernel reads a layer in place, a slice would be copied
                view, view_layer = cache, layer
            if self.cfg.attention_impl == "pallas" and x_BTD.shape[1] == 1:
                out_BTHK = _absorbed_decode_pallas(q_nope_BTHK, q_rope_BTHK, *view, self.w_uk[...], self.w_uv[...],
                                                   positions_BT, scale, view_layer)
            else:
                cache_latent_BSL, cache_rope_BSK = (layer_of(c, view_layer) for c in view)
                valid_BTS = jnp.arange(cache_latent_BSL.shape[1])[None, None, :] <= positions_BT[:, :, None]
                out_BTHK = absorbed_attention(q_nope_BTHK, q_rope_BTHK, cache_latent_BSL, cache_rope_BSK,
                                              self.w_uk[...], self.w_uv[...], valid_BTS, scale)
        elif self.cfg.attention_impl == "pallas":  # no max logit: the kernel keeps no per-head statistics
            out_BTHK = _naive_prefill_pallas(q_nope_BTHK, q_rope_BTHK, latent_BTL, k_rope_BTK, self.w_uk[...],
                                             self.w_uv[...], scale)
        elif cache is None and _sequence_split(*x_BTD.shape[:2]):
            # Each device holds a slice of every sequence's queries and needs all its keys: the absorbed form
            # gathers the latent rows (kv_lora_rank + rope values per token). The naive form expanded each
            # device's rows into per-head K and V and XLA all-reduced those (full K2.6 training on v5p-256, one
            # layer's forward and backward: 40 GB moved, 26 GB absorbed, for 11% more FLOPs).
            valid_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
            out_BTHK, max_logit_H = absorbed_attention(q_nope_BTHK, q_rope_BTHK, latent_BTL, k_rope_BTK,
                                                       self.w_uk[...], self.w_uv[...], valid_BTS, scale,
                                                       return_max_logit=True)
        else:
            out_BTHK, max_logit_H = causal_attention(q_nope_BTHK, q_rope_BTHK, latent_BTL, k_rope_BTK,
                                                     self.w_uk[...], self.w_uv[...], positions_BT, scale)
        return jnp.einsum("bthk,hkd->btd", out_BTHK, self.wo[...]), cache, max_logit_H


def layer_of(stack, layer):
    """Layer `layer` of a [layers, ...] stack (a dynamic slice); the array itself when layer is None."""
    return stack if layer is None else jax.lax.dynamic_index_in_dim(stack, layer, keepdims=False)


def write_cache(cache, latent_BTL, k_rope_BTK, positions_BT, layer=None):
    """Scatter this step's latent rows into the cache at their positions (positions past S are dropped).
    `layer`: the cache arrays are [layers, B, S, .] stacks and the rows go to that layer, in place. Under a
    mesh, each device writes its own rows (shard_map over the layout of sharding.rules.sequence_axes): with the
    layer index in front, XLA's partitioner all-gathered the whole cache stack for the scatter (v6e-256 decode
    plan: 1.5 GB a layer per chip)."""
    mesh = _kernel_mesh()
    if layer is None or mesh is None:
        return _write_rows(cache, latent_BTL, k_rope_BTK, positions_BT, layer, seq_axes=None)
    b, s, _ = _kernel_axes(mesh, cache[0].shape[-3], cache[0].shape[-2], 1)
    rows, stack = P(b), P(*(None,) * (cache[0].ndim - 3), b, s, None)
    return jax.shard_map(partial(_write_rows, seq_axes=s), mesh=mesh, in_specs=((stack, stack), rows, rows, rows, P()),
                         out_specs=(stack, stack), check_vma=False)(cache, latent_BTL, k_rope_BTK, positions_BT, layer)


def _write_rows(cache, latent_BTL, k_rope_BTK, positions_BT, layer, *, seq_axes):
    """write_cache on one device's rows: with `seq_axes` they are positions [i * S, (i + 1) * S) (i: the
    device's index along those axes) and other positions are dropped."""
    if seq_axes is not None:
        S = cache[0].shape[-2]
        local_BT = positions_BT - jax.lax.axis_index(seq_axes) * S
        positions_BT = jnp.where((local_BT >= 0) & (local_BT < S), local_BT, S)  # S: past the end, dropped
    one_sequence_on_cpu = positions_BT.shape[0] == 1 and _compiling_for_cpu()  # see _write_one_row_each
    if positions_BT.shape[1] == 1 and (seq_axes is not None or one_sequence_on_cpu):
        return tuple(_write_one_row_each(c, new, positions_BT[:, 0], layer)
                     for c, new in zip(cache, (latent_BTL, k_rope_BTK)))
    b_BT = jnp.arange(positions_BT.shape[0])[:, None]
    at = (b_BT, positions_BT) if layer is None else (layer, b_BT, positions_BT)
    return tuple(c.at[at].set(new.astype(c.dtype), mode="drop") for c, new in zip(cache, (latent_BTL, k_rope_BTK)))


def _write_one_row_each(cache_BSC, new_BTC, positions_B, layer):
    """Decode's cache write as one dynamic_update_slice per sequence; a position past the rows writes nothing.
    A scatter with the layer index in front is costed on TPU as a pass over the whole stack: the full K2.6
    v5p-256 decode plan, whose caches are split by position (all 64 sequences on every chip), went from 2.03x to
    1.18x ideal bytes with this. There the row is kept by a select (a position past the rows rewrites the row it
    clamps to with its own value). On CPU each write runs under a lax.cond instead: with one sequence, XLA's copy
    insertion copied the whole cache arrays in generate's loop after a scatter or a selected write, and under
    the cond they are written in place (bench-mini, batch 1: 15.5 -> 13.9 ms a step; with 4 sequences the
    scatter was as fast, so the single-device path keeps it there)."""
    S, C = cache_BSC.shape[-2:]
    lead = () if layer is None else (layer,)
    size = (*(1,) * len(lead), 1, 1, C)
    on_cpu = _compiling_for_cpu()
    for b in range(positions_B.shape[0]):
        start = (*lead, b, jnp.minimum(positions_B[b], S - 1), 0)
        row = new_BTC[b, 0].reshape(size).astype(cache_BSC.dtype)
        if on_cpu:
            cache_BSC = jax.lax.cond(positions_B[b] < S, partial(jax.lax.dynamic_update_slice, update=row,
                                                                 start_indices=start), lambda c: c, cache_BSC)
        else:
            old = jax.lax.dynamic_slice(cache_BSC, start, size)
            cache_BSC = jax.lax.dynamic_update_slice(cache_BSC, jnp.where(positions_B[b] < S, row, old), start)
    return cache_BSC


def write_paged_cache(pages, latent_BTL, k_rope_BTK, positions_BT, page_table_BP, layer=None):
    """`write_cache` for a paged cache: position p of sequence b goes to row p % G of page
    page_table_BP[b, p // G]. Positions past the table, and pages marked unused (index N, one past the last
    page), are dropped, so idle batch slots write nothing. `layer` as in write_cache."""
    N, G = pages[0].shape[-3:-1]
    page_BT = jnp.take_along_axis(page_table_BP, positions_BT // G, axis=1, mode="fill", fill_value=N)
    row_BT = positions_BT % G
    at = (page_BT, row_BT) if layer is None else (layer, page_BT, row_BT)
    return tuple(p.at[at].set(new.astype(p.dtype), mode="drop") for p, new in zip(pages, (latent_BTL, k_rope_BTK)))


def gather_pages(pages, page_table_BP):
    """Each sequence's pages in order as contiguous [B, P*G, .] arrays (unused pages read as zeros)."""
    def gather(pages_NGC):
        rows_BPGC = jnp.take(pages_NGC, page_table_BP, axis=0, mode="fill", fill_value=0)
        B, P, G, C = rows_BPGC.shape
        return rows_BPGC.reshape(B, P * G, C)
    return tuple(gather(p) for p in pages)
