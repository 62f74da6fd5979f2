"""What the kernels share: chip generation, interpret default, block picking, stacked-layer operands, and the
byte count of a pipelined operand (the rule every CostEstimate here is built from).

Grid order is row-major (the last grid axis fastest). The TPU pipeline copies an input block into VMEM when
its block index differs from the previous grid step's (the first step always copies) and writes an output
block back when its index is about to change (and after the last step). So the bytes an operand moves are
(number of index changes along the grid, plus one) times its block's bytes; index maps that repeat the
previous block for skipped steps (ragged lengths, causal blocks above the diagonal, idle work items) move
nothing there.
"""

from __future__ import annotations

import concurrent.futures
import math

import jax
import jax.numpy as jnp
import numpy as np


def target_device() -> tuple[str, str]:
    """(platform, device kind) the kernels are compiled for: the ambient mesh's devices when a mesh is set
    (`jax.set_mesh`; a deviceless compile for a TPU topology sets one over its TPU descriptions while the
    default backend is the CPU), otherwise the default backend's first device."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is not None:
        return device.platform, device.device_kind
    return jax.default_backend(), jax.devices()[0].device_kind


def chip_generation(generation: str | None = None) -> str:
    """The key of the block-size tables: "v5e", "v5p", "v6e", or "default" (interpret mode, unknown chips)."""
    if generation is not None:
        return generation
    platform, kind = target_device()
    if platform != "tpu":
        return "default"
    kind = kind.lower()  # "TPU v5p", "TPU v5" (v5p), "TPU v5 lite", "TPU v6e", "TPU v6 lite", ...
    for key, names in (("v5e", ("v5e", "v5 lite")), ("v6e", ("v6e", "v6 lite")), ("v5p", ("v5p", "v5"))):
        if any(name in kind for name in names):
            return key
    return "default"


def table_row(table: dict, generation: str | None):
    """The block sizes for this chip generation (see chip_generation); a clear error for unknown keys."""
    key = chip_generation(generation)
    if key not in table:
        raise ValueError(f"no block sizes for chip generation {key!r}; known: {sorted(table)}")
    return table[key]


def default_interpret(interpret):
    """Mosaic kernels only run on a TPU; everywhere else run the interpreter unless told otherwise (the
    target as `target_device` says: a deviceless TPU mesh compiles them with Mosaic)."""
    return (target_device()[0] != "tpu") if interpret is None else interpret


def pick_block(dim: int, target: int, quantum: int) -> int:
    """The largest multiple of `quantum` that is at most `target` and divides `dim`; `dim` itself (a block
    equal to the array dimension is always legal for Mosaic) when there is none or `dim <= target`."""
    if dim <= target:
        return dim
    for block in range(target - target % quantum, 0, -quantum):
        if dim % block == 0:
            return block
    return dim


def eager(fn):
    """fn() evaluated on concrete values, outside whatever the caller is inside: the kernels' wrappers compute
    their CostEstimates while being traced, possibly under a mesh of TPUs that are not there (a deviceless
    compile), where even an eager op would try to run on them. Tracing state and the ambient mesh are
    per-thread, so a fresh thread sees neither."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def pipelined_copies(grid: tuple[int, ...], index_map, *prefetch) -> int:
    """How many times the pipeline copies one operand's block over the whole grid: the first step plus
    every step whose block index differs from the step before. `index_map` is the kernel's own index map,
    evaluated here on numpy arrays of grid coordinates (and numpy copies of the scalar-prefetch operands)."""
    ids = np.indices(grid).reshape(len(grid), -1)
    index = eager(lambda: [np.asarray(i) for i in index_map(*ids, *prefetch)])
    index = np.stack([np.broadcast_to(i, ids.shape[1:]) for i in index])
    return 1 + int(np.count_nonzero(np.any(index[:, 1:] != index[:, :-1], axis=0)))


LAYER_0 = np.zeros(1, np.int32)  # the layer operand of one layer's arrays, and of every CostEstimate count:
                                 # which layer is read moves no bytes


def layer_stacks(operands, layer):
    """`operands` as stacks of layers [Lyr, ...] and the layer to read as int32 [1] (a scalar-prefetch operand
    that the kernels' index maps put first in each block index). Given one layer's arrays (layer None), stacks
    of one (a free reshape). Given stacks and `layer`, the kernel reads that layer's blocks in place: a layer
    sliced out of a stack before the call would be copied first (XLA materialises a pallas_call operand), every
    layer of a scan. Operands may be pytrees (the INT4 (packed, scale) pairs)."""
    if layer is None:
        return [jax.tree.map(lambda a: a[None], op) for op in operands], LAYER_0
    return list(operands), jnp.asarray(layer, jnp.int32).reshape(1)


def block_bytes(block_shape: tuple[int | None, ...], dtype) -> int:
    return math.prod(1 if b is None else b for b in block_shape) * np.dtype(dtype).itemsize
