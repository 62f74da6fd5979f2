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

The layers' other matrices ([in, out] per layer: wq_a, wkv_a, the dense and shared MLPs, the router) and the
lm_head go out major too when each decode step multiplies them by one row (`rows=1`: batch 1, or greedy batch 2
as two streams), and row-major otherwise: 4 rows times an out-major matrix ran slower (lm_head 9.5 against
7.1 ms; [1024, 2816] 12 against 17 GB/s). bench-mini, float32, in one process alternating (1024-token prompts,
33 new tokens, medians): batch 1 13.4 -> 12.4 ms a step, batch 2 21.3 -> 18.5 ms; the same matrices out major at
batch 8 (two streams of 4 rows): 48.1 -> 55.9 ms. The attention's per-head weights (wq_b, wo, w_uk, w_uv) gained
nothing or lost out major, so they stay row-major.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout

from kimi_jax.params import linear_axes

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


@jax.tree_util.register_pytree_node_class
class OutMajorMatrix:
    """A matrix [in, out] handed over as its rows of outputs (`rows_OI`, aliasing an out-major array):
    `m[...]` is the matrix, transposed back inside jitted code where the transpose is free."""

    def __init__(self, rows_OI):
        self.rows_OI = rows_OI

    def __getitem__(self, index):
        return self.rows_OI.T[index]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows_OI.shape[::-1]

    def tree_flatten(self):
        return (self.rows_OI,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


def is_views(x) -> bool:
    return isinstance(x, StackViews)


def _on_one_cpu(w) -> bool:
    return (isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer) and len(w.devices()) == 1
            and next(iter(w.devices())).platform == "cpu")


def _out_major_layout(ndim: int) -> Layout:
    return Layout(major_to_minor=(*range(ndim - 2), ndim - 1, ndim - 2))


def _is_out_major(w: jax.Array) -> bool:
    return w.ndim >= 2 and w.format.layout.major_to_minor == _out_major_layout(w.ndim).major_to_minor


def _stored(w: jax.Array, out_major: bool) -> jax.Array:
    """`w` in the out-major or the row-major memory order (moved if it is in the other; same values)."""
    if _is_out_major(w) == out_major:
        return w
    order = _out_major_layout(w.ndim) if out_major else Layout(major_to_minor=tuple(range(w.ndim)))
    return jax.device_put(w, Format(order, w.sharding))


def _is_layer_matrix(path, variable) -> bool:
    """A linear weight stacked over the layers as [layers, in, out] (one input and one output axis)."""
    return linear_axes(path[-1], variable.get_metadata()["axes"]) == ((1,), (2,))


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


def split_layer_views(model, rows: int | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split(model)`, with every stacked layer weight as per-layer views when the layer loop is unrolled,
    and the routed experts of the default MoE path (moe_impl="xla", dense weights) also as per-expert views
    (their stacks moved out major first, see above). `rows`: how many rows each decode step multiplies the
    weights by, where the caller knows it; with 1 the layers' [in, out] matrices and the lm_head are moved out
    major too, otherwise (moved back) row-major. Arrays that are not on one CPU device (accelerators, meshes)
    stay as nnx.split gives them. The model keeps the memory orders set here: a move is made only when a call asks
    for another order than the last."""
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    if cfg.layer_loop != "unroll":
        return graphdef, state
    # nnx.split's variables are the model's own, so a moved array stays moved in the model
    for name in model.stacks():
        flat = []
        for path, variable in nnx.to_flat_state(state[f"{name}_layers"]["layers"]):
            w = variable.get_value()
            if _on_one_cpu(w):
                expert_stack = (path[0] == "mlp" and path[-1] in ROUTED_EXPERT_WEIGHTS and w.ndim == 4
                                and cfg.moe_impl == "xla")
                if expert_stack or _is_layer_matrix(path, variable):
                    w = _stored(w, out_major=expert_stack or rows == 1)
                    variable.set_value(w)
                variable = variable.replace(_views(w, 2 if expert_stack else 1))
            flat.append((path, variable))
        state[f"{name}_layers"]["layers"] = nnx.from_flat_state(flat)
    if "lm_head" in state and _on_one_cpu(state["lm_head"].get_value()):
        head = _stored(state["lm_head"].get_value(), out_major=rows == 1)
        state["lm_head"].set_value(head)
        if rows == 1:
            state["lm_head"] = state["lm_head"].replace(OutMajorMatrix(jax.device_put(np.from_dlpack(head).T,
                                                                                      head.sharding)))
    return graphdef, state
