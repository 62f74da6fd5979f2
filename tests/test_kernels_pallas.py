"""Pallas kernels held to their pure-jnp references on fresh random inputs, in interpret mode: the plain
interpreter and the TPU-semantics one (two simulated cores, race detection, NaN-filled uninitialised VMEM,
out-of-bounds reads raise). Edge cases: ragged lengths, lengths off the block grid, length 1 and 0, stale NaN
cache rows, causal blocks of unequal sizes, empty expert groups. Each kernel's CostEstimate is held to the
bytes its pipelined blocks move, counted from the pallas_call's own grid and index maps; each kernel compiles
for deviceless v5p and v6e TPUs at Kimi K2.6 sizes (when libtpu is installed); the model's "pallas" switch
gives the "xla" path's logits.
"""

import importlib.util
import math

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # its `races` flag
from jax._src.state.discharge import discharge_state
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import mla_decode as dec
from kernels_pallas import mla_prefill as pre
from kernels_pallas import moe_gmm as gmm

F32_TOL = 1e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all() and np.abs(b).max() > 1e-3
    return np.abs(a - b).max() / np.abs(b).max()


def tpu_semantics():
    """The TPU interpreter: 2 cores split the parallel grid axes, so two cores writing one block is a race."""
    return pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)


INTERPRETERS = pytest.mark.parametrize("interpret", [True, "tpu"], ids=["interpret", "tpu-races"])


def run(kernel, interpret, *args, **kwargs):
    params = tpu_semantics() if interpret == "tpu" else interpret
    out = jax.block_until_ready(kernel(*args, interpret=params, **kwargs))
    if interpret == "tpu":
        assert not tpu_interpreter.races.races_found, "the TPU interpreter found a data race"
    return out


def normal(rng, shape, dtype=jnp.float32, std=1.0):
    """Fresh inputs from numpy (jax.random would compile a sampler per shape: seconds each on this CPU)."""
    return jnp.asarray((std * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)


# ---------------------------------------------------------------------------------------- race detector

def test_race_detector_flags_two_cores_writing_one_block():
    """The negative control for every `tpu-races` case below: a kernel whose parallel steps share an output
    block must be flagged, or the race assertions would prove nothing."""
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)

    racy = pl.pallas_call(kernel, grid=(2,), in_specs=[pl.BlockSpec((8, 128), lambda i: (0, 0))],
                          out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
                          out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                          compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
                          interpret=tpu_semantics())
    jax.block_until_ready(racy(jnp.ones((8, 128))))
    assert tpu_interpreter.races.races_found


# ---------------------------------------------------------------------------------------------- decode

