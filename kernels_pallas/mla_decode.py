"""Weight-absorbed MLA decode attention over the latent cache (flash-decoding), beside its definition.

One query token per sequence, already absorbed into latent space (q_nope @ w_uk, width L = kv_lora_rank),
attends over that sequence's first `lengths_B[b]` cache rows: the latent itself is both key and value, the
shared rope key adds its own score. The output stays in latent space [B, H, L]; the caller applies w_uv.

Cache layout: two arrays, latent [B, S, L] and rope [B, S, R], exactly as kimi_jax.cache keeps them (one
concatenated [B, S, L+R] array would have to be built by copying the whole cache every step, and its
576-wide rows pad to 640 lanes on TPU: 1.11x the bytes). The kernel reads the rope cache through its
transpose [B, R, S]: XLA:TPU already lays a [B, S, 64] array out with S minor (a 64-wide minor dimension
would waste half of each 128-lane tile), so the transpose is a free bitcast, the rope blocks are lane-dense
[R, block_s] tiles, and q_rope @ rope_RS is a plain matmul. Handing Mosaic the [B, S, R] view instead made
XLA copy the whole rope cache into row-major layout before every call (seen in the deviceless compile).

Lengths arrive by scalar prefetch. Blocks past a sequence's length map to the last valid block, so the
pipeline fetches nothing for them and the kernel skips them: a ragged batch reads only its real rows
(rounded up to the block). With num_splits > 1 the cache blocks are cut into partitions that run as
independent grid points (v5p's two TensorCores each take some) and are merged by log-sum-exp afterwards.
With return_lse the kernel also returns each head's log-sum-exp of its scores, so that partial results over
disjoint pieces of a cache (a cache split over devices by position) can be merged the same way
(`merge_partials`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._common import (LAYER_0, block_bytes, default_interpret, layer_stacks, pick_block,
                                    pipelined_copies, table_row)

LANES = 128  # row statistics (max, sum) are kept broadcast over one lane tile, the layout Mosaic keeps cheap


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    block_s: int     # cache rows per grid step: large enough that a step's DMA (block_s * 1152 B in bf16)
                     # outlasts the ~0.35 us per-step overhead, small enough that ragged tails waste little
    num_splits: int  # cache partitions attended independently then merged (one per TensorCore)


BLOCKS = {
    "v5p": DecodeBlocks(block_s=1024, num_splits=2),  # megacore: two TensorCores share the grid
    "v6e": DecodeBlocks(block_s=1024, num_splits=1),
    "v5e": DecodeBlocks(block_s=512, num_splits=1),
    "default": DecodeBlocks(block_s=512, num_splits=1),
}


def mla_decode_reference(q_latent_BHL, q_rope_BHR, cache_latent_BSL, cache_rope_BSR, lengths_B, scale):
    """The definition: softmax over the first lengths_B[b] cache rows (float32), weighted sum of latents.
    A sequence of length 0 gets a zero context."""
    S = cache_latent_BSL.shape[1]
    f32 = jnp.float32
    scores_BHS = (jnp.einsum("bhl,bsl->bhs", q_latent_BHL.astype(f32), cache_latent_BSL.astype(f32))
                  + jnp.einsum("bhr,bsr->bhs", q_rope_BHR.astype(f32), cache_rope_BSR.astype(f32))) * scale
    valid_B1S = (jnp.arange(S)[None, :] < lengths_B[:, None])[:, None, :]
    scores_BHS = jnp.where(valid_B1S, scores_BHS, -jnp.inf)
    max_BH1 = scores_BHS.max(axis=-1, keepdims=True)
    weights_BHS = jnp.exp(scores_BHS - jnp.where(jnp.isfinite(max_BH1), max_BH1, 0.0))
    total_BH1 = weights_BHS.sum(axis=-1, keepdims=True)
    probs_BHS = weights_BHS / jnp.where(total_BH1 > 0, total_BH1, 1.0)
    return jnp.einsum("bhs,bsl->bhl", probs_BHS, cache_latent_BSL.astype(f32)).astype(q_latent_BHL.dtype)


def _decode_kernel(lengths_ref, layer_ref, q_latent_ref, q_rope_ref, latent_ref, rope_ref, *refs, scale, block_s,
                   blocks_per_split, split):
    if split:
        out_ref, lse_ref, max_ref, sum_ref, acc_ref = refs
    else:
        out_ref, max_ref, sum_ref, acc_ref = refs
    b, p, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = lengths_ref[b]
    start = (p * blocks_per_split + j) * block_s

    @pl.when(j == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(start < length)  # a processed block always holds at least one valid row: the max stays finite
    def _attend():
        contract_last = (((1,), (1,)), ((), ()))
        latent_SL = latent_ref[...]
        scores_HS = (jax.lax.dot_general(q_latent_ref[...], latent_SL, contract_last,
                                         preferred_element_type=jnp.float32)
                     + jnp.dot(q_rope_ref[...], rope_ref[...], preferred_element_type=jnp.float32)) * scale
        valid_1S = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_s), 1) < length
        scores_HS = jnp.where(valid_1S, scores_HS, -jnp.inf)
        max_prev_HN = max_ref[...]
        max_next_HN = jnp.maximum(max_prev_HN, scores_HS.max(axis=1, keepdims=True))
        rescale_HN = jnp.exp(max_prev_HN - max_next_HN)
        probs_HS = jnp.exp(scores_HS - max_next_HN[:, :1])
        sum_ref[...] = rescale_HN * sum_ref[...] + probs_HS.sum(axis=1, keepdims=True)
        # Rows past the length get probability 0, but 0 * NaN is NaN: zero them, since the rows of a partial
        # last block (or a cache slot never written) are not guaranteed finite.
        valid_S1 = start + jax.lax.broadcasted_iota(jnp.int32, (block_s, 1), 0) < length
        latent_SL = jnp.where(valid_S1, latent_SL, jnp.zeros_like(latent_SL))
        acc_ref[...] = rescale_HN[:, :1] * acc_ref[...] + jnp.dot(
            probs_HS.astype(latent_SL.dtype), latent_SL, preferred_element_type=jnp.float32)
        max_ref[...] = max_next_HN

    @pl.when(j == blocks_per_split - 1)
    def _finish():
        sum_HN = sum_ref[...]
        context_HL = acc_ref[...] / jnp.where(sum_HN > 0, sum_HN, 1.0)[:, :1]  # length 0: zero context
        if split:
            out_ref[...] = context_HL
            lse_ref[...] = jnp.where(sum_HN > 0, max_ref[...] + jnp.log(sum_HN), -jnp.inf)
        else:
            out_ref[...] = context_HL.astype(out_ref.dtype)


def _merge_splits(context_BPHL, lse_BPHN):
    """Combine the per-partition results of one call (`merge_partials` over the partition axis). Returns the
    merged context [B, H, L] and log-sum-exp [B, H] (-inf where every partition is empty)."""
    over_splits = dict(axis=1, keepdims=True)
    context_B1HL, lse_B1H = merge_partials(context_BPHL, lse_BPHN[..., 0], lambda x: x.sum(**over_splits),
                                           lambda x: x.max(**over_splits), return_lse=True)
    return context_B1HL[:, 0], lse_B1H[:, 0]


def merge_partials(value_BH_, lse_BH, psum, pmax, *, return_lse=False):
    """Merge softmax-weighted results over disjoint key sets held elsewhere (one per device of a mesh axis):
    each piece's value (a context [B, H, ...] normalised over its own keys, or anything linear in it) weighs
    exp(lse - max lse) / sum of those. `psum` / `pmax` reduce over the pieces (jax.lax.psum / pmax over the
    axis inside shard_map). Pieces with no keys (lse -inf) weigh 0; a row with none anywhere stays 0.
    return_lse: also the merged log-sum-exp (-inf for a row with no keys anywhere)."""
    top_BH = pmax(lse_BH)
    top_BH = jnp.where(jnp.isfinite(top_BH), top_BH, 0.0)
    weight_BH = jnp.where(jnp.isfinite(lse_BH), jnp.exp(lse_BH - top_BH), 0.0)
    total_BH = psum(weight_BH)
    weight_BH_ = weight_BH.reshape(weight_BH.shape + (1,) * (value_BH_.ndim - weight_BH.ndim))
    merged = psum(weight_BH_ * value_BH_.astype(jnp.float32))
    safe_total_BH = jnp.where(total_BH > 0, total_BH, 1.0)
    merged = merged / safe_total_BH.reshape(total_BH.shape + (1,) * (merged.ndim - total_BH.ndim))
    if not return_lse:
        return merged
    return merged, jnp.where(total_BH > 0, top_BH + jnp.log(safe_total_BH), -jnp.inf)


def _plan(B, H, L, R, S, dtype, generation, block_s, num_splits, return_lse=False):
    blocks = table_row(BLOCKS, generation)
    bs = block_s or pick_block(S, blocks.block_s, LANES)  # the rope block's lane dimension
    if S % bs:
        raise ValueError(f"mla_decode: block_s={bs} must divide the cache length S={S}")
    num_blocks = S // bs
    splits = max(1, min(num_splits or blocks.num_splits, num_blocks))
    per_split = -(-num_blocks // splits)
    grid = (B, splits, per_split)

    # Index maps get the grid point (b, p, j) and the scalar-prefetch operands: lengths [B] and the layer [1]
    # of the cache stacks [Lyr, B, S, .] to read.
    def cache_block(b, p, j, lengths_B, layer):
        # The last block holding a valid row (lax.div: Mosaic lowers `//` through a sign op that needs a live TPU).
        last = jax.lax.div(jnp.maximum(lengths_B[b], 1) - 1, bs)
        return layer[0], b, jnp.minimum(p * per_split + j, last), 0

    def rope_block(b, p, j, lengths_B, layer):
        layer, b, s, _ = cache_block(b, p, j, lengths_B, layer)
        return layer, b, 0, s

    def per_sequence(b, p, j, lengths_B, layer):
        return b, 0, 0

    def per_split_block(b, p, j, lengths_B, layer):
        return b, p, 0, 0

    in_specs = [pl.BlockSpec((None, H, L), per_sequence), pl.BlockSpec((None, H, R), per_sequence),
                pl.BlockSpec((None, None, bs, L), cache_block), pl.BlockSpec((None, None, R, bs), rope_block)]
    if splits > 1 or return_lse:
        out_specs = [pl.BlockSpec((None, None, H, L), per_split_block),
                     pl.BlockSpec((None, None, H, LANES), per_split_block)]
        out_shape = [jax.ShapeDtypeStruct((B, splits, H, L), jnp.float32),
                     jax.ShapeDtypeStruct((B, splits, H, LANES), jnp.float32)]
    else:
        out_specs = [pl.BlockSpec((None, H, L), per_sequence)]
        out_shape = [jax.ShapeDtypeStruct((B, H, L), dtype)]
    return bs, num_blocks, splits, per_split, grid, in_specs, out_specs, out_shape


def cost_estimate(B, H, L, R, S, dtype, *, generation=None, block_s=None, num_splits=None,
                  return_lse=False) -> pl.CostEstimate:
    """FLOPs and bytes of one call with every sequence at the full length S (the most the grid can move;
    a ragged batch moves less). Bytes are counted block by block from the grid and the index maps."""
    bs, num_blocks, _, _, grid, in_specs, out_specs, out_shape = _plan(
        B, H, L, R, S, dtype, generation, block_s, num_splits, return_lse)
    full_B = np.full(B, S, np.int32)
    dtypes = [dtype] * 4 + [o.dtype for o in out_shape]
    moved = sum(pipelined_copies(grid, spec.index_map, full_B, LAYER_0) * block_bytes(spec.block_shape, dt)
                for spec, dt in zip(in_specs + out_specs, dtypes))
    steps = B * num_blocks  # blocks holding valid rows
    return pl.CostEstimate(
        flops=steps * 2 * H * bs * (2 * L + R),          # scores over L+R, then probs @ latent over L
        transcendentals=steps * H * (bs + LANES),        # exp of the scores and of the running-max rescale
        bytes_accessed=moved + full_B.nbytes + 4)        # + the prefetched lengths and layer


@functools.partial(jax.jit, static_argnames=("scale", "generation", "block_s", "num_splits", "interpret",
                                             "return_lse"))
def mla_decode(q_latent_BHL, q_rope_BHR, cache_latent_BSL, cache_rope_BSR, lengths_B, scale, *, layer=None,
               generation=None, block_s=None, num_splits=None, interpret=None, return_lse=False):
    """Pallas twin of `mla_decode_reference` (same arguments; lengths are clipped to [0, S]).
    `layer`: the caches are stacks of layers [Lyr, B, S, .] and this one (int32 scalar, may be traced) is
    attended, read in place (a layer sliced out of the stacks before the call would be copied first).
    `generation` picks the block table row (default: the current chip); `block_s` / `num_splits` override it;
    `interpret` is False on TPU, True or a `pltpu.InterpretParams` elsewhere (default: interpret off TPU).
    return_lse: returns (context [B, H, L] float32, log-sum-exp of the scores [B, H], -inf at length 0) for
    `merge_partials`."""
    (cache_latent_BSL, cache_rope_BSR), layer_1 = layer_stacks((cache_latent_BSL, cache_rope_BSR), layer)
    B, H, L = q_latent_BHL.shape
    R = q_rope_BHR.shape[-1]
    S = cache_latent_BSL.shape[2]
    dtype = cache_latent_BSL.dtype
    bs, _, splits, per_split, grid, in_specs, out_specs, out_shape = _plan(
        B, H, L, R, S, dtype, generation, block_s, num_splits, return_lse)
    kernel = functools.partial(_decode_kernel, scale=float(scale), block_s=bs, blocks_per_split=per_split,
                               split=splits > 1 or return_lse)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((H, LANES), jnp.float32), pltpu.VMEM((H, LANES), jnp.float32),
                            pltpu.VMEM((H, L), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost_estimate(B, H, L, R, S, dtype, generation=generation, block_s=bs,
                                    num_splits=splits, return_lse=return_lse),
        interpret=default_interpret(interpret),
        name="mla_decode",
    )(jnp.clip(lengths_B, 0, S).astype(jnp.int32), layer_1, q_latent_BHL.astype(dtype), q_rope_BHR.astype(dtype),
      cache_latent_BSL, jnp.swapaxes(cache_rope_BSR, 2, 3))
    if return_lse:
        return _merge_splits(*outs)
    if splits == 1:
        return outs[0].astype(q_latent_BHL.dtype)
    return _merge_splits(*outs)[0].astype(q_latent_BHL.dtype)
