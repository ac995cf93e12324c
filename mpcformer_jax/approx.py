"""MPC-friendly replacements for BERT's expensive nonlinearities, by name.

Four registries, one per slot: ``GELU_APPROX`` (the FFN activation), ``SOFTMAX_APPROX`` (the
attention normaliser), ``NORM_APPROX`` (the residual-stream normalisation, LayerNorm) and
``POOLER_APPROX`` (the pooler's tanh). ``Approximation`` names one choice for all four slots;
it is the one vocabulary configs, the benchmark and the results tables use. Configs carry
names, never callables, so a config stays hashable and can be a static argument of
``jax.jit`` and of SPU compilation. Adding an approximation is one function and one registry
entry.

Every normaliser takes the attention scores (already scaled by 1/sqrt(head_dim)) and a 0/1 key
mask broadcastable to the scores, and applies the mask *multiplicatively*: under SPU's fixed
point a large additive mask (-1e4 as in BERT) corrupts exp, and a quadratic would square it
(see shared/SPU_NOTES.md). Each row is divided by its sum through one reciprocal per row,
broadcast over the row, rather than one division per element: under MPC a reciprocal is an
iterative protocol, a multiplication is one round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# --------------------------------------------------------------------------- GeLU family

_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)


def gelu(x: Array) -> Array:
    """Exact GeLU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel, 2016).

    Holds everywhere; this is BERT's activation and the reference for all others.
    """
    # Written with erf rather than jax.nn.gelu, which uses erfc: SPU evaluates erf natively,
    # while erfc is lowered to exp, a per-element reciprocal and comparisons. Same function;
    # under ABY3 this cut exact GeLU's bytes 2.6x (497 -> 192 MiB per 98,304 elements).
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def gelu_tanh(x: Array) -> Array:
    """Tanh GeLU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Hendrycks & Gimpel, 2016).

    Within 1e-3 of exact GeLU everywhere; HF's ``gelu_new``.
    """
    return jax.nn.gelu(x, approximate=True)


def relu(x: Array) -> Array:
    """ReLU, max(x, 0). Within 0.17 of GeLU everywhere, 4.1e-3 for |x| > 3; one comparison."""
    return jax.nn.relu(x)


def quad(x: Array) -> Array:
    """MPCFormer's "Quad": 0.125 x^2 + 0.25 x + 0.5 (Li et al., ICLR 2023, Sec. 3.2).

    Not an approximation in the pointwise sense: it stays within 0.57 of GeLU on [-2, 2]
    (0.5 at x = 0) and drifts quadratically outside; distillation adapts the
    network to it. Costs one secret multiplication and no comparison.
    """
    # The same polynomial as 0.125 (x + 1)^2 + 0.375: one square and one constant product,
    # where the expanded form costs a third fixed-point truncation (x * 0.25). Under ABY3 this
    # cut the activation's bytes by 26% (10.1 -> 7.5 MiB per 98,304 elements).
    return 0.125 * jnp.square(x + 1.0) + 0.375


def quad_folded(x: Array) -> Array:
    """quad with its constants moved into the next layer: (x + 1)^2.

    0.125 (x + 1)^2 + 0.375 followed by a Dense layer (W, b) equals (x + 1)^2 followed by
    (0.125 W, b + 0.375 * column sums of W); ``models.fold`` does that in plaintext before the
    weights are shared, which saves one truncation per FFN element under MPC. Not a registry
    entry: the model uses it in place of ``quad`` in a folded model only.
    """
    return jnp.square(x + 1.0)


# PUMA (Dong et al., 2023, "PUMA: Secure Inference of LLaMA-7B in Five Minutes", Sec. 4.2),
# coefficients in ascending powers as published.
_PUMA_F0 = (-0.5054031199708174, -0.42226581151983866, -0.11807612951181953, -0.011034134030615728)
_PUMA_F1 = (0.008526321541038084, 0.5, 0.3603292692789629, 0.0, -0.037688200365904236, 0.0,
            0.0018067462606141187)


def puma(x: Array) -> Array:
    """PUMA's piecewise-polynomial GeLU (Dong et al., 2023), as PUMA's code computes it.

    0 for x < -4; F0 (cubic) on [-4, -1.95); F1 (degree 6, even powers plus 0.5 x) on
    [-1.95, 3]; x for x > 3. Within 2.1e-2 of exact GeLU everywhere (tested; the largest gap is
    at the jump x = 3), so it can replace GeLU without retraining. Costs three comparisons and
    five multiplications. Source: ``hack_gelu`` in secretflow/spu
    examples/python/ml/flax_gpt2/pumabench.py (also ``gelu_poly`` in
    examples/python/ml/experimental_mp/hack_functions.py): the segment selectors are XORs of
    the comparisons (b1 ^ b2 ^ True, b0 ^ b1), local on boolean shares, where an OR would cost
    an AND (ABY3, BERT-base, seq 128: 345.0 MiB and 163 messages per layer, against 346.1 MiB
    and 166 with OR/NOT; results/puma_anchor.md).
    """
    b0 = x < -4.0
    b1 = x < -1.95
    b2 = x > 3.0
    in_f1 = b1 ^ b2 ^ True  # [-1.95, 3]: b1 and b2 never hold together
    in_f0 = b0 ^ b1  # [-4, -1.95)
    x2 = jnp.square(x)
    x3 = x * x2
    x4 = jnp.square(x2)
    x6 = jnp.square(x3)
    f0 = _PUMA_F0[3] * x3 + _PUMA_F0[2] * x2 + _PUMA_F0[1] * x + _PUMA_F0[0]
    f1 = _PUMA_F1[6] * x6 + _PUMA_F1[4] * x4 + _PUMA_F1[2] * x2 + _PUMA_F1[1] * x + _PUMA_F1[0]
    dt = x.dtype
    return b2.astype(dt) * x + in_f0.astype(dt) * f0 + in_f1.astype(dt) * f1


# ---------------------------------------------------------------- softmax family


def _normalise(weights: Array, eps: float = 0.0, *, reciprocal: Array | None = None) -> Array:
    """Divides each row by its sum with one reciprocal per row, broadcast over the row.

    With ``reciprocal`` given, multiplies by it instead: attention computes the row sums
    before P.V and applies their reciprocal to the (smaller) context afterwards. It lives here,
    under this name, so SPU cost attribution counts it as the normaliser's (private/compile.py
    groups ops by the approx function they were traced in).
    """
    if reciprocal is not None:
        return weights * reciprocal
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    if eps:
        denom = denom + eps
    return weights * jnp.reciprocal(denom)


def _finish(weights: Array, mask: Array, values: Array | None, eps: float = 0.0,
            normalise: bool = True):
    """Ends a normaliser: probabilities, or the parts attention needs to reorder the division.

    ``weights`` are unnormalised row weights, *not* masked (masked keys may hold any finite
    value). Without ``values`` this returns ``normalise(weights * mask)``, the probabilities.

    With ``values`` (B, K, heads, head_dim) it returns ``(weights, masked_values, reciprocal)``
    such that ``einsum(weights, masked_values) * reciprocal`` equals ``probs @ values``. The
    mask then multiplies the values (K x head_dim per head) rather than the weights (Q x K),
    the row sums are a product with the 0/1 mask, and the reciprocal scales the context
    (Q x head_dim) rather than the probabilities (Q x K): under MPC every element-wise product
    costs communication, and head_dim < K. ``reciprocal`` is None when nothing is divided.
    """
    if values is None:
        masked = weights * mask
        return _normalise(masked, eps) if normalise else masked
    key_mask = mask.reshape(mask.shape[0], mask.shape[-1])  # (B, K) from (B, 1, 1, K)
    masked_values = values * key_mask[:, :, None, None].astype(values.dtype)
    if not normalise:
        return weights, masked_values, None
    denom = jnp.einsum("bhqk,bk->bhq", weights, key_mask.astype(weights.dtype))[..., None]
    return weights, masked_values, jnp.reciprocal(denom + eps if eps else denom)


# Below this, a masked score never wins the row max; small enough to stay far inside
# SPU's fixed-point range (2^44 at 18 fraction bits), and it never reaches exp.
_MASK_FLOOR = 1e4


def softmax(scores: Array, mask: Array, *, values: Array | None = None):
    """Exact masked softmax, exp(s - m) * mask / sum, m the row max over unmasked keys.

    Holds for all scores. The mask enters the max as a moderate shift and multiplies the
    shifted scores, so exp never sees a huge negative argument (SPU's exp of -1e4 is wrong;
    shared/SPU_NOTES.md); masked keys get exp(0) = 1 and are then dropped by the mask.
    ``values``: see ``_finish``.
    """
    row_max = jnp.max(scores - (1.0 - mask) * _MASK_FLOOR, axis=-1, keepdims=True)
    # Multiplying by the mask sends masked keys to exp(0) (then zeroed) instead of letting a
    # masked score above the unmasked max overflow exp; one multiplication, no comparison.
    shifted = (scores - jax.lax.stop_gradient(row_max)) * mask
    return _finish(jnp.exp(shifted), mask, values)


def two_quad(scores: Array, mask: Array, c: float = 5.0, *, values: Array | None = None):
    """MPCFormer's "2Quad": (s + c)^2 * mask / row sum, c = 5 (Li et al., ICLR 2023, Sec. 3.2).

    A normaliser, not a pointwise approximation of softmax: it keeps rows non-negative and
    summing to one and relies on distillation. Intended for scores roughly in [-c, c]; it
    costs one square and one reciprocal per row, no exp and no max. ``values``: see ``_finish``.
    """
    return _finish(jnp.square(scores + c), mask, values)


def two_relu(scores: Array, mask: Array, eps: float = 1e-6, *, values: Array | None = None):
    """MPCFormer's "2ReLU": relu(s) * mask / (row sum + eps) (Li et al., ICLR 2023, Sec. 3.2).

    eps keeps a row whose scores are all negative finite (it then attends to nothing).
    Holds for scores of any range; costs one comparison per score and a reciprocal per row.
    ``values``: see ``_finish``.
    """
    return _finish(jax.nn.relu(scores), mask, values, eps=eps)


# PUMA runs SPU with fxp_exp_mode 0 (EXP_DEFAULT, i.e. Taylor) and fxp_exp_iters 5
# (secretflow/spu examples/python/ml/flax_llama7b/3pc.json, experimental_mp/3pc_nExp.json),
# where this project's configs use 8. SPU's Taylor exp (libspu/kernel/hal/fxp_approx.cc,
# exp_taylor) is (1 + x / 2^n)^(2^n): one truncation, then n squarings. With n = 5 it is only
# valid down to x = -32 (it returns to 1 at -64 and explodes below), hence PUMA's cut at -14,
# where exp(x) < 1e-6 is dropped.
PUMA_EXP_ITERS = 5
_PUMA_EXP_FLOOR = -14.0


def puma_exp(x: Array, iters: int = PUMA_EXP_ITERS) -> Array:
    """SPU's Taylor exp at PUMA's setting, (1 + x / 2^iters)^(2^iters), written out.

    Computes under any runtime config what SPU's ``jnp.exp`` computes under PUMA's
    (``fxp_exp_iters`` 5): the same truncation and squarings, the same bytes (measured equal,
    results/puma_anchor.md). Within 8.6e-3 of exp on [-14, 0] (worst near x = -2); valid for
    x >= -32 only.
    """
    y = 1.0 + x * (1.0 / 2 ** iters)
    for _ in range(iters):
        y = jnp.square(y)
    return y


def puma_softmax(scores: Array, mask: Array, *, values: Array | None = None):
    """PUMA's softmax (Dong et al., 2023, Sec. 4.2), as PUMA's code and runtime compute it.

    x = s - (1 - mask) 1e4 - max; w = puma_exp(x) * (x > -14); w / row sum. Source:
    ``hack_softmax`` in secretflow/spu examples/python/ml/flax_llama7b/flax_llama7b.py and
    flax_gpt2/pumabench.py
    (max subtraction, the cut ``x > -14``, ``nexp / divisor`` with the compiler option
    ``enable_optimize_denominator_with_broadcast``, i.e. one reciprocal per row), with exp at
    PUMA's 5 Taylor iterations (``puma_exp``). The mask is additive, as in HF BERT: a masked key
    lands near -1e4 after the max subtraction and the cut drops it, so no product with the
    mask is needed. Valid while scores stay far below 1e4 in magnitude (and, in floating point,
    within about 500 of the row max, where puma_exp overflows float32). Probabilities within
    2e-2 of exact softmax (tested; 1.5e-2 on scores of scale 5).
    ``values``: as ``_finish`` (the weights are already 0 at masked keys, so the values are
    not masked and the row sums are plain sums).
    """
    shift = (1.0 - mask) * _MASK_FLOOR  # a product with a public constant: local under MPC
    x = scores - jax.lax.stop_gradient(jnp.max(scores - shift, axis=-1, keepdims=True))
    kept = (x - shift > _PUMA_EXP_FLOOR).astype(scores.dtype)
    # exp reads x without the mask shift: the same output (masked keys are cut), but a float
    # puma_exp of -1e4 would overflow to inf and inf * 0 is NaN.
    weights = puma_exp(x) * kept
    if values is None:
        return _normalise(weights)
    return weights, values, jnp.reciprocal(jnp.sum(weights, axis=-1, keepdims=True))


# Newton's iteration from a calibrated start: no bit decomposition. SPU's own reciprocal and
# rsqrt first normalise their input into [0.5, 1) by locating its highest bit, which costs a
# secret bit decomposition (about 60 of a reciprocal's ~70 rounds under ABY3). When training
# data bounds the input, a fixed start below the answer and a fixed number of steps need only
# multiplications. Measured under ABY3 (one BERT-base layer, seq 128): each product with its
# truncation costs about three messages per party, so 8 steps cost about what SPU's own
# reciprocal (152 messages) and rsqrt do: the bit decomposition is not the expensive part
# there. These entries are kept as the calibrated-range variants the benchmark compares.
RECIPROCAL_STEPS = 8
RSQRT_STEPS = 8


def newton_reciprocal(d: Array, bound: float, steps: int = RECIPROCAL_STEPS) -> Array:
    """1/d by ``steps`` Newton steps y <- y (2 - d y) from y0 = 1/bound.

    For 0 < d <= bound the iterates rise monotonically towards 1/d with relative error
    (1 - d/bound)^(2^steps): with 8 steps, below 1e-3 for d in [bound/37, bound] and below 5%
    for d in [bound/85, bound]. Above the bound it converges (slowly) up to 2 bound and
    diverges beyond. ``bound`` is public (a
    calibration constant of the model, see ``models.calibrate``).
    """
    y = jnp.full_like(d, 1.0 / bound) * (2.0 - d * (1.0 / bound))  # the first step, one product
    for _ in range(steps - 1):
        y = y * (2.0 - d * y)
    return y


def newton_rsqrt(v: Array, bound: float, steps: int = RSQRT_STEPS) -> Array:
    """1/sqrt(v) by ``steps`` Newton steps y <- y (3 - v y^2) / 2 from y0 = 1/sqrt(bound).

    For 0 < v <= bound the iterates rise monotonically towards 1/sqrt(v) (each step multiplies
    a far-off iterate by up to 1.5): with 8 steps, within 1e-3 for v in [bound/90, bound] and
    within 10% for v in [bound/200, bound]. Above the bound it converges (slowly) up to
    3 bound and diverges beyond. ``bound`` is
    public (see ``models.calibrate``).
    """
    y0 = bound ** -0.5
    y = (1.5 * y0) - (0.5 * y0 ** 3) * v  # the first step: products with public constants only
    for _ in range(steps - 1):
        y = y * (1.5 - 0.5 * v * jnp.square(y))
    return y


def two_quad_newton(scores: Array, mask: Array, c: float = 5.0, *, values: Array | None = None,
                    bound: float = 50.0):
    """2Quad with a calibrated reciprocal: (s + c)^2 * mask / row sum, the row sum's inverse by
    ``newton_reciprocal`` (8 steps, no bit decomposition).

    ``bound``: an upper bound of (row sum / padded length), calibrated per layer on training
    data (``models.calibrate``); dividing by the public padded length keeps one bound for
    every bucket. Row sums in [bound/85, bound] get a reciprocal within 5% (the model is
    distilled with it, so it adapts to the function rather than to softmax). The default,
    2 c^2, suits scores near zero (an uncalibrated model). ``values``: see ``_finish``.
    """
    weights = jnp.square(scores + c)
    length = scores.shape[-1]
    if values is None:
        masked = weights * mask
        return masked * _calibrated_reciprocal(jnp.sum(masked, -1, keepdims=True), bound * length)
    key_mask = mask.reshape(mask.shape[0], mask.shape[-1])
    masked_values = values * key_mask[:, :, None, None].astype(values.dtype)
    denom = jnp.einsum("bhqk,bk->bhq", weights, key_mask.astype(weights.dtype))[..., None]
    return weights, masked_values, _calibrated_reciprocal(denom, bound * length)


TWO_QUAD_C = 5.0  # MPCFormer's c, shared by every 2Quad normaliser


def two_quad_len(scores: Array, mask: Array, c: float = TWO_QUAD_C, *,
                 values: Array | None = None, key_weights: Array | None = None,
                 mix: float = 1.0, batched: bool = False):
    """2Quad normalised by the number of valid keys: (s + c)^2 / c^2 * mask / n, with
    n = sum(mask), the row's number of real tokens (this project, issue 19).

    2Quad divides each row by its own sum, so every layer pays one reciprocal per row (about
    65 rounds a layer under ABY3 at BERT-base shape, most of quad+2quad+affine's rounds).
    Here the divisor is the query's length, the same for every row, head and layer:
    ``key_weights`` = mask / (c^2 n) is computed once per query (``query_key_weights``, one
    reciprocal of a (B,) vector) and each layer only multiplies. Rows no longer sum to one:
    they sum to the mean of ((s + c) / c)^2 over the valid keys, which is 1 for scores near
    zero (uniform attention, where 2Quad starts too) and grows with the scores' spread;
    distillation fits the network to that, as it fits 2Quad's shape. Holds for any finite
    scores (nothing data-dependent is divided); n >= 1 always ([CLS] is never masked).

    ``values``: see ``_finish``; the key weights multiply the values (K x head_dim per
    head) and nothing is divided afterwards (reciprocal None).

    ``batched``: with ``values``, the square and the values' key weighting run as one
    elementwise product (``elementwise_products``; the same numbers, one round trip fewer a
    layer under MPC). Set for a model prepared for MPC (``BertConfig.batched_products``).

    ``mix`` < 1 is for training only (``BertConfig.softmax_mix``): each row is then
    (1 - mix) times 2Quad's plus mix times this one, divided per row, so a student started
    from a row-normalised network can be moved to unnormalised rows in steps (an affine
    student has no LayerNorm to absorb a row's sum: switched at once, the rt student's
    hidden states overflowed within two layers).
    """
    if mix < 1.0:
        return _two_quad_mixed(scores, mask, c, values, mix)
    if key_weights is None:
        key_weights = query_key_weights(mask.reshape(mask.shape[0], mask.shape[-1]), c)
    shifted = scores + c
    if values is None:
        return jnp.square(shifted) * key_weights[:, None, None, :].astype(scores.dtype)
    per_key = key_weights[:, :, None, None].astype(values.dtype)
    if batched:
        weights, masked_values = elementwise_products((shifted, shifted), (values, per_key))
    else:
        weights, masked_values = jnp.square(shifted), values * per_key
    return weights, masked_values, None


def elementwise_products(*pairs: tuple[Array, Array]) -> list[Array]:
    """``[a * b for a, b in pairs]`` (b broadcast to a's shape) as one elementwise product of
    the pairs' flattened concatenation.

    Why: SPU runs ops one after another, and each product op pays its own round trips (under
    ABY3 a reshare and a truncation, about 3 rounds) whatever its size. Independent products
    batched into one op pay them once; concatenating, reshaping and slicing shares is free.
    """
    left = jnp.concatenate([a.reshape(-1) for a, _ in pairs])
    right = jnp.concatenate([jnp.broadcast_to(b, a.shape).reshape(-1) for a, b in pairs])
    product = left * right
    out, start = [], 0
    for a, _ in pairs:
        out.append(product[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


def _two_quad_mixed(scores: Array, mask: Array, c: float, values: Array | None, mix: float):
    """(1 - mix) 2Quad + mix 2quad_len, one division per row (``two_quad_len``'s ``mix``)."""
    key_mask = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
    per_row = mix / (c * c * jnp.sum(key_mask, axis=-1, keepdims=True))  # (B, 1, 1, 1)
    if values is None:
        probs = two_quad(scores, mask, c)
        return (1.0 - mix) * probs + jnp.square(scores + c) * key_mask * per_row
    weights, masked_values, reciprocal = two_quad(scores, mask, c, values=values)
    return weights, masked_values, (1.0 - mix) * reciprocal + per_row


def query_key_weights(mask: Array, c: float = TWO_QUAD_C, folded: bool = False) -> Array:
    """mask / (c^2 n) per batch row, n = sum(mask) (``two_quad_len``): once per query.

    ``folded``: the model's attention output layer holds the 1 / c^2 (``models.fold``), so
    only mask / n is computed: no multiplication by a public constant on secrets. Named so
    cost attribution counts it with the attention normaliser (private/compile.py)."""
    inverse = jnp.reciprocal(jnp.sum(mask, axis=-1, keepdims=True))
    return client_key_weights_scaled(mask * inverse, c, folded)


def key_weights_for_client(mask):
    """mask / n per batch row, n = sum(mask), as the client computes it in plaintext (numpy
    or jax) for a model with ``client_key_weights``; an all-zero row stays zero."""
    n = mask.sum(axis=-1, keepdims=True)
    return mask / (n + (n == 0))


def client_key_weights_scaled(weights: Array, c: float = TWO_QUAD_C,
                              folded: bool = False) -> Array:
    """``query_key_weights`` from the client's mask / n (``key_weights_for_client``): only
    the 1 / c^2, which a folded model holds in its attention output layer. Named so cost
    attribution counts it with the attention normaliser (private/compile.py)."""
    return weights if folded else weights * (1.0 / (c * c))


def _calibrated_reciprocal(denom: Array, bound: float) -> Array:
    # Named so cost attribution counts it with the attention normaliser (private/compile.py).
    return newton_reciprocal(denom, bound)


# ---------------------------------------------------------------- linear floor
# The cost floor of issue 5: the same network with nothing in the nonlinearities' places.
# Not a usable model; present so a benchmark can name it like any other variant.


def identity(x: Array) -> Array:
    """No activation, f(x) = x. The linear floor of the benchmark; not a usable model."""
    return x


def mask_only(scores: Array, mask: Array, *, values: Array | None = None):
    """No normaliser, f(s) = s * mask. The linear floor of the benchmark; not a usable model.

    ``values``: see ``_finish`` (nothing is divided, so its reciprocal is None).
    """
    return _finish(scores, mask, values, normalise=False)


# ------------------------------------------------------- residual normalisation
# Every entry maps (x, scale, bias) over the last axis, with the LayerNorm's own parameters
# (same names, same shapes), so a student starts from its teacher's weights and the HF folder
# keeps its layout. ``bound`` is the site's calibration constant (``models.calibrate``).


def layernorm(x: Array, scale: Array, bias: Array, *, eps: float = 1e-12,
              bound: float | None = None) -> Array:
    """Exact LayerNorm, (x - mean) / sqrt(var + eps) * scale + bias (Ba et al., 2016).

    BERT's own; holds everywhere. The model runs flax's ``nn.LayerNorm`` for this entry
    (the same function, kept for bit-identical HF parity); this is its reference form.
    """
    del bound
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def affine_norm(x: Array, scale: Array, bias: Array, *, eps: float = 1e-12,
                bound: float | None = None) -> Array:
    """A frozen per-channel affine map, x * scale + bias: LayerNorm with its per-token
    statistics replaced by constants (BatchNorm at inference; Powerformer's LayerNorm ->
    linear replacement for HE inference, 2024).

    No statistic of the token is computed: one product per element, no reciprocal, no
    square root. Initialised from the teacher by a per-channel least-squares fit of its
    LayerNorm's output on its input over training tokens (``models.calibrate``); then
    distilled. Valid for any input; not an approximation pointwise (a token whose variance
    is far from the typical one is not rescaled).
    """
    del eps, bound
    return x * scale + bias


def layernorm_newton(x: Array, scale: Array, bias: Array, *, eps: float = 1e-12,
                     bound: float | None = None) -> Array:
    """LayerNorm whose 1/sqrt(var + eps) is ``newton_rsqrt`` (8 steps from 1/sqrt(bound)).

    ``bound``: an upper bound of the token variance at this site, calibrated on training
    data (``models.calibrate``). Equals LayerNorm within 1e-3 for variances in
    [bound/90, bound] and 10% in [bound/200, bound]; a token of smaller variance is
    normalised less (its output shrinks towards the bias), one above 3 bound diverges.
    No bit decomposition: about three products a step.
    """
    mean = jnp.mean(x, -1, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), -1, keepdims=True)
    inv = newton_rsqrt(var + eps, 1.0 if bound is None else bound)
    return centred * inv * scale + bias


def identity_norm(x: Array, scale: Array, bias: Array, *, eps: float = 1e-12,
                  bound: float | None = None) -> Array:
    """No normalisation, f(x) = x. For a linear floor without LayerNorm; not a usable model."""
    del scale, bias, eps, bound
    return x


def pooler_linear(x: Array) -> Array:
    """No squashing after the pooler's dense layer, f(x) = x, in place of BERT's tanh.

    Why: tanh is paid once per query, on the [CLS] vector only, but under ABY3 SPU computes
    it as a clamp and a degree-17 Chebyshev recurrence: about 52 sequential rounds, as many
    as a LayerNorm site. The classifier that follows is linear, so the head becomes one
    affine map of [CLS], which prediction-layer distillation fits. Holds for |x| << 1
    (tanh x = x - x^3/3 + ...); a distilled student needs its pooler trained with it.
    """
    return x


# SPU 0.9.5's own tanh (libspu/kernel/hal/fxp_approx.cc, ``tanh_chebyshev``): an odd Chebyshev
# series of degree 17 on [-5, 5], its coefficients float32 as SPU holds them.
SPU_TANH_COEFFS = tuple(float(c) for c in np.float32([
    1.2514045938932097, -0.3655987797163166, 0.17253141478140663, -0.08943445792774211,
    0.047703017901250824, -0.025830290571688078, 0.014338801903468182,
    -0.008541730970059077, 0.0061230685785789475]))
SPU_TANH_RANGE = 5.0


def spu_tanh(x: Array) -> Array:
    """tanh as SPU 0.9.5 computes it, at less than half its communication depth.

    p(x) = sum_k c_k T_{2k+1}(t), t = clamp(x, -5, 5) / 5, with c_k = ``SPU_TANH_COEFFS``
    (SPU's ``tanh_chebyshev``). The same polynomial SPU evaluates, so within 4.9e-3 of tanh
    everywhere (5.8e-4 for |x| <= 0.1, 4.2e-3 for |x| <= 1; SPU's error, not this one's).

    Why: SPU clamps with two comparisons and two selects one after another, then runs the
    recurrence T_{2k+1} = 2 T_2 T_{2k-1} - T_{2k-3}: nine sequential products. Here one
    comparison of [t, -t] against 1 clamps both sides, and the doubling identity
    T_{m+n} = 2 T_m T_n - T_{|m-n|} reaches T_17 in five sequential products, each level
    one batched product. Under ABY3 that is 25 rounds instead of 50 (measured, README).
    Doubling is written a + a: a product with the public 2.0 would cost a truncation.
    Private inference only (``BertConfig.chebyshev_pooler``): training keeps ``jnp.tanh``.
    """
    def twice(a):
        return a + a

    t = x * (1.0 / SPU_TANH_RANGE)
    width = t.shape[-1]
    both = jnp.concatenate([t, -t], axis=-1)
    excess = jnp.where(both > 1.0, 1.0 - both, 0.0)  # one comparison for both sides
    t1 = t + excess[..., :width] - excess[..., width:]  # clamp(t, -1, 1)
    t2 = twice(t1 * t1) - 1.0
    p = jnp.stack([t1, t2]) * jnp.stack([t2, t2])
    t3, t4 = twice(p[0]) - t1, twice(p[1]) - 1.0
    p = jnp.stack([t2, t3, t4]) * jnp.stack([t3, t4, t4])
    t5, t7, t8 = twice(p[0]) - t1, twice(p[1]) - t1, twice(p[2]) - 1.0
    p = jnp.stack([t4, t4, t8, t8, t8]) * jnp.stack([t5, t7, t5, t7, t8])
    t9, t11, t13, t15 = (twice(p[0]) - t1, twice(p[1]) - t3, twice(p[2]) - t3,
                         twice(p[3]) - t1)
    t16 = twice(p[4]) - 1.0
    t17 = twice(t1 * t16) - t15
    terms = jnp.stack([t1, t3, t5, t7, t9, t11, t13, t15, t17], axis=-1)
    return terms @ jnp.asarray(SPU_TANH_COEFFS, terms.dtype)


ActivationFn = Callable[[Array], Array]
# (scores, mask) -> probabilities; also (scores, mask, values=v) -> (weights, values, recip).
NormaliserFn = Callable[..., Any]
NormFn = Callable[..., Array]

GELU_APPROX: dict[str, ActivationFn] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": relu,
    "quad": quad,
    "puma": puma,
    "identity": identity,
}

SOFTMAX_APPROX: dict[str, NormaliserFn] = {
    "softmax": softmax,
    "2quad": two_quad,
    "2relu": two_relu,
    "puma": puma_softmax,
    "2quad_newton": two_quad_newton,
    "2quad_len": two_quad_len,
    "identity": mask_only,
}

POOLER_APPROX: dict[str, ActivationFn] = {
    "tanh": jnp.tanh,
    "linear": pooler_linear,
}

# A normaliser a progressive student may replace, by the one its start was distilled with
# (``DistillConfig.norm_students_from``): 2quad_len and 2quad_newton start from a 2quad student.
PROGRESSIVE_FROM = {"2quad_len": "2quad", "2quad_newton": "2quad"}


def progressive_starts(choice: Approximation) -> list[Approximation]:
    """The students a progressive ``choice`` may start from, first choice first: one step
    away where it can be (its normaliser's ``PROGRESSIVE_FROM`` with the same norms, then
    the same choice with exact LayerNorm), then both steps at once (``PROGRESSIVE_FROM``
    with exact LayerNorm). Empty for a choice with nothing to replace progressively (exact
    LayerNorm and a normaliser distilled from the teacher)."""
    starts = []
    previous = PROGRESSIVE_FROM.get(choice.softmax)
    if previous and choice.norm != "layernorm":
        starts.append(dataclasses.replace(choice, softmax=previous))
    if choice.norm != "layernorm":
        starts.append(dataclasses.replace(choice, norm="layernorm"))
    if previous:
        starts.append(dataclasses.replace(choice, softmax=previous, norm="layernorm"))
    if choice.pooler != "tanh":
        # A replaced pooler starts from the same student with tanh: nothing to calibrate
        # (tanh x ~ x near 0), distillation fits the rest.
        tanh = dataclasses.replace(choice, pooler="tanh")
        starts += [tanh] + [dataclasses.replace(s, pooler="tanh") for s in starts]
    return starts


# Normalisers that take the query's ``key_weights`` (``query_key_weights``), computed once
# per query by the model and passed to every layer.
PER_QUERY_KEY_WEIGHTS = frozenset({"2quad_len"})

NORM_APPROX: dict[str, NormFn] = {
    "layernorm": layernorm,
    "affine": affine_norm,
    "layernorm_newton": layernorm_newton,
    "identity": identity_norm,
}

# Entries that read a calibration constant (``bound``) per site: the model passes it.
CALIBRATED = frozenset({"2quad_newton", "layernorm_newton"})


def _lookup(registry: dict, kind: str, name: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(
            f"Unknown {kind} approximation {name!r}. Available {kind} approximations are: "
            f"{', '.join(sorted(registry))}."
        ) from None


def get_activation(name: str) -> ActivationFn:
    """Returns the GeLU replacement registered as ``name``; ValueError lists the valid names."""
    return _lookup(GELU_APPROX, "activation", name)


def get_pooler(name: str) -> ActivationFn:
    """Returns the pooler-tanh replacement registered as ``name``; ValueError lists the names."""
    return _lookup(POOLER_APPROX, "pooler", name)


def get_normaliser(name: str) -> NormaliserFn:
    """Returns the softmax replacement registered as ``name``; ValueError lists the valid names."""
    return _lookup(SOFTMAX_APPROX, "softmax", name)


def get_norm(name: str) -> NormFn:
    """Returns the LayerNorm replacement registered as ``name``; ValueError lists the names.

    A mixed name (``split_norm``) returns its replacement's function."""
    return _lookup(NORM_APPROX, "normalisation", split_norm(name)[0])


# A mixed normalisation, "<norm>@<site>:<site>...": the replacement at every site except the
# listed ones, which keep exact LayerNorm (sites: 0 = embedding, then 2l + 1 and 2l + 2 for
# layer l's attention and FFN outputs). Why: on trained MiniLM quad+2quad students, one site
# made affine without retraining moves dev accuracy by at most a point, every site affine
# falls to the majority class, and every site affine but layer 0's FFN output (site 2) keeps
# rt's accuracy (0.740 of 0.740) and most of trec's (0.748 of 0.801; sites 2 and 5: 0.801).
# That FFN output is where quad's outlier tokens first enter the residual stream.
_SITES_MARK, _SITES_SEP = "@", ":"


def split_norm(name: str) -> tuple[str, tuple[int, ...]]:
    """"affine@5:2" -> ("affine", (2, 5)); "affine" -> ("affine", ()).

    Raises ValueError for a malformed site list or one attached to exact LayerNorm."""
    base, mark, sites_text = name.partition(_SITES_MARK)
    if not mark:
        return name, ()
    parts = sites_text.split(_SITES_SEP)
    if not all(p.isdigit() for p in parts):
        raise ValueError(
            f"Normalisation {name!r}: after '@' come the sites that keep exact LayerNorm, "
            "as non-negative integers joined by ':' (e.g. 'affine@2:5'; 0 is the embedding's "
            "LayerNorm, 2l+1 and 2l+2 layer l's attention and FFN outputs).")
    if base == "layernorm":
        raise ValueError(f"Normalisation {name!r}: exact LayerNorm has no sites to keep "
                         "exact; name a replacement before '@' (e.g. 'affine@2').")
    return base, tuple(sorted({int(p) for p in parts}))


def join_norm(base: str, exact_sites: tuple[int, ...] = ()) -> str:
    """The inverse of ``split_norm``: the one spelling of ``base`` with ``exact_sites``."""
    if not exact_sites:
        return base
    return f"{base}{_SITES_MARK}{_SITES_SEP.join(str(s) for s in sorted(set(exact_sites)))}"


@dataclasses.dataclass(frozen=True)
class Approximation:
    """One choice for each of the four slots, by registry name.

    ``name`` is the choice's one spelling, ``<activation>+<softmax>[+<norm>[+<pooler>]]``:
    the norm is left out when it is exact LayerNorm and the pooler is tanh, so MPCFormer's
    pairs keep their names ("quad+2quad"); the pooler is left out when it is tanh
    ("quad+2quad+layernorm+linear" spells a linear pooler with exact LayerNorm). ``parse``
    reads that spelling back, plus two aliases: "exact" (BERT itself) and "floor" (nothing
    in the activation's and the attention normaliser's places, LayerNorm and tanh kept: the
    cost floor of MPCFormer's two replacements).
    """

    activation: str = "gelu"
    softmax: str = "softmax"
    norm: str = "layernorm"
    pooler: str = "tanh"

    def __post_init__(self):
        get_activation(self.activation)
        get_normaliser(self.softmax)
        get_norm(self.norm)
        get_pooler(self.pooler)
        # One spelling per choice ("affine@5:2" is "affine@2:5"), so equal choices are equal.
        object.__setattr__(self, "norm", join_norm(*split_norm(self.norm)))

    @property
    def name(self) -> str:
        parts = [self.activation, self.softmax]
        if self.pooler != "tanh":
            parts += [self.norm, self.pooler]
        elif self.norm != "layernorm":
            parts.append(self.norm)
        return "+".join(parts)

    @property
    def label(self) -> str:
        """``name``, or "exact" / "floor" for those two."""
        return {EXACT: "exact", FLOOR: "floor"}.get(self, self.name)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str | Approximation) -> Approximation:
        """"quad+2quad", "quad+2quad_newton+affine", "quad+2quad+affine@2",
        "quad+2quad_len+affine@2+linear", "exact" or "floor" -> Approximation."""
        if isinstance(text, Approximation):
            return text
        text = text.strip()
        if text in _ALIASES:
            return _ALIASES[text]
        parts = text.split("+")
        if len(parts) not in (2, 3, 4) or not all(parts):
            raise ValueError(
                f"Approximation {text!r} must read '<gelu>+<softmax>', "
                "'<gelu>+<softmax>+<norm>' or '<gelu>+<softmax>+<norm>+<pooler>' (e.g. "
                "'quad+2quad', 'quad+2quad+affine', 'quad+2quad+affine@2': affine but site 2 "
                "exact, 'quad+2quad+layernorm+linear': no tanh after the pooler), or be "
                f"'exact' or 'floor'. Activations: {', '.join(sorted(GELU_APPROX))}; softmax: "
                f"{', '.join(sorted(SOFTMAX_APPROX))}; norms: {', '.join(sorted(NORM_APPROX))}; "
                f"poolers: {', '.join(sorted(POOLER_APPROX))}.")
        return cls(*parts)


EXACT = Approximation()
FLOOR = Approximation("identity", "identity")
_ALIASES = {"exact": EXACT, "floor": FLOOR}
