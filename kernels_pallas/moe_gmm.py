"""Grouped matmul for the routed experts, and the expert FFN built on it, beside their definitions.

Rows of `lhs` are sorted by expert: group g owns rows [ends[g] - sizes[g], ends[g]). The grid walks
"work items": one per (group, row tile) that intersect, in row order, so a tile shared by two groups is
visited once per group and each visit stores only its own rows. Empty groups get no work item (their
weights are never read); the item list is built from the group sizes (scalar prefetch) and padded to a
static bound, tiles_m + min(E, M) - 1, with idle items that repeat the last real one (no DMA, no work).
The first visit of a tile zeroes the rows no group owns (the padding past sum(sizes)).

expert_ffn: (token, expert) pairs sorted by expert, gate and up projections in one fused pass
(silu(x @ w_gate) * (x @ w_up), reading each row tile once), the down projection, then the combine back
to token order (each token gathers its X rows, weighted). The packed-INT4 variant (kimi_jax/quant.py's format,
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

from kernels_pallas._common import block_bytes, default_interpret, pick_block, pipelined_copies, table_row


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
    tile_W, real_1 (int32): items past the groups' own cover the tiles no group reaches (rows past
    sum(sizes)), under the last group so its weights are not fetched again; idle items repeat the last."""
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
    return starts_E, ends_E, group_W, tile_W.astype(jnp.int32), real[None].astype(jnp.int32)


def _gmm_kernel(starts_ref, ends_ref, group_ref, tile_ref, real_ref, lhs_ref, *refs, num_rhs, swiglu, tm):
    rhs_refs, out_ref, acc_refs = refs[:num_rhs], refs[num_rhs], refs[num_rhs + 1:]
    w, k = pl.program_id(1), pl.program_id(2)

    @pl.when(w < real_ref[0])
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

    def k_block(w, k, real):  # idle items stay on the last item's last block: no DMA
        return jnp.where(w < real[0], k, k_steps - 1)

    in_specs = [pl.BlockSpec((tm, tk), lambda n, w, k, starts, ends, group, tile, real: (
        tile[w], k_block(w, k, real)))]
    in_specs += [pl.BlockSpec((None, tk, tn), lambda n, w, k, starts, ends, group, tile, real: (
        group[w], k_block(w, k, real), n))] * num_rhs
    out_spec = pl.BlockSpec((tm, tn), lambda n, w, k, starts, ends, group, tile, real: (tile[w], n))
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


def cost_estimate(M, K, N, E, dtype, *, num_rhs=1, swiglu=False, generation=None, tm=None, tk=None,
                  tn=None) -> pl.CostEstimate:
    """FLOPs and bytes of the static grid with every work item real and each one switching group (the most
    the grid can move: all groups non-empty, every group boundary inside a tile). Fewer non-empty groups or
    boundaries on tile edges move less. Bytes are counted block by block from the grid and the index maps."""
    tm, tk, tn = _blocks(M, K, N, E, dtype, generation, tm, tk, tn)
    num_tiles, num_work, grid, in_specs, out_spec = _plan(M, K, N, E, num_rhs, tm, tk, tn)
    w_W = np.arange(num_work)
    worst = (np.zeros(E, np.int32), np.zeros(E, np.int32), w_W, np.minimum(w_W, num_tiles - 1),
             np.array([num_work]))
    moved = sum(pipelined_copies(grid, spec.index_map, *worst) * block_bytes(spec.block_shape, dtype)
                for spec in in_specs + [out_spec])
    prefetched = 4 * (2 * E + 2 * num_work + 1)
    return pl.CostEstimate(
        flops=2 * num_work * tm * K * N * num_rhs,
        transcendentals=num_work * tm * N if swiglu else 0,  # the sigmoid of silu
        bytes_accessed=moved + prefetched)


