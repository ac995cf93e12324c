"""Each approximation against its exact function over its stated range, and its formula."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpcformer_jax import approx

X = jnp.linspace(-10.0, 10.0, 20001)
EXACT_GELU = np.asarray(approx.gelu(X))


def test_gelu_is_erf_formula():
    from scipy.special import erf

    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    expected = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    np.testing.assert_allclose(approx.gelu(jnp.asarray(x)), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "lo", "hi", "tol"),
    [("gelu_tanh", -10, 10, 1e-3), ("relu", -10, 10, 0.17), ("puma", -10, 10, 2.1e-2),
     ("quad", -2, 2, 0.57)],
)
def test_activation_within_stated_range(name, lo, hi, tol):
    inside = (X >= lo) & (X <= hi)
    err = np.abs(np.asarray(approx.get_activation(name)(X)) - EXACT_GELU)[np.asarray(inside)]
    assert err.max() <= tol


def test_quad_formula_at_points():
    x = jnp.array([-2.0, 0.0, 2.0, 4.0])
    np.testing.assert_allclose(approx.quad(x), [0.5, 0.5, 1.5, 3.5])


def test_puma_pieces():
    # Outside [-4, 3] PUMA is exactly 0 / x; inside, its published polynomials.
    np.testing.assert_allclose(approx.puma(jnp.array([-6.0, -4.5, 3.5, 8.0])),
                               [0.0, 0.0, 3.5, 8.0])
    x = -3.0
    f0 = sum(c * x**i for i, c in enumerate(approx._PUMA_F0))
    x1 = 1.0
    f1 = sum(c * x1**i for i, c in enumerate(approx._PUMA_F1))
    np.testing.assert_allclose(approx.puma(jnp.array([x, x1])), [f0, f1], atol=1e-6)


def _scores_and_mask(seed=0, scale=3.0):
    scores = jax.random.normal(jax.random.PRNGKey(seed), (2, 3, 4, 6)) * scale
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], jnp.float32)[:, None, None, :]
    return scores, mask


def _reference_softmax(scores, mask):
    return jax.nn.softmax(jnp.where(mask > 0, scores, -jnp.inf), axis=-1)


def test_softmax_matches_jax_with_mask():
    scores, mask = _scores_and_mask()
    np.testing.assert_allclose(approx.softmax(scores, mask), _reference_softmax(scores, mask),
                               atol=1e-6)


def test_softmax_ignores_huge_masked_scores():
    scores, mask = _scores_and_mask()
    scores = scores.at[1, :, :, 3:].set(1e4)  # padded keys with absurd scores
    probs = approx.softmax(scores, mask)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs, _reference_softmax(scores, mask), atol=1e-6)


def test_puma_softmax_close_to_exact():
    scores, mask = _scores_and_mask(scale=5.0)
    np.testing.assert_allclose(approx.puma_softmax(scores, mask),
                               _reference_softmax(scores, mask), atol=2e-2)


def test_puma_softmax_formula():
    # PUMA's hack_softmax with exp at SPU's Taylor series, fxp_exp_iters = 5.
    scores, mask = _scores_and_mask(scale=5.0)
    x = np.where(np.asarray(mask) > 0, np.asarray(scores, np.float64), -1e4)
    x = x - x.max(-1, keepdims=True)
    w = (1 + x / 32) ** 32 * (x > -14)
    np.testing.assert_allclose(approx.puma_softmax(scores, mask), w / w.sum(-1, keepdims=True),
                               atol=1e-5)


def test_puma_exp_error_on_its_range():
    x = jnp.linspace(-14.0, 0.0, 14001)
    assert float(jnp.max(jnp.abs(approx.puma_exp(x) - jnp.exp(x)))) <= 8.6e-3


def test_two_quad_formula():
    scores, mask = _scores_and_mask()
    num = (scores + 5.0) ** 2 * mask
    np.testing.assert_allclose(approx.two_quad(scores, mask),
                               num / num.sum(-1, keepdims=True), rtol=1e-5)


def test_two_quad_len_formula_and_one_reciprocal_per_query():
    scores, mask = _scores_and_mask()
    n = mask.sum(-1, keepdims=True)  # valid keys per row
    expected = (scores + 5.0) ** 2 / 25.0 * mask / n
    np.testing.assert_allclose(approx.two_quad_len(scores, mask), expected, rtol=1e-5)
    # Zero scores: uniform attention over the valid keys, as 2Quad's own start.
    probs = np.asarray(approx.two_quad_len(jnp.zeros_like(scores), mask))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    # The divisor is the query's length, not the row's sum: doubling one row's scores' spread
    # changes that row's total (not a distribution), never another row's weights.
    wide = approx.two_quad_len(scores * 3.0, mask)
    assert not np.allclose(np.asarray(wide).sum(-1), 1.0)
    # Folded: mask / n only (the 1 / c^2 is in the attention output weights).
    flat = mask.reshape(mask.shape[0], mask.shape[-1])
    per_row = flat / flat.sum(-1, keepdims=True)
    np.testing.assert_allclose(approx.query_key_weights(flat, folded=True), per_row, rtol=1e-6)
    np.testing.assert_allclose(approx.query_key_weights(flat), per_row / 25.0, rtol=1e-6)


def test_two_quad_len_mixed_with_two_quad_for_training_in_steps():
    scores, mask = _scores_and_mask()
    quad, length = approx.two_quad(scores, mask), approx.two_quad_len(scores, mask)
    np.testing.assert_allclose(approx.two_quad_len(scores, mask, mix=0.0), quad, rtol=1e-5)
    np.testing.assert_allclose(approx.two_quad_len(scores, mask, mix=0.25),
                               0.75 * np.asarray(quad) + 0.25 * np.asarray(length),
                               rtol=1e-5, atol=1e-7)
    # The attention path (weights, masked values, per-row factor) gives the same context.
    values = jax.random.normal(jax.random.PRNGKey(0),
                               (scores.shape[0], scores.shape[-1], scores.shape[1], 3))
    weights, masked, reciprocal = approx.two_quad_len(scores, mask, values=values, mix=0.25)
    context = np.einsum("bhqk,bkhd->bhqd", weights, masked) * np.asarray(reciprocal)
    probs = np.asarray(approx.two_quad_len(scores, mask, mix=0.25))
    np.testing.assert_allclose(context, np.einsum("bhqk,bkhd->bhqd", probs, values),
                               rtol=1e-4, atol=1e-6)


def test_softmax_mix_is_for_length_normalisers_and_never_exported():
    from mpcformer_jax.models import BertConfig

    config = BertConfig.tiny().with_approximation("quad+2quad_len+affine")
    mixed = config.replace(softmax_mix=0.5)
    with pytest.raises(ValueError, match="training step"):
        mixed.to_hf_config()
    with pytest.raises(ValueError, match="softmax_act '2quad' is not one"):
        config.with_approximation("quad+2quad").replace(softmax_mix=0.5)
    with pytest.raises(ValueError, match=r"softmax_mix must be in \[0, 1\]"):
        config.replace(softmax_mix=1.5)
    assert "softmax_mix" not in json.dumps(config.to_hf_config())
    from mpcformer_jax.private.model import prepared_config

    with pytest.raises(ValueError, match="training step"):
        prepared_config(mixed)


def test_two_quad_len_costs_no_reciprocal_per_layer():
    # The model computes the key weights once; with them given, a layer's normaliser holds
    # no reciprocal (division) at all.
    scores, mask = _scores_and_mask()
    flat = mask.reshape(mask.shape[0], mask.shape[-1])
    kw = approx.query_key_weights(flat)
    jaxpr = jax.make_jaxpr(lambda s, v: approx.two_quad_len(s, mask, values=v, key_weights=kw))(
        scores, jnp.ones((scores.shape[0], scores.shape[-1], scores.shape[1], 2)))
    eqns = jaxpr.jaxpr.eqns
    assert not {e.primitive.name for e in eqns} & {"div", "rsqrt", "exp", "log"}
    assert all(e.params.get("y", 1) > 0 for e in eqns if e.primitive.name == "integer_pow")
    # ... while the standalone call (no key weights) divides once, by the row count.
    alone = jax.make_jaxpr(lambda s: approx.two_quad_len(s, mask))(scores).jaxpr.eqns
    assert any(e.primitive.name == "div" or (e.primitive.name == "integer_pow"
                                             and e.params["y"] < 0) for e in alone)


def test_two_relu_formula_and_all_negative_row():
    scores, mask = _scores_and_mask()
    num = jnp.maximum(scores, 0) * mask
    np.testing.assert_allclose(approx.two_relu(scores, mask),
                               num / (num.sum(-1, keepdims=True) + 1e-6), rtol=1e-5)
    negative = -jnp.abs(scores) - 1.0
    np.testing.assert_array_equal(approx.two_relu(negative, mask), 0.0)


@pytest.mark.parametrize("name", ["softmax", "2quad", "2relu", "puma"])
def test_normalisers_are_distributions_over_unmasked_keys(name):
    scores, mask = _scores_and_mask(seed=1)
    scores = jnp.abs(scores) if name == "2relu" else scores  # rows with a positive score
    probs = np.asarray(approx.get_normaliser(name)(scores, mask))
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs[1, ..., 3:], 0.0)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="Available activation approximations are: .*quad"):
        approx.get_activation("cubic")
    with pytest.raises(ValueError, match="Available softmax approximations are: .*2quad"):
        approx.get_normaliser("3quad")


def test_approximation_parse_round_trips_every_benchmark_name():
    from mpcformer_jax.bench.variants import VARIANTS

    for v in VARIANTS:
        a = approx.Approximation.parse(v.name)
        assert a == v.approximation
        assert approx.Approximation.parse(a.name) == a  # the canonical name reads back
        assert approx.Approximation.parse(a.label) == a
    assert approx.Approximation.parse("exact") == approx.EXACT
    assert approx.Approximation.parse("gelu+softmax").label == "exact"


@pytest.mark.parametrize("bad, names", [
    ("nope", "Activations: gelu, .*quad"),          # not a spelling at all
    ("quad+3quad", "Available softmax approximations are: .*2quad"),
    ("cubic+2quad", "Available activation approximations are: .*quad"),
    ("quad+2quad+bogus", "layernorm"),
])
def test_approximation_parse_refuses_bad_names_naming_valid_ones(bad, names):
    with pytest.raises(ValueError, match=names):
        approx.Approximation.parse(bad)


@pytest.mark.parametrize("name", sorted(approx.SOFTMAX_APPROX))
def test_reordered_attention_equals_probs_times_values(name):
    """``values=`` (mask on v, division after P.V) gives the same context as probs @ v."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    scores = jax.random.normal(keys[0], (2, 3, 4, 6)) * 2.0
    values = jax.random.normal(keys[1], (2, 6, 3, 5))
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], jnp.float32)[:, None, None, :]
    fn = approx.get_normaliser(name)
    expected = jnp.einsum("bhqk,bkhd->bhqd", fn(scores, mask), values)
    weights, masked_values, recip = fn(scores, mask, values=values)
    got = jnp.einsum("bhqk,bkhd->bhqd", weights, masked_values)
    if recip is not None:
        got = got * recip
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- calibrated Newton entries


