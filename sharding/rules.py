"""Logical axis names -> mesh axes: one table per use; a parallelism strategy is an edit here, not in the model.

Every parameter carries logical axis names (`axes` metadata, e.g. ("layers", "experts", "embed",
"expert_mlp")). A table maps each name to a mesh axis (or None: replicated along it).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SERVE = {"layers": None, "vocab": "tensor", "embed": None, "heads": "tensor", "head_dim": None,
         "q_lora": None, "latent": None, "mlp": "tensor", "experts": "expert", "expert_mlp": None}
TRAIN = {**SERVE, "embed": "fsdp"}


# Mesh axes a batch of sequences may split over, in order (the "tensor" axis holds heads instead).
BATCH_AXES = ("data", "fsdp", "expert")


def sequence_axes(mesh_shape, batch: int, length: int | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """How arrays of sequences [B, S, ...] (tokens, the latent cache) split over a mesh: (batch axes, position
    axes). The batch takes the BATCH_AXES of size > 1 in order, each while it still divides the batch (the
    expert-parallel MoE splits tokens over every axis anyway); the "expert" axis, when the batch could not
    take it (batch 64 on 128 chips), splits the positions instead if it divides `length`, or every chip would
    hold every sequence's whole cache. One rule for the plan's cache layout and the attention kernels' shards."""
    batch_axes, used = [], 1
    for axis in BATCH_AXES:
        size = mesh_shape.get(axis, 1)
        if size > 1 and batch % (used * size) == 0:
            batch_axes.append(axis)
            used *= size
    seq_axes = tuple(a for a in ("expert",) if length is not None and mesh_shape.get(a, 1) > 1
                     and a not in batch_axes and length % mesh_shape[a] == 0)
    return tuple(batch_axes), seq_axes


class ShardingError(ValueError):
    """A parameter that a mesh cannot hold as the rules say; the message names parameter, shape and axis."""


def partition_spec(name: str, shape, axes, mesh: Mesh, rules: dict) -> PartitionSpec:
    """The PartitionSpec of one array; mesh axes missing from `mesh` (or of size 1) mean replicated."""
    spec, used = [], set()
    for dim, logical in zip(shape, axes):
        mesh_axis = rules.get(logical) if logical is not None else None
        if mesh_axis is None or mesh_axis not in mesh.shape or mesh.shape[mesh_axis] == 1 or mesh_axis in used:
            spec.append(None)
            continue
        if dim % mesh.shape[mesh_axis]:
            raise ShardingError(f"parameter {name!r} of shape {tuple(shape)}: dimension {logical!r} ({dim}) is not "
                                f"divisible by mesh axis {mesh_axis!r} of size {mesh.shape[mesh_axis]}")
        spec.append(mesh_axis)
        used.add(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(name: str, shape, axes, mesh: Mesh, rules: dict = SERVE) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(name, shape, axes, mesh, rules))


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
    """A mesh with named axes, e.g. {"data": 2, "expert": 4}, over `devices` (default: all local devices)."""
    devices = list(devices if devices is not None else jax.devices())
    n = 1
    for size in shape.values():
        n *= size
    if n != len(devices):
        raise ShardingError(f"mesh shape {shape} needs {n} devices, but {len(devices)} were given")
    return jax.make_mesh(tuple(shape.values()), tuple(shape), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
