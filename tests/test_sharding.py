"""Sharding on 8 fake CPU devices: expert-parallel MoE == single-device MoE (dropless, and capacity-limited
drops exactly the pairs the stated rule drops), sharded forward and greedy generate == single device, bad
meshes give errors naming what is wrong, and `kimi-jax plan` compiles small configs for deviceless TPUs."""

import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_jax import KimiForCausalLM, preset
from kimi_jax.generate import generate
from kimi_jax.moe import experts_grouped, experts_reference
from sharding import make_mesh
from sharding.expert_parallel import capacity, experts_ragged, moe_expert_parallel
from sharding.rules import SERVE, named_sharding
from numerics import randomize, rel


def place(model, mesh, rules=SERVE):
    """A copy of `model` with every parameter placed on `mesh` as `rules` say."""
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        name = "/".join(map(str, path))
        var.set_value(jax.device_put(var.get_value(), named_sharding(name, var.shape, var.axes, mesh, rules)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def moe_inputs(N, D, F, E, X, used_experts, seed=0):
    """Random tokens, weights and routing whose expert ids come only from `used_experts` (so the other
    experts, and whole devices, get no tokens)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    x_ND = jax.random.normal(ks[0], (N, D))
    w_gate, w_up = (0.3 * jax.random.normal(k, (E, D, F)) for k in ks[1:3])
    w_down = 0.3 * jax.random.normal(ks[3], (E, F, D))
    rng = np.random.default_rng(seed)
    experts_NX = np.stack([rng.choice(used_experts, X, replace=False) for _ in range(N)]).astype(np.int32)
    weights_NX = jax.random.uniform(ks[4], (N, X), minval=0.1, maxval=1.0)
    return x_ND, weights_NX, jnp.asarray(experts_NX), w_gate, w_up, w_down


def run_ep(mesh, x_ND, weights_NX, experts_NX, w_gate, w_up, w_down, capacity_factor=None,
           local_ffn=experts_grouped):
    """The expert-parallel MoE jitted on `mesh`, expert stacks placed sharded over "expert"; returns the
    output and the compiled program's text."""
    place_w = lambda w: jax.device_put(w, NamedSharding(mesh, P("expert")))  # noqa: E731
    ws = tuple(map(place_w, (w_gate, w_up, w_down)))
    fn = jax.jit(lambda x, wt, ex, *w: moe_expert_parallel(x, wt, ex, *w, local_ffn=local_ffn, mesh=mesh,
                                                           capacity_factor=capacity_factor))
    compiled = fn.lower(x_ND, weights_NX, experts_NX, *ws).compile()
    return compiled(x_ND, weights_NX, experts_NX, *ws), compiled.as_text()


@pytest.mark.parametrize("shape,local_ffn", [({"expert": 8}, experts_grouped),
                                             ({"data": 2, "expert": 4}, experts_grouped),
                                             ({"expert": 8}, experts_ragged)])
def test_expert_parallel_dropless_equals_single_device(shape, local_ffn):
    N, D, F, E, X = 45, 24, 40, 16, 3  # N divides no device count: padding pairs must go nowhere
    # Experts 0..5 only: on 8 expert devices (2 experts each) devices 3..7 receive nothing, and experts 6..15
    # get no tokens.
    args = moe_inputs(N, D, F, E, X, used_experts=np.arange(6))
    expected = experts_reference(*args)
    assert rel(experts_grouped(*args), expected) < 1e-5
    out, hlo = run_ep(make_mesh(shape), *args, local_ffn=local_ffn)
    assert rel(out, expected) < 1e-5
    # Dropless: the expert group's tokens are all-gathered and each device's share comes back by reduce-scatter;
    # no collective moves anything shaped like an expert matrix ([24, 40]).
    assert "all-gather" in hlo and "reduce-scatter" in hlo and "all-to-all" not in hlo
    assert not moved_weights(hlo)
    if shape == {"expert": 8} and local_ffn is experts_grouped:  # the control: indexing w[idx] moves weights
        mesh = make_mesh(shape)
        ws = [jax.device_put(w, NamedSharding(mesh, P("expert"))) for w in args[3:]]
        assert moved_weights(jax.jit(experts_reference).lower(*args[:3], *ws).compile().as_text())


def moved_weights(hlo: str) -> list[str]:
    """Collectives in `hlo` whose shapes end in an expert matrix's [D, F] = [24, 40] (either order)."""
    return [line for line in hlo.splitlines()
            if re.search(r"= .*\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)", line)
            and re.search(r"(24,40|40,24)\]", line)]


def dropped_reference_weights(experts_NX, weights_NX, devices, n, E, cap):
    """The capacity rule written out independently: tokens split into `devices` contiguous chunks; within a
    chunk, pairs in token-major order, the first `cap` pairs bound for each expert device are kept."""
    experts_NX, weights_NX = np.asarray(experts_NX), np.array(weights_NX)
    N, X = experts_NX.shape
    chunk = -(-N // devices)
    dropped = 0
    for start in range(0, N, chunk):
        sent = np.zeros(n, int)
        for t in range(start, min(start + chunk, N)):
            for x in range(X):
                dest = experts_NX[t, x] // (E // n)
                if sent[dest] >= cap:
                    weights_NX[t, x] = 0.0
                    dropped += 1
                sent[dest] += 1
    return weights_NX, dropped


def test_expert_parallel_capacity_drops_exactly_the_overflow():
    N, D, F, E, X = 64, 16, 8, 16, 2
    mesh = make_mesh({"expert": 8})
    # Skewed routing: everything goes to experts 0..3 (devices 0 and 1), so a capacity of 1.0 x the mean
    # overflows there.
    x_ND, weights_NX, experts_NX, *ws = moe_inputs(N, D, F, E, X, used_experts=np.arange(4), seed=1)
    cap = capacity(N // 8, X, E, 8, 1.0)
    kept_weights_NX, dropped = dropped_reference_weights(experts_NX, weights_NX, 8, 8, E, cap)
    assert 0 < dropped < N * X
    out, hlo = run_ep(mesh, x_ND, weights_NX, experts_NX, *ws, capacity_factor=1.0)
    assert "all-to-all" in hlo and not moved_weights(hlo)  # with a capacity, pairs travel by all_to_all
    assert rel(out, experts_reference(x_ND, jnp.asarray(kept_weights_NX), experts_NX, *ws)) < 1e-5
    assert rel(out, experts_reference(x_ND, weights_NX, experts_NX, *ws)) > 1e-2  # the drops are visible


def sharded_model_and_ids(shape, model, ids_BT):
    mesh = make_mesh(shape)
    batch_axes = tuple(a for a in shape if a != "tensor" and ids_BT.shape[0] % shape[a] == 0)
    ids = jax.device_put(ids_BT, NamedSharding(mesh, P(batch_axes or None)))
    return mesh, place(model, mesh), ids


MESHES = [{"expert": 8}, {"data": 2, "expert": 4}, {"data": 8}]


@pytest.fixture(scope="module")
def tiny_expected():
    """The EP-configured model, its ids and prompts, and the single-device logits and greedy tokens (computed
    once: the plain grouped MoE, same weights)."""
    cfg = preset("tiny", vocab_size=288, moe_impl="ep")  # the byte vocabulary (275) divides no mesh axis
    ep = randomize(KimiForCausalLM(cfg, rngs=nnx.Rngs(5)))
    single = nnx.merge(nnx.split(KimiForCausalLM(cfg.replace(moe_impl="xla"), rngs=nnx.Rngs(5)))[0], nnx.state(ep))
    ids_BT = jax.random.randint(jax.random.key(6), (8, 7), 0, cfg.vocab_size)
    prompts = [[int(t) for t in row[: 3 + i % 4]] for i, row in enumerate(np.asarray(ids_BT))]  # ragged lengths
    logits = nnx.jit(lambda m, x: m(x))(single, ids_BT)
    return ep, ids_BT, prompts, logits, generate(single, prompts, max_new_tokens=4).tokens


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_forward_and_generate_equal_single_device(shape, tiny_expected):
    ep, ids_BT, prompts, expected_logits, expected_tokens = tiny_expected
    mesh, sharded, ids = sharded_model_and_ids(shape, ep, ids_BT)
    if "expert" in shape:  # the expert stacks really are split, and the MoE gathers tokens (dropless)
        assert len(sharded.moe_layers.layers.mlp.w_gate.get_value().sharding.device_set) == 8
    with jax.set_mesh(mesh):
        jitted = nnx.jit(lambda m, x: m(x))
        if "expert" in shape:
            assert "reduce-scatter" in jitted.lower(sharded, ids).compile().as_text()
        assert rel(jitted(sharded, ids), expected_logits) < 1e-5
        assert generate(sharded, prompts, max_new_tokens=4).tokens == expected_tokens


def test_split_sequence_forward_and_gradients_equal_single_device(tiny_expected):
    """Batch 2 of 16 tokens on 8 devices: the sequence splits over "expert", so cacheless attention takes the
    absorbed form (attention._sequence_split); logits, QK-Clip's max logits and weight gradients == the single
    device's naive causal form."""
    from kimi_jax.attention import _sequence_split

    ep = tiny_expected[0]
    ids_BT = jax.random.randint(jax.random.key(7), (2, 16), 0, ep.cfg.vocab_size)
    single = nnx.merge(nnx.split(KimiForCausalLM(ep.cfg.replace(moe_impl="xla"), rngs=nnx.Rngs(5)))[0],
                       nnx.state(ep))
    mesh = make_mesh({"expert": 8})
    sharded, ids = place(ep, mesh), jax.device_put(ids_BT, NamedSharding(mesh, P(None, "expert")))

    def loss_and_stats(model, ids):
        out = model.forward(ids)
        return jnp.mean(out.logits_BTV.astype(jnp.float32) ** 2), (out.logits_BTV, out.max_logit_H)

    def run(model, ids):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        grad_fn = jax.grad(lambda p: loss_and_stats(nnx.merge(graphdef, p, rest), ids), has_aux=True)
        return jax.jit(grad_fn)(params)

    grads, (logits, max_logits) = run(single, ids_BT)
    with jax.set_mesh(mesh):
        assert _sequence_split(2, 16)
        sharded_grads, (sharded_logits, sharded_max) = run(sharded, ids)
    assert rel(sharded_logits, logits) < 1e-5
    for a, b in zip(sharded_max, max_logits):
        assert rel(a, b) < 1e-5
    for (path, a), (_, b) in zip(nnx.to_flat_state(sharded_grads), nnx.to_flat_state(grads)):
        assert rel(a.get_value(), b.get_value()) < 1e-4, path


@pytest.mark.parametrize("loop", ["unroll", "scan"])
def test_sharded_pallas_kernels_equal_single_device_xla(loop):
    """attention_impl="pallas" and moe_impl="ep_pallas" on a data=2 x expert=2 x tensor=2 mesh (kernels
    interpreted), float32, against the single-device "xla" model. Batch 2 splits over "data"; "expert" cannot
    take it, so the cache positions split over "expert" (16 rows: 0-7 and 8-15), and decoding at positions
    6, 7, 8 attends with one device holding no rows, then one; heads split over "tensor" (and, in the
    cacheless prefill, over "expert" too). Covers the prefill kernel's shards, the decode kernel's
    cross-device log-sum-exp merge and the Pallas expert FFN as each device's part of the expert-parallel MoE.
    Under the scan the cache is [layers, B, S, .] stacks written per device (attention.write_cache) and the
    kernels read a layer of the stacks (and of the expert stacks) in place."""
    from kimi_jax.cache import init_cache
    from sharding.rules import sequence_axes

    shape = {"data": 2, "expert": 2, "tensor": 2}
    cfg = preset("tiny", vocab_size=288, attention_impl="pallas", moe_impl="ep_pallas", layer_loop=loop)
    model = randomize(KimiForCausalLM(cfg, rngs=nnx.Rngs(7)))
    single = nnx.merge(nnx.split(KimiForCausalLM(cfg.replace(attention_impl="xla", moe_impl="xla"),
                                                 rngs=nnx.Rngs(7)))[0], nnx.state(model))
    ids_BT = jax.random.randint(jax.random.key(8), (2, 9), 0, cfg.vocab_size)
    want = nnx.jit(lambda m, x: m(x))(single, ids_BT)

    mesh = make_mesh(shape)
    batch_axes, seq_axes = sequence_axes(mesh.shape, 2, 16)
    assert batch_axes == ("data",) and seq_axes == ("expert",)
    sharded = place(model, mesh)
    cache = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
        mesh, P(*(None,) * (a.ndim - 3), batch_axes, seq_axes, None))), init_cache(cfg, 2, 16))

    @nnx.jit(static_argnames="attend")
    def step(m, tok, pos, cache, attend):
        out = m.forward(tok, pos, cache, attend_cache=attend)
        return out.logits_BTV, out.cache

    with jax.set_mesh(mesh):
        prompt, cache = step(sharded, ids_BT[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), cache, attend=False)
        assert rel(prompt, want[:, :6]) < 1e-5
        graphdef, state = nnx.split(sharded)
        program = str(jax.make_jaxpr(lambda st, c: nnx.merge(graphdef, st).forward(
            ids_BT[:, 6:7], jnp.full((2, 1), 6), c).logits_BTV)(state, cache))
        assert "mla_decode" in program and "pmax" in program and "moe_gmm_swiglu" in program
        for t in range(6, 9):
            piece, cache = step(sharded, ids_BT[:, t:t + 1], jnp.full((2, 1), t), cache, attend=True)
            assert rel(piece, want[:, t:t + 1]) < 1e-5


def test_bad_meshes_name_what_is_wrong():
    from sharding.plan import parse_mesh
    from sharding.rules import ShardingError

    with pytest.raises(ShardingError, match=r"needs 16 devices, but 8 were given"):
        make_mesh({"expert": 16})
    with pytest.raises(ShardingError, match=r"'model=4'.*AXIS=SIZE"):
        parse_mesh("expert=2,model=4")
    args = moe_inputs(8, 4, 4, 12, 2, used_experts=np.arange(12))
    with pytest.raises(ValueError, match=r"n_routed_experts=12 is not divisible by mesh axis 'expert' of size 8"):
        moe_expert_parallel(*args, local_ffn=experts_grouped, mesh=make_mesh({"expert": 8}))


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="deviceless TPU compiles need libtpu (part of the `test` extra on Linux x86-64)")