def _gmm_call(lhs_MK, rhs_list, group_sizes_E, *, swiglu, generation, tm, tk, tn, interpret):
    M, K = lhs_MK.shape
    E, _, N = rhs_list[0].shape
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
            num_scalar_prefetch=5, grid=grid, in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32) for _ in rhs_list]),
        out_shape=jax.ShapeDtypeStruct((M, N), dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            # double-buffered blocks plus accumulators, with headroom; v5p has 64 MiB of VMEM per core
            vmem_limit_bytes=int(min(max(32 << 20, 1.5 * vmem_bytes), 60 << 20))),
        cost_estimate=cost_estimate(M, K, N, E, dtype, num_rhs=len(rhs_list), swiglu=swiglu, tm=tm, tk=tk,
                                    tn=tn, generation=generation),
        interpret=default_interpret(interpret),
        name="moe_gmm_swiglu" if swiglu else "moe_gmm",
    )(*schedule(group_sizes_E, num_tiles, tm, num_work), lhs_MK, *[r.astype(dtype) for r in rhs_list])


@functools.partial(jax.jit, static_argnames=("generation", "tm", "tk", "tn", "interpret"))
def gmm(lhs_MK, rhs_EKN, group_sizes_E, *, generation=None, tm=None, tk=None, tn=None, interpret=None):
    """Pallas twin of `gmm_reference`. Blocks default to the chip's table row; tm must divide M."""
    return _gmm_call(lhs_MK, [rhs_EKN], group_sizes_E, swiglu=False, generation=generation, tm=tm, tk=tk, tn=tn,
                     interpret=interpret)


@functools.partial(jax.jit, static_argnames=("generation", "tm", "tk", "tn", "interpret"))
def gmm_swiglu(lhs_MK, w_gate_EKN, w_up_EKN, group_sizes_E, *, generation=None, tm=None, tk=None, tn=None,
               interpret=None):
    """Pallas twin of `gmm_swiglu_reference`: both projections from one read of each row tile."""
    return _gmm_call(lhs_MK, [w_gate_EKN, w_up_EKN], group_sizes_E, swiglu=True, generation=generation, tm=tm,
                     tk=tk, tn=tn, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("generation", "tm", "interpret"))
def expert_ffn(x_ND, weights_NX, experts_NX, w_gate_EDF, w_up_EDF, w_down_EFD, *, generation=None, tm=None,
               interpret=None):
    """Pallas twin of `expert_ffn_reference`: sort the pairs by expert, two grouped matmuls, combine."""
    N, D = x_ND.shape
    X = experts_NX.shape[1]
    E = w_gate_EDF.shape[0]
    P = N * X
    tm, _, _ = _blocks(P, D, D, E, x_ND.dtype, generation, tm, None, None)
    M = -(-P // tm) * tm
    expert_P = experts_NX.reshape(P).astype(jnp.int32)
    order_P = jnp.argsort(expert_P, stable=True)
    sizes_E = jnp.bincount(expert_P, length=E).astype(jnp.int32)
    # Padding rows (any token) lie past every group, so the kernels leave them zero and the combine skips them.
    token_M = jnp.concatenate([order_P // X, jnp.zeros((M - P,), order_P.dtype)])
    x_MD = jnp.take(x_ND, token_M, axis=0)
    h_MF = gmm_swiglu(x_MD, w_gate_EDF, w_up_EDF, sizes_E, generation=generation, tm=tm, interpret=interpret)
    y_MD = gmm(h_MF, w_down_EFD, sizes_E, generation=generation, tm=tm, interpret=interpret)
    rank_P = jnp.zeros((P,), jnp.int32).at[order_P].set(jnp.arange(P, dtype=jnp.int32))  # sorted row of pair p
    y_NXD = jnp.take(y_MD, rank_P, axis=0).reshape(N, X, D)
    return jnp.einsum("nxd,nx->nd", y_NXD.astype(jnp.float32), weights_NX.astype(jnp.float32)).astype(x_ND.dtype)
