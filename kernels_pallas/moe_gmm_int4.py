"""Grouped matmul over packed-INT4 expert weights, and the INT4 expert FFN, beside their definitions.

The weights stay exactly as kimi_jax/quant.py keeps them (the checkpoint's own packing, SPEC.md section 3): an
expert stack of logical shape [E, K, N] (x @ W layout) is a pair
  packed_ENW  int32 [E, N, W]   W = K/8 words; input k is nibble k % 8 of word k // 8, holding q + 8
  scale_ENG         [E, N, G]   G = K/group scales (bf16 for Kimi; f32 and f16 also accepted)
and W[e, k, n] = q * scale[e, n, k // group], the product rounded to the scale's dtype, then cast to the
compute dtype (the lhs's). The kernel dequantizes block by block in VMEM; nothing dequantized reaches HBM.

Same work-item grid as moe_gmm.py (group sizes by scalar prefetch, items (group, row tile) in row order,
idle items repeat the last real one, empty groups read nothing), with two rhs operands per weight: the packed
block [tn, tk/8] and its scales, read through their transpose [E, G, N] as a [tk/group, tn] block (a free
bitcast where XLA:TPU stores [E, N, G] N-minor, as it does for K2.6's 224- and 64-wide scale rows). A grid
step's block is dequantized piece by piece in a loop: a piece is `chunk` words (one 128-lane tile, 1024
inputs) by `sub` output columns. Its words are transposed to [chunk, sub] (one 32-bit transpose per 8
weights), each word row is repeated over 8 sublanes and sublane j keeps nibble j, which gives the weight rows
8g + j in their natural order as [chunk, 8, sub] = [8 * chunk, sub] (8 rows are one 32-bit sublane tile, so
the reshape is free); each scale row broadcasts over its group's rows the same way. Then one plain matmul
lhs [tm, 8 * chunk] x W [8 * chunk, sub]: no lane shuffles, no permuted lhs.

Exactness: XOR with 0x88888888 turns the offset-binary nibble q+8 into two's-complement q, and
(word << 28-4j) >> 28 (arithmetic) sign-extends nibble j. q * scale is exact in float32, then rounded once to
the scale's dtype by a float cast (float16, which Mosaic cannot convert to, is rounded on the bits), then cast
to the compute dtype: the same weights, bit for bit, as kimi_jax.quant.dequantize_int4. (Mosaic cannot load
float16 at all: float16 scales reach the kernel widened to float32, a copy per call.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._common import default_interpret, layer_stacks, pick_block, table_row
from kernels_pallas.moe_gmm import (combine_pairs, cover_tile, estimate, estimate_schedules, expected_routing,
                                    expert_ffn_reference, gmm_reference, item_k, item_lhs_tile, pick_tm, schedule,
                                    sort_pairs, store_rows)

PER_WORD = 8        # int4 values per int32 word
OFFSET = 8          # stored nibble = q + 8
LANES = 128
FLIP = np.int32(np.uint32(0x88888888).view(np.int32))  # XOR: offset-binary nibbles -> two's complement


@dataclasses.dataclass(frozen=True)
class GmmInt4Blocks:
    tm_min: int          # rows per tile, as moe_gmm.GmmBlocks. A weight costs 0.56 B here against 2 B in bf16,
    tm_max: int          # so a tile's MXU time passes its weight DMA at ~3.6x fewer rows (v5p ridge ~47 rows,
                         # v6e ~157, v5e ~67).
    tk: int              # contraction block target: a multiple of 1024 (128 packed words a lane tile) or all of
                         # K (K2.6: always all of K, 7168 or 2048)
    step_bytes: int      # packed + scale bytes of a grid step's rhs blocks: tn is the widest 128-multiple
                         # divisor of N within it (~7 MiB per step, as moe_gmm's bf16 blocks move)
    min_col_blocks: int  # at least this many column blocks (v5p: one per TensorCore of the parallel axis)
    chunk: int           # words per in-kernel piece: one 128-lane tile (1024 inputs)
    sub: int             # output columns per in-kernel piece (its temporaries: ~6 x 4 B x 8 x chunk x sub)


BLOCKS = {
    # K2.6 gate+up (K=7168, N=2048): tn=1024, 2 x 3.5 MiB packed + 2 x 0.44 MiB scales per step; down
    # (K=2048, N=7168): tn=3584 on v5p (two column blocks, one per TensorCore), 7168 on v6e.
    "v5p": GmmInt4Blocks(tm_min=32, tm_max=64, tk=8192, step_bytes=8 << 20, min_col_blocks=2, chunk=128, sub=512),
    "v6e": GmmInt4Blocks(tm_min=64, tm_max=128, tk=8192, step_bytes=8 << 20, min_col_blocks=1, chunk=128, sub=512),
    "v5e": GmmInt4Blocks(tm_min=32, tm_max=64, tk=8192, step_bytes=4 << 20, min_col_blocks=1, chunk=128, sub=512),
    "default": GmmInt4Blocks(tm_min=8, tm_max=128, tk=8192, step_bytes=1 << 20, min_col_blocks=1, chunk=128, sub=512),
}


# ----------------------------------------------------------------------------------------------- references

def dequantize_reference(packed_ENW, scale_ENG, dtype, group_size=32):
    """The definition of the weights: [E, K, N] in `dtype`, q * scale rounded once to the scale's dtype (as
    compressed-tensors and kimi_jax.quant.dequantize_int4 compute it). K = 8 W = group_size G."""
    E, N, W = packed_ENW.shape
    K = W * PER_WORD
    shifts_8 = jnp.arange(PER_WORD, dtype=jnp.uint32) * 4
    nibbles_ENW8 = (jax.lax.bitcast_convert_type(packed_ENW, jnp.uint32)[..., None] >> shifts_8) & 0xF
    q_ENK = nibbles_ENW8.astype(jnp.int32).reshape(E, N, K) - OFFSET
    product_ENK = q_ENK.astype(jnp.float32) * jnp.repeat(scale_ENG.astype(jnp.float32), group_size, axis=-1)[..., :K]
    info = jnp.finfo(scale_ENG.dtype)
    w_ENK = jax.lax.reduce_precision(product_ENK, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return jnp.swapaxes(w_ENK, 1, 2).astype(dtype)


def gmm_int4_reference(lhs_MK, rhs, group_sizes_E, group_size=32):
    """gmm_reference against the dequantized stack; rhs = (packed_ENW, scale_ENG)."""
    return gmm_reference(lhs_MK, dequantize_reference(*rhs, lhs_MK.dtype, group_size), group_sizes_E)


def gmm_swiglu_int4_reference(lhs_MK, w_gate, w_up, group_sizes_E, group_size=32):
    gate_MN = gmm_int4_reference(lhs_MK, w_gate, group_sizes_E, group_size).astype(jnp.float32)
    up_MN = gmm_int4_reference(lhs_MK, w_up, group_sizes_E, group_size).astype(jnp.float32)
    return (jax.nn.silu(gate_MN) * up_MN).astype(lhs_MK.dtype)


def expert_ffn_int4_reference(x_ND, weights_NX, experts_NX, w_gate, w_up, w_down, group_size=32):
    dense = [dequantize_reference(*w, x_ND.dtype, group_size) for w in (w_gate, w_up, w_down)]
    return expert_ffn_reference(x_ND, weights_NX, experts_NX, *dense)


# ------------------------------------------------------------------------------------------------- kernel

def _round_bits(x, dtype):
    """float32 x rounded to nearest even in `dtype` (kept as float32), on the bits: the same values as
    jax.lax.reduce_precision for finite normal results (all that q * scale produces). For float16 scales, which
    Mosaic cannot convert to."""
    info = jnp.finfo(dtype)
    drop = 23 - int(info.nmant)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    odd = jax.lax.shift_right_logical(bits, drop) & 1
    bits = (bits + ((1 << (drop - 1)) - 1) + odd) & np.int32(-(1 << drop))
    y = jax.lax.bitcast_convert_type(bits, jnp.float32)
    big = float(info.max)  # float16's narrower exponent: overflow goes to infinity
    return jnp.where(y > big, jnp.inf, jnp.where(y < -big, -jnp.inf, y))


def _dequantize(words_nc, scale_Sn, dtype, rounding):
    """The weights [8 * chunk, n] in `dtype` of a chunk of packed words [n, chunk] and its scales [S, n], each
    product q * scale rounded to `rounding` (the checkpoint's scale dtype) first.

    The words are transposed (one 32-bit XLU transpose per 8 weights), each word row is repeated over 8
    sublanes and shifted so that sublane j keeps nibble j: [chunk, 8, n] is input rows 8g + j, in order, and
    reshapes to [8 * chunk, n] for free (8 rows are one 32-bit sublane tile). The scales broadcast the same
    way over each group's rows."""
    chunk, n = words_nc.shape[1], words_nc.shape[0]
    S = scale_Sn.shape[0]
    flipped_c1n = (words_nc.T ^ FLIP)[:, None, :]
    shifts_181 = 28 - 4 * jax.lax.broadcasted_iota(jnp.int32, (1, PER_WORD, 1), 1)
    q_c8n = jax.lax.shift_right_arithmetic(jax.lax.shift_left(flipped_c1n, shifts_181), 28)
    q_Sgn = q_c8n.reshape(PER_WORD * chunk, n).reshape(S, PER_WORD * chunk // S, n).astype(jnp.float32)
    product_Sgn = q_Sgn * scale_Sn.astype(jnp.float32)[:, None, :]  # exact: |q| <= 8
    if rounding == jnp.float16:
        w_Sgn = _round_bits(product_Sgn, jnp.float16)
    else:  # the one rounding of compressed-tensors' product in the scale's dtype (none for float32)
        w_Sgn = product_Sgn.astype(rounding)
    return w_Sgn.reshape(PER_WORD * chunk, n).astype(dtype)


def _dequantized_dots(lhs_ref, packed_ref, scale_ref, acc_ref, chunk, sub, rounding):
    """acc += lhs @ W over this grid step's block: a loop over (chunk of words, sub columns) pieces, each
    dequantized in VMEM and multiplied as lhs [tm, 8 * chunk] x W [8 * chunk, sub]. The loop keeps Mosaic's
    unrolled code (and the live temporaries) one piece long."""
    tn, words = packed_ref.shape
    subs = tn // sub
    S = chunk * scale_ref.shape[0] // words  # scale rows per chunk

    def piece(it, carry):
        i, s = jax.lax.div(it, subs), jax.lax.rem(it, subs)
        c0, n0 = pl.multiple_of(i * chunk, chunk), pl.multiple_of(s * sub, sub)
        w_kn = _dequantize(packed_ref[pl.ds(n0, sub), pl.ds(c0, chunk)],
                           scale_ref[pl.ds(pl.multiple_of(i * S, S), S), pl.ds(n0, sub)], lhs_ref.dtype, rounding)
        lhs_mk = lhs_ref[:, pl.ds(pl.multiple_of(PER_WORD * c0, PER_WORD * chunk), PER_WORD * chunk)]
        acc_ref[:, pl.ds(n0, sub)] += jnp.dot(lhs_mk, w_kn, preferred_element_type=jnp.float32)
        return carry

    jax.lax.fori_loop(0, (words // chunk) * subs, piece, 0)


def _gmm_int4_kernel(starts_ref, ends_ref, group_ref, tile_ref, counts_ref, layer_ref, lhs_ref, *refs, num_rhs,
                     swiglu, tm, chunk, sub, rounding):
    packed_refs, scale_refs = refs[0:2 * num_rhs:2], refs[1:2 * num_rhs:2]
    out_ref, acc_refs = refs[2 * num_rhs], refs[2 * num_rhs + 1:]
    w, k = pl.program_id(1), pl.program_id(2)
    cover_tile(w, k, counts_ref, out_ref)

    @pl.when(w < counts_ref[1])
    def _work():
        @pl.when(k == 0)
        def _zero():
            for acc_ref in acc_refs:
                acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        for acc_ref, packed_ref, scale_ref in zip(acc_refs, packed_refs, scale_refs):
            _dequantized_dots(lhs_ref, packed_ref, scale_ref, acc_ref, chunk, sub, rounding)

        @pl.when(k == pl.num_programs(2) - 1)
        def _store():
            result_mn = jax.nn.silu(acc_refs[0][...]) * acc_refs[1][...] if swiglu else acc_refs[0][...]
            store_rows(result_mn, w, tm, starts_ref, ends_ref, group_ref, tile_ref, out_ref)


def _plan(M, K, N, E, num_rhs, tm, tk, tn, group):
    num_tiles, num_work, k_steps = M // tm, M // tm + min(E, M) - 1, K // tk
    grid = (N // tn, num_work, k_steps)

    # As moe_gmm._plan: the rhs operands are stacks of layers, read at the prefetched layer.
    in_specs = [pl.BlockSpec((tm, tk), lambda n, w, k, starts, ends, group_W, tile, counts, layer: (
        item_lhs_tile(w, tile, counts), item_k(w, k, counts, k_steps)))]
    in_specs += [pl.BlockSpec((None, None, tn, tk // PER_WORD),
                              lambda n, w, k, starts, ends, group_W, tile, counts, layer: (
                                  layer[0], group_W[w], n, item_k(w, k, counts, k_steps))),
                 pl.BlockSpec((None, None, tk // group, tn),
                              lambda n, w, k, starts, ends, group_W, tile, counts, layer: (
                                  layer[0], group_W[w], item_k(w, k, counts, k_steps), n))] * num_rhs
    out_spec = pl.BlockSpec((tm, tn), lambda n, w, k, starts, ends, group_W, tile, counts, layer: (tile[w], n))
    return num_tiles, num_work, grid, in_specs, out_spec


def _pick_tn(N, tk, group, scale_dtype, num_rhs, table):
    """The widest 128-multiple divisor of N whose rhs blocks fit table.step_bytes, with at least
    table.min_col_blocks column blocks when N allows; N itself when no 128-multiple divides it."""
    per_column = num_rhs * (tk // PER_WORD * 4 + tk // group * np.dtype(scale_dtype).itemsize)
    divisors = [tn for tn in range(N - N % LANES, 0, -LANES) if N % tn == 0]
    if not divisors:
        return N
    fitting = [tn for tn in divisors if tn * per_column <= table.step_bytes and N // tn >= table.min_col_blocks]
    return fitting[0] if fitting else divisors[-1]


def _blocks(M, K, N, E, dtype, scale_dtype, group, num_rhs, generation, tm, tk, tn, chunk, sub):
    table = table_row(BLOCKS, generation)
    tm = tm or pick_tm(M, E, dtype, table.tm_min, table.tm_max)
    tk = tk or pick_block(K, table.tk, PER_WORD * LANES)
    tn = tn or _pick_tn(N, tk, group, scale_dtype, num_rhs, table)
    chunk = chunk or pick_block(tk // PER_WORD, table.chunk, LANES)
    return tm, tk, tn, chunk, sub or pick_block(tn, table.sub, LANES)


def _check_shapes(K, W, G, group_size):
    if K != W * PER_WORD or K != G * group_size or group_size % PER_WORD:
        raise ValueError(f"INT4 grouped matmul: lhs has K={K} columns, the packed rhs {W} words ({W * PER_WORD} "
                         f"inputs) and {G} scale columns of {group_size} inputs; the kernel needs all three equal "
                         f"(in_features a multiple of the group size) and the group size a multiple of 8")


def _check_blocks(M, K, N, group, tm, tk, tn, chunk, sub):
    if (M % tm or K % tk or N % tn or tn % sub or tk % group or (tk // PER_WORD) % chunk
            or (PER_WORD * chunk) % group):
        raise ValueError(f"INT4 grouped matmul: blocks (tm={tm}, tk={tk}, tn={tn}) must divide (M={M}, K={K}, "
                         f"N={N}), sub={sub} columns must divide tn, chunk={chunk} words must divide tk/8, and "
                         f"tk and a chunk must hold whole groups of {group} inputs")


def cost_estimate(M, K, N, E, dtype, scale_dtype=jnp.bfloat16, *, group_size=32, num_rhs=1, swiglu=False,
                  generation=None, tm=None, tk=None, tn=None, routing=None) -> pl.CostEstimate:
    """As moe_gmm.cost_estimate (the worst case, or the expected `routing`), with the rhs bytes those of the
    packed words and the scales, never of dequantized weights."""
    tm, tk, tn, _, _ = _blocks(M, K, N, E, dtype, scale_dtype, group_size, num_rhs, generation, tm, tk, tn, 1, 1)
    num_tiles, num_work, grid, in_specs, out_spec = _plan(M, K, N, E, num_rhs, tm, tk, tn, group_size)
    return estimate(grid, in_specs + [out_spec], [dtype] + [jnp.int32, scale_dtype] * num_rhs + [dtype],
                    estimate_schedules(M, E, tm, num_tiles, num_work, routing),
                    flops_per_item=2 * tm * K * N * num_rhs,
                    transcendentals_per_item=tm * N if swiglu else 0,  # the sigmoid of silu
                    prefetched=4 * (2 * E + 2 * num_work + 3))


def _gmm_int4_call(lhs_MK, rhs_list, group_sizes_E, layer, *, group_size, swiglu, generation, tm, tk, tn, chunk,
                   sub, interpret, routing):
    M, K = lhs_MK.shape
    rhs_list, layer_1 = layer_stacks(rhs_list, layer)
    E, N, W = rhs_list[0][0].shape[1:]
    G = rhs_list[0][1].shape[-1]
    rounding = rhs_list[0][1].dtype
    # Mosaic cannot load float16 vectors: float16 scales are widened to float32 (exact) by XLA before the call,
    # a copy of the scale stacks each call (bf16, the Kimi checkpoints' dtype, is read as stored).
    scale_dtype = jnp.dtype(jnp.float32) if rounding == jnp.float16 else rounding
    dtype = lhs_MK.dtype
    num_rhs = len(rhs_list)
    group = group_size
    _check_shapes(K, W, G, group)
    tm, tk, tn, chunk, sub = _blocks(M, K, N, E, dtype, scale_dtype, group, num_rhs, generation, tm, tk, tn, chunk,
                                     sub)
    _check_blocks(M, K, N, group, tm, tk, tn, chunk, sub)
    num_tiles, num_work, grid, in_specs, out_spec = _plan(M, K, N, E, num_rhs, tm, tk, tn, group)
    itemsize, scale_size = np.dtype(dtype).itemsize, np.dtype(scale_dtype).itemsize
    blocks = (tm * tk + tm * tn) * itemsize + num_rhs * tn * (tk // PER_WORD * 4 + tk // group * scale_size)
    # double-buffered blocks, the accumulators, and a piece's temporaries (~6 float32 copies of its weights)
    vmem_bytes = 2 * blocks + num_rhs * tm * tn * 4 + 6 * PER_WORD * chunk * sub * 4
    # The scales are read through their transpose [Lyr, E, G, N]. XLA:TPU stores [.., N, G] with N minor when G
    # is not a multiple of 128 (K2.6: G = 224 and 64), so the transpose is a bitcast, and G on sublanes lets a
    # chunk's scales broadcast over its weight rows with no lane shuffle.
    operands = [x for packed, scale in rhs_list for x in (packed, jnp.swapaxes(scale.astype(scale_dtype), 2, 3))]
    return pl.pallas_call(
        functools.partial(_gmm_int4_kernel, num_rhs=num_rhs, swiglu=swiglu, tm=tm, chunk=chunk, sub=sub,
                          rounding=rounding),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=grid, in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32) for _ in rhs_list]),
        out_shape=jax.ShapeDtypeStruct((M, N), dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=int(min(max(32 << 20, 1.5 * vmem_bytes), 60 << 20))),
        cost_estimate=cost_estimate(M, K, N, E, dtype, scale_dtype, group_size=group, num_rhs=num_rhs,
                                    swiglu=swiglu, generation=generation, tm=tm, tk=tk, tn=tn, routing=routing),
        interpret=default_interpret(interpret),
        name="moe_gmm_int4_swiglu" if swiglu else "moe_gmm_int4",
    )(*schedule(group_sizes_E, num_tiles, tm, num_work), layer_1, lhs_MK, *operands)


BLOCK_ARGS = ("group_size", "generation", "tm", "tk", "tn", "chunk", "sub", "interpret", "routing")


@functools.partial(jax.jit, static_argnames=BLOCK_ARGS)
def gmm_int4(lhs_MK, rhs, group_sizes_E, *, layer=None, group_size=32, generation=None, tm=None, tk=None, tn=None,
             chunk=None, sub=None, interpret=None, routing=None):
    """Pallas twin of `gmm_int4_reference`; rhs = (packed_ENW, scale_ENG). Blocks default to the chip's row;
    `routing` and `layer` (both arrays then lead with a layers axis) as in moe_gmm.gmm."""
    return _gmm_int4_call(lhs_MK, [rhs], group_sizes_E, layer, group_size=group_size, swiglu=False,
                          generation=generation, tm=tm, tk=tk, tn=tn, chunk=chunk, sub=sub, interpret=interpret,
                          routing=routing)


@functools.partial(jax.jit, static_argnames=BLOCK_ARGS)
def gmm_swiglu_int4(lhs_MK, w_gate, w_up, group_sizes_E, *, layer=None, group_size=32, generation=None, tm=None,
                    tk=None, tn=None, chunk=None, sub=None, interpret=None, routing=None):
    """Pallas twin of `gmm_swiglu_int4_reference`: both projections from one read of each row tile."""
    return _gmm_int4_call(lhs_MK, [w_gate, w_up], group_sizes_E, layer, group_size=group_size, swiglu=True,
                          generation=generation, tm=tm, tk=tk, tn=tn, chunk=chunk, sub=sub, interpret=interpret,
                          routing=routing)


@functools.partial(jax.jit, static_argnames=("group_size", "generation", "tm", "interpret", "expected_pairs",
                                             "expected_experts"))
def expert_ffn_int4(x_ND, weights_NX, experts_NX, w_gate, w_up, w_down, *, layer=None, group_size=32,
                    generation=None, tm=None, interpret=None, expected_pairs=None, expected_experts=None):
    """Pallas twin of `expert_ffn_int4_reference` (moe_gmm.expert_ffn with packed weights): each w_* is
    (packed_ENW, scale_ENG) of the logical stacks [E, D, F], [E, D, F], [E, F, D]. Pairs with expert id >= E
    contribute zero; `expected_pairs` / `expected_experts` and `layer` as in moe_gmm.expert_ffn."""
    N, D = x_ND.shape
    X = experts_NX.shape[1]
    E = w_gate[0].shape[-3]
    P = N * X
    table = table_row(BLOCKS, generation)
    tm = tm or pick_tm(P, E, x_ND.dtype, table.tm_min, table.tm_max)
    M = -(-P // tm) * tm
    # Padding rows (any token) lie past every group, so the kernels leave them zero and the combine skips them.
    x_MD, sizes_E, order_P = sort_pairs(x_ND, experts_NX, E, M)
    routing = expected_routing(expected_pairs, expected_experts, E, P)
    h_MF = gmm_swiglu_int4(x_MD, w_gate, w_up, sizes_E, layer=layer, group_size=group_size, generation=generation,
                           tm=tm, interpret=interpret, routing=routing)
    y_MD = gmm_int4(h_MF, w_down, sizes_E, layer=layer, group_size=group_size, generation=generation, tm=tm,
                    interpret=interpret, routing=routing)
    return combine_pairs(y_MD, order_P, weights_NX, x_ND.dtype)