def decode_inputs(B=4, H=4, L=32, R=16, S=40, lengths=(1, 13, 40, 0), seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q_latent_BHL, q_rope_BHR = normal(rng, (B, H, L), dtype), normal(rng, (B, H, R), dtype)
    latent_BSL, rope_BSR = normal(rng, (B, S, L), dtype, 0.5), normal(rng, (B, S, R), dtype, 0.5)
    lengths_B = jnp.asarray(lengths, jnp.int32)
    return q_latent_BHL, q_rope_BHR, latent_BSL, rope_BSR, lengths_B


def poison_past_lengths(x_BSC, lengths_B, value):
    past_BS = jnp.arange(x_BSC.shape[1])[None, :] >= lengths_B[:, None]
    return jnp.where(past_BS[..., None], jnp.asarray(value, x_BSC.dtype), x_BSC)


@INTERPRETERS
@pytest.mark.parametrize("num_splits", [1, 3])
def test_mla_decode_equals_reference(interpret, num_splits):
    """Lengths 1, 13 (off the 8-row block), 40 (full) and 0; cache rows past each length are NaN for the
    kernel (a stale slot) and zero for the reference (which only reads the first `length` rows). 3 splits
    of 5 blocks leave the last split a clamped, empty slot."""
    q_latent, q_rope, latent, rope, lengths = decode_inputs()
    want = dec.mla_decode_reference(q_latent, q_rope, poison_past_lengths(latent, lengths, 0.0),
                                    poison_past_lengths(rope, lengths, 0.0), lengths, 0.17)
    got = run(dec.mla_decode, interpret, q_latent, q_rope, poison_past_lengths(latent, lengths, jnp.nan),
              poison_past_lengths(rope, lengths, jnp.nan), lengths, 0.17, block_s=8, num_splits=num_splits)
    assert got.shape == want.shape == q_latent.shape
    assert rel(got, want) < F32_TOL
    assert np.all(np.asarray(got[3]) == 0.0)  # length 0: a zero context, not NaN


@INTERPRETERS
def test_mla_decode_reads_one_layer_of_stacked_caches(interpret):
    """Caches as [layers, B, S, .] stacks with a traced layer index (as a scanned model passes them): equal
    to the reference over that layer, with other layers' rows NaN (a kernel reading the wrong layer fails)."""
    q_latent, q_rope, latent, rope, lengths = decode_inputs()
    poison = jnp.full((3, *latent.shape), jnp.nan), jnp.full((3, *rope.shape), jnp.nan)
    latent_stack, rope_stack = poison[0].at[1].set(latent), poison[1].at[1].set(rope)
    want = dec.mla_decode_reference(q_latent, q_rope, latent, rope, lengths, 0.17)
    got = run(dec.mla_decode, interpret, q_latent, q_rope, latent_stack, rope_stack, lengths, 0.17,
              layer=jnp.int32(1), block_s=8, num_splits=2)  # an array: traced inside the jitted kernel
    assert rel(got, want) < F32_TOL


def test_mla_decode_partials_merge_to_the_whole_cache():
    """A cache split by position in two halves (as over two devices): each half's context and log-sum-exp
    (return_lse), merged by merge_partials, equal attention over the whole. Lengths 1 and 13 leave the second
    half empty (lse -inf, weight 0), 40 spans both, 0 leaves both empty (a zero context)."""
    q_latent, q_rope, latent, rope, lengths = decode_inputs(S=48)
    want = dec.mla_decode_reference(q_latent, q_rope, latent, rope, lengths, 0.17)
    contexts, lses = [], []
    for start in (0, 24):
        context, lse = run(dec.mla_decode, True, q_latent, q_rope, latent[:, start:start + 24],
                           rope[:, start:start + 24], jnp.clip(lengths - start, 0, 24), 0.17, block_s=8,
                           return_lse=True)
        contexts.append(context)
        lses.append(lse)
    assert np.isneginf(np.asarray(lses[1][:2])).all() and np.isfinite(np.asarray(lses[0][:3])).all()
    got = dec.merge_partials(jnp.stack(contexts), jnp.stack(lses), lambda x: x.sum(0), lambda x: x.max(0))
    assert rel(got, want) < F32_TOL
    assert np.all(np.asarray(got[3]) == 0.0)


def test_mla_decode_length_one_sees_only_row_zero_and_bf16():
    q_latent, q_rope, latent, rope, _ = decode_inputs(lengths=(1, 1, 1, 1), dtype=jnp.bfloat16)
    lengths = jnp.ones(4, jnp.int32)
    got = run(dec.mla_decode, True, q_latent, q_rope, latent, rope, lengths, 0.17, block_s=8, num_splits=2)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(latent[:, :1].repeat(4, 1), np.float32),
                               rtol=0, atol=0)  # softmax over one row is exactly 1
    want = dec.mla_decode_reference(q_latent, q_rope, latent, rope, jnp.array([5, 40, 17, 8]), 0.17)
    got = run(dec.mla_decode, True, q_latent, q_rope, latent, rope, jnp.array([5, 40, 17, 8]), 0.17, block_s=20)
    assert rel(got, want) < 2e-2  # bf16 inputs, probabilities rounded to bf16 before the value matmul


