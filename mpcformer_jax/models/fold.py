"""Fold a model's public constants into its weights, in plaintext, before MPC.

Multiplying a secret by a public fixed-point constant costs a truncation under MPC (a round
and bytes per element); multiplying a weight by it in plaintext, before the weights are
secret-shared, costs nothing. ``fold`` moves two such constants into the weights:

* the attention scale 1/sqrt(head_dim) into the query kernel and bias;
* quad's 0.125 and 0.375 into the FFN output layer (``approx.quad_folded``);
* ``2quad_len``'s 1 / c^2 into the attention output layer (``approx.query_key_weights``);
* a linear pooler (``approx.pooler_linear``) into the classifier: W_c (W_p h + b_p) + b_c is
  one affine map of [CLS], (W_p W_c, b_p W_c + b_c), so the query pays one product and one
  truncation fewer. The folded model has no pooler parameters.

The folded model computes the same function (tested); its config says ``folded=True`` so the
forward skips what the weights now hold. Only the owner folds, for private inference.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from mpcformer_jax import approx
from mpcformer_jax.models.config import BertConfig


def fold(config: BertConfig, params: dict[str, Any]) -> tuple[BertConfig, dict[str, Any]]:
    """``(config, params)`` with the public constants in the weights; a folded model is
    returned unchanged."""
    if config.folded:
        return config, params
    params = jax.tree_util.tree_map(np.asarray, params)  # host copies; the caller's are untouched
    layers = params["bert"]["encoder"]["layer"]
    scale = 1.0 / math.sqrt(config.head_dim)
    new_layers = {}
    for name, layer in layers.items():
        layer = dict(layer)
        attention = dict(layer["attention"])
        self_att = dict(attention["self"])
        self_att["query"] = {k: v * scale for k, v in self_att["query"].items()}
        attention["self"] = self_att
        if config.softmax_act in approx.PER_QUERY_KEY_WEIGHTS:
            # context / c^2 @ W = context @ (W / c^2): the bias is added after the product.
            out = dict(attention["output"])
            out["dense"] = {**out["dense"],
                            "kernel": out["dense"]["kernel"] / approx.TWO_QUAD_C ** 2}
            attention["output"] = out
        layer["attention"] = attention
        if config.hidden_act == "quad":
            out = dict(layer["output"])
            dense = dict(out["dense"])
            kernel = dense["kernel"]
            dense["bias"] = dense["bias"] + 0.375 * kernel.sum(axis=0)
            dense["kernel"] = 0.125 * kernel
            out["dense"] = dense
            layer["output"] = out
        new_layers[name] = layer
    bert = dict(params["bert"])
    encoder = dict(bert["encoder"])
    encoder["layer"] = new_layers
    bert["encoder"] = encoder
    params = {**params, "bert": bert}
    if config.pooler_act == "linear":
        pooler = bert.pop("pooler")["dense"]
        head = params["classifier"]
        # float64 for the product, so folding adds no rounding of its own
        kernel = np.asarray(pooler["kernel"], np.float64) @ np.asarray(head["kernel"], np.float64)
        bias = np.asarray(pooler["bias"], np.float64) @ np.asarray(head["kernel"], np.float64) \
            + np.asarray(head["bias"], np.float64)
        dtype = np.asarray(head["kernel"]).dtype
        params["classifier"] = {"kernel": kernel.astype(dtype), "bias": bias.astype(dtype)}
    return config.replace(folded=True), params
