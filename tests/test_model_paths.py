"""Fast paths held to their slow twins on random inputs: absorbed == naive MLA, step-by-step decode == full
forward, grouped experts == the per-pair definition, router semantics, sharded == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax import KimiForCausalLM, preset
from kimi_jax.attention import _write_one_row_each, absorbed_attention, causal_attention, naive_attention
from kimi_jax.cache import init_cache
from kimi_jax.generate import greedy
from kimi_jax.moe import experts_grouped, experts_reference, route
from kimi_jax.generate import generate
from kimi_jax.views import OutMajorMatrix, StackViews, split_layer_views
from sharding import make_mesh
from sharding.rules import SERVE, ShardingError, named_sharding
from numerics import randomize, rel


@pytest.mark.parametrize("T", [1, 3])  # T=1: decode's multiply-reduce context on CPU; T=3: the einsum
@pytest.mark.parametrize("lengths", [(1, 1), (7, 3), (16, 16)])
def test_absorbed_attention_equals_naive(lengths, T):
    B, S, H, Kn, Kr, Kv, L = 2, 16, 4, 16, 8, 12, 32
    ks = jax.random.split(jax.random.key(0), 6)
    q_nope = jax.random.normal(ks[0], (B, T, H, Kn))
    q_rope = jax.random.normal(ks[1], (B, T, H, Kr))
    latent = jax.random.normal(ks[2], (B, S, L))
    k_rope = jax.random.normal(ks[3], (B, S, Kr))
    w_uk = 0.3 * jax.random.normal(ks[4], (H, Kn, L))
    w_uv = 0.3 * jax.random.normal(ks[5], (H, L, Kv))
    # each query sees its sequence's cache up to a ragged length
    last = jnp.asarray(lengths)[:, None] - 1 + jnp.arange(T)[None, :] * 0
    valid = jnp.arange(S)[None, None, :] <= last[:, :, None]
    a, a_max = absorbed_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, valid, 0.17, return_max_logit=True)
    n, n_max = naive_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, valid, 0.17, return_max_logit=True)
    assert rel(a, n) < 1e-5
    assert rel(a_max, n_max) < 1e-5


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_per_head_matmul_equals_a_loop_over_heads(monkeypatch, platform):
    """Both forms of the absorbed attention's per-head product (heads first on CPU, the plain einsum for
    accelerators) == each head's rows times that head's matrix, with several sequences and tokens."""
    import kimi_jax.attention as attention

    monkeypatch.setattr(attention, "target_device", lambda: (platform, "any"))
    x_BTHI = jax.random.normal(jax.random.key(0), (3, 2, 4, 16))
    w_HIO = jax.random.normal(jax.random.key(1), (4, 16, 8))
    want = jnp.stack([x_BTHI[:, :, h] @ w_HIO[h] for h in range(4)], axis=2)
    assert rel(attention._per_head_matmul(x_BTHI, w_HIO), want) < 1e-5


@pytest.mark.parametrize("T,block", [(37, 8), (16, 16), (5, 256)])
def test_causal_attention_equals_naive(T, block):
    """The query-blocked causal path == the reference with the positions mask: outputs, per-head max logits
    and gradients, for T not a multiple of the block and positions that do not start at 0."""
    B, H, Kn, Kr, Kv, L = 2, 4, 16, 8, 12, 32
    ks = jax.random.split(jax.random.key(1), 6)
    args = (jax.random.normal(ks[0], (B, T, H, Kn)), jax.random.normal(ks[1], (B, T, H, Kr)),
            jax.random.normal(ks[2], (B, T, L)), jax.random.normal(ks[3], (B, T, Kr)),
            0.3 * jax.random.normal(ks[4], (H, Kn, L)), 0.3 * jax.random.normal(ks[5], (H, L, Kv)))
    positions = jnp.stack([jnp.arange(T), 7 + jnp.arange(T)])
    valid = positions[:, None, :] <= positions[:, :, None]

    def blocked(*a):
        return causal_attention(*a, positions, 0.17, block=block)

    def naive(*a):
        return naive_attention(*a, valid, 0.17, return_max_logit=True)

    (out, max_logit), (ref, ref_max_logit) = blocked(*args), naive(*args)
    assert rel(out, ref) < 1e-5 and rel(max_logit, ref_max_logit) < 1e-6
    probe = jax.random.normal(ks[0], ref.shape)
    grads = jax.grad(lambda *a: jnp.sum(blocked(*a)[0] * probe), argnums=range(6))(*args)
    ref_grads = jax.grad(lambda *a: jnp.sum(naive(*a)[0] * probe), argnums=range(6))(*args)
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < 1e-5


@pytest.mark.parametrize("platform,blocks", [("cpu", 2), ("tpu", 1)])
def test_causal_attention_blocks_by_target(monkeypatch, platform, blocks):
    """512 tokens: two query blocks for a CPU, one for an accelerator (fewer copies of the attention graph to
    compile; slices of a sequence split over a mesh axis would each become collective permutes)."""
    import kimi_jax.attention as attention

    monkeypatch.setattr(attention, "target_device", lambda: (platform, "any"))
    B, T, H, K, L = 1, 512, 2, 8, 16
    q, latent, w_uk = jnp.ones((B, T, H, K)), jnp.ones((B, T, L)), jnp.ones((H, K, L))
    jaxpr = jax.make_jaxpr(lambda q: causal_attention(q, q, latent, latent[..., :K], w_uk, w_uk.swapaxes(1, 2),
                                                      jnp.arange(T)[None], 0.1))(q)
    assert sum(eqn.primitive.name == "exp" for eqn in jaxpr.jaxpr.eqns) == blocks


@pytest.mark.parametrize("loop", ["unroll", "scan"])
def test_decode_step_by_step_equals_full_forward(loop):
    cfg = preset("tiny", layer_loop=loop)
    model = randomize(KimiForCausalLM(cfg, rngs=nnx.Rngs(1)))
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    full = nnx.jit(lambda m, x: m(x))(model, ids)

    @nnx.jit(static_argnames="attend")
    def step(m, tok, pos, cache, attend):
        out = m.forward(tok, pos, cache, attend_cache=attend)
        return out.logits_BTV, out.cache

    cache = init_cache(cfg, 2, 16)
    # prefill 5 tokens with the naive path into the cache, then decode the rest one at a time (absorbed)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    logits, cache = step(model, ids[:, :5], pos, cache, attend=False)
    pieces = [logits]
    for t in range(5, 12):
        logits, cache = step(model, ids[:, t:t + 1], jnp.full((2, 1), t), cache, attend=True)
        pieces.append(logits)
    assert rel(jnp.concatenate(pieces, axis=1), full) < 1e-5


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("layer", [None, 1])
def test_one_row_cache_write_equals_the_scatter(monkeypatch, layer, platform):
    """Decode's per-sequence dynamic_update_slice cache write (caches split by position; on CPU also batch 1)
    in both forms (under lax.cond on CPU, a select for accelerators) against the scatter it replaces, several
    sequences, on one layer of a stack and on a plain cache, jitted; position S is past this device's rows and
    must leave the cache as it was."""
    import kimi_jax.attention as attention

    monkeypatch.setattr(attention, "target_device", lambda: (platform, "any"))
    B, S, C = 4, 8, 6
    rng = np.random.default_rng(3)
    shape = (B, S, C) if layer is None else (3, B, S, C)
    cache = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    new_BTC = jnp.asarray(rng.standard_normal((B, 1, C)), jnp.float32)
    positions_B = jnp.asarray([0, 5, S, S - 1], jnp.int32)
    at = (jnp.arange(B), positions_B) if layer is None else (layer, jnp.arange(B), positions_B)
    want = cache.at[at].set(new_BTC[:, 0], mode="drop")
    write = jax.jit(lambda c, n, p, i: _write_one_row_each(c, n, p, None if layer is None else i))
    got = write(cache, new_BTC, positions_B, jnp.int32(layer or 0))
    assert not np.array_equal(want, cache)  # rows were written
    np.testing.assert_array_equal(got, want)

def test_chunked_prefill_over_cache_equals_full_forward():
    cfg = preset("tiny")
    model = randomize(KimiForCausalLM(cfg, rngs=nnx.Rngs(3)))
    ids = jax.random.randint(jax.random.key(4), (1, 10), 0, cfg.vocab_size)
    full = nnx.jit(lambda m, x: m(x))(model, ids)

    @nnx.jit
    def chunk(m, tok, pos, cache):
        out = m.forward(tok, pos, cache, attend_cache=True)
        return out.logits_BTV, out.cache

    first, cache = chunk(model, ids[:, :4], jnp.arange(4)[None], init_cache(cfg, 1, 10))
    second, _ = chunk(model, ids[:, 4:], jnp.arange(4, 10)[None], cache)
    assert rel(jnp.concatenate([first, second], 1), full) < 1e-5


@pytest.mark.parametrize("views", ["stacked", "views", "out-major views"])
@pytest.mark.parametrize("N,E,X,block", [(1, 8, 2, None), (5, 16, 3, None), (64, 8, 2, None), (37, 12, 4, 4),
                                         (9, 64, 8, 1)])
def test_grouped_experts_equal_reference(N, E, X, block, views):
    """Stacked expert weights, and the per-expert views of kimi_jax.views (chosen by lax.switch), also with
    each matrix held as its rows of outputs (as split_layer_views gives them on CPU)."""
    D, F = 16, 24
    ks = jax.random.split(jax.random.key(N * E), 6)
    x = jax.random.normal(ks[0], (N, D))
    # choose from a few experts only, so that most experts get no tokens
    experts = jax.random.choice(ks[1], jnp.arange(0, E, 3), (N, X))
    experts = jnp.sort(experts, axis=1)
    weights = jax.random.uniform(ks[2], (N, X), minval=0.1)
    wg, wu = jax.random.normal(ks[3], (2, E, D, F)) * 0.3
    wd = jax.random.normal(ks[4], (E, F, D)) * 0.3
    stacks = {"stacked": [wg, wu, wd], "views": [StackViews(list(w)) for w in (wg, wu, wd)],
              "out-major views": [StackViews([m.T for m in w], True) for w in (wg, wu, wd)]}[views]
    got = jax.jit(experts_grouped, static_argnames="block")(x, weights, experts, *stacks, block=block)
    assert rel(got, experts_reference(x, weights, experts, wg, wu, wd)) < 1e-5


@pytest.mark.parametrize("rows", [None, 1])
def test_layer_views_alias_the_stacks_and_equal_the_model(rows):
    """split_layer_views hands every layer (and routed expert) over as arrays that share the stacks' memory,
    and forward / cached decode through them equal the model's own. With rows=1 the layers' [in, out] matrices
    and the lm_head are handed over as their rows of outputs too."""
    cfg = preset("tiny")
    model = randomize(KimiForCausalLM(cfg, rngs=nnx.Rngs(3)))
    before = nnx.split(model)[1]
    graphdef, state = split_layer_views(model, rows=rows)
    for name in ("w_gate", "w_down"):
        stack = getattr(model.moe_layers.layers.mlp, name)[...]
        views = state["moe_layers"]["layers"]["mlp"][name].get_value()
        L, E = stack.shape[:2]
        assert (views.shape, views[0].shape, views[0].transposed) == (stack.shape, stack.shape[1:], True)
        for i, e in [(0, 0), (L - 1, E - 1)]:
            part = views.parts[i].parts[e]  # the matrix's rows of outputs, in the stack's memory order
            assert part.shape == stack.shape[:1:-1]
            assert part.unsafe_buffer_pointer() - stack.unsafe_buffer_pointer() == (i * E + e) * part.nbytes
            assert np.array_equal(views[i][e], before["moe_layers"]["layers"]["mlp"][name][...][i, e])
    for stack, views, was in [
            (model.moe_layers.layers.mlp.shared.w_up, state["moe_layers"]["layers"]["mlp"]["shared"]["w_up"],
             before["moe_layers"]["layers"]["mlp"]["shared"]["w_up"]),
            (model.dense_layers.layers.attn.wq_a, state["dense_layers"]["layers"]["attn"]["wq_a"],
             before["dense_layers"]["layers"]["attn"]["wq_a"])]:
        stack, views, was = stack[...], views.get_value(), was[...]
        assert views.transposed == (rows == 1) and views.shape == stack.shape
        last = views.parts[-1]
        assert last.shape == (stack.shape[:0:-1] if rows == 1 else stack.shape[1:])
        assert last.unsafe_buffer_pointer() - stack.unsafe_buffer_pointer() == (len(views.parts) - 1) * last.nbytes
        assert np.array_equal(views[len(views.parts) - 1], was[-1])
    head = state["lm_head"].get_value()
    assert isinstance(head, OutMajorMatrix) == (rows == 1)
    if rows == 1:
        assert head.rows_OI.unsafe_buffer_pointer() == model.lm_head[...].unsafe_buffer_pointer()
        assert head.shape == model.lm_head.shape and np.array_equal(head[...], before["lm_head"][...])
    ids = jax.random.randint(jax.random.key(0), (2, 40), 0, cfg.vocab_size)

    def prefill_then_step(state, ids):
        m = nnx.merge(graphdef, state)
        cache = init_cache(cfg, 2, 48, jnp.float32)
        out = m.forward(ids[:, :-1], cache=cache, attend_cache=False)
        step = m.forward(ids[:, -1:], jnp.full((2, 1), ids.shape[1] - 1), out.cache)
        return out.logits_BTV, step.logits_BTV

    got = jax.jit(prefill_then_step)(state, ids)
    want = jax.jit(prefill_then_step)(nnx.split(model)[1], ids)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5


def test_greedy_equals_argmax():
    """generate.greedy (two reductions) picks what jnp.argmax picks: the first of tied best ids, the first NaN."""
    logits = np.array(jax.random.normal(jax.random.key(0), (6, 300)))
    logits[1, [17, 250]] = logits[1].max() + 1.0  # a tie: the first wins
    logits[2, [40, 90]] = np.nan
    logits[3] = -np.inf
    logits[4, 299] = np.inf
    got = jax.jit(greedy)(jnp.asarray(logits))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    np.testing.assert_array_equal(got[1:5], [17, 40, 0, 299])


def test_router_bias_selects_but_does_not_weight():
    cfg = preset("tiny", n_group=1, topk_group=1, n_routed_experts=8, num_experts_per_tok=2,
                 routed_scaling_factor=2.0)
    x = jax.random.normal(jax.random.key(0), (6, cfg.hidden_size))
    w = jax.random.normal(jax.random.key(1), (cfg.hidden_size, 8)) * 0.3
    scores = jax.nn.sigmoid(x @ w)
    weights0, experts0 = route(x, w, jnp.zeros(8), cfg)
    bias = jnp.zeros(8).at[5].set(10.0)  # expert 5 wins selection for every token
    weights1, experts1 = route(x, w, bias, cfg)
    assert (experts1 == 5).any(axis=1).all() and not (experts0 == 5).all()
    # the weights are the UNBIASED scores of the chosen experts, normalised, times the scaling factor
    chosen = jnp.take_along_axis(scores, experts1, axis=1)
    np.testing.assert_allclose(weights1, 2.0 * chosen / chosen.sum(1, keepdims=True), rtol=1e-6)


def test_group_limited_routing_keeps_experts_in_best_groups():
    cfg = preset("tiny", n_group=4, topk_group=2, n_routed_experts=16, num_experts_per_tok=3)
    x = jax.random.normal(jax.random.key(0), (32, cfg.hidden_size))
    w = jax.random.normal(jax.random.key(1), (cfg.hidden_size, 16))
    bias = jax.random.normal(jax.random.key(2), (16,)) * 0.1
    _, experts = route(x, w, bias, cfg)
    biased = np.asarray(jax.nn.sigmoid(x @ w) + bias).reshape(32, 4, 4)
    group_score = np.sort(biased, axis=-1)[..., -2:].sum(-1)
    best = np.argsort(-group_score, axis=-1)[:, :2]
    assert all(set(np.asarray(e) // 4) <= set(g) for e, g in zip(experts, best))


def test_sharded_forward_equals_single_device():
    cfg = preset("tiny", vocab_size=288)  # the byte vocabulary (275) divides no mesh axis
    model = randomize(KimiForCausalLM(cfg, rngs=nnx.Rngs(5)))
    ids = jax.random.randint(jax.random.key(6), (4, 9), 0, cfg.vocab_size)
    expected = nnx.jit(lambda m, x: m(x))(model, ids)
    for shape in ({"expert": 8}, {"data": 2, "expert": 2, "tensor": 2}):
        mesh = make_mesh(shape)
        graphdef, state = nnx.split(model)
        flat = nnx.to_flat_state(state)
        for path, var in flat:
            name = "/".join(map(str, path))
            var.set_value(jax.device_put(var.get_value(), named_sharding(name, var.shape, var.axes, mesh, SERVE)))
        sharded = nnx.merge(graphdef, nnx.from_flat_state(flat))
        assert any(len(v.get_value().sharding.device_set) > 1 for _, v in nnx.to_flat_state(nnx.state(sharded)))
        assert rel(nnx.jit(lambda m, x: m(x))(sharded, ids), expected) < 1e-5


def test_bad_mesh_names_the_parameter():
    mesh = make_mesh({"expert": 8})
    with pytest.raises(ShardingError, match=r"'moe/w_gate'.*\(6, 4, 4\).*'expert' of size 8"):
        named_sharding("moe/w_gate", (6, 4, 4), ("experts", "embed", "expert_mlp"), mesh, SERVE)


def test_out_major_weights_leave_the_model_as_it_was():
    """split_layer_views moves the routed expert stacks (and with rows=1 the layers' matrices and the lm_head)
    into another memory order (kimi_jax.views), and a later call without rows=1 moves the matrices back; the
    model's values, forward and gradients stay those of a model that was never split."""
    cfg = preset("tiny")
    model, twin = (randomize(KimiForCausalLM(cfg, rngs=nnx.Rngs(3))) for _ in range(2))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)

    def loss(m, ids):
        return jnp.mean(m(ids) ** 2)

    want_loss, want = nnx.jit(nnx.value_and_grad(loss))(twin, ids)
    for rows in (1, 4):
        split_layer_views(model, rows=rows)
        mlp = model.moe_layers.layers.mlp
        for w in (mlp.w_gate, mlp.w_up, mlp.w_down):
            assert w[...].format.layout.major_to_minor == (0, 1, 3, 2)
        matrix = (0, 2, 1) if rows == 1 else (0, 1, 2)
        for w in (mlp.shared.w_down, mlp.w_router, model.dense_layers.layers.mlp.w_gate,
                  model.moe_layers.layers.attn.wkv_a):
            assert w[...].format.layout.major_to_minor == matrix
        assert model.lm_head[...].format.layout.major_to_minor == ((1, 0) if rows == 1 else (0, 1))
        assert model.moe_layers.layers.attn.wo[...].format.layout.major_to_minor == (0, 1, 2, 3)
        got_loss, got = nnx.jit(nnx.value_and_grad(loss))(model, ids)
        assert got_loss == want_loss
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert rel(g, w) < 1e-6
        leaves = [jax.tree.leaves(nnx.state(m)) for m in (model, twin)]
        assert all(np.array_equal(a, b) for a, b in zip(*leaves))


def test_generate_moves_the_matrices_and_keeps_the_tokens():
    """generate() at batch 1 hands the matrices over out major and at batch 3 row-major (kimi_jax.views), moving
    the same model's weights back and forth; each sequence gets the tokens it gets alone on a fresh model."""
    cfg = preset("tiny")
    model, twin = (randomize(KimiForCausalLM(cfg, rngs=nnx.Rngs(4))) for _ in range(2))
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 9)).tolist()
    alone = [generate(model, [p], max_new_tokens=6).tokens[0] for p in prompts]
    assert model.lm_head[...].format.layout.major_to_minor == (1, 0)
    together = generate(model, prompts, max_new_tokens=6, temperature=0.0).tokens
    assert model.lm_head[...].format.layout.major_to_minor == (0, 1)
    again = generate(model, prompts[:1], max_new_tokens=6).tokens
    assert together == alone and again == alone[:1]
    assert generate(twin, prompts, max_new_tokens=6).tokens == alone
