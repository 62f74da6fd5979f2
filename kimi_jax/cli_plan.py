"""`kimi-jax plan`: will this model fit that TPU pod, and how fast could a step run? Answered without the pod.

A deviceless AOT compile (SPEC.md section 7) of one decode, prefill or training step of the configuration
(default: the full Kimi K2.6) over abstract parameters (nnx.eval_shape, ShapeDtypeStructs carrying their
NamedShardings), with the layers under a scan so 61 layers compile in seconds. Reported per chip:
- HBM needed (memory_analysis of the full program) against the chip's HBM;
- FLOPs and bytes of one step (cost_analysis counts a scan body once, so the program is compiled with one
  and with two layers per scan iteration, or --cost-method unrolled: with 1 and 2 unrolled MoE layers; the
  difference is one layer: first + (layers - 1) * difference. A training step adds one MoE layer's forward and
  backward compiled alone instead (--cost-method layer): one compile of a layer, not of a second whole step,
  and no loop-carried stacked gradient buffer, whose per-iteration dynamic_update_slice TPU's cost model
  charges as a read and write of the whole buffer. tests/test_sharding.py holds each to a fully unrolled
  compile);
- ideal bytes, counted by hand: the weight shards the step must read (routed experts scaled by the expected
  fraction that the step's tokens choose) plus the cache shard; bytes / ideal is the program's waste;
- a roofline step time, max(FLOPs / peak, bytes / bandwidth), and tokens/s from it.

--kernels compiles the Pallas kernels (kernels_pallas/, through Mosaic) in place of the XLA attention and
local expert FFN: attention per shard under shard_map, the expert FFN as each device's part of the
expert-parallel MoE. cost_analysis then counts each kernel by its pl.CostEstimate; the expert FFN's is that
of uniform routing at this step's token count (kimi_jax.moe.experts_pallas), the same expectation the ideal
bytes use.
"""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from sharding.plan import CHIPS, parse_mesh

MODES = ("decode", "prefill", "train")
MOE_IMPL = {"ragged": "ep_ragged", "grouped": "ep", "pallas": "ep_pallas"}  # --local-ffn -> moe_impl
LOCAL_FFNS = tuple(MOE_IMPL)


