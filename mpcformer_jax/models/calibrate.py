"""Calibrate a student's replacements on its teacher: initial weights and public bounds.

Run once, when a student is made from its teacher (``pipeline.make_student``), over a few
training batches:

* ``affine`` norm: each site's scale and bias become the per-channel least-squares fit of
  the teacher's LayerNorm output on its input there (then distillation takes over);
* ``layernorm_newton``: each site's bound is the largest token variance seen there, times
  ``MARGIN`` (the Newton start must lie below the answer: ``approx.newton_rsqrt``);
* ``2quad_newton``: each layer's bound is the largest (row sum of (s + c)^2) / padded length
  seen there, times ``MARGIN``, from the teacher's attention scores.

The bounds are public constants of the compiled program, like the architecture: they tell
the parties the typical scale of the model's activations, not its weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mpcformer_jax.models.bert import BertForSequenceClassification
from mpcformer_jax.models.config import BertConfig

# Head-room above the largest value seen: Newton from a start below the answer still
# converges up to 3x (rsqrt) or 2x (reciprocal) past its bound, and a distilled student's
# activations move a little away from its teacher's.
MARGIN = 1.5
_TWO_QUAD_C = 5.0  # approx.two_quad_newton's c


def needs_calibration(config: BertConfig) -> bool:
    return config.norm_act in ("affine", "layernorm_newton") or \
        config.softmax_act == "2quad_newton"


def _teacher_statistics(config: BertConfig, params, batches: Iterable[dict]) -> dict[str, Any]:
    """Per LayerNorm site (forward order): sums for a per-channel fit and the largest token
    variance; per layer: the largest (s + c)^2 row sum / length."""
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
            x, y = np.asarray(x, np.float64)[mask], np.asarray(y, np.float64)[mask]
            acc["n"] += len(x)
            acc["x"] += x.sum(0)
            acc["y"] += y.sum(0)
            acc["xx"] += (x * x).sum(0)
            acc["xy"] += (x * y).sum(0)
            acc["var"] = max(acc["var"], float(x.var(-1).max()))
        for layer, s in enumerate(scores):
            s = np.asarray(s, np.float64)
            sums = (np.square(s + _TWO_QUAD_C) * mask[:, None, None, :]).sum(-1) / s.shape[-1]
            real_rows = np.broadcast_to(mask[:, None, :], sums.shape)
            row_max[layer] = max(row_max[layer], float(sums[real_rows].max()))
    if not sites:
        raise ValueError("calibration needs at least one batch of training data.")
    return {"sites": sites, "row_max": row_max}


def calibrate(student: BertConfig, student_params, teacher: BertConfig, teacher_params,
              batches: Iterable[dict], layer_map: tuple[int, ...]) -> tuple[BertConfig, Any]:
    """``(student config, student params)`` calibrated on ``teacher`` over ``batches``.

    ``layer_map``: the teacher layer each student layer was copied from. A student that
    needs no calibration is returned unchanged.
    """
    if not needs_calibration(student):
        return student, student_params
    if teacher.norm_act != "layernorm":
        raise ValueError("calibration reads the teacher's exact LayerNorms; the teacher has "
                         f"norm {teacher.norm_act!r}.")
    stats = _teacher_statistics(teacher, teacher_params, batches)
    # Student site -> teacher site: the embedding's, then two per (mapped) layer.
    site_map = [0] + [s for j in layer_map for s in (1 + 2 * j, 2 + 2 * j)]
    sites = [stats["sites"][t] for t in site_map]
    changes: dict[str, Any] = {}
    params = jax.tree_util.tree_map(np.asarray, student_params)
    if student.norm_act == "layernorm_newton":
        changes["norm_bounds"] = tuple(MARGIN * s["var"] for s in sites)
    if student.norm_act == "affine":
        for site, acc in enumerate(sites):
            n = acc["n"]
            mx, my = acc["x"] / n, acc["y"] / n
            var_x = np.maximum(acc["xx"] / n - mx * mx, 1e-12)
            slope = (acc["xy"] / n - mx * my) / var_x
            _set_norm(params, site, slope.astype(np.float32),
                      (my - slope * mx).astype(np.float32))
    if student.softmax_act == "2quad_newton":
        changes["softmax_bounds"] = tuple(MARGIN * float(stats["row_max"][j]) for j in layer_map)
    return student.replace(**changes), params


def _set_norm(params, site: int, scale: np.ndarray, bias: np.ndarray) -> None:
    bert = params["bert"]
    if site == 0:
        node = bert["embeddings"]["LayerNorm"]
    else:
        layer = bert["encoder"]["layer"][str((site - 1) // 2)]
        node = (layer["attention"]["output"] if site % 2 == 1 else layer["output"])["LayerNorm"]
    node["scale"], node["bias"] = scale, bias
