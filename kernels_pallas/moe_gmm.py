"""Grouped matmul for the routed experts, and the expert FFN built on it, beside their definitions.

Rows of `lhs` are sorted by expert: group g owns rows [ends[g] - sizes[g], ends[g]). The grid walks
"work items": one per (group, row tile) that intersect, in row order, so a tile shared by two groups is
visited once per group and each visit stores only its own rows. Empty groups get no work item (their
weights are never read); the item list is built from the group sizes (scalar prefetch) and padded to a
static bound, tiles_m + min(E, M) - 1, with idle items that repeat the last real one (no DMA, no work).
The first visit of a tile zeroes the rows no group owns (the padding past sum(sizes)); tiles that no group
reaches get "cover" items that only write zeros: they fetch no block (an expert-parallel receive buffer is
mostly such rows at decode, sized for the worst case).

expert_ffn: (token, expert) pairs sorted by expert, gate and up projections in one fused pass
(silu(x @ w_gate) * (x @ w_up), reading each row tile once), the down projection, then the combine back
to token order (each token sums its X rows, weighted); both permutations are one-hot matmuls for up to
ONE_HOT_MAX_TOKENS tokens (decode), row gathers above. The packed-INT4 variant (kimi_jax/quant.py's format,
dequantized in VMEM) is moe_gmm_int4.py, on the same schedule and epilogue.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._common import (LAYER_0, block_bytes, default_interpret, eager, layer_stacks, pick_block,
                                    pipelined_copies, table_row)


@dataclasses.dataclass(frozen=True)
class GmmBlocks:
    tm_min: int  # rows per tile: the next power of two above the mean rows per expert, clamped to
    tm_max: int  # [tm_min, tm_max]. At decode (~1 row per expert) a larger tile leaves fewer groups split
                 # across two tiles (each split reads that expert's weights twice); above tm_max the MXU
                 # time of a tile would pass its weight DMA time (v5p ridge ~166 FLOP/B, v6e ~560).
    tk: int      # contraction block target (the largest 128-multiple divisor of K not above it)
    tn: int      # output-column block target


BLOCKS = {
    # gate+up at K2.6: rhs blocks 1792 x 1024 bf16 = 3.5 MiB each, two of them double-buffered: ~15 MiB VMEM,
    # ~7 MiB of weights per grid step against a ~0.35 us step overhead.
    "v5p": GmmBlocks(tm_min=64, tm_max=128, tk=2048, tn=1024),
    "v6e": GmmBlocks(tm_min=64, tm_max=256, tk=2048, tn=1024),
    "v5e": GmmBlocks(tm_min=64, tm_max=128, tk=2048, tn=512),
    "default": GmmBlocks(tm_min=8, tm_max=128, tk=512, tn=512),
}


# ----------------------------------------------------------------------------------------------- references

def gmm_reference(lhs_MK, rhs_EKN, group_sizes_E):
    """The definition: row m of group g is lhs[m] @ rhs[g]; rows past sum(group_sizes) are zero."""
    M = lhs_MK.shape[0]
    ends_E = jnp.cumsum(group_sizes_E)
    rows_M = jnp.arange(M)
    member_ME = (rows_M[:, None] >= (ends_E - group_sizes_E)[None, :]) & (rows_M[:, None] < ends_E[None, :])
    out_MN = jnp.einsum("me,mk,ekn->mn", member_ME.astype(jnp.float32), lhs_MK.astype(jnp.float32),
                        rhs_EKN.astype(jnp.float32))
    return out_MN.astype(lhs_MK.dtype)


def gmm_swiglu_reference(lhs_MK, w_gate_EKN, w_up_EKN, group_sizes_E):
    """silu(lhs @ w_gate[g]) * (lhs @ w_up[g]) per row of group g."""
    gate_MN = gmm_reference(lhs_MK, w_gate_EKN, group_sizes_E).astype(jnp.float32)
    up_MN = gmm_reference(lhs_MK, w_up_EKN, group_sizes_E).astype(jnp.float32)
    return (jax.nn.silu(gate_MN) * up_MN).astype(lhs_MK.dtype)


def expert_ffn_reference(x_ND, weights_NX, experts_NX, w_gate_EDF, w_up_EDF, w_down_EFD):
    """The definition: each token through each of its X experts, weighted by its routing weight, summed."""
    f32 = jnp.float32
    x32_ND = x_ND.astype(f32)
    h_NXF = (jax.nn.silu(jnp.einsum("nd,nxdf->nxf", x32_ND, w_gate_EDF[experts_NX].astype(f32)))
             * jnp.einsum("nd,nxdf->nxf", x32_ND, w_up_EDF[experts_NX].astype(f32)))
    y_NXD = jnp.einsum("nxf,nxfd->nxd", h_NXF, w_down_EFD[experts_NX].astype(f32))
    return jnp.einsum("nxd,nx->nd", y_NXD, weights_NX.astype(f32)).astype(x_ND.dtype)


# ------------------------------------------------------------------------------------------------- kernel

def schedule(group_sizes_E, num_tiles: int, tm: int, num_work: int):
    """Work items (group, row tile) in row order, padded to num_work. Returns starts_E, ends_E, group_W,
    tile_W, counts_2 = [real items, group items] (int32): items past the groups' own ("cover" items) zero the
    tiles no group reaches (rows past sum(sizes)), under the last group so nothing is fetched again; idle items
    past the real ones repeat the last."""
    E = group_sizes_E.shape[0]
    sizes_E = group_sizes_E.astype(jnp.int32)
    ends_E = jnp.cumsum(sizes_E)
    starts_E = ends_E - sizes_E
    first_E = jax.lax.div(starts_E, tm)
    count_E = jnp.where(sizes_E > 0, jax.lax.div(jnp.maximum(ends_E - 1, 0), tm) - first_E + 1, 0)
    cum_E = jnp.cumsum(count_E)
    group_items = cum_E[-1]
    covered = jax.lax.div(ends_E[-1] + tm - 1, tm)
    real = group_items + num_tiles - covered
    w_W = jnp.arange(num_work, dtype=jnp.int32)
    g_W = jnp.minimum(jnp.searchsorted(cum_E, w_W, side="right"), E - 1).astype(jnp.int32)
    last_group = g_W[jnp.maximum(group_items - 1, 0)]
    is_group_item_W = w_W < group_items
    tile_W = jnp.where(is_group_item_W, first_E[g_W] + w_W - (cum_E[g_W] - count_E[g_W]),
                       covered + w_W - group_items)
    tile_W = jnp.where(w_W < real, tile_W, num_tiles - 1)
    group_W = jnp.where(is_group_item_W, g_W, last_group)
    return (starts_E, ends_E, group_W, tile_W.astype(jnp.int32),
            jnp.stack([real, group_items]).astype(jnp.int32))


def item_k(w, k, counts, k_steps: int):
    """The contraction block of work item w at step k: cover and idle items stay on the last group item's
    last block, so they fetch nothing."""
    return jnp.where(w < counts[1], k, k_steps - 1)


def item_lhs_tile(w, tile, counts):
    """The lhs row tile of work item w: cover and idle items keep the last group item's tile (no fetch)."""
    return tile[jnp.maximum(jnp.minimum(w, counts[1] - 1), 0)]


