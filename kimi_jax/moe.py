"""Mixture of experts: the noaux_tc router and a dropless expert FFN that computes only the chosen experts.

The expert FFN sorts (token, expert) pairs by expert and walks them in tiles of `block` rows, each tile
belonging to one expert, so the work is proportional to the pairs, never to the number of experts
(jax.lax.ragged_dot lowers to a dense loop over all experts on CPU; SPEC.md section 7).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.moe_gmm import expert_ffn
from kernels_pallas.moe_gmm_int4 import expert_ffn_int4
from kimi_jax.config import KimiConfig
from kimi_jax.layers import RouterBias, param, swiglu
from kimi_jax.quant import Int4Param, Int4Weight, expert_matrix
from kimi_jax.views import is_views
from sharding.expert_parallel import experts_ragged, moe_expert_parallel
from sharding.plan import expected_expert_fraction


def route(x_ND, w_router_DE, bias_E, cfg: KimiConfig):
    """noaux_tc routing. Returns combine weights [N, X] (float32) and expert ids [N, X].

    Selection uses sigmoid scores plus the correction bias (group-limited when n_group > 1); the combine
    weights are the UNBIASED scores of the chosen experts, normalised, times routed_scaling_factor."""
    weights_NX, experts_NX, _ = route_with_scores(x_ND, w_router_DE, bias_E, cfg)
    return weights_NX, experts_NX


def route_with_scores(x_ND, w_router_DE, bias_E, cfg: KimiConfig):
    """`route`, plus the sigmoid scores of every expert [N, E] (for balance statistics)."""
    logits_NE = x_ND.astype(jnp.float32) @ w_router_DE.astype(jnp.float32)
    scores_NE = jax.nn.sigmoid(logits_NE)
    choice_NE = scores_NE + bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        N, E = choice_NE.shape
        grouped_NGE = choice_NE.reshape(N, cfg.n_group, E // cfg.n_group)
        group_score_NG = jax.lax.top_k(grouped_NGE, 2)[0].sum(-1)
        _, best_groups = jax.lax.top_k(group_score_NG, cfg.topk_group)
        keep_NG = jnp.zeros_like(group_score_NG, dtype=bool).at[jnp.arange(N)[:, None], best_groups].set(True)
        choice_NE = jnp.where(jnp.repeat(keep_NG, E // cfg.n_group, axis=1), choice_NE, -jnp.inf)
    _, experts_NX = jax.lax.top_k(choice_NE, cfg.num_experts_per_tok)
    weights_NX = jnp.take_along_axis(scores_NE, experts_NX, axis=1)
    if cfg.norm_topk_prob:
        weights_NX = weights_NX / (weights_NX.sum(-1, keepdims=True) + 1e-20)
    return weights_NX * cfg.routed_scaling_factor, experts_NX.astype(jnp.int32), scores_NE


UNROLLED_TILES = 64  # at most this many tiles run as a Python loop (see experts_grouped)


def default_block(num_pairs: int, num_experts: int) -> int:
    """Tile rows: about the mean pairs per expert (1 at decode, where a tile is one token's expert)."""
    mean = -(-num_pairs // num_experts)
    return int(min(256, 1 << (mean - 1).bit_length()))


def experts_reference(x_ND, weights_NX, experts_NX, w_gate_EDF, w_up_EDF, w_down_EFD):
    """The definition: each token through each of its chosen experts, weighted and summed. Gathers every
    pair's weights, so it is only for tests."""
    h_NXF = jax.nn.silu(jnp.einsum("nd,nxdf->nxf", x_ND, w_gate_EDF[experts_NX])) * jnp.einsum(
        "nd,nxdf->nxf", x_ND, w_up_EDF[experts_NX])
    y_NXD = jnp.einsum("nxf,nxfd->nxd", h_NXF, w_down_EFD[experts_NX])
    return jnp.einsum("nxd,nx->nd", y_NXD.astype(jnp.float32), weights_NX).astype(x_ND.dtype)


def experts_grouped(x_ND, weights_NX, experts_NX, w_gate_EDF, w_up_EDF, w_down_EFD, block: int | None = None):
    """Dropless grouped expert FFN: pairs sorted by expert, tiles of `block` rows, one expert per tile."""
    N, D = x_ND.shape
    X = experts_NX.shape[1]
    E = w_gate_EDF.shape[0]
    P = N * X
    bm = block or default_block(P, E)

    expert_P = experts_NX.reshape(P)
    order_P = jnp.argsort(expert_P, stable=True)
    token_P = order_P // X
    x_sorted_PD = jnp.concatenate([x_ND[token_P], jnp.zeros((bm, D), x_ND.dtype)])  # bm rows of slack

    # Tile schedule: tile t works on rows [row_start, row_start + row_count) of expert tile_expert.
    size_E = jnp.bincount(expert_P, length=E)
    start_E = jnp.cumsum(size_E) - size_E
    tiles_E = (size_E + bm - 1) // bm
    tiles_end_E = jnp.cumsum(tiles_E)
    max_tiles = P if bm == 1 else -(-P // bm) + min(E, P)
    t = jnp.arange(max_tiles)
    tile_expert = jnp.minimum(jnp.searchsorted(tiles_end_E, t, side="right"), E - 1)
    tile_index = t - (tiles_end_E - tiles_E)[tile_expert]
    row_start = start_E[tile_expert] + tile_index * bm
    row_count = jnp.where(t < tiles_end_E[-1], jnp.clip(size_E[tile_expert] - tile_index * bm, 0, bm), 0)

    # Per-expert arrays (kimi_jax.views, XLA:CPU): a tile picks its expert with lax.switch and reads it in
    # place; from a stack, a dynamic slice that XLA copies first.
    views = is_views(w_gate_EDF)
    branches = [lambda x_bD, e=e: swiglu(x_bD, w_gate_EDF[e], w_up_EDF[e], w_down_EFD[e]) for e in range(E)] \
        if views else None

    def tile_weights(i):
        # expert_matrix: a dense slice, or only this tile's expert dequantized when the stacks are INT4.
        return tuple(expert_matrix(w, tile_expert[i], x_ND.dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))

    def compute(i, y_PD, weights=None):
        r = row_start[i]
        x_bD = jax.lax.dynamic_slice_in_dim(x_sorted_PD, r, bm)
        y_bD = jax.lax.switch(tile_expert[i], branches, x_bD) if views else swiglu(x_bD, *weights)
        keep_b = jnp.arange(bm) < row_count[i]
        old_bD = jax.lax.dynamic_slice_in_dim(y_PD, r, bm)
        return jax.lax.dynamic_update_slice_in_dim(y_PD, jnp.where(keep_b[:, None], y_bD, old_bD), r, 0)

    y_PD = jnp.zeros_like(x_sorted_PD)
    if max_tiles <= UNROLLED_TILES and not views:
        # Few tiles (decode): a Python loop, so each expert matrix is one dynamic slice of the weights as given.
        # Inside a loop the weights become loop operands, and when they are a slice of a stacked-layers array
        # (the unrolled layer loop) XLA copies the layer's whole expert stack first (measured: 1.2 GB a step
        # on bench-mini).
        for i in range(max_tiles):
            y_PD = jax.lax.cond(row_count[i] > 0, lambda w, y, i=i: compute(i, y, w), lambda w, y: y,
                                tile_weights(i), y_PD)
    else:
        y_PD = jax.lax.fori_loop(0, max_tiles, lambda i, y: jax.lax.cond(
            row_count[i] > 0, lambda y: compute(i, y, None if views else tile_weights(i)), lambda y: y, y), y_PD)
    y_sorted_PD = y_PD[:P]
    weight_P = weights_NX.reshape(P)[order_P]
    out_ND = jnp.zeros((N, D), jnp.float32).at[token_P].add(y_sorted_PD.astype(jnp.float32) * weight_P[:, None])
    return out_ND.astype(x_ND.dtype)


def experts_pallas(x_RD, weights_RX, experts_RX, w_gate_EDF, w_up_EDF, w_down_EFD, *, routed=None, layer=None):
    """The expert FFN through the Pallas grouped-matmul kernels: kernels_pallas.moe_gmm.expert_ffn for dense
    stacks, moe_gmm_int4.expert_ffn_int4 for INT4 ones (the packed words and scales as kept, dequantized in
    VMEM). Pairs whose expert id is >= E fall outside every group and contribute zero, which is what
    moe_expert_parallel's empty buffer rows need of a local FFN.

    routed=(tokens, top_k, experts): the whole step's routing (all devices), when this call holds E of
    `experts` routed experts; the kernels' CostEstimates then count the expected traffic of uniform routing
    (the distinct experts `tokens` tokens choose, and this call's share of their pairs) instead of the worst
    case, so that a compiled program's cost_analysis is comparable with `kimi-jax plan`'s ideal bytes.
    layer: the weights are stacks of layers [Lyr, E, ...] (every leaf) and the kernels read this one in place."""
    E = jax.tree.leaves(w_gate_EDF)[0].shape[-3]  # dense [.., E, D, F]; INT4 packed [.., E, O, W]
    expected = {}
    if routed is not None:
        tokens, top_k, total = routed
        expected = dict(expected_pairs=tokens * top_k * E / total,
                        expected_experts=E * expected_expert_fraction(tokens, top_k, total))
    if isinstance(w_gate_EDF, Int4Weight):
        packed = [(w.packed, w.scale) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)]
        return expert_ffn_int4(x_RD, weights_RX, experts_RX, *packed, layer=layer, group_size=w_gate_EDF.group_size,
                               **expected)
    return expert_ffn(x_RD, weights_RX, experts_RX, w_gate_EDF, w_up_EDF, w_down_EFD, layer=layer, **expected)


LOCAL_FFN = {"ep": experts_grouped, "ep_ragged": experts_ragged, "ep_pallas": experts_pallas}


def experts_in_place(cfg: KimiConfig) -> bool:
    """Whether the routed experts go to the Pallas kernels, which read a layer of the stacked weights in place
    given its index (a scanned LayerStack then hands them the whole stacks: `MoE.__call__(layer=...)`)."""
    return cfg.moe_impl in ("pallas", "ep_pallas")


class DenseMLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, rngs: nnx.Rngs, dtype, mlp_axis: str = "mlp"):
        self.w_gate = param(rngs, (hidden, intermediate), ("embed", mlp_axis), dtype)
        self.w_up = param(rngs, (hidden, intermediate), ("embed", mlp_axis), dtype)
        self.w_down = param(rngs, (intermediate, hidden), (mlp_axis, "embed"), dtype)

    def __call__(self, x):
        return swiglu(x, self.w_gate[...], self.w_up[...], self.w_down[...])


class MoE(nnx.Module):
    """Routed experts (top-k of E) plus the always-on shared expert."""

    def __init__(self, cfg: KimiConfig, rngs: nnx.Rngs, dtype):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.cfg = cfg
        self.w_router = param(rngs, (D, E), ("embed", "experts"), dtype)
        self.router_bias = param(rngs, (E,), ("experts",), jnp.float32, init="zeros", kind=RouterBias)
        if cfg.expert_quant is not None:  # kept INT4 (converted with --int4 keep): packed + scales
            self.w_gate = Int4Param((E, D, F), ("experts", "embed", "expert_mlp"), cfg.expert_quant)
            self.w_up = Int4Param((E, D, F), ("experts", "embed", "expert_mlp"), cfg.expert_quant)
            self.w_down = Int4Param((E, F, D), ("experts", "expert_mlp", "embed"), cfg.expert_quant)
        else:
            self.w_gate = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), dtype)
            self.w_up = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), dtype)
            self.w_down = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), dtype)
        self.shared = (DenseMLP(D, cfg.shared_intermediate_size, rngs, dtype, mlp_axis="expert_mlp")
                       if cfg.n_shared_experts else None)

    def route(self, x_ND):
        return route(x_ND, self.w_router[...], self.router_bias[...], self.cfg)

    def route_with_scores(self, x_ND):
        return route_with_scores(x_ND, self.w_router[...], self.router_bias[...], self.cfg)

    def __call__(self, x_BTD, routing=None, layer=None):
        """routing: (weights [N,X], expert ids [N,X]) when the caller already routed (to report the choices).
        layer: the routed expert weights are the whole stacks of a scanned LayerStack and this is the layer the
        kernels read (only where experts_in_place(cfg): DecoderLayer passes it no other time)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        weights_NX, experts_NX = routing if routing is not None else self.route(x_ND)
        impl, E = self.cfg.moe_impl, self.cfg.n_routed_experts
        routed = (B * T, self.cfg.num_experts_per_tok, E)  # the whole step's routing, for kernel cost estimates
        experts = (self.w_gate[...], self.w_up[...], self.w_down[...])
        if impl == "pallas":  # grouped-matmul kernels (interpreted off TPU)
            out_ND = experts_pallas(x_ND, weights_NX, experts_NX, *experts, routed=routed, layer=layer)
        elif impl in LOCAL_FFN:  # experts sharded over the ambient mesh's "expert" axis, tokens all-gathered
            # (dropless) or moved by all_to_all (capacity-limited: sharding/expert_parallel.py); without such a
            # mesh it is the local FFN itself: grouped tiles ("ep": CPU), ragged_dot ("ep_ragged": TPU) or the
            # Pallas kernels ("ep_pallas").
            local_ffn = partial(experts_pallas, routed=routed) if impl == "ep_pallas" else LOCAL_FFN[impl]
            out_ND = moe_expert_parallel(x_ND, weights_NX, experts_NX, *experts, local_ffn=local_ffn,
                                         capacity_factor=self.cfg.moe_capacity_factor, layer=layer)
        else:
            out_ND = experts_grouped(x_ND, weights_NX, experts_NX, *experts)
        if self.shared is not None:
            out_ND = out_ND + self.shared(x_ND)
        return out_ND.reshape(B, T, D)
