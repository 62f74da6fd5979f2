"""The packed-INT4 grouped matmul (kernels_pallas/moe_gmm_int4.py) held to its definition: kimi_jax.quant's
dequantization followed by the dense grouped-matmul reference. In interpret mode (and the TPU-semantics
interpreter with race detection) on fresh random words and scales: weights bit for bit (one-hot lhs rows pick
single weights), empty groups, rows past the groups, several contraction steps, chunks and column pieces.
Its CostEstimate counts packed words and scales block by block; it compiles for deviceless v5p and v6e at
Kimi K2.6 expert sizes (when libtpu is installed); the model's "pallas" MoE with INT4 experts gives the "xla"
path's logits.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from test_kernels_pallas import (F32_TOL, GROUPS, K26, compile_for, moved_bytes, needs_libtpu, normal, pallas_calls,
                                 rel, run, tpu_mesh)

from kernels_pallas import moe_gmm_int4 as g4
from kimi_jax.quant import dequantize_int4

# M=64 rows in tiles of 8; K=128 inputs in two contraction steps of 64 (8 words, 2 scale rows each), each
# step in two chunks of 4 words; N=96 columns in two tiles of 48 (two cores), each in two pieces of 24.
BLOCKS = dict(tm=8, tk=64, tn=48, chunk=4, sub=24)


def int4_stack(rng, E, K, N, scale_dtype=ml_dtypes.bfloat16):
    """(packed_ENW, scale_ENG): random words (every nibble uniform over the 16 values) and scales."""
    packed = rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, (E, N, K // 8), dtype=np.int32,
                          endpoint=True)
    scale = rng.uniform(0.002, 0.3, (E, N, K // 32)) * rng.choice([-1, 1], (E, N, K // 32))
    return jnp.asarray(packed), jnp.asarray(scale.astype(scale_dtype))


def gmm_int4_inputs(M=64, K=128, N=96, E=5, seed=3, scale_dtype=ml_dtypes.bfloat16):
    rng = np.random.default_rng(seed)
    return normal(rng, (M, K)), int4_stack(rng, E, K, N, scale_dtype), int4_stack(rng, E, K, N, scale_dtype)


@pytest.mark.parametrize("scale_dtype", [ml_dtypes.bfloat16, np.float16, np.float32], ids=str)
def test_dequantize_reference_is_kimi_quant_bit_for_bit(scale_dtype):
    """The kernel file's definition of the weights is kimi_jax.quant's, itself held to compressed-tensors; the
    SPEC's worked example packs q = -8..-1 as 0x76543210."""
    packed, scale = int4_stack(np.random.default_rng(0), 3, 96, 40, scale_dtype)
    for dtype in (jnp.float32, jnp.bfloat16):
        want = dequantize_int4(packed, scale, 96, 32, dtype)
        got = g4.dequantize_reference(packed, scale, dtype)
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))
    example = jnp.full((1, 1, 4), 0x76543210, jnp.int32)
    q = g4.dequantize_reference(example, jnp.ones((1, 1, 1), jnp.float32), jnp.float32)[0, :8, 0]
    assert np.array_equal(np.asarray(q), np.arange(-8, 0))


def one_hot_rows(lhs_MK, rng):
    """lhs with its even rows one-hot at random inputs (their outputs are single weights, exactly), and those
    inputs; odd rows stay random."""
    M, K = lhs_MK.shape
    inputs_M = rng.integers(0, K, M)
    one_hot_MK = np.eye(K, dtype=np.float32)[inputs_M]
    even_M1 = (np.arange(M) % 2 == 0)[:, None]
    return jnp.where(even_M1, jnp.asarray(one_hot_MK), lhs_MK.astype(jnp.float32)).astype(lhs_MK.dtype), inputs_M


def assert_single_weights(got_MN, rhs, sizes_E, inputs_M, dtype):
    """Rows of group g one-hot at input k hold W[g, k, :] of kimi_jax.quant's dequantization, bit for bit."""
    K = rhs[0].shape[-1] * 8
    dense_EKN = np.asarray(dequantize_int4(*rhs, K, 32, dtype)).astype(np.float32)
    owner_M = np.repeat(np.arange(len(sizes_E)), sizes_E)
    rows = np.arange(0, len(owner_M), 2)
    assert np.array_equal(np.asarray(got_MN[rows]).astype(np.float32), dense_EKN[owner_M[rows], inputs_M[rows]])


