"""The Kimi K2.6 / DeepSeek-V3 text model in Flax NNX.

Layers that repeat are stacked on a leading "layers" axis (one stack for the first_k_dense_replace dense
layers, one for the MoE layers). The forward runs a stack under `lax.scan` (fast pod compiles) or as an
unrolled loop (XLA:CPU would copy each layer's weights per scan iteration), as `cfg.layer_loop` says.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.attention import MLA
from kimi_jax.config import KimiConfig
from kimi_jax.layers import init_array, param, rms_norm, rope_cos_sin
from kimi_jax.moe import DenseMLP, MoE, experts_in_place
from kimi_jax.views import ROUTED_EXPERT_WEIGHTS, is_views


class ModelOutput(NamedTuple):
    logits_BTV: jax.Array
    cache: dict | None          # see kimi_jax.cache
    experts_BTX: list           # routed expert ids per MoE layer, in layer order
    router_scores_BTE: list     # sigmoid router scores per MoE layer (balance statistics)
    max_logit_H: list           # largest pre-softmax logit per head, per layer (naive path only; QK-Clip)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: KimiConfig, rngs: nnx.Rngs, dtype, moe: bool):
        self.eps = cfg.rms_norm_eps
        self.attn_norm = param(rngs, (cfg.hidden_size,), ("embed",), dtype, init="ones")
        self.attn = MLA(cfg, rngs, dtype)
        self.mlp_norm = param(rngs, (cfg.hidden_size,), ("embed",), dtype, init="ones")
        self.mlp = MoE(cfg, rngs, dtype) if moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size, rngs, dtype)

    def __call__(self, x_BTD, positions_BT, cos, sin, cache, attend_cache, page_table_BP=None, layer=None):
        """Returns (x, cache, stats): stats holds the layer's max logits and, for MoE layers, its routing.
        `layer` (under the scan): this is layer `layer` of a LayerStack, the cache arrays are the stack's whole
        [layers, ...] arrays, and so are the routed expert weights where `experts_in_place(cfg)`."""
        h_BTD, cache, max_logit_H = self.attn(rms_norm(x_BTD, self.attn_norm[...], self.eps), positions_BT,
                                              cos, sin, cache, attend_cache, page_table_BP, layer=layer)
        x_BTD = x_BTD + h_BTD
        h_BTD = rms_norm(x_BTD, self.mlp_norm[...], self.eps)
        stats = {"max_logit_H": max_logit_H}
        if isinstance(self.mlp, MoE):
            B, T, D = h_BTD.shape
            weights_NX, experts_NX, scores_NE = self.mlp.route_with_scores(h_BTD.reshape(B * T, D))
            out_BTD = self.mlp(h_BTD, routing=(weights_NX, experts_NX),
                               layer=layer if experts_in_place(self.mlp.cfg) else None)
            stats.update(experts_BTX=experts_NX.reshape(B, T, -1), router_scores_BTE=scores_NE.reshape(B, T, -1))
            return x_BTD + out_BTD, cache, stats
        return x_BTD + self.mlp(h_BTD), cache, stats


def with_remat(fn, remat: str):
    """`fn` under KimiConfig.remat: "none" as is, "full" recomputed in the backward pass, "dots" keeping the
    results of its matmuls."""
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_saveable if remat == "dots" else None)


class LayerStack(nnx.Module):
    """`num_layers` identical decoder layers, every weight stacked on a leading "layers" axis."""

    def __init__(self, cfg: KimiConfig, num_layers: int, rngs: nnx.Rngs, dtype, moe: bool):
        # Trace one layer for its structure, then draw every weight once with a leading layer axis
        # (nnx.vmap over the constructor costs seconds per stack).
        graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLayer(cfg, nnx.Rngs(0), dtype, moe)))
        flat = nnx.to_flat_state(state)
        for _, variable in flat:
            meta = variable.get_metadata()
            key = rngs.params() if meta["init"] == "normal" else None
            variable.set_value(init_array(key, (num_layers, *variable.shape), variable.dtype, meta["init"],
                                          meta["std"]))
            variable.set_metadata("axes", ("layers", *meta["axes"]))
        self.layers = nnx.merge(graphdef, nnx.from_flat_state(flat))
        self.num_layers = num_layers
        self.loop = cfg.layer_loop
        self.scan_unroll = cfg.scan_unroll
        self.remat = cfg.remat

    def __call__(self, x_BTD, positions_BT, cos, sin, cache, attend_cache, page_table_BP=None):
        """cache: None, or per layer (latent, rope) — stacked arrays under scan, a list of pairs unrolled.
        Returns (x, cache, per-layer stats dicts)."""
        # Under the scan, weights that the Pallas MoE kernels read stay whole stacks (see below).
        whole_experts = (self.loop == "scan" and isinstance(self.layers.mlp, MoE)
                         and experts_in_place(self.layers.mlp.cfg))
        graphdef, whole, stacked = nnx.split(
            self.layers, lambda path, _: whole_experts and path[0] == "mlp" and path[1] in ROUTED_EXPERT_WEIGHTS, ...)

        def run_layer(x_BTD, layer_state, layer_cache, layer=None):
            return nnx.merge(graphdef, whole, layer_state)(x_BTD, positions_BT, cos, sin, layer_cache,
                                                           attend_cache, page_table_BP, layer=layer)

        run_layer = with_remat(run_layer, self.remat)

        if self.loop == "scan":
            # The scan slices each layer's weights out of the stacks, except what a Pallas kernel reads: the
            # cache (carried whole, written in place) and, with the MoE kernels, the routed experts. Those the
            # kernels read in place at the layer index; XLA would copy a slice of them before every kernel call
            # (on v5p-128 decode, about 1 GB a MoE layer of expert stacks alone).
            def body(carry, state_and_index):
                x_BTD, cache = carry
                layer_state, layer = state_and_index
                x_BTD, cache, stats = run_layer(x_BTD, layer_state, cache, layer)
                return (x_BTD, cache), stats
            (x_BTD, cache), stats = jax.lax.scan(body, (x_BTD, cache), (stacked, jnp.arange(self.num_layers)),
                                                 unroll=self.scan_unroll)
            return x_BTD, cache, [jax.tree.map(lambda s: s[i], stats) for i in range(self.num_layers)]

        new_cache, stats = [], []
        for i in range(self.num_layers):
            layer_state = jax.tree.map(lambda w: w[i], stacked, is_leaf=is_views)
            x_BTD, layer_cache, layer_stats = run_layer(x_BTD, layer_state, None if cache is None else cache[i])
            new_cache.append(layer_cache)
            stats.append(layer_stats)
        return x_BTD, (None if cache is None else new_cache), stats


class KimiForCausalLM(nnx.Module):
    """`model(input_ids_BT)` -> logits [B, T, V]; `model.forward(...)` also takes and returns a latent cache."""

    def __init__(self, cfg: KimiConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed = param(rngs, (V, D), ("vocab", "embed"), dtype)
        self.dense_layers = (LayerStack(cfg, cfg.num_dense_layers, rngs, dtype, moe=False)
                             if cfg.num_dense_layers else None)
        self.moe_layers = LayerStack(cfg, cfg.num_moe_layers, rngs, dtype, moe=True) if cfg.num_moe_layers else None
        self.final_norm = param(rngs, (D,), ("embed",), dtype, init="ones")
        self.lm_head = None if cfg.tie_word_embeddings else param(rngs, (D, V), ("embed", "vocab"), dtype)

    def stacks(self):
        return {name: stack for name in ("dense", "moe")
                if (stack := getattr(self, f"{name}_layers")) is not None}

    def forward(self, input_ids_BT, positions_BT=None, cache=None, attend_cache=True,
                logits_index_B=None, page_table_BP=None) -> ModelOutput:
        """positions default to 0..T-1. With a cache (kimi_jax.cache.init_cache), this step's latent rows are
        written at `positions_BT`; `attend_cache=False` is the prefill of an empty cache (naive attention).
        `logits_index_B` computes logits only at one token per sequence (the last of a prompt): [B, 1, V].
        `page_table_BP` makes the cache a paged one (kimi_jax.cache.init_paged_cache): sequence b's position p
        lives in page page_table_BP[b, p // page_size]."""
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = jnp.take(self.embed[...], input_ids_BT, axis=0)
        cos, sin = rope_cos_sin(self.cfg, positions_BT, x_BTD.dtype)
        new_cache, stats = ({} if cache is not None else None), []
        for name, stack in self.stacks().items():
            x_BTD, stack_cache, stack_stats = stack(x_BTD, positions_BT, cos, sin,
                                                    None if cache is None else cache[name], attend_cache,
                                                    page_table_BP)
            stats += stack_stats
            if cache is not None:
                new_cache[name] = stack_cache
        if logits_index_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_index_B[:, None, None], axis=1)
        x_BTD = rms_norm(x_BTD, self.final_norm[...], self.cfg.rms_norm_eps)
        head_DV = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        moe_stats = [s for s in stats if "experts_BTX" in s]
        return ModelOutput(x_BTD @ head_DV, new_cache, [s["experts_BTX"] for s in moe_stats],
                           [s["router_scores_BTE"] for s in moe_stats], [s["max_logit_H"] for s in stats])

    def __call__(self, input_ids_BT, positions_BT=None):
        return self.forward(input_ids_BT, positions_BT).logits_BTV
