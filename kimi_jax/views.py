"""Stacked weights handed to jitted code as separate arrays, for XLA:CPU.

XLA:CPU copies any slice of an array before a dot reads it: a layer sliced out of the stacked layers, or an
expert chosen at run time out of [E, ...]. Given each layer's (and each routed expert's) weights as arguments
of their own, its dots read them in place. On CPU these arguments alias the stacked buffer (zero-copy), so the
model keeps one parameter tree and no extra memory.

Measured on bench-mini decode (float32, one CPU core): a step copied every layer's attention and expert
matrices (21 of 56 ms) until layers came as views; choosing an expert among per-expert views with
`lax.switch` reads it at 12.6 GB/s, slicing and copying it out of the stack at 6.3 GB/s. The price is compile
time, a switch branch per expert per MoE layer: bench-mini's decode program compiles in 17 s instead of 7, a
384-expert model's in 33 s instead of 4.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

ROUTED_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@jax.tree_util.register_pytree_node_class
class StackViews:
    """A stacked array [N, ...] as N separate arrays: `views[i]` is what `stack[i]` would be, `views[...]` the
    views themselves (what an nnx Variable's `[...]` returns) and `shape` the stack's shape."""

    def __init__(self, parts):
        self.parts = tuple(parts)

    def __getitem__(self, i):
        return self if i is Ellipsis else self.parts[i]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    def tree_flatten(self):
        return self.parts, None

    @classmethod
    def tree_unflatten(cls, _, parts):
        return cls(parts)


def is_views(x) -> bool:
    return isinstance(x, StackViews)


def _on_one_cpu(w) -> bool:
    return (isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer) and len(w.devices()) == 1
            and next(iter(w.devices())).platform == "cpu")


def _views(w: jax.Array, depth: int) -> StackViews:
    """The `depth` leading axes of `w` as nested StackViews of arrays that alias `w`'s buffer."""
    host = np.asarray(w)  # on CPU, a view of the array's own buffer
    lead = host.shape[:depth]
    # One batched device_put for every part (generate() splits the model on each call): each part is a
    # zero-copy array over its piece of `host`.
    parts = jax.device_put(list(host.reshape(-1, *host.shape[depth:])), w.sharding)

    def nest(parts, lead):
        if len(lead) == 1:
            return StackViews(parts)
        n = len(parts) // lead[0]
        return StackViews(nest(parts[i * n:(i + 1) * n], lead[1:]) for i in range(lead[0]))

    return nest(parts, lead)


def split_layer_views(model) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split(model)`, with every stacked layer weight as per-layer views when the layer loop is unrolled,
    and the routed experts of the default MoE path (moe_impl="xla", dense weights) also as per-expert views.
    Arrays that are not on one CPU device (accelerators, meshes) stay as nnx.split gives them."""
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    if cfg.layer_loop != "unroll":
        return graphdef, state
    for name in model.stacks():
        flat = []
        for path, variable in nnx.to_flat_state(state[f"{name}_layers"]["layers"]):
            w = variable.get_value()
            if _on_one_cpu(w):
                expert_stack = (path[0] == "mlp" and path[-1] in ROUTED_EXPERT_WEIGHTS and w.ndim == 4
                                and cfg.moe_impl == "xla")
                variable = variable.replace(_views(w, 2 if expert_stack else 1))
            flat.append((path, variable))
        state[f"{name}_layers"]["layers"] = nnx.from_flat_state(flat)
    return graphdef, state