# --------------------------------------------------------------------------------------------- prefill

def prefill_inputs(B=2, H=3, T=37, Kn=16, R=8, Kv=12, seed=1):
    rng = np.random.default_rng(seed)
    return (normal(rng, (B, H, T, Kn)), normal(rng, (B, H, T, R)), normal(rng, (B, H, T, Kn)),
            normal(rng, (B, T, R)), normal(rng, (B, H, T, Kv)))


@INTERPRETERS
@pytest.mark.parametrize("blocks", [(8, 8), (16, 8), (8, 16)], ids=lambda b: f"bq{b[0]}-bk{b[1]}")
def test_mla_prefill_equals_reference(interpret, blocks):
    """T = 37 is off every block grid (padded keys must stay invisible); unequal blocks put the diagonal
    mid-block; v's width (12) differs from the nope width (16)."""
    args = prefill_inputs()
    want = pre.mla_prefill_reference(*args, 0.21)
    got = run(pre.mla_prefill, interpret, *args, 0.21, block_q=blocks[0], block_k=blocks[1])
    assert got.shape == want.shape
    assert rel(got, want) < F32_TOL


def test_mla_prefill_single_token_and_default_blocks():
    args = prefill_inputs(T=1)
    got = run(pre.mla_prefill, True, *args, 0.21)
    np.testing.assert_allclose(got, args[4], rtol=1e-6)  # token 0 sees only itself: its own value
    args = prefill_inputs(T=50, seed=2)
    assert rel(run(pre.mla_prefill, True, *args, 0.21), pre.mla_prefill_reference(*args, 0.21)) < F32_TOL


# ------------------------------------------------------------------------------------------ grouped matmul

GROUPS = {
    "every-boundary-inside-a-tile": [13, 17, 15, 10, 9],      # all 8 + 5 - 1 work items real: the estimate's case
    "empty-groups-first-and-last": [0, 30, 0, 34, 0],
    "one-group": [0, 0, 64, 0, 0],
    "rows-past-the-groups": [5, 0, 20, 0, 3],                 # 28 of 64 rows owned: the rest must be zero
    "all-empty": [0, 0, 0, 0, 0],
}


def gmm_inputs(M=64, K=64, N=96, E=5, seed=3):
    rng = np.random.default_rng(seed)
    return normal(rng, (M, K)), normal(rng, (E, K, N), std=0.2), normal(rng, (E, K, N), std=0.2)


@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_gmm_equals_reference(groups):
    """tm=8 rows, tk=32 (two contraction steps), tn=48 (two column tiles)."""
    lhs, rhs, rhs2 = gmm_inputs()
    sizes = jnp.asarray(GROUPS[groups], jnp.int32)
    got = run(gmm.gmm, True, lhs, rhs, sizes, tm=8, tk=32, tn=48)
    want = gmm.gmm_reference(lhs, rhs, sizes)
    if groups == "all-empty":
        assert np.all(np.asarray(got) == 0)
        return
    assert rel(got, want) < F32_TOL
    assert np.all(np.asarray(got[int(sizes.sum()):]) == 0)
    got = run(gmm.gmm_swiglu, True, lhs, rhs, rhs2, sizes, tm=8, tk=32, tn=48)
    assert rel(got, gmm.gmm_swiglu_reference(lhs, rhs, rhs2, sizes)) < F32_TOL


@pytest.mark.parametrize("groups", ["every-boundary-inside-a-tile", "rows-past-the-groups"])
def test_gmm_tpu_semantics_no_races(groups):
    """Two cores split the column tiles; consecutive work items of one row tile share its output block."""
    lhs, rhs, rhs2 = gmm_inputs()
    sizes = jnp.asarray(GROUPS[groups], jnp.int32)
    got = run(gmm.gmm_swiglu, "tpu", lhs, rhs, rhs2, sizes, tm=8, tk=32, tn=48)
    assert rel(got, gmm.gmm_swiglu_reference(lhs, rhs, rhs2, sizes)) < F32_TOL