def cover_tile(w, k, counts, out_ref):
    """A cover item (a tile no group reaches) writes zeros: those rows belong to no group."""
    @pl.when((w >= counts[1]) & (w < counts[0]) & (k == 0))
    def _zero():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


def _gmm_kernel(starts_ref, ends_ref, group_ref, tile_ref, counts_ref, layer_ref, lhs_ref, *refs, num_rhs, swiglu,
                tm):
    rhs_refs, out_ref, acc_refs = refs[:num_rhs], refs[num_rhs], refs[num_rhs + 1:]
    w, k = pl.program_id(1), pl.program_id(2)
    cover_tile(w, k, counts_ref, out_ref)

    @pl.when(w < counts_ref[1])
    def _work():
        @pl.when(k == 0)
        def _zero():
            for acc_ref in acc_refs:
                acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        lhs_mk = lhs_ref[...]
        for acc_ref, rhs_ref in zip(acc_refs, rhs_refs):
            acc_ref[...] += jnp.dot(lhs_mk, rhs_ref[...], preferred_element_type=jnp.float32)

        @pl.when(k == pl.num_programs(2) - 1)
        def _store():
            result_mn = jax.nn.silu(acc_refs[0][...]) * acc_refs[1][...] if swiglu else acc_refs[0][...]
            store_rows(result_mn, w, tm, starts_ref, ends_ref, group_ref, tile_ref, out_ref)