@pytest.fixture(autouse=True)
def libtpu_shared(monkeypatch):
    """libtpu takes a machine-wide lock file on load; a deviceless compile touches no chip, so let a plan running
    beside these tests (or another pytest worker) not fail them."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def run_cli(capsys, *argv):
    from kimi_jax.cli import main

    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_libtpu
@pytest.mark.parametrize("topology,mode,hbm,peaks,kernels", [
    ("v5p:2x2x1", "decode", 95 * 2**30, (459e12, 2765e9), False),
    ("v6e:2x2", "train", 32 * 2**30, (918e12, 1640e9), False),
    ("v5p:2x2x1", "decode", 95 * 2**30, (459e12, 2765e9), True),
], ids=["v5p-decode", "v6e-train", "v5p-decode-kernels"])
def test_plan_compiles_small_config_for_deviceless_tpu(capsys, topology, mode, hbm, peaks, kernels):
    code, out, err = run_cli(capsys, "--topology", topology, "--mode", mode, "--preset", "tiny", "--batch", "8",
                             "--context", "64", "--json", *(["--kernels"] if kernels else []))
    assert code == 0, err
    plan = json.loads(out)
    # --kernels: the Pallas kernels are in the program, lowered for Mosaic (not interpreted).
    assert plan["pallas_kernels"] == (["mla_decode", "moe_gmm", "moe_gmm_swiglu"] if kernels else [])
    assert plan["chips"] == 4 and plan["mesh"] == {"expert": 4}  # the default mesh: 8 experts, 4 chips
    assert plan["fits"] is True and plan["hbm_per_chip_bytes"] == hbm
    assert 0 < plan["hbm_needed_per_chip_bytes"] < hbm
    assert plan["flops_per_step"] > 0 and plan["bytes_per_step"] > 0 and plan["ideal_bytes_per_step"] > 0
    # Roofline consistency: tokens/s is tokens per step over the slower of compute and memory time.
    step_s = max(plan["flops_per_step"] / peaks[0], plan["bytes_per_step"] / peaks[1])
    assert plan["est_tokens_per_s"] == pytest.approx(plan["tokens_per_step"] / step_s)


@needs_libtpu
@pytest.mark.parametrize("impls", [dict(moe_impl="ep_ragged"), dict(moe_impl="ep_pallas", attention_impl="pallas")],
                         ids=["xla", "kernels"])
def test_plan_cost_corrects_the_scan_body(impls):
    """Per-step cost of a 1 dense + 4 MoE layer model, against a fully unrolled compile of it: the raw scan
    counts its body once; the unrolled 1/2-layer difference is exact; the scan compiled with 1 and 2 layers per
    iteration is close (it also counts what the loop itself does per iteration: slicing its layer's weights and
    cache, which the unrolled program lays out differently). Also with the Pallas kernels, whose cost is their
    CostEstimates, counted once per scan body like any other instruction."""
    from kimi_jax.cli_plan import _compile_step
    from sharding.plan import compiled_cost, scan_corrected, topology_mesh
    from sharding.rules import SERVE

    cfg = preset("tiny", num_hidden_layers=5, layer_loop="scan", **impls)
    mesh = topology_mesh("v5p:2x2x1", {"expert": 4})
    variants = {"scan": cfg, "scan2": cfg.replace(scan_unroll=2), "unrolled": cfg.replace(layer_loop="unroll"),
                "one": cfg.replace(layer_loop="unroll", num_hidden_layers=2),
                "two": cfg.replace(layer_loop="unroll", num_hidden_layers=3)}
    cost = {k: compiled_cost(_compile_step(c, mesh, SERVE, "decode", 8, 64)["compiled"]) for k, c in variants.items()}
    truth = cost["unrolled"]
    assert cost["scan"]["flops"] < 0.6 * truth["flops"]  # the raw scan really undercounts
    exact = scan_corrected(cost["one"], cost["two"], cfg.num_moe_layers)
    assert exact["flops"] == pytest.approx(truth["flops"], rel=0.01)
    assert exact["bytes"] == pytest.approx(truth["bytes"], rel=0.03)
    scanned = scan_corrected(cost["scan"], cost["scan2"], cfg.num_moe_layers)
    assert scanned["flops"] == pytest.approx(truth["flops"], rel=0.1)
    assert scanned["bytes"] == pytest.approx(truth["bytes"], rel=0.4)


@needs_libtpu
def test_plan_train_cost_from_one_layer():
    """A training step's cost as the plan takes it (the step under the layer scan, plus num_moe_layers - 1 times
    one MoE layer's forward and backward compiled alone) == a fully unrolled compile of the step; the one-layer
    program keeps the layer's output, as the step's next layer does (without it, FLOPs came out at 0.78x)."""
    from kimi_jax.cli_plan import _compile_moe_layer_grad, _compile_step
    from sharding.plan import compiled_cost, layer_corrected, topology_mesh
    from sharding.rules import TRAIN

    cfg = preset("tiny", num_hidden_layers=5, layer_loop="scan", moe_impl="ep_ragged", moe_capacity_factor=2.0,
                 remat="full")
    mesh = topology_mesh("v5p:2x2x1", {"expert": 4})
    scanned, truth = (compiled_cost(_compile_step(c, mesh, TRAIN, "train", 8, 64)["compiled"])
                      for c in (cfg, cfg.replace(layer_loop="unroll")))
    layer = compiled_cost(_compile_moe_layer_grad(cfg, mesh, TRAIN, 8, 64)["compiled"])
    assert scanned["flops"] < 0.6 * truth["flops"]
    cost = layer_corrected(scanned, layer, cfg.num_moe_layers)
    assert cost["flops"] == pytest.approx(truth["flops"], rel=0.01)
    assert cost["bytes"] == pytest.approx(truth["bytes"], rel=0.03)


@needs_libtpu
@pytest.mark.parametrize("mesh,message", [
    ("expert=8", r"mesh \{'expert': 8\} needs 8 devices, but topology 'v5p:2x2x1' has 4 chips"),
    ("expert=2,tensor=2", r"parameter 'embed' of shape \(275, 64\): dimension 'vocab' \(275\) is not divisible by "
                          r"mesh axis 'tensor' of size 2"),
], ids=["too-many-devices", "axis-does-not-divide"])
def test_plan_bad_mesh_errors(capsys, mesh, message):
    import re

    code, out, err = run_cli(capsys, "--topology", "v5p:2x2x1", "--preset", "tiny", "--batch", "8", "--context",
                             "64", "--mesh", mesh, "--json")
    assert code == 2 and out == "" and re.search(message, err), err