@pytest.mark.parametrize("interpret", [True, "tpu"], ids=["interpret", "tpu-races"])
def test_gmm_reads_one_layer_of_stacked_weights(interpret):
    """Weights as [layers, E, K, N] stacks and a traced layer (a scanned model's routed experts): the layer's
    results, other layers NaN. gmm, gmm_swiglu and the expert FFN built on them."""
    lhs, rhs, rhs2 = gmm_inputs()
    sizes = jnp.asarray(GROUPS["every-boundary-inside-a-tile"], jnp.int32)

    def stack(w):
        return jnp.full((3, *w.shape), jnp.nan).at[2].set(w)

    blocks = dict(tm=8, tk=32, tn=48)
    layer = jnp.int32(2)  # an array: traced inside the jitted kernels
    got = run(gmm.gmm, interpret, lhs, stack(rhs), sizes, layer=layer, **blocks)
    got_swiglu = run(gmm.gmm_swiglu, interpret, lhs, stack(rhs), stack(rhs2), sizes, layer=layer, **blocks)
    assert rel(got, gmm.gmm_reference(lhs, rhs, sizes)) < F32_TOL
    assert rel(got_swiglu, gmm.gmm_swiglu_reference(lhs, rhs, rhs2, sizes)) < F32_TOL
    rng = np.random.default_rng(7)
    x, E = normal(rng, (6, 64)), rhs.shape[0]
    w_down = normal(rng, (E, 96, 64), std=0.2)
    experts = jnp.asarray(np.stack([rng.permutation(E)[:2] for _ in range(6)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(6, 2)), jnp.float32)
    got = gmm.expert_ffn(x, weights, experts, stack(rhs), stack(rhs2), stack(w_down), layer=layer, interpret=True)
    assert rel(got, gmm.expert_ffn_reference(x, weights, experts, rhs, rhs2, w_down)) < F32_TOL


@pytest.mark.parametrize("one_hot", [True, False], ids=["one_hot_rows", "gathered_rows"])
@pytest.mark.parametrize("N,X,E", [(10, 3, 6), (1, 2, 8), (33, 8, 16)])
def test_expert_ffn_equals_references(N, X, E, one_hot, monkeypatch):
    """Against this file's definition and against the model's own (kimi_jax.moe.experts_reference), with the
    pairs sorted and combined by one-hot matmuls (few tokens) and by row gathers (many)."""
    from kimi_jax.moe import experts_reference

    monkeypatch.setattr(gmm, "ONE_HOT_MAX_TOKENS", N if one_hot else N - 1)
    gmm.expert_ffn.clear_cache()  # the path is chosen at trace time

    D, F = 32, 24
    rng = np.random.default_rng(N)
    x = normal(rng, (N, D))
    w_gate, w_up, w_down = normal(rng, (E, D, F), std=0.2), normal(rng, (E, D, F), std=0.2), normal(
        rng, (E, F, D), std=0.2)
    experts = jnp.asarray(np.stack([rng.permutation(E)[:X] for _ in range(N)]), jnp.int32)  # X distinct each
    weights = jnp.asarray(rng.uniform(size=(N, X)), jnp.float32)
    got = run(gmm.expert_ffn, True, x, weights, experts, w_gate, w_up, w_down)
    assert rel(got, gmm.expert_ffn_reference(x, weights, experts, w_gate, w_up, w_down)) < F32_TOL
    assert rel(got, experts_reference(x, weights, experts, w_gate, w_up, w_down)) < F32_TOL


# ------------------------------------------------------------------------------------------- cost estimate

def pallas_calls(fn, *args):
    """Evaluates fn's jaxpr eagerly and returns, for each pallas_call, its concrete operands and params
    (the kernel itself is skipped: its outputs are replaced by zeros)."""
    calls = []

    def evaluate(jaxpr, consts, *values):
        env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, values))
        read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]  # noqa: E731
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if eqn.primitive.name == "pallas_call":
                calls.append((ins, eqn.params))
                outs = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars]
            elif eqn.primitive.name in ("jit", "pjit"):
                outs = evaluate(eqn.params["jaxpr"].jaxpr, eqn.params["jaxpr"].consts, *ins)
            else:
                outs = eqn.primitive.bind(*ins, **eqn.params)
                outs = outs if eqn.primitive.multiple_results else [outs]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    closed = jax.make_jaxpr(fn)(*args)
    evaluate(closed.jaxpr, closed.consts, *args)
    return calls