def add_plan(sub):
    p = sub.add_parser("plan", help="deviceless compile for a TPU pod: HBM per chip, FLOPs, roofline tokens/s",
                       description="Compile one step of the model for a TPU topology without the chips, and "
                                   "report per-chip memory, cost and a roofline estimate.")
    p.add_argument("--topology", required=True, help=f"GENERATION:SHAPE, e.g. v5p:8x8x8, v6e:16x16 "
                                                     f"(generations: {', '.join(CHIPS)})")
    p.add_argument("--mode", choices=MODES, default="decode")
    p.add_argument("--batch", type=int, default=64, help="sequences per step")
    p.add_argument("--context", type=int, default=32768,
                   help="decode: cache length; prefill: prompt length (= cache length); train: sequence length")
    p.add_argument("--int4", action="store_true", help="routed experts kept INT4 (packed + bf16 scales)")
    p.add_argument("--mesh", default=None, help="e.g. expert=64,tensor=4 (axes: data, fsdp, tensor, expert); "
                                                "default: experts first, then tensor, then data/fsdp")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="expert-parallel dispatch capacity; default: dropless for decode, 2.0 otherwise "
                        "(a dropless buffer for a long prefill is the whole batch per destination)")
    p.add_argument("--local-ffn", choices=LOCAL_FFNS, default=None,
                   help="each device's expert FFN: lax.ragged_dot (TPU grouped matmul; the default), the tile "
                        "loop of kimi_jax.moe.experts_grouped (whose loop body cost_analysis counts once), or the "
                        "Pallas grouped-matmul kernels (default with --kernels)")
    p.add_argument("--attention", choices=("xla", "pallas"), default=None,
                   help="attention: XLA einsums (the default) or the Pallas MLA kernels per shard (default with "
                        "--kernels)")
    p.add_argument("--kernels", action="store_true",
                   help="the Pallas kernels for attention and the local expert FFN (= --attention pallas "
                        "--local-ffn pallas)")
    p.add_argument("--cost-method", choices=("scan", "unrolled", "layer"), default=None,
                   help="per-layer cost from the scan compiled with 1 and 2 layers per iteration (2 compiles; "
                        "includes the loop's per-iteration slicing; the default for decode and prefill), from "
                        "unrolled 1- and 2-MoE-layer variants (3 compiles, slower), or, training only and its "
                        "default, from one MoE layer's forward and backward compiled alone")
    p.add_argument("--preset", default="kimi-k2.6", help="configuration preset (tests use small ones)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_plan)


def run_plan(args) -> int:
    kernels = "pallas" if args.kernels else None
    result = plan(args.topology, args.mode, args.batch, args.context, int4=args.int4,
                  mesh_shape=parse_mesh(args.mesh) if args.mesh else None, preset_name=args.preset,
                  capacity_factor=args.capacity_factor, local_ffn=args.local_ffn or kernels or "ragged",
                  attention=args.attention or kernels or "xla", cost_method=args.cost_method)
    if args.json:
        print(json.dumps(result))
        return 0
    gib = 2**30
    if result.get("compile_error"):
        print(f"{result['preset']} {result['mode']} on {result['topology']}, mesh {result['mesh']}: DOES NOT FIT "
              f"(needs {result['hbm_needed_per_chip_bytes'] / gib:.1f} GiB of {result['hbm_per_chip_bytes'] / gib:.0f} "
              f"GiB per chip; XLA: {result['compile_error']})")
        return 0
    print(f"{result['preset']} {result['mode']} on {result['topology']} ({result['chips']} chips), mesh "
          f"{result['mesh']}, batch {result['batch']}, context {result['context']}, "
          f"{'INT4' if result['int4'] else 'bf16'} experts, MoE dispatch {result['moe_dispatch']}, attention "
          f"{result['attention']}")
    print(f"  HBM per chip: needs {result['hbm_needed_per_chip_bytes'] / gib:.2f} GiB of "
          f"{result['hbm_per_chip_bytes'] / gib:.0f} GiB -> {'fits' if result['fits'] else 'DOES NOT FIT'}")
    print(f"  per chip per step: {result['flops_per_step'] / 1e12:.3f} TFLOP, {result['bytes_per_step'] / gib:.2f} "
          f"GiB accessed (ideal {result['ideal_bytes_per_step'] / gib:.2f} GiB, x{result['bytes_over_ideal']:.2f})")
    print(f"  roofline: {result['est_step_s'] * 1e3:.2f} ms/step, {result['est_tokens_per_s']:.0f} tokens/s "
          f"({result['est_tokens_per_s_ideal']:.0f} at ideal bytes); compiled in {result['compile_s']:.1f} s")
    return 0


def plan(topology: str, mode: str, batch: int, context: int, *, int4: bool = False,
         mesh_shape: dict | None = None, preset_name: str = "kimi-k2.6",
         capacity_factor: float | None = None, local_ffn: str = "ragged", attention: str = "xla",
         cost_method: str | None = None) -> dict:
    """The plan as a dict (the `--json` object). Raises ShardingError / ConfigError with what is wrong."""
    import jax
    import jax.numpy as jnp

    from kimi_jax.config import ExpertQuant, preset
    from sharding.plan import (chip_of, compiled_cost, default_mesh_shape, expected_expert_fraction,
                               hbm_oom_bytes, layer_corrected, roofline, scan_corrected, topology_devices,
                               topology_mesh)
    from sharding.rules import SERVE, TRAIN, ShardingError

    if mode not in MODES:
        raise ShardingError(f"--mode {mode!r}: expected one of {MODES}")
    cost_method = cost_method or ("layer" if mode == "train" else "scan")
    if cost_method == "layer" and mode != "train":
        raise ShardingError(f"--cost-method layer with --mode {mode}: the one-layer program is a training step's")
    if batch < 1 or context < 2:
        raise ShardingError(f"--batch {batch} / --context {context}: need batch >= 1 and context >= 2")
    chip = chip_of(topology)
    if int4 and mode == "train":
        raise ShardingError("--int4 with --mode train: packed INT4 experts are not trainable here")
    if mode == "train" and "pallas" in (attention, local_ffn):
        raise ShardingError("--kernels / pallas with --mode train: the Pallas kernels have no backward pass")
    if local_ffn not in MOE_IMPL:
        raise ShardingError(f"--local-ffn {local_ffn!r}: expected one of {LOCAL_FFNS}")
    if capacity_factor is None and mode != "decode":
        capacity_factor = 2.0
    cfg = preset(preset_name, layer_loop="scan", moe_impl=MOE_IMPL[local_ffn], attention_impl=attention,
                 moe_capacity_factor=capacity_factor, expert_quant=ExpertQuant() if int4 else None,
                 remat="full" if mode == "train" else "none")
    train = mode == "train"
    if mesh_shape is None:
        mesh_shape = default_mesh_shape(len(topology_devices(topology)), cfg.n_routed_experts,
                                        cfg.num_attention_heads, train)
    mesh = topology_mesh(topology, mesh_shape)
    rules = TRAIN if train else SERVE

    start = time.perf_counter()
    # The full program gives the memory. Cost: cost_analysis counts a loop body once, so the step's one MoE layer
    # is made num_moe_layers: by the one-layer program ("layer", `layer_corrected`), or by a second compile with
    # two MoE layers per scan iteration, or unrolled 1- and 2-layer variants, whose difference is one layer
    # (`scan_corrected`). The one-layer program compiles in a second thread beside the step (TPU codegen leaves
    # part of the 2 cores idle: full K2.6 training on v5p-256, 111 s side by side, 121 s one after the other).
    layer_future = None
    if cost_method == "layer":
        pool = ThreadPoolExecutor(1)
        layer_future = pool.submit(_compile_moe_layer_grad, cfg, mesh, rules, batch, context)
        pool.shutdown(wait=False)
    try:
        full = _compile_step(cfg, mesh, rules, mode, batch, context)
    except Exception as e:  # XLA refuses a program that cannot fit: that is the answer, not a crash
        needed = hbm_oom_bytes(e)
        if needed is None:
            raise
        return {"preset": preset_name, "topology": topology, "chips": mesh.size, "mesh": dict(mesh.shape),
                "mode": mode, "batch": batch, "context": context, "int4": int4, "fits": False,
                "hbm_per_chip_bytes": chip.hbm_bytes, "hbm_needed_per_chip_bytes": needed,
                "flops_per_step": None, "bytes_per_step": None, "ideal_bytes_per_step": None,
                "est_tokens_per_s": None, "compile_error": str(e).splitlines()[0][:300],
                "compile_s": time.perf_counter() - start}
    mem = compiled_cost(full["compiled"])
    if cost_method == "layer":
        layer = compiled_cost(layer_future.result()["compiled"])
        cost = layer_corrected(mem, layer, cfg.num_moe_layers)
    else:
        one, two = mem, None
        if cost_method == "scan":
            try:
                two = compiled_cost(_compile_step(cfg.replace(scan_unroll=2), mesh, rules, mode, batch, context)[
                    "compiled"])
            except Exception as e:  # two layers' temporaries per iteration can overflow a chip the program fits
                if hbm_oom_bytes(e) is None:
                    raise
                cost_method = "unrolled (two layers per scan iteration did not fit)"
        if two is None:  # the layers unrolled, 1 and 2 MoE layers: no loop at all, one more compile
            one, two = (compiled_cost(_compile_step(
                cfg.replace(num_hidden_layers=cfg.first_k_dense_replace + k, layer_loop="unroll"), mesh, rules, mode,
                batch, context)["compiled"]) for k in (1, 2))
        cost = scan_corrected(one, two, cfg.num_moe_layers)
    compile_s = time.perf_counter() - start

    tokens = batch * (1 if mode == "decode" else context)
    ideal = _ideal_bytes(full["params"], full["cache"], cfg, mode, tokens,
                         expected_expert_fraction(tokens, cfg.num_experts_per_tok, cfg.n_routed_experts))
    step_s = roofline(cost["flops"], cost["bytes"], chip)
    ideal_step_s = roofline(cost["flops"], ideal, chip)
    return {
        "preset": preset_name, "topology": topology, "chips": mesh.size, "mesh": dict(mesh.shape), "mode": mode,
        "batch": batch, "context": context, "int4": int4,
        "moe_dispatch": ("dropless (token all-gather + reduce-scatter)" if capacity_factor is None
                         else f"capacity {capacity_factor:g} (all_to_all)") + f", local {local_ffn}",
        "attention": attention, "pallas_kernels": full["kernels"],
        "fits": mem["hbm_needed_per_chip_bytes"] <= chip.hbm_bytes,
        "hbm_per_chip_bytes": chip.hbm_bytes,
        "hbm_needed_per_chip_bytes": mem["hbm_needed_per_chip_bytes"],
        "arguments_per_chip_bytes": mem["argument_bytes"], "temp_per_chip_bytes": mem["temp_bytes"],
        # Per chip: cost_analysis reports the SPMD-partitioned program of one device.
        "flops_per_step": cost["flops"], "bytes_per_step": cost["bytes"], "ideal_bytes_per_step": ideal,
        "bytes_over_ideal": cost["bytes"] / ideal if ideal else math.nan,
        "tokens_per_step": tokens,
        "est_step_s": step_s, "est_tokens_per_s": tokens / step_s,
        "est_tokens_per_s_ideal": tokens / ideal_step_s,
        "cost_method": cost_method, "compile_s": compile_s, "jax_version": jax.__version__,
        "cache_dtype": str(jnp.dtype(jnp.bfloat16)),
    }


def _sharded_shapes(state, mesh, rules, prefix: str = ""):
    """`state` (of an nnx.eval_shape module) with every variable as a ShapeDtypeStruct carrying the NamedSharding
    that `rules` give its logical axes on `mesh`; also [(name, struct)] for the ideal-bytes count."""
    import jax
    from flax import nnx

    from sharding.rules import named_sharding

    flat = nnx.to_flat_state(state)
    shapes = []
    for path, var in flat:
        name = prefix + "/".join(map(str, path))
        value = var.get_value()
        var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype,
                                           sharding=named_sharding(name, value.shape, var.axes, mesh, rules)))
        shapes.append((name, var.get_value()))
    return nnx.from_flat_state(flat), shapes


