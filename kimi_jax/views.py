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

A routed expert's matrices are kept on CPU as their rows of outputs ("out major": an XLA layout, the same values
and shapes with the last two axes swapped in memory), and their views are those rows, transposed back inside the
jitted code where the transpose is free. A vector times a matrix stored so is a loop fusion that XLA:CPU splits
over two threads; a row-major matrix goes to its matrix-vector kernel, on one. Measured on bench-mini, float32:
- gate and up [1024, 256]: ~10 GB/s row-major, ~16 GB/s out major (one matrix at a time, cold); decode step at
  batch 1 19.5 -> 18.4 ms, a group of 4 sequences 43.7 -> 38.1 ms;
- down [256, 1024], as fast row-major on one thread, but the second thread sleeps through a single-threaded
  product and takes ~35-40 us to wake for the next split one; with all three split it stays awake through a
  layer's tiles (jax.profiler: 130-137 -> 100-104 us a tile; batch 1 15.1 -> 14.9 ms a step, batch 8 52.4 ->
  50.4 ms). Prefill is unchanged.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout

ROUTED_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@jax.tree_util.register_pytree_node_class
class StackViews:
    """A stacked array [N, ...] as N separate arrays: `views[i]` is what `stack[i]` would be, `views[...]` the
    views themselves (what an nnx Variable's `[...]` returns) and `shape` the stack's shape. With `transposed`,
    each part holds the matrix with its last two axes swapped, and `views[i]` swaps them back."""

    def __init__(self, parts, transposed: bool = False):
        self.parts = tuple(parts)
        self.transposed = transposed

    def __getitem__(self, i):
        if i is Ellipsis:
            return self
        return self.parts[i].swapaxes(-1, -2) if self.transposed else self.parts[i]

    @property
    def shape(self) -> tuple[int, ...]:
        part = self.parts[0].shape
        return (len(self.parts), *part[:-2], *part[-2:][::-1]) if self.transposed else (len(self.parts), *part)

    def tree_flatten(self):
        return self.parts, self.transposed

    @classmethod
    def tree_unflatten(cls, transposed, parts):
        return cls(parts, transposed)


def is_views(x) -> bool:
    return isinstance(x, StackViews)


def _on_one_cpu(w) -> bool:
    return (isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer) and len(w.devices()) == 1
            and next(iter(w.devices())).platform == "cpu")


def _out_major_layout(ndim: int) -> Layout:
    return Layout(major_to_minor=(*range(ndim - 2), ndim - 1, ndim - 2))


def _is_out_major(w: jax.Array) -> bool:
    return w.ndim >= 2 and w.format.layout.major_to_minor == _out_major_layout(w.ndim).major_to_minor


def _views(w: jax.Array, depth: int) -> StackViews:
    """The `depth` leading axes of `w` as nested StackViews of arrays that alias `w`'s buffer. A `w` stored out
    major (_out_major_layout) gives parts that hold each matrix as its rows of outputs, and transposed views."""
    transposed = _is_out_major(w)
    host = np.from_dlpack(w)  # on CPU, a view of the array's own buffer (strided as the layout is)
    lead = host.shape[:depth]
    # One batched device_put for every part (generate() splits the model on each call): each part is a
    # zero-copy array over its piece of `host`, which is contiguous in this memory order.
    pieces = [host[i].swapaxes(-1, -2) if transposed else host[i] for i in np.ndindex(*lead)]
    parts = jax.device_put(pieces, w.sharding)

    def nest(parts, lead):
        if len(lead) == 1:
            return StackViews(parts, transposed)
        n = len(parts) // lead[0]
        return StackViews(nest(parts[i * n:(i + 1) * n], lead[1:]) for i in range(lead[0]))

    return nest(parts, lead)


def split_layer_views(model) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split(model)`, with every stacked layer weight as per-layer views when the layer loop is unrolled,
    and the routed experts of the default MoE path (moe_impl="xla", dense weights) also as per-expert views
    (their stacks moved out major first, see above). Arrays that are not on one CPU device
    (accelerators, meshes) stay as nnx.split gives them."""
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
                if expert_stack and not _is_out_major(w):
                    # nnx.split's variables are the model's own, so the model keeps the new order (moved once)
                    w = jax.device_put(w, Format(_out_major_layout(w.ndim), w.sharding))
                    variable.set_value(w)
                variable = variable.replace(_views(w, 2 if expert_stack else 1))
            flat.append((path, variable))
        state[f"{name}_layers"]["layers"] = nnx.from_flat_state(flat)
    return graphdef, state