def moved_bytes(operands, params):
    """What the TPU pipeline copies for this pallas_call: per operand, a block each time its index (from the
    call's own index-map jaxprs on the real scalar-prefetch values) changes between consecutive grid steps,
    plus the first step; plus the scalar-prefetch operands themselves."""
    mapping = params["grid_mapping"]
    prefetch = operands[:mapping.num_index_operands]
    ids = [jnp.asarray(i, jnp.int32) for i in np.indices(mapping.grid).reshape(len(mapping.grid), -1)]
    total = sum(np.asarray(p).nbytes for p in prefetch)
    per_operand = []
    for block in mapping.block_mappings:
        index_map = jex.core.jaxpr_as_fun(discharge_state(block.index_map_jaxpr))
        n_out = len(block.index_map_jaxpr.out_avals)
        index = jax.vmap(lambda *g: index_map(*g, *prefetch)[:n_out])(*ids)
        index = np.stack([np.broadcast_to(np.asarray(i), ids[0].shape) for i in index])
        copies = 1 + np.count_nonzero(np.any(index[:, 1:] != index[:, :-1], axis=0))
        nbytes = copies * math.prod(block.transformed_block_aval.shape) * block.array_aval.dtype.itemsize
        per_operand.append(nbytes)
        total += nbytes
    return total, per_operand