@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_gmm_int4_equals_reference(groups):
    """float32 lhs, bf16 scales (the CPU model's case); even rows one-hot: the weights are exact."""
    lhs, rhs, rhs2 = gmm_int4_inputs()
    lhs, inputs_M = one_hot_rows(lhs, np.random.default_rng(1))
    sizes = jnp.asarray(GROUPS[groups], jnp.int32)
    got = run(g4.gmm_int4, True, lhs, rhs, sizes, **BLOCKS)
    if groups == "all-empty":
        assert np.all(np.asarray(got) == 0)
        return
    assert rel(got, g4.gmm_int4_reference(lhs, rhs, sizes)) < F32_TOL
    assert np.all(np.asarray(got[int(sizes.sum()):]) == 0)
    assert_single_weights(got, rhs, GROUPS[groups], inputs_M, jnp.float32)
    got = run(g4.gmm_swiglu_int4, True, lhs, rhs, rhs2, sizes, **BLOCKS)
    assert rel(got, g4.gmm_swiglu_int4_reference(lhs, rhs, rhs2, sizes)) < F32_TOL


@pytest.mark.parametrize("dtype,scale_dtype", [(jnp.bfloat16, ml_dtypes.bfloat16), (jnp.float32, np.float16)],
                         ids=["bf16-bf16", "f32-f16"])
def test_gmm_int4_weights_bit_for_bit_in_other_dtypes(dtype, scale_dtype):
    """bf16 compute (the TPU model's case: the product rounded once, to bf16) and float16 scales (rounded on
    the bits in the kernel)."""
    lhs, rhs, _ = gmm_int4_inputs(scale_dtype=scale_dtype)
    lhs, inputs_M = one_hot_rows(lhs.astype(dtype), np.random.default_rng(2))
    sizes = GROUPS["every-boundary-inside-a-tile"]
    got = run(g4.gmm_int4, True, lhs, rhs, jnp.asarray(sizes, jnp.int32), **BLOCKS)
    assert got.dtype == dtype
    assert_single_weights(got, rhs, sizes, inputs_M, dtype)
    tol = F32_TOL if dtype == jnp.float32 else 1e-2
    assert rel(got, g4.gmm_int4_reference(lhs, rhs, jnp.asarray(sizes, jnp.int32))) < tol


def test_gmm_int4_tpu_semantics_no_races():
    """Two cores split the column tiles; consecutive work items of one row tile share its output block."""
    lhs, rhs, rhs2 = gmm_int4_inputs()
    sizes = jnp.asarray(GROUPS["rows-past-the-groups"], jnp.int32)
    got = run(g4.gmm_swiglu_int4, "tpu", lhs, rhs, rhs2, sizes, **BLOCKS)
    assert rel(got, g4.gmm_swiglu_int4_reference(lhs, rhs, rhs2, sizes)) < F32_TOL


def test_gmm_int4_rejects_what_it_cannot_run():
    lhs, (packed, scale), _ = gmm_int4_inputs()
    sizes = jnp.asarray(GROUPS["one-group"], jnp.int32)
    with pytest.raises(ValueError, match="K=120 columns"):
        g4.gmm_int4(lhs[:, :120], (packed, scale), sizes, interpret=True)
    with pytest.raises(ValueError, match="tm=24"):
        g4.gmm_int4(lhs, (packed, scale), sizes, tm=24, interpret=True)


# ------------------------------------------------------------------------------------------- cost estimate