@pytest.mark.parametrize("lo_ratio, tol", [(37.0, 1e-3), (85.0, 0.05)])
def test_newton_reciprocal_within_stated_range(lo_ratio, tol):
    bound = 7.5
    d = np.geomspace(bound / lo_ratio, bound, 500)
    y = np.asarray(approx.newton_reciprocal(jnp.asarray(d), bound))
    assert np.max(np.abs(y * d - 1)) < tol
    # Rising from below: never above the answer inside the range.
    assert np.all(y * d <= 1 + 1e-6)


@pytest.mark.parametrize("lo_ratio, tol", [(90.0, 1e-3), (200.0, 0.1)])
def test_newton_rsqrt_within_stated_range(lo_ratio, tol):
    bound = 3.0
    v = np.geomspace(bound / lo_ratio, bound, 500)
    y = np.asarray(approx.newton_rsqrt(jnp.asarray(v), bound))
    assert np.max(np.abs(y * np.sqrt(v) - 1)) < tol


def test_two_quad_newton_equals_two_quad_when_row_sums_are_in_range():
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.normal(size=(2, 3, 5, 5)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)[:, None, None, :]
    exact = approx.two_quad(scores, mask)
    sums = np.asarray(jnp.sum(jnp.square(scores + 5.0) * mask, -1)) / 5
    ours = approx.two_quad_newton(scores, mask, bound=float(sums.max()))
    assert sums.max() / sums.min() < 37  # inside the 1e-3 range
    np.testing.assert_allclose(ours, exact, rtol=2e-3, atol=1e-6)
    # The reordered form agrees too (probs @ v as weights @ masked v * reciprocal).
    values = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
    w, mv, r = approx.two_quad_newton(scores, mask, values=values, bound=float(sums.max()))
    np.testing.assert_allclose(jnp.einsum("bhqk,bkhd->bhqd", w, mv) * r,
                               jnp.einsum("bhqk,bkhd->bhqd", exact, values), rtol=3e-3,
                               atol=1e-5)