def store_rows(result_mn, w, tm, starts_ref, ends_ref, group_ref, tile_ref, out_ref):
    """Work item w's epilogue: writes the rows of its tile that its group owns, keeping the others."""
    g, tile = group_ref[w], tile_ref[w]
    rows_m1 = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine_m1 = (rows_m1 >= starts_ref[g]) & (rows_m1 < ends_ref[g])
    # Consecutive items of one tile share the resident output block; its first visit starts from zeros
    # (the uninitialised VMEM block would otherwise leak into rows that no group owns).
    first_visit = (w == 0) | (tile_ref[jnp.maximum(w - 1, 0)] != tile)
    kept_mn = jnp.where(first_visit, jnp.zeros_like(result_mn), out_ref[...].astype(jnp.float32))
    out_ref[...] = jnp.where(mine_m1, result_mn, kept_mn).astype(out_ref.dtype)


def _plan(M, K, N, E, num_rhs, tm, tk, tn):
    num_tiles, num_work, k_steps = M // tm, M // tm + min(E, M) - 1, K // tk
    grid = (N // tn, num_work, k_steps)

    # Index maps get the grid point (n, w, k) and the scalar-prefetch operands of `schedule` (+ the layer).
    in_specs = [pl.BlockSpec((tm, tk), lambda n, w, k, starts, ends, group, tile, counts, layer: (
        item_lhs_tile(w, tile, counts), item_k(w, k, counts, k_steps)))]
    in_specs += [pl.BlockSpec((None, None, tk, tn), lambda n, w, k, starts, ends, group, tile, counts, layer: (
        layer[0], group[w], item_k(w, k, counts, k_steps), n))] * num_rhs
    out_spec = pl.BlockSpec((tm, tn), lambda n, w, k, starts, ends, group, tile, counts, layer: (tile[w], n))
    return num_tiles, num_work, grid, in_specs, out_spec


def pick_tm(M, E, dtype, tm_min, tm_max):
    """Rows per tile: the next power of two above the mean rows per group, clamped to [tm_min, tm_max] and to
    at least one packed sublane tile of `dtype`."""
    sublanes = 8 * 4 // np.dtype(dtype).itemsize
    mean = max(1, -(-M // E))
    return min(tm_max, max(tm_min, sublanes, 1 << (mean - 1).bit_length()))


def _blocks(M, K, N, E, dtype, generation, tm, tk, tn):
    table = table_row(BLOCKS, generation)
    tm = tm or pick_tm(M, E, dtype, table.tm_min, table.tm_max)
    return tm, tk or pick_block(K, table.tk, 128), tn or pick_block(N, table.tn, 128)


def estimate_schedules(M: int, E: int, tm: int, num_tiles: int, num_work: int, routing=None):
    """The scalar-prefetch values a CostEstimate is counted on, as [(weight, prefetch operands, group items)].

    routing=None: the worst case, one schedule with every work item a group item in a new group (all groups
    non-empty, every group boundary inside a tile: the most the grid can move).
    routing=(rows, groups): the expected case, `rows` real rows (the rest past every group) spread evenly over
    `groups` non-empty groups; a fractional `groups` (an expectation) weighs the schedules of its floor and
    ceiling, so the estimate is linear in it. Callers that know their routing statistics pass them (the model's
    MoE: kimi_jax.moe.experts_pallas)."""
    if routing is None:
        w_W = np.arange(num_work)
        return [(1.0, (np.zeros(E, np.int32), np.zeros(E, np.int32), w_W, np.minimum(w_W, num_tiles - 1),
                       np.array([num_work, num_work]), LAYER_0), num_work)]
    rows = int(min(M, max(0, round(routing[0]))))
    groups = min(float(routing[1]), E, rows)
    low = int(np.floor(groups))
    out = []
    for g, weight in ((low, 1.0 - (groups - low)), (low + 1, groups - low)):
        if weight <= 0:
            continue
        sizes_E = np.zeros(E, np.int32)
        if g:
            sizes_E[np.arange(g) * E // g] = np.diff(np.arange(g + 1) * rows // g)
        prefetch = eager(lambda: tuple(np.asarray(a) for a in schedule(jnp.asarray(sizes_E), num_tiles, tm,
                                                                        num_work)))
        out.append((weight, (*prefetch, LAYER_0), int(prefetch[-1][1])))
    return out


def estimate(grid, specs, dtypes, schedules, flops_per_item: int, transcendentals_per_item: int,
             prefetched: int) -> pl.CostEstimate:
    """A grouped matmul's CostEstimate over `estimate_schedules`: bytes counted block by block from the grid
    and the index maps (`pipelined_copies`), FLOPs for the group items (cover and idle items compute
    nothing)."""
    moved = flops = transcendentals = 0.0
    for weight, prefetch, items in schedules:
        moved += weight * sum(pipelined_copies(grid, spec.index_map, *prefetch) * block_bytes(spec.block_shape, d)
                              for spec, d in zip(specs, dtypes))
        flops += weight * items * flops_per_item
        transcendentals += weight * items * transcendentals_per_item
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                           bytes_accessed=int(moved) + prefetched)


def cost_estimate(M, K, N, E, dtype, *, num_rhs=1, swiglu=False, generation=None, tm=None, tk=None,
                  tn=None, routing=None) -> pl.CostEstimate:
    """FLOPs and bytes of the grid, by default in the worst case (every work item real and each one switching
    group); with routing=(rows, groups) for that expected occupancy (see `estimate_schedules`). Fewer
    non-empty groups, boundaries on tile edges or rows past the groups move less."""
    tm, tk, tn = _blocks(M, K, N, E, dtype, generation, tm, tk, tn)
    num_tiles, num_work, grid, in_specs, out_spec = _plan(M, K, N, E, num_rhs, tm, tk, tn)
    return estimate(grid, in_specs + [out_spec], [dtype] * (len(in_specs) + 1),
                    estimate_schedules(M, E, tm, num_tiles, num_work, routing),
                    flops_per_item=2 * tm * K * N * num_rhs,
                    transcendentals_per_item=tm * N if swiglu else 0,  # the sigmoid of silu
                    prefetched=4 * (2 * E + 2 * num_work + 3))


def _gmm_call(lhs_MK, rhs_list, group_sizes_E, layer, *, swiglu, generation, tm, tk, tn, interpret, routing):
    M, K = lhs_MK.shape
    rhs_list, layer_1 = layer_stacks(rhs_list, layer)
    E, _, N = rhs_list[0].shape[1:]
    dtype = lhs_MK.dtype
    tm, tk, tn = _blocks(M, K, N, E, dtype, generation, tm, tk, tn)
    if M % tm or K % tk or N % tn:
        raise ValueError(f"grouped matmul: blocks (tm={tm}, tk={tk}, tn={tn}) must divide (M={M}, K={K}, N={N})")
    num_tiles, num_work, grid, in_specs, out_spec = _plan(M, K, N, E, len(rhs_list), tm, tk, tn)
    itemsize = np.dtype(dtype).itemsize
    vmem_bytes = (2 * (tm * tk + len(rhs_list) * tk * tn + tm * tn) * itemsize + len(rhs_list) * tm * tn * 4)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, num_rhs=len(rhs_list), swiglu=swiglu, tm=tm),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=grid, in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32) for _ in rhs_list]),
        out_shape=jax.ShapeDtypeStruct((M, N), dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            # double-buffered blocks plus accumulators, with headroom; v5p has 64 MiB of VMEM per core
            vmem_limit_bytes=int(min(max(32 << 20, 1.5 * vmem_bytes), 60 << 20))),
        cost_estimate=cost_estimate(M, K, N, E, dtype, num_rhs=len(rhs_list), swiglu=swiglu, tm=tm, tk=tk,
                                    tn=tn, generation=generation, routing=routing),
        interpret=default_interpret(interpret),
        name="moe_gmm_swiglu" if swiglu else "moe_gmm",
    )(*schedule(group_sizes_E, num_tiles, tm, num_work), layer_1, lhs_MK, *[r.astype(dtype) for r in rhs_list])


