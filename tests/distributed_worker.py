"""One process of a multi-host run on CPU, started by tests/test_distributed.py (twice, on localhost):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu PYTHONPATH=tests \\
        python -m distributed_worker --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I \\
        --checkpoint CKPT --out OUT --mesh expert=8

joins the others (sharding.distributed.initialize), loads CKPT onto a mesh over the devices of every process,
runs the sharded forward on OUT/ids.npy and a greedy generate of OUT/prompts.json, and writes what it sees
(whole arrays, gathered across processes) to OUT/logits_I.npy and OUT/tokens_I.json, and where things ran to
OUT/facts_I.json. A generate that raises is recorded in tokens_I.json as {"error": ...} (the forward result
stands on its own).
"""

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mesh", default="expert=8")
    p.add_argument("--moe-impl", default="ep")
    p.add_argument("--max-new-tokens", type=int, default=4, help="0: forward only")
    args = p.parse_args(argv)
    start = time.perf_counter()
    log = lambda msg: print(f"[process {args.process_id}] {time.perf_counter() - start:6.1f} s  {msg}",  # noqa: E731
                            file=sys.stderr, flush=True)

    from sharding.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)

    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    import kimi_jax
    from kimi_jax.generate import generate
    from sharding import make_mesh
    from sharding.distributed import gather
    from sharding.plan import parse_mesh

    log(f"joined: {jax.process_count()} processes, {jax.device_count()} devices ({jax.local_device_count()} here)")
    shape = parse_mesh(args.mesh)
    mesh = make_mesh(shape)  # over jax.devices(): every process's devices
    model = kimi_jax.load(args.checkpoint, dtype="float32", mesh=mesh, moe_impl=args.moe_impl, progress=False)
    log(f"loaded onto mesh {dict(mesh.shape)}")
    out = Path(args.out)
    w_gate = model.moe_layers.layers.mlp.w_gate.get_value()
    facts = {"process_count": jax.process_count(), "device_count": jax.device_count(),
             "local_device_count": jax.local_device_count(), "mesh": dict(mesh.shape),
             "expert_weight_processes": sorted({d.process_index for d in w_gate.sharding.device_set}),
             "expert_weight_local_shard": list(w_gate.addressable_shards[0].data.shape)}
    (out / f"facts_{args.process_id}.json").write_text(json.dumps(facts))

    ids_BT = np.load(out / "ids.npy")
    batch_axes = tuple(a for a in shape if a != "tensor" and ids_BT.shape[0] % shape[a] == 0)
    ids = jax.device_put(ids_BT, NamedSharding(mesh, P(batch_axes or None)))  # same value on every process
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, x: m(x))(model, ids)
        np.save(out / f"logits_{args.process_id}.npy", gather(logits))
        log("forward done")
        if args.max_new_tokens:
            prompts = json.loads((out / "prompts.json").read_text())
            try:
                tokens = generate(model, prompts, max_new_tokens=args.max_new_tokens).tokens
            except Exception as e:
                tokens = {"error": f"{type(e).__name__}: {e}"}
            (out / f"tokens_{args.process_id}.json").write_text(json.dumps(tokens))
            log(f"generate done{' (raised)' if 'error' in tokens else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