def test_decode_cost_estimate_counts_the_blocks_it_moves():
    B, H, L, R, S, bs = 4, 4, 32, 16, 64, 16
    q_latent, q_rope, latent, rope, _ = decode_inputs(B, H, L, R, S)
    call = lambda lengths: pallas_calls(  # noqa: E731
        lambda *a: dec.mla_decode(*a, 0.1, block_s=bs, num_splits=2, interpret=True),
        q_latent, q_rope, latent, rope, jnp.asarray(lengths, jnp.int32))[0]
    operands, params = call([S] * B)
    estimate = params["cost_estimate"]
    assert moved_bytes(operands, params)[0] == estimate.bytes_accessed
    assert estimate.flops == B * (S // bs) * 2 * H * bs * (2 * L + R)
    # Ragged: only the blocks holding valid rows are read (length 0 still reads its first block).
    lengths = [1, 17, 64, 0]
    total, per_operand = moved_bytes(*call(lengths))
    blocks_read = sum(max(1, -(-n // bs)) for n in lengths)
    assert per_operand[2] == blocks_read * bs * L * 4 and per_operand[3] == blocks_read * bs * R * 4
    assert total < estimate.bytes_accessed


def test_prefill_cost_estimate_counts_the_blocks_it_moves():
    B, H, T, Kn, R, Kv, bq, bk = 2, 3, 64, 16, 8, 12, 16, 16
    operands, params = pallas_calls(lambda *a: pre.mla_prefill(*a, 0.1, block_q=bq, block_k=bk, interpret=True),
                                    *prefill_inputs(B, H, T, Kn, R, Kv))[0]
    estimate = params["cost_estimate"]
    total, per_operand = moved_bytes(operands, params)
    assert total == estimate.bytes_accessed
    nq = T // bq
    assert estimate.flops == B * H * nq * (nq + 1) // 2 * 2 * bq * bk * (Kn + R + Kv)  # causal blocks only
    # Above-diagonal key blocks are never fetched: k_nope moves fewer than B*H*nq*nk blocks.
    assert per_operand[2] < B * H * nq * nq * bk * Kn * 4


@pytest.mark.parametrize("groups", ["every-boundary-inside-a-tile", "empty-groups-first-and-last"])
def test_gmm_cost_estimate_counts_the_blocks_it_moves(groups):
    lhs, rhs, rhs2 = gmm_inputs()
    sizes = jnp.asarray(GROUPS[groups], jnp.int32)
    for fn in (lambda *a: gmm.gmm(*a[:2], a[3], tm=8, tk=32, tn=48, interpret=True),
               lambda *a: gmm.gmm_swiglu(*a, tm=8, tk=32, tn=48, interpret=True)):
        operands, params = pallas_calls(fn, lhs, rhs, rhs2, sizes)[0]
        total, _ = moved_bytes(operands, params)
        if groups.startswith("every"):  # every work item real and each a new group: the estimate's case
            assert total == params["cost_estimate"].bytes_accessed
        else:  # two empty groups: fewer work items, fewer weight blocks
            assert total < params["cost_estimate"].bytes_accessed


def test_gmm_rows_past_the_groups_fetch_nothing_and_expected_estimate_counts_them():
    """An expert-parallel receive buffer at decode: 6 real rows in 3 groups, all in the first of 8 row tiles,
    the other 58 rows past every group (their expert id is the local expert count). The tiles no group reaches
    get "cover" items that only write zeros: no weight or lhs block moves for them, so the weights move once
    per group item. The CostEstimate for routing=(6 rows, 3 groups) counts exactly that; the default (worst
    case) counts far more."""
    lhs, rhs, rhs2 = gmm_inputs()
    sizes = jnp.asarray([2, 2, 0, 2, 0], jnp.int32)
    got = run(gmm.gmm_swiglu, True, lhs, rhs, rhs2, sizes, tm=8, tk=32, tn=48)
    assert rel(got, gmm.gmm_swiglu_reference(lhs, rhs, rhs2, sizes)) < F32_TOL
    assert np.all(np.asarray(got[6:]) == 0)
    call = lambda **kw: pallas_calls(  # noqa: E731
        lambda *a: gmm.gmm_swiglu(*a, tm=8, tk=32, tn=48, interpret=True, **kw), lhs, rhs, rhs2, sizes)[0]
    operands, params = call(routing=(6.0, 3.0))
    total, per_operand = moved_bytes(operands, params)
    block = 32 * 48 * 4
    assert per_operand[1] == per_operand[2] == 2 * 3 * 2 * block  # column blocks x group items x k steps
    assert total == params["cost_estimate"].bytes_accessed
    assert params["cost_estimate"].flops == 2 * 3 * 8 * 64 * 96 * 2  # group items only compute
    assert call()[1]["cost_estimate"].bytes_accessed > 2 * total  # the worst case


# ------------------------------------------------------------------------------------- deviceless compile

K26 = dict(B=64, H=64, L=512, R=64, S=32768, T=4096, Kn=128, Kv=128, E=384, D=7168, F=2048, X=8)
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install libtpu, the `tpu` extra): no "
                                         "deviceless TPU compile")


def tpu_mesh(topology):
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    return jax.sharding.Mesh(np.array(devices).reshape(-1), ("x",))


def compile_for(mesh, fn, *shapes_dtypes, spec=None):
    sharding = jax.sharding.NamedSharding(mesh, spec or jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes_dtypes]
    return jax.jit(fn).lower(*args).compile()


@needs_libtpu
@pytest.mark.parametrize("generation,topology", [("v5p", "v5p:1x1x1"), ("v6e", "v6e:1x1")])
def test_kernels_compile_for_deviceless_tpu_at_k26_sizes(generation, topology):
    """Mosaic accepts every block shape at the real sizes (it rejects illegal ones, see the next test), and
    the compiled program carries each kernel's CostEstimate."""
    c, bf16 = K26, jnp.bfloat16
    mesh = tpu_mesh(topology)
    decode = compile_for(
        mesh, lambda *a: dec.mla_decode(*a, 0.1447, generation=generation, interpret=False),
        ((c["B"], c["H"], c["L"]), bf16), ((c["B"], c["H"], c["R"]), bf16), ((c["B"], c["S"], c["L"]), bf16),
        ((c["B"], c["S"], c["R"]), bf16), ((c["B"],), jnp.int32))
    est = dec.cost_estimate(c["B"], c["H"], c["L"], c["R"], c["S"], bf16, generation=generation)
    assert decode.cost_analysis()["bytes accessed"] >= est.bytes_accessed
    # The rope cache reaches the kernel as a bitcast, not a copy: the program needs no cache-sized temporary.
    assert decode.memory_analysis().temp_size_in_bytes < c["B"] * c["S"] * c["R"] * 2
    compile_for(mesh, lambda *a: pre.mla_prefill(*a, 0.1447, generation=generation, interpret=False),
                ((1, c["H"], c["T"], c["Kn"]), bf16), ((1, c["H"], c["T"], c["R"]), bf16),
                ((1, c["H"], c["T"], c["Kn"]), bf16), ((1, c["T"], c["R"]), bf16),
                ((1, c["H"], c["T"], c["Kv"]), bf16))
    # One decode step's pairs (64 tokens x 8 experts) against all 384 experts; each matmul on its own (the
    # three 384-expert stacks together, 34 GB, exceed a v6e's 32 GB HBM).
    M = c["B"] * c["X"]
    sizes = ((c["E"],), jnp.int32)
    compile_for(mesh, lambda *a: gmm.gmm_swiglu(*a, generation=generation, interpret=False),
                ((M, c["D"]), bf16), ((c["E"], c["D"], c["F"]), bf16), ((c["E"], c["D"], c["F"]), bf16), sizes)
    compile_for(mesh, lambda *a: gmm.gmm(*a, generation=generation, interpret=False),
                ((M, c["F"]), bf16), ((c["E"], c["F"], c["D"]), bf16), sizes)


@needs_libtpu
def test_kernels_read_a_layer_of_a_stack_without_copying_it():
    """A scanned model hands the kernels whole [layers, ...] stacks and the layer index (scalar prefetch):
    Mosaic accepts the 4-D blocks, and XLA allocates no temporary the size of one layer's operand, which it
    would for a layer sliced out of the stack before the call (at v5p-128 decode, ~1 GB per MoE layer)."""
    c, bf16, i32 = K26, jnp.bfloat16, jnp.int32
    mesh = tpu_mesh("v5p:1x1x1")
    layers, B, S = 3, 8, 8192
    decode = compile_for(
        mesh, lambda *a: dec.mla_decode(*a[:5], 0.1447, layer=a[5], generation="v5p", interpret=False),
        ((B, c["H"], c["L"]), bf16), ((B, c["H"], c["R"]), bf16), ((layers, B, S, c["L"]), bf16),
        ((layers, B, S, c["R"]), bf16), ((B,), i32), ((), i32))
    assert decode.memory_analysis().temp_size_in_bytes < B * S * c["R"] * 2  # not even the rope cache's layer
    E, M = 6, 384  # one v5p-128 chip's experts and its dropless receive buffer
    swiglu = compile_for(
        mesh, lambda lhs, wg, wu, sizes, layer: gmm.gmm_swiglu(lhs, wg, wu, sizes, layer=layer, generation="v5p",
                                                               interpret=False),
        ((M, c["D"]), bf16), ((layers, E, c["D"], c["F"]), bf16), ((layers, E, c["D"], c["F"]), bf16),
        ((E,), i32), ((), i32))
    assert swiglu.memory_analysis().temp_size_in_bytes < E * c["D"] * c["F"] * 2


@needs_libtpu
def test_deviceless_compile_rejects_an_illegal_block_and_runs_under_shard_map():
    mesh = tpu_mesh("v5p:2x2x1")
    with pytest.raises(Exception, match="divisible by 8 and 128"):  # S=1000: no legal 128-multiple block
        compile_for(mesh, lambda *a: dec.mla_decode(*a, 0.1, generation="v5p", block_s=200, interpret=False),
                    ((4, 8, 512), jnp.bfloat16), ((4, 8, 64), jnp.bfloat16), ((4, 1000, 512), jnp.bfloat16),
                    ((4, 1000, 64), jnp.bfloat16), ((4,), jnp.int32))
    # Sequences sharded over 4 chips, the kernel per shard (Pallas inside shard_map needs check_vma=False).
    P = jax.sharding.PartitionSpec
    sharded = jax.shard_map(lambda *a: dec.mla_decode(*a, 0.1, generation="v5p", interpret=False), mesh=mesh,
                            in_specs=P("x"), out_specs=P("x"), check_vma=False)
    compile_for(mesh, sharded, ((64, 64, 512), jnp.bfloat16), ((64, 64, 64), jnp.bfloat16),
                ((64, 4096, 512), jnp.bfloat16), ((64, 4096, 64), jnp.bfloat16), ((64,), jnp.int32), spec=P("x"))


# ----------------------------------------------------------------------------------------------- model switch

@pytest.mark.parametrize("loop", ["unroll", "scan"])
def test_model_pallas_path_equals_xla_path(loop):
    """A tiny random model, float32. "pallas": the prompt's 6 tokens through the naive MLA path (prefill
    kernel) into the cache, experts through the grouped matmul, then 3 cached decode steps through the absorbed
    path (decode kernel). Its logits equal the "xla" full forward over all 9 tokens. Under the scan the
    kernels get the whole stacks (routed experts, cache) and the layer index."""
    from kimi_jax import KimiForCausalLM, preset
    from kimi_jax.cache import init_cache

    def model_for(impl):
        cfg = preset("tiny", attention_impl=impl, moe_impl=impl, layer_loop=loop)
        graphdef, state = nnx.split(KimiForCausalLM(cfg, rngs=nnx.Rngs(0)))
        rng = np.random.default_rng(0)  # non-default weights: norms off 1, router bias nonzero
        state = jax.tree.map(lambda w: w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype), state)
        return cfg, nnx.merge(graphdef, state)

    ids = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 9)), jnp.int32)
    _, xla_model = model_for("xla")
    want = nnx.jit(lambda m, x: m(x))(xla_model, ids)

    cfg, model = model_for("pallas")

    @nnx.jit(static_argnames="attend")
    def step(m, tok, pos, cache, attend):
        out = m.forward(tok, pos, cache, attend_cache=attend)
        return out.logits_BTV, out.cache

    cache = init_cache(cfg, 2, 16)
    graphdef, state = nnx.split(model)
    for tokens, attend, kernels in ((6, False, ("mla_prefill", "moe_gmm_swiglu")), (1, True, ("mla_decode",))):
        program = str(jax.make_jaxpr(lambda st, c: nnx.merge(graphdef, st).forward(
            ids[:, :tokens], jnp.zeros((2, tokens), jnp.int32), c, attend_cache=attend).logits_BTV)(state, cache))
        assert all("pallas_call[" in program and name in program for name in kernels), kernels
    prompt, cache = step(model, ids[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), cache, attend=False)
    assert rel(prompt, want[:, :6]) < F32_TOL
    for t in range(6, 9):
        piece, cache = step(model, ids[:, t:t + 1], jnp.full((2, 1), t), cache, attend=True)
        assert rel(piece, want[:, t:t + 1]) < F32_TOL