GMM_ARGS = ("generation", "tm", "tk", "tn", "interpret", "routing")


@functools.partial(jax.jit, static_argnames=GMM_ARGS)
def gmm(lhs_MK, rhs_EKN, group_sizes_E, *, layer=None, generation=None, tm=None, tk=None, tn=None, interpret=None,
        routing=None):
    """Pallas twin of `gmm_reference`. Blocks default to the chip's table row; tm must divide M. `routing`:
    the expected (rows, non-empty groups) the CostEstimate assumes (default: the worst case). `layer`: rhs is
    a stack of layers [Lyr, E, K, N] and this (int32 scalar, may be traced) is the one to use, read in place
    (see `_common.layer_stacks`); the result is gmm_reference(lhs, rhs[layer], group_sizes)."""
    return _gmm_call(lhs_MK, [rhs_EKN], group_sizes_E, layer, swiglu=False, generation=generation, tm=tm, tk=tk,
                     tn=tn, interpret=interpret, routing=routing)


@functools.partial(jax.jit, static_argnames=GMM_ARGS)
def gmm_swiglu(lhs_MK, w_gate_EKN, w_up_EKN, group_sizes_E, *, layer=None, generation=None, tm=None, tk=None,
               tn=None, interpret=None, routing=None):
    """Pallas twin of `gmm_swiglu_reference`: both projections from one read of each row tile (`layer` as in
    `gmm`)."""
    return _gmm_call(lhs_MK, [w_gate_EKN, w_up_EKN], group_sizes_E, layer, swiglu=True, generation=generation,
                     tm=tm, tk=tk, tn=tn, interpret=interpret, routing=routing)


