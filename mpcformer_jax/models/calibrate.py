"""Calibrate a student's replacements: initial weights and public bounds.

Run once, when a student is made from its teacher (``pipeline.make_student``), over a few
training batches, on the student's own activations (see ``calibrate``):

* ``affine`` norm: each site's scale and bias become the per-channel least-squares fit of
  the exact LayerNorm's output on the input the site receives once the sites before it are
  affine (``_fit_affine_in_order``); then distillation takes over;
* ``layernorm_newton``: each site's bound is the largest token variance seen there (padding
  positions included: they are computed too), times ``MARGIN`` (the Newton start must lie
  below the answer: ``approx.newton_rsqrt``);
* ``2quad_newton``: each layer's bound is the largest (row sum of (s + c)^2) / padded length
  seen there, times ``MARGIN`` (its norms already calibrated, its reciprocal exact).

The bounds are public constants of the compiled program, like the architecture: they tell
the parties the typical scale of the model's activations, not its weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mpcformer_jax import approx
from mpcformer_jax.models.bert import BertForSequenceClassification
from mpcformer_jax.models.config import BertConfig

# Head-room above the largest value seen. Newton from a start below the answer still
# converges up to 3x (rsqrt) or 2x (reciprocal) past its bound and diverges beyond, which
# turns one outlier token into inf and, through the attention, every row into NaN; a
# distilled student's activations also move away from its teacher's. First tried at 1.5:
# the first stage-1 step of a layernorm_newton student on rt was NaN.
MARGIN = 3.0


def needs_calibration(config: BertConfig, start: BertConfig | None = None) -> bool:
    """Whether making this student from weights trained as ``start`` reads training data: a
    calibrated bound (``approx.CALIBRATED``) or an affine norm's least-squares start (see
    ``calibrate`` for the default ``start``)."""
    start = _default_start(config) if start is None else start
    return _affine_sites(config, start).any() or \
        bool({config.norm_replacement, config.softmax_act} & approx.CALIBRATED)


def _default_start(student: BertConfig) -> BertConfig:
    # The student's own network with exact LayerNorms: how a student made from its teacher
    # or from an exact-LayerNorm student was trained.
    return student.replace(norm_act="layernorm")


def _affine_sites(student: BertConfig, start: BertConfig) -> np.ndarray:
    """Per LayerNorm site: affine in the student, exact LayerNorm where it was trained."""
    n_sites = 1 + 2 * student.num_hidden_layers
    return np.array([student.norm_at(i) == "affine" and start.norm_at(i) == "layernorm"
                     for i in range(n_sites)])


def _statistics(config: BertConfig, params, batches: list[dict]) -> dict[str, Any]:
    """Per exact LayerNorm site (forward order): sums for a per-channel fit over real tokens
    and the largest variance of any position; per layer: the largest (s + c)^2 row sum /
    length over real rows."""
    model = BertForSequenceClassification(config)

    @jax.jit
    def run(params, ids, mask):
        seen = []

        def grab(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, nn.LayerNorm) and context.method_name == "__call__":
                seen.append((args[0], out))
            return out

        with nn.intercept_methods(grab):
            _, inter = model.apply({"params": params}, ids, mask, None, True, True)
        return seen, inter["attention_scores"]

    sites: list[dict[str, np.ndarray]] = []
    row_max = np.zeros(config.num_hidden_layers)
    for batch in batches:
        mask = np.asarray(batch["attention_mask"]).astype(bool)
        seen, scores = run(params, batch["input_ids"], batch["attention_mask"])
        if not sites:
            sites = [dict(n=0.0, x=0.0, y=0.0, xx=0.0, xy=0.0, var=0.0) for _ in seen]
        for acc, (x, y) in zip(sites, seen, strict=True):
            acc["var"] = max(acc["var"], float(np.asarray(x, np.float64).var(-1).max()))
            x, y = np.asarray(x, np.float64)[mask], np.asarray(y, np.float64)[mask]
            acc["n"] += len(x)
            acc["x"] += x.sum(0)
            acc["y"] += y.sum(0)
            acc["xx"] += (x * x).sum(0)
            acc["xy"] += (x * y).sum(0)
        for layer, s in enumerate(scores):
            s = np.asarray(s, np.float64)
            sums = (np.square(s + approx.TWO_QUAD_C) * mask[:, None, None, :]).sum(-1) / s.shape[-1]
            real_rows = np.broadcast_to(mask[:, None, :], sums.shape)
            row_max[layer] = max(row_max[layer], float(sums[real_rows].max()))
    return {"sites": sites, "row_max": row_max}


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel least squares y ~ slope * x + intercept over rows (tokens)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = x.mean(0), y.mean(0)
    var_x = np.maximum(((x - mx) ** 2).mean(0), 1e-12)
    slope = ((x - mx) * (y - my)).mean(0) / var_x
    return slope.astype(np.float32), (my - slope * mx).astype(np.float32)


def _fit_affine_in_order(probe: BertConfig, params, batches: list[dict], replaced: np.ndarray
                         ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per-channel affine fits of the LayerNorm sites ``replaced`` marks, one after the other.

    Site k is fitted on the inputs it receives when the replaced sites before it are already
    the fitted affine maps (the others exact LayerNorm), against the exact LayerNorm's outputs
    of the unchanged network (``probe``, exact LayerNorms) on the same tokens. Fitting every
    site on the exact network's own inputs instead (first version) let the errors compound:
    on rt the hidden states of a quad student grew from 12 to 3e4 over six layers, and its KD
    student reached 0.685 dev accuracy against its teacher's 0.755.

    Two eager forwards over all batches at once: one reads the exact outputs, the second
    fits each site on the host as the forward reaches it and goes on with the fitted map, so
    every site's input already has the fits before it. (A jitted forward per fitted site
    cost two compilations and a dozen passes: 44 s of the default run's 998.)
    """
    model = BertForSequenceClassification(probe)
    length = max(np.shape(b["input_ids"])[1] for b in batches)

    def padded(key):
        return np.concatenate([np.pad(np.asarray(b[key]), ((0, 0), (0, length - np.shape(
            b[key])[1]))) for b in batches])

    ids, mask = padded("input_ids"), padded("attention_mask")
    real = mask.astype(bool)

    def is_norm(ctx):
        return isinstance(ctx.module, nn.LayerNorm) and ctx.method_name == "__call__"

    targets = []  # the exact network's LayerNorm outputs, real tokens only, forward order

    def read(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if is_norm(ctx):
            targets.append(np.asarray(out)[real])
        return out

    fits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    reached = []  # sites the second forward has passed, in order

    def fit(next_fun, args, kwargs, ctx):
        if not is_norm(ctx):
            return next_fun(*args, **kwargs)
        site, x = len(reached), args[0]
        reached.append(site)
        if not replaced[site]:
            return next_fun(*args, **kwargs)
        fits[site] = _fit(np.asarray(x)[real], targets[site])
        return x * fits[site][0] + fits[site][1]

    with nn.intercept_methods(read):
        model.apply({"params": params}, ids, mask)
    with nn.intercept_methods(fit):
        model.apply({"params": params}, ids, mask)
    return {i: (slope.copy(), intercept.copy()) for i, (slope, intercept) in fits.items()}


def calibrate(student: BertConfig, params, batches: Iterable[dict],
              start: BertConfig | None = None) -> tuple[BertConfig, Any]:
    """``(config, params)`` of a student, calibrated over ``batches``; a student that needs no
    calibration is returned unchanged.

    ``start``: the network ``params`` were trained as (the teacher, or the distilled student
    a progressive one starts from); by default the student itself with exact LayerNorms. Only
    what differs from it is calibrated: an affine site that was a LayerNorm is fitted, one
    already affine in ``start`` keeps its weights.

    The statistics are the student's own, not its teacher's: the same network with exact
    LayerNorms (and an exact reciprocal) in the replaced places, run on the student's
    weights. A quad student's FFN outputs are not its teacher's GeLU outputs: on rt the
    variance entering layer 0's output LayerNorm reached 1,411 in a quad student against
    131 in its teacher, so bounds read on the teacher made Newton diverge.
    """
    start = _default_start(student) if start is None else start
    if not needs_calibration(student, start):
        return student, params
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch of training data.")
    params = jax.tree_util.tree_map(np.asarray, params)  # a new tree: leaves are replaced
    exact_reciprocal = "2quad" if student.softmax_act == "2quad_newton" else student.softmax_act
    probe = student.replace(norm_act="layernorm", softmax_act=exact_reciprocal, norm_bounds=(),
                            softmax_bounds=())
    if student.norm_replacement == "layernorm_newton":  # the only reader of these statistics
        sites = _statistics(probe, params, batches)["sites"]
        student = student.replace(norm_bounds=tuple(MARGIN * s["var"] for s in sites))
    replaced = _affine_sites(student, start)
    if replaced.any():
        fits = _fit_affine_in_order(probe, params, batches, replaced)
        for site, (slope, intercept) in fits.items():
            _set_norm(params, site, slope, intercept)
    if student.softmax_act == "2quad_newton":
        # Row sums with the norms as calibrated above (an affine student's scores are not
        # those of the same network with LayerNorms).
        row_max = _statistics(student.replace(softmax_act="2quad"), params, batches)["row_max"]
        student = student.replace(softmax_bounds=tuple(MARGIN * float(r) for r in row_max))
    return student, params


def _set_norm(params, site: int, scale: np.ndarray, bias: np.ndarray) -> None:
    bert = params["bert"]
    if site == 0:
        node = bert["embeddings"]["LayerNorm"]
    else:
        layer = bert["encoder"]["layer"][str((site - 1) // 2)]
        node = (layer["attention"]["output"] if site % 2 == 1 else layer["output"])["LayerNorm"]
    node["scale"], node["bias"] = scale, bias
