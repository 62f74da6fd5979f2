"""Multi-host through jax.distributed, on one machine: two processes on localhost, 4 fake CPU devices each, join
through `sharding.distributed.initialize` (collectives over gloo), load one checkpoint with
`kimi_jax.load(..., mesh=...)` onto a mesh over all 8 devices (the routed experts split across both processes, so
the MoE's token all-gather and reduce-scatter cross processes), and run the sharded forward and a greedy
generate; each process's result must equal the single-device result of this (pytest) process."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import kimi_jax
from convert.export_hf import export_hf
from kimi_jax import KimiForCausalLM, preset
from kimi_jax.generate import generate
from kimi_jax.params import ModelParts
from numerics import randomize, rel

TESTS = Path(__file__).parent
PROCESSES, DEVICES_PER_PROCESS, MESH = 2, 4, "expert=8"
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    # Cheaper XLA:CPU compiles (the workers' time is almost all compiling; results stay within float32
    # rounding of the optimized program).
    env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS} "
                        f"--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_workers(checkpoint: Path, out: Path) -> list[tuple[subprocess.Popen, Path]]:
    coordinator = f"127.0.0.1:{free_port()}"
    workers = []
    for i in range(PROCESSES):
        log = out / f"stderr_{i}.txt"
        with open(log, "wb") as stderr:
            cmd = [sys.executable, "-m", "distributed_worker", "--coordinator", coordinator, "--num-processes",
                   str(PROCESSES), "--process-id", str(i), "--checkpoint", str(checkpoint), "--out", str(out),
                   "--mesh", MESH]
            workers.append((subprocess.Popen(cmd, env=worker_env(), cwd=TESTS.parent, stdout=stderr,
                                             stderr=subprocess.STDOUT), log))
    return workers


def wait_for(workers, timeout_s: float) -> None:
    """Waits for every worker; the first failure (or the timeout) ends the others, whose peers would otherwise
    wait in a collective for the heartbeat timeout. Fails with each worker's output."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p, _ in workers):
        failed = any(p.poll() not in (None, 0) for p, _ in workers)
        if failed or time.monotonic() > deadline:
            for p, _ in workers:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.2)
    codes = [p.returncode for p, _ in workers]
    if codes != [0] * len(workers):
        logs = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n" + "\n".join(
            line for line in log.read_text(errors="replace").splitlines() if not line.startswith("[Gloo]"))[-6000:]
            for i, (p, log) in enumerate(workers))
        pytest.fail(f"distributed workers failed (exit codes {codes}; negative: killed after the first failure or "
                    f"the {timeout_s} s timeout):\n{logs}", pytrace=False)


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """Writes a tiny random checkpoint and runs the two workers on it; while they run, loads it here on one
    device and computes the reference logits. Returns (out directory, single-device model, logits, prompts)."""
    root = tmp_path_factory.mktemp("distributed")
    cfg = preset("tiny", vocab_size=288)  # the byte vocabulary (275) divides no mesh axis
    tree = {k: np.asarray(v) for k, v in ModelParts.of(randomize(KimiForCausalLM(cfg, rngs=nnx.Rngs(5)))).arrays()
            .items()}
    checkpoint = export_hf(cfg, tree, root / "checkpoint")
    out = root / "out"
    out.mkdir()
    ids_BT = np.asarray(jax.random.randint(jax.random.key(6), (8, 7), 0, cfg.vocab_size), np.int32)
    prompts = [[int(t) for t in row[: 3 + i % 4]] for i, row in enumerate(ids_BT)]  # ragged lengths
    np.save(out / "ids.npy", ids_BT)
    (out / "prompts.json").write_text(json.dumps(prompts))

    workers = start_workers(checkpoint, out)
    try:
        single = kimi_jax.load(checkpoint, dtype="float32", progress=False)  # one device, the plain MoE
        logits = np.asarray(nnx.jit(lambda m, x: m(x))(single, ids_BT))
    finally:
        wait_for(workers, TIMEOUT_S)
    return out, single, logits, prompts


def test_two_processes_see_one_mesh(distributed_run):
    out = distributed_run[0]
    for i in range(PROCESSES):
        facts = json.loads((out / f"facts_{i}.json").read_text())
        assert facts["process_count"] == PROCESSES and facts["device_count"] == PROCESSES * DEVICES_PER_PROCESS
        assert facts["local_device_count"] == DEVICES_PER_PROCESS and facts["mesh"] == {"expert": 8}
        # The expert stack [layers, 8, D, F] lives on devices of both processes, one expert per device.
        assert facts["expert_weight_processes"] == [0, 1]
        assert facts["expert_weight_local_shard"][1] == 1


def test_sharded_forward_across_processes_equals_single_device(distributed_run):
    out, _, expected, _ = distributed_run
    for i in range(PROCESSES):
        assert rel(np.load(out / f"logits_{i}.npy"), expected) < 1e-5


def test_sharded_generate_across_processes_equals_single_device(distributed_run):
    out, single, _, prompts = distributed_run
    tokens = [json.loads((out / f"tokens_{i}.json").read_text()) for i in range(PROCESSES)]
    expected = generate(single, prompts, max_new_tokens=4).tokens  # only now: a generate compile is not cheap
    for i in range(PROCESSES):
        assert tokens[i] == expected, f"process {i}"


def test_initialize_errors_say_what_to_fix():
    from sharding.distributed import DistributedError, initialize

    with pytest.raises(DistributedError, match=r"coordinator '127.0.0.1': expected HOST:PORT"):
        initialize("127.0.0.1", 2, 0)
    with pytest.raises(DistributedError, match=r"process_id 2 is outside \[0, num_processes=2\)"):
        initialize("127.0.0.1:1234", 2, 2)
    jax.devices()  # this pytest process already runs jax on its own: too late to join others
    with pytest.raises(DistributedError, match=r"process 0: jax has already created this process's devices"):
        initialize("127.0.0.1:1234", 2, 0)