def expected_routing(num_pairs: float, experts_hit: float | None, E: int, P: int):
    """The (rows, non-empty groups) of an expert FFN call for its CostEstimate: None (the worst case) unless
    the caller gave the expected distinct experts hit; rows default to all P pairs."""
    if experts_hit is None:
        return None
    return (float(min(P, num_pairs if num_pairs is not None else P)), float(min(E, experts_hit)))


# Tokens up to which expert_ffn permutes rows by one-hot matmuls instead of row gathers. On TPU a gathered row
# reads whole (8, 128) tiles, 16 * D bytes for a bf16 row of D, and cost_analysis counts it so (a take of 512
# rows out of [64, 7168] is 84 MB on v5p, for 7 MB of rows); the one-hot matmul does 2 * N * D FLOPs per row
# instead. At v5p's ~166 FLOP per HBM byte (v6e ~560) the matmul is cheaper while N is below ~1300 (~4500).
ONE_HOT_MAX_TOKENS = 1024


def _sorted_tokens(order_P, X: int, M: int, padding: int):
    """The token of each of the M sorted rows (pair order_P[m] belongs to token order_P[m] // X); `padding` for
    the rows past the P pairs."""
    return jnp.concatenate([order_P // X, jnp.full((M - order_P.shape[0],), padding, order_P.dtype)])


def sort_pairs(x_ND, experts_NX, E: int, M: int):
    """The (token, expert) pairs sorted by expert, as M rows (M >= N*X; padding rows past every group):
    x_MD (row m holds the token of the m-th pair), sizes_E, and order_P (the pair at each sorted row).
    Pairs with expert id >= E sort past every group."""
    N, X = experts_NX.shape
    P = N * X
    expert_P = experts_NX.reshape(P).astype(jnp.int32)
    order_P = jnp.argsort(expert_P, stable=True)
    sizes_E = jnp.bincount(expert_P, length=E).astype(jnp.int32)
    token_M = _sorted_tokens(order_P, X, M, 0)
    if N <= ONE_HOT_MAX_TOKENS:
        one_hot_MN = (token_M[:, None] == jnp.arange(N)[None, :]).astype(x_ND.dtype)
        x_MD = jnp.dot(one_hot_MN, x_ND, precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32).astype(x_ND.dtype)  # exact: one 1.0 per row
    else:
        x_MD = jnp.take(x_ND, token_M, axis=0)
    return x_MD, sizes_E, order_P


def combine_pairs(y_MD, order_P, weights_NX, dtype):
    """Each token's sum of its pairs' rows (sorted as `sort_pairs` left them), weighted, in float32."""
    N, X = weights_NX.shape
    P, M = N * X, y_MD.shape[0]
    weights_NX = weights_NX.astype(jnp.float32)
    if N <= ONE_HOT_MAX_TOKENS:
        token_M = _sorted_tokens(order_P, X, M, N)  # padding rows: no token
        weight_M = jnp.concatenate([weights_NX.reshape(P)[order_P], jnp.zeros((M - P,), jnp.float32)])
        combine_NM = jnp.where(jnp.arange(N)[:, None] == token_M[None, :], weight_M[None, :], 0.0)
        out_ND = jnp.dot(combine_NM, y_MD.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    else:
        rank_P = jnp.zeros((P,), jnp.int32).at[order_P].set(jnp.arange(P, dtype=jnp.int32))  # sorted row of p
        y_NXD = jnp.take(y_MD, rank_P, axis=0).reshape(N, X, -1)
        out_ND = jnp.einsum("nxd,nx->nd", y_NXD.astype(jnp.float32), weights_NX)
    return out_ND.astype(dtype)


@functools.partial(jax.jit, static_argnames=("generation", "tm", "interpret", "expected_pairs", "expected_experts"))
def expert_ffn(x_ND, weights_NX, experts_NX, w_gate_EDF, w_up_EDF, w_down_EFD, *, layer=None, generation=None,
               tm=None, interpret=None, expected_pairs=None, expected_experts=None):
    """Pallas twin of `expert_ffn_reference`: sort the pairs by expert, two grouped matmuls, combine.
    Pairs whose expert id is >= E sort past every group and contribute zero. `expected_pairs` (real pairs,
    default all) and `expected_experts` (distinct experts they hit) make the CostEstimates those of that
    expected routing instead of the worst case. `layer`: the weights are stacks of layers [Lyr, E, ...] and
    this one is used, read in place (as in `gmm`)."""
    N, D = x_ND.shape
    X = experts_NX.shape[1]
    E = w_gate_EDF.shape[-3]
    P = N * X
    tm, _, _ = _blocks(P, D, D, E, x_ND.dtype, generation, tm, None, None)
    M = -(-P // tm) * tm
    # Padding rows (any token) lie past every group, so the kernels leave them zero and the combine skips them.
    x_MD, sizes_E, order_P = sort_pairs(x_ND, experts_NX, E, M)
    routing = expected_routing(expected_pairs, expected_experts, E, P)
    h_MF = gmm_swiglu(x_MD, w_gate_EDF, w_up_EDF, sizes_E, layer=layer, generation=generation, tm=tm,
                      interpret=interpret, routing=routing)
    y_MD = gmm(h_MF, w_down_EFD, sizes_E, layer=layer, generation=generation, tm=tm, interpret=interpret,
               routing=routing)
    return combine_pairs(y_MD, order_P, weights_NX, x_ND.dtype)
