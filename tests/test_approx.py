"""Each approximation against its exact function over its stated range, and its formula."""

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