def test_norm_entries_formulas():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 16)) * 2.0 + 0.5, jnp.float32)
    scale = jnp.asarray(rng.normal(size=16), jnp.float32)
    bias = jnp.asarray(rng.normal(size=16), jnp.float32)
    import flax.linen as nn

    flax_ln = nn.LayerNorm(epsilon=1e-12).apply({"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(approx.layernorm(x, scale, bias), flax_ln, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(approx.affine_norm(x, scale, bias), x * scale + bias)
    np.testing.assert_array_equal(approx.identity_norm(x, scale, bias), x)
    var = np.asarray(jnp.var(x, -1))
    bound = float(var.max()) * 1.5
    assert var.min() > bound / 90  # inside the 1e-3 range of newton_rsqrt
    np.testing.assert_allclose(approx.layernorm_newton(x, scale, bias, bound=bound), flax_ln,
                               rtol=2e-3, atol=2e-3)


def test_approximation_vocabulary():
    a = approx.Approximation.parse("quad+2quad_newton+affine")
    assert (a.activation, a.softmax, a.norm) == ("quad", "2quad_newton", "affine")
    assert approx.Approximation.parse(a.name) == a and str(a) == a.name
    assert approx.Approximation.parse("quad+2quad").name == "quad+2quad"
    assert approx.Approximation.parse("quad+2quad+layernorm") == \
        approx.Approximation.parse("quad+2quad")
    assert approx.Approximation.parse("exact") == approx.EXACT and approx.EXACT.label == "exact"
    assert approx.FLOOR.label == "floor" and approx.EXACT.name == "gelu+softmax"
    with pytest.raises(ValueError, match="norms: affine"):
        approx.Approximation.parse("quad")
    with pytest.raises(ValueError, match="Unknown normalisation approximation 'batchnorm'"):
        approx.Approximation.parse("quad+2quad+batchnorm")


def test_pooler_slot_formula_spelling_and_progressive_starts():
    x = jnp.linspace(-3, 3, 13)
    np.testing.assert_array_equal(approx.get_pooler("linear")(x), x)
    np.testing.assert_allclose(approx.get_pooler("tanh")(x), np.tanh(np.asarray(x)), rtol=1e-6)
    a = approx.Approximation.parse("quad+2quad_len+affine@2+linear")
    assert (a.activation, a.softmax, a.norm, a.pooler) == ("quad", "2quad_len", "affine@2",
                                                            "linear")
    assert approx.Approximation.parse(a.name) == a and a.name == "quad+2quad_len+affine@2+linear"
    # tanh is BERT's own: left out of the name, so every older name reads the same.
    assert approx.Approximation.parse("quad+2quad+affine+tanh").name == "quad+2quad+affine"
    plain = approx.Approximation.parse("quad+2quad+layernorm+linear")
    assert plain.name == "quad+2quad+layernorm+linear" and plain.norm == "layernorm"
    assert approx.EXACT.pooler == "tanh" and approx.FLOOR.pooler == "tanh"
    # A replaced pooler may start from its tanh student, the nearest first.
    starts = [s.name for s in approx.progressive_starts(a)]
    assert starts.index("quad+2quad_len+affine@2") < starts.index("quad+2quad_len")
    assert starts[:3] == ["quad+2quad+affine@2+linear", "quad+2quad_len+layernorm+linear",
                          "quad+2quad+layernorm+linear"]
    assert [s.name for s in approx.progressive_starts(plain)] == ["quad+2quad"]
    with pytest.raises(ValueError, match="Available pooler approximations are: linear, tanh"):
        approx.Approximation.parse("quad+2quad+affine+sigmoid")
    with pytest.raises(ValueError, match="poolers: linear, tanh"):
        approx.Approximation.parse("quad+2quad+affine+linear+x")


def test_mixed_norm_names_one_spelling_and_clear_errors():
    a = approx.Approximation.parse("quad+2quad+affine@5:2:2")
    assert a.norm == "affine@2:5" and a.name == "quad+2quad+affine@2:5"
    assert approx.Approximation.parse(a.name) == a
    assert approx.split_norm("affine@2:5") == ("affine", (2, 5))
    assert approx.split_norm("affine") == ("affine", ()) and approx.join_norm("affine") == "affine"
    assert approx.get_norm("affine@2") is approx.affine_norm
    with pytest.raises(ValueError, match="non-negative integers joined by ':'"):
        approx.Approximation.parse("quad+2quad+affine@2,5")
    with pytest.raises(ValueError, match="non-negative integers"):
        approx.Approximation.parse("quad+2quad+affine@")
    with pytest.raises(ValueError, match="exact LayerNorm has no sites"):
        approx.Approximation.parse("quad+2quad+layernorm@2")
    with pytest.raises(ValueError, match="Unknown normalisation approximation 'batchnorm'"):
        approx.get_norm("batchnorm@1")


def _spu_tanh_as_spu_writes_it(x):
    """SPU 0.9.5's ``tanh_chebyshev`` step by step: clamp to [-5, 5], scale by 0.2, then the
    recurrence P_{k+1} = (4 t^2 - 2) P_k - P_{k-1} from P_0 = t, P_1 = t (4 t^2 - 3)."""
    t = np.clip(np.asarray(x, np.float64), -5.0, 5.0) * 0.2
    y = 4.0 * t * t - 2.0
    poly = [t, t * (y - 1.0)]
    while len(poly) < len(approx.SPU_TANH_COEFFS):
        poly.append(y * poly[-1] - poly[-2])
    return np.stack(poly, -1) @ np.asarray(approx.SPU_TANH_COEFFS)


def test_spu_tanh_is_spus_polynomial_at_lower_depth():
    x = np.linspace(-12.0, 12.0, 4801, dtype=np.float32)
    got = np.asarray(approx.spu_tanh(jnp.asarray(x)))
    np.testing.assert_allclose(got, _spu_tanh_as_spu_writes_it(x), atol=3e-6)
    # The accuracy its docstring states (SPU's own).
    error = np.abs(got - np.tanh(x))
    assert error.max() < 4.9e-3
    assert error[np.abs(x) <= 0.1].max() < 6e-4 and error[np.abs(x) <= 1].max() < 4.3e-3
    # Saturated: past the clamp the value is the series at +-1, odd.
    edge = float(np.sum(approx.SPU_TANH_COEFFS))
    np.testing.assert_allclose(got[[0, -1]], [-edge, edge], atol=3e-6)
    np.testing.assert_allclose(got, -got[::-1], atol=3e-6)


def test_elementwise_products_batch_without_changing_a_value():
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
    weights = jnp.asarray(rng.uniform(size=(2, 5, 1, 1)), jnp.float32)
    square, scaled = approx.elementwise_products((scores, scores), (values, weights))
    np.testing.assert_array_equal(square, scores * scores)
    np.testing.assert_array_equal(scaled, values * weights)
    # 2quad_len batched (what prepare sets) is bit-identical to its two products.
    mask = jnp.ones((2, 5)).at[:, 3:].set(0.0)
    key_mask = mask[:, None, None, :]
    plain = approx.two_quad_len(scores, key_mask, values=values)
    batched = approx.two_quad_len(scores, key_mask, values=values, batched=True)
    for a, b in zip(plain[:2], batched[:2], strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain[2] is None and batched[2] is None