@pytest.mark.parametrize("groups", ["every-boundary-inside-a-tile", "empty-groups-first-and-last"])
def test_gmm_int4_cost_estimate_counts_packed_words_and_scales(groups):
    lhs, rhs, rhs2 = gmm_int4_inputs()
    M, K = lhs.shape
    E, N, _ = rhs[0].shape
    sizes = jnp.asarray(GROUPS[groups], jnp.int32)
    blocks = dict(tm=8, tk=64, tn=48)
    for num_rhs, fn in ((1, lambda x, p, s, p2, s2, g: g4.gmm_int4(x, (p, s), g, **blocks, interpret=True)),
                        (2, lambda x, p, s, p2, s2, g: g4.gmm_swiglu_int4(x, (p, s), (p2, s2), g, **blocks,
                                                                          interpret=True))):
        operands, params = pallas_calls(fn, lhs, *rhs, *rhs2, sizes)[0]
        estimate = params["cost_estimate"]
        total, per_operand = moved_bytes(operands, params)
        num_work = M // 8 + E - 1
        assert estimate.flops == 2 * num_work * 8 * K * N * num_rhs
        if groups.startswith("every"):  # every work item real and each a new group: the estimate's case
            assert total == estimate.bytes_accessed
            # Per weight, a work item moves its packed words (4 B per 8 inputs) and bf16 scales (2 B per 32).
            packed_bytes, scale_bytes = per_operand[1], per_operand[2]
            assert packed_bytes == num_work * (K // 64) * (N // 48) * 48 * 8 * 4
            assert scale_bytes == num_work * (K // 64) * (N // 48) * 48 * 2 * 2
        else:  # two empty groups: fewer work items, fewer weight blocks
            assert total < estimate.bytes_accessed


# ------------------------------------------------------------------------------------- deviceless compile

def test_expert_ffn_int4_reads_one_layer_of_stacked_weights():
    """Packed words and scales as [layers, E, ...] stacks with a traced layer (a scanned model's INT4 experts):
    the layer's result; other layers hold different weights."""
    rng = np.random.default_rng(11)
    E, D, F, N, X = 4, 128, 64, 5, 2
    layers = [[int4_stack(rng, E, K, Nout) for K, Nout in ((D, F), (D, F), (F, D))] for _ in range(2)]
    stacked = [jax.tree.map(lambda *a: jnp.stack(a), *pairs) for pairs in zip(*layers)]
    x = normal(rng, (N, D))
    experts = jnp.asarray(np.stack([rng.permutation(E)[:X] for _ in range(N)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(N, X)), jnp.float32)
    got = g4.expert_ffn_int4(x, weights, experts, *stacked, layer=jnp.int32(1), tm=8, interpret=True)
    want = g4.expert_ffn_int4_reference(x, weights, experts, *layers[1])
    assert rel(got, want) < F32_TOL
    assert rel(got, g4.expert_ffn_int4_reference(x, weights, experts, *layers[0])) > 0.1


@needs_libtpu
@pytest.mark.parametrize("generation,topology", [("v5p", "v5p:1x1x1"), ("v6e", "v6e:1x1")])
def test_gmm_int4_compiles_for_deviceless_tpu_at_k26_sizes(generation, topology):
    """One decode step's pairs (64 tokens x 8 experts) against all 384 packed experts, gate+up and down. Mosaic
    accepts every block, the program moves what the CostEstimate says (plus the schedule), and the scales
    reach the kernel through a bitcast (no temporary the size of a scale stack)."""
    c, bf16, i32 = K26, jnp.bfloat16, jnp.int32
    mesh = tpu_mesh(topology)
    E, D, F, M = c["E"], c["D"], c["F"], c["B"] * c["X"]
    sizes = ((E,), i32)
    for K, N, num_rhs in ((D, F, 2), (F, D, 1)):
        def fn(lhs, *args):
            rhs_list, group_sizes = [args[i:i + 2] for i in range(0, 2 * num_rhs, 2)], args[-1]
            kernel = g4.gmm_swiglu_int4 if num_rhs == 2 else g4.gmm_int4
            return kernel(lhs, *rhs_list, group_sizes, generation=generation, interpret=False)

        compiled = compile_for(mesh, fn, ((M, K), bf16), *[((E, N, K // 8), i32), ((E, N, K // 32), bf16)] * num_rhs,
                               sizes)
        estimate = g4.cost_estimate(M, K, N, E, bf16, num_rhs=num_rhs, swiglu=num_rhs == 2, generation=generation)
        assert estimate.bytes_accessed <= compiled.cost_analysis()["bytes accessed"] < 1.01 * estimate.bytes_accessed
        assert compiled.memory_analysis().temp_size_in_bytes < E * N * (K // 32) * 2


# ----------------------------------------------------------------------------------------------- model switch

def test_model_pallas_int4_experts_equal_xla():
    """A tiny random model (float32) keeping its experts packed INT4 (expert_quant set): the "pallas" MoE
    (expert_ffn_int4, interpreted) gives the "xla" MoE's logits (kimi_jax.quant dequantizing one expert at a
    time). 12 (token, expert) pairs fill 16 rows of 8-row tiles."""
    from kimi_jax import KimiForCausalLM, preset
    from kimi_jax.config import ExpertQuant

    def model_for(impl):
        cfg = preset("tiny", num_hidden_layers=2, moe_impl=impl, expert_quant=ExpertQuant())  # one MoE layer
        graphdef, state = nnx.split(KimiForCausalLM(cfg, rngs=nnx.Rngs(0)))
        rng = np.random.default_rng(0)

        def randomize(w):  # packed words: random nibbles; scales: small, signed; the rest off its defaults
            if w.dtype == jnp.int32:
                return jnp.asarray(rng.integers(-2**31, 2**31, w.shape, dtype=np.int64).astype(np.int32))
            if w.dtype == jnp.bfloat16:
                return jnp.asarray(rng.uniform(0.005, 0.05, w.shape) * rng.choice([-1, 1], w.shape), w.dtype)
            return w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype)

        return nnx.merge(graphdef, jax.tree.map(randomize, state))

    ids = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 3)), jnp.int32)  # 12 pairs: 16 rows of 8
    want = nnx.jit(lambda m, x: m(x))(model_for("xla"), ids)
    model = model_for("pallas")
    graphdef, state = nnx.split(model)
    assert "moe_gmm_int4_swiglu" in str(jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(ids))(state))
    got = nnx.jit(lambda m, x: m(x))(model, ids)
    assert rel(got, want) < F32_TOL