def _sequence_layout(mesh, batch: int, context: int):
    """(batch axes, position axes) of [B, S, ...] arrays, each None when empty. Batch over the axes that do not
    hold weight shards along the batch (data/fsdp, then expert); the expert axis, when the batch cannot take it,
    over the positions (sharding.rules.sequence_axes, the rule the attention kernels shard by). An explicit
    data/fsdp axis must divide the batch."""
    from sharding.rules import ShardingError, sequence_axes

    batch_axes, seq_axes = sequence_axes(mesh.shape, batch, context)
    for axis in ("data", "fsdp"):
        if mesh.shape.get(axis, 1) > 1 and axis not in batch_axes:
            raise ShardingError(f"batch {batch} is not divisible by mesh axis {axis!r} of size {mesh.shape[axis]}"
                                + (f" (after {list(batch_axes)})" if batch_axes else ""))
    return batch_axes or None, seq_axes or None


def _abstract(cfg, mesh, rules, mode: str, batch: int, context: int):
    """Abstract parameters (and cache for serving) as ShapeDtypeStructs with their NamedShardings."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kimi_jax.cache import init_cache
    from kimi_jax.model import KimiForCausalLM

    model = nnx.eval_shape(lambda: KimiForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    state, params = _sharded_shapes(state, mesh, rules)

    batch_spec, seq_axes = _sequence_layout(mesh, batch, context)
    # Training splits the sequence the same way: otherwise every chip of the expert group would run attention,
    # the dense layers and the loss over all of the batch's tokens.
    tokens = NamedSharding(mesh, P(batch_spec, seq_axes if mode == "train" else None))
    cache = None
    if mode != "train":
        shapes = jax.eval_shape(lambda: init_cache(cfg, batch, context, jnp.bfloat16))
        cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, P(*(None,) * (a.ndim - 3), batch_spec, seq_axes, None))),
            shapes)
    return graphdef, state, params, cache, tokens


def _compile_step(cfg, mesh, rules, mode: str, batch: int, context: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.train import cross_entropy

    graphdef, state, params, cache, tokens = _abstract(cfg, mesh, rules, mode, batch, context)

    if mode == "decode":
        def step(state, tok_B1, pos_B1, cache):
            out = nnx.merge(graphdef, state).forward(tok_B1, pos_B1, cache, attend_cache=True)
            return jnp.argmax(out.logits_BTV[:, -1], -1).astype(jnp.int32), out.cache
        args = (state, jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=tokens),
                jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=tokens), cache)
        donate = (3,)
    elif mode == "prefill":
        def step(state, ids_BS, cache):
            last_B = jnp.full((ids_BS.shape[0],), ids_BS.shape[1] - 1, jnp.int32)
            out = nnx.merge(graphdef, state).forward(ids_BS, None, cache, attend_cache=False, logits_index_B=last_B)
            return jnp.argmax(out.logits_BTV[:, -1], -1).astype(jnp.int32), out.cache
        args = (state, jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=tokens), cache)
        donate = (2,)
    else:
        # Forward + backward + a plain SGD update (no optimizer moments: AdamW would add 8 bytes per
        # parameter of float32 state, sharded like the parameters).
        train_graphdef, trainable, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)

        # Inputs and targets as two arrays of `context` tokens: slicing one array of context + 1 would cut
        # across the shards of a split sequence.
        def step(trainable, rest, inputs_BS, targets_BS):
            def loss_fn(trainable):
                logits = nnx.merge(train_graphdef, trainable, rest)(inputs_BS)
                return cross_entropy(logits, targets_BS, jnp.ones_like(targets_BS, bool))[0]
            loss, grads = jax.value_and_grad(loss_fn)(trainable)
            return jax.tree.map(lambda p, g: p - (1e-5 * g).astype(p.dtype), trainable, grads), loss
        ids = jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=tokens)
        args = (trainable, rest, ids, ids)
        donate = (0,)

    with jax.set_mesh(mesh):
        lowered = jax.jit(step, donate_argnums=donate).lower(*args)
        compiled = lowered.compile()
    # Pallas kernels lowered for Mosaic (interpreted ones would be plain loops): their names, for the report.
    kernels = sorted(set(re.findall(r'kernel_name = "(\w+)"', lowered.as_text())))
    return {"compiled": compiled, "params": params, "cache": cache, "kernels": kernels}


def _compile_moe_layer_grad(cfg, mesh, rules, batch: int, context: int) -> dict:
    """One MoE decoder layer's share of a training step as a program of its own: its forward under the step's
    remat policy, and the backward to its weight gradients and input gradient, with the activations split as
    the step's tokens are. Its cost is one iteration of the step's layer scan without the loop: without the
    stacked gradient buffer that each iteration of the backward scan updates in place."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kimi_jax.layers import rope_cos_sin
    from kimi_jax.model import DecoderLayer, with_remat

    layer = nnx.eval_shape(lambda: DecoderLayer(cfg, nnx.Rngs(0), jnp.bfloat16, moe=True))
    graphdef, weights, rest = nnx.split(layer, nnx.Param, ...)
    weights, _ = _sharded_shapes(weights, mesh, rules, prefix="moe_layers/")
    x = jax.ShapeDtypeStruct((batch, context, cfg.hidden_size), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(*_sequence_layout(mesh, batch, context), None)))

    def step(weights, rest, x_BTD, dy_BTD):
        positions_BT = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
        cos, sin = rope_cos_sin(cfg, positions_BT, x_BTD.dtype)

        @partial(with_remat, remat=cfg.remat)
        def run(weights, x_BTD):
            return nnx.merge(graphdef, weights, rest)(x_BTD, positions_BT, cos, sin, None, True)[0]
        y_BTD, vjp = jax.vjp(run, weights, x_BTD)
        return y_BTD, vjp(dy_BTD)  # the output too: the step's forward feeds the next layer, not only the backward

    with jax.set_mesh(mesh):
        compiled = jax.jit(step).lower(weights, rest, x, x).compile()
    return {"compiled": compiled}


def _ideal_bytes(params, cache, cfg, mode: str, tokens: int, expert_fraction: float) -> float:
    """Bytes one chip must move in one step, counted by hand from the shards it holds.
    Serving: every weight shard once (routed experts times the expected fraction chosen; the embedding only
    the rows looked up), plus the cache shard (read at decode, written at prefill).
    Training: 6 x the parameter shards (forward read, backward read, gradient write, update read parameter
    and gradient, write parameter); activations are not counted."""
    from sharding.plan import shard_bytes

    total = 0.0
    for name, a in params:
        b = shard_bytes(a.shape, a.dtype, a.sharding)
        if mode == "train":
            total += 6 * b
        elif name.startswith("embed"):
            total += min(b, tokens * cfg.hidden_size * a.dtype.itemsize)
        elif "/mlp/w_" in name and name.startswith("moe_layers") and "shared" not in name:
            total += b * expert_fraction
        else:
            total += b
    if cache is not None:
        import jax
        total += sum(shard_bytes(a.shape, a.dtype, a.sharding) for a in jax.tree.leaves(cache))
    return total
