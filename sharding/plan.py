"""Deviceless pod planning: TPU topologies without the chips, meshes over them, and what a compiled step
costs per chip (HBM from memory_analysis, FLOPs and bytes from cost_analysis), with a roofline estimate.

Nothing here knows the model: kimi_jax/cli_plan.py builds the abstract parameters and step functions and
hands their compiled executables to `compiled_cost`.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from sharding.rules import ShardingError, make_mesh

MESH_AXES = ("data", "fsdp", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip peaks (Google Cloud TPU documentation)."""

    bf16_flops_per_s: float
    hbm_bytes_per_s: float
    hbm_bytes: int


CHIPS = {
    "v5p": Chip(459e12, 2765e9, 95 * 2**30),
    "v6e": Chip(918e12, 1640e9, 32 * 2**30),
    "v5e": Chip(197e12, 819e9, 16 * 2**30),
}


def chip_of(topology: str) -> Chip:
    generation = topology.split(":")[0]
    if generation not in CHIPS:
        raise ShardingError(f"topology {topology!r}: unknown TPU generation {generation!r}; expected one of "
                            f"{sorted(CHIPS)} (e.g. v5p:4x4x4, v6e:16x16)")
    return CHIPS[generation]


def topology_devices(topology: str) -> list:
    """The TPU devices of `topology` (e.g. "v5p:8x8x8"), described without the hardware (needs libtpu)."""
    chip_of(topology)
    if ":" not in topology:
        raise ShardingError(f"topology {topology!r}: expected GENERATION:SHAPE, e.g. v5p:8x8x8 or v6e:16x16")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # libtpu missing, or a shape the generation does not come in
        raise ShardingError(f"topology {topology!r}: cannot describe it deviceless ({type(e).__name__}: {e})") \
            from None


def parse_mesh(text: str) -> dict[str, int]:
    """"expert=64,tensor=4" -> {"expert": 64, "tensor": 4}."""
    shape = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ShardingError(f"--mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of {MESH_AXES} and a "
                                f"positive SIZE")
        shape[name] = int(size)
    return shape


def default_mesh_shape(num_devices: int, num_experts: int, num_heads: int, train: bool) -> dict[str, int]:
    """As many devices on "expert" as divide both the device count and the expert count, then "tensor" over
    what divides the heads, the rest on "data" (serving) or "fsdp" (training)."""
    expert = max(d for d in range(1, num_devices + 1) if num_devices % d == 0 and num_experts % d == 0)
    rest = num_devices // expert
    tensor = max(d for d in range(1, min(rest, num_heads) + 1) if rest % d == 0 and num_heads % d == 0)
    shape = {"expert": expert, "tensor": tensor, ("fsdp" if train else "data"): rest // tensor}
    return {k: v for k, v in shape.items() if v > 1} or {"expert": 1}


def topology_mesh(topology: str, shape: dict[str, int]):
    devices = topology_devices(topology)
    n = math.prod(shape.values())
    if n != len(devices):
        raise ShardingError(f"mesh {shape} needs {n} devices, but topology {topology!r} has {len(devices)} chips")
    try:
        return make_mesh(shape, devices)
    except NotImplementedError:
        # jax.make_mesh maps each logical axis onto whole physical axes (v6e:16x16 cannot hold a size-2 axis);
        # splitting a physical axis is legal, only its rings are shorter.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(shape.values()), devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, tuple(shape), axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def hbm_oom_bytes(error: Exception) -> int | None:
    """The bytes an XLA compile-time HBM out-of-memory error says the program needs, e.g. "... temporaries
    (175.47G) exceeds available HBM (95.73G)"; None for any other error."""
    import re

    found = re.search(r"CompileTimeHbmOom.*?\(([\d.]+)([KMGT])\)", str(error))
    if not found:
        return None
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2)))


def compiled_cost(compiled) -> dict:
    """Per-chip numbers of one compiled SPMD program (cost_analysis counts a loop body once: see
    `scan_corrected`)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    needed = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    return {"hbm_needed_per_chip_bytes": int(needed), "argument_bytes": int(mem.argument_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes), "flops": float(cost.get("flops", 0.0)),
            "bytes": float(cost.get("bytes accessed", 0.0))}


def scan_corrected(cost_one: dict, cost_two: dict, layers: int) -> dict:
    """FLOPs and bytes of a program whose `layers` repeated layers run under a scan, from compiles with one and
    with two layers per scan iteration (cost_analysis counts a loop body once): their difference is one layer,
    and everything else is counted once in each."""
    return {k: cost_one[k] + (layers - 1) * (cost_two[k] - cost_one[k]) for k in ("flops", "bytes")}


def layer_corrected(cost_program: dict, cost_layer: dict, layers: int) -> dict:
    """FLOPs and bytes of a program whose `layers` repeated layers run under a scan (its body counted once),
    from the cost of one layer compiled as a program of its own."""
    return {k: cost_program[k] + (layers - 1) * cost_layer[k] for k in ("flops", "bytes")}


def roofline(flops: float, bytes_: float, chip: Chip) -> float:
    """Seconds per step if the chip ran at its peak FLOP/s or HBM bandwidth, whichever binds."""
    return max(flops / chip.bf16_flops_per_s, bytes_ / chip.hbm_bytes_per_s)


def shard_bytes(shape, dtype, sharding) -> int:
    """Bytes of one device's shard of an array."""
    return math.prod(sharding.shard_shape(tuple(shape))) * jax.numpy.dtype(dtype).itemsize


def expected_expert_fraction(tokens: int, top_k: int, num_experts: int) -> float:
    """Expected fraction of experts chosen by at least one of `tokens` tokens under uniform routing (each token
    picks top_k distinct experts)."""
    return 1.0 - (1.0 - top_k / num_experts) ** tokens
