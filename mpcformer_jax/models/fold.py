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

``fold_norms`` (below) goes further for affine norm sites: their per-channel scale and shift,
weights themselves, move into the Dense layers around the residual stream.
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


# --------------------------------------------------------------------------- norm folding
#
# An affine norm site, v = g * z + b, costs a secret elementwise product and a truncation
# per element under MPC, though g and b are weights. Every reader of v is linear: the next
# sublayer's input Dense layers (Q, K, V or the FFN's first layer), the pooler, and the
# residual sum. So the stream can be carried in a basis, v = D * s + c (D, c per channel,
# owner-side constants), with s what the nodes hold: a reader's kernel absorbs D and c
# (s (D W) + (c W + b)), and a sublayer's output Dense layer absorbs 1 / D so that the
# residual sum stays in the basis (s + F / D). A folded site is then free: it only updates
# (D, c). A materialised site computes v = (g D) * s + (g c + b), one product as before,
# and resets the basis.
#
# Which sites fold is a public rule of the architecture (never of the weights, which would
# leak through the compiled program): a site folds when the next site is affine (it then
# folds or materialises the basis) or when it is the last site (the pooler reads it);
# sites 2l + 2 (FFN outputs) materialise otherwise, so a basis spans at most two sites.
# The short span bounds precision: the readers' kernels hold D * W, whose small entries
# lose relative precision in fixed point, and s grows as F / D. An exact LayerNorm site
# needs the true stream (its statistics are not linear): the site before it materialises,
# and its own scale and bias fold like an affine site's.


def norm_fold_sites(config: BertConfig) -> tuple[int, ...]:
    """The normalisation sites whose per-channel affine map ``fold_norms`` moves into the
    weights (the rule above): affine sites, and exact LayerNorm sites' scale and bias."""
    last = 2 * config.num_hidden_layers
    kinds = [config.norm_at(site) for site in range(last + 1)]
    folded = []
    for site, kind in enumerate(kinds):
        if kind not in ("affine", "layernorm"):
            continue
        next_affine = site < last and kinds[site + 1] == "affine"
        spans = site == 0 or site % 2 == 1 or kind == "layernorm"
        if site == last or (next_affine and spans):
            folded.append(site)
    return tuple(folded)


def _read(dense: dict, scale: np.ndarray, shift: np.ndarray) -> dict:
    """A Dense layer reading v = scale * s + shift, as one reading s."""
    kernel = np.asarray(dense["kernel"], np.float64)
    return {**dense, "kernel": (scale[:, None] * kernel).astype(np.float32),
            "bias": (np.asarray(dense["bias"], np.float64) + shift @ kernel).astype(np.float32)}


def _write(dense: dict, scale: np.ndarray) -> dict:
    """A Dense layer whose output is added to a stream held in basis ``scale``."""
    return {**dense,
            "kernel": (np.asarray(dense["kernel"], np.float64) / scale).astype(np.float32),
            "bias": (np.asarray(dense["bias"], np.float64) / scale).astype(np.float32)}


def fold_norms(config: BertConfig, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the affine maps of ``config.folded_norm_sites`` moved into the Dense
    layers that read and write the residual stream (see above); those sites' ``scale`` and
    ``bias`` are dropped, materialised affine sites' rewritten. The forward of ``config``
    (folded sites skipped) on the result is the forward of the unfolded model."""
    sites = set(config.folded_norm_sites)
    if not sites:
        return params
    params = jax.tree_util.tree_map(np.asarray, params)  # host copies; the caller's untouched
    bert = dict(params["bert"])
    embeddings = dict(bert["embeddings"])
    encoder = dict(bert["encoder"])
    layers = {name: {part: dict(v) for part, v in layer.items()}
              for name, layer in encoder["layer"].items()}

    def norm_holder(site):  # the (copied) dict holding site's "LayerNorm"
        if site == 0:
            return embeddings
        layer = layers[str((site - 1) // 2)]
        if site % 2 == 0:
            layer["output"] = dict(layer["output"])
            return layer["output"]
        layer["attention"] = dict(layer["attention"])
        layer["attention"]["output"] = dict(layer["attention"]["output"])
        return layer["attention"]["output"]

    width = config.hidden_size
    scale, shift = np.ones(width), np.zeros(width)  # the stream's basis: v = scale s + shift

    def at_site(site):
        nonlocal scale, shift
        holder = norm_holder(site)
        norm = {k: np.asarray(v, np.float64) for k, v in holder["LayerNorm"].items()}
        g, b = norm["scale"], norm["bias"]
        if config.norm_at(site) == "layernorm":
            if not (np.all(scale == 1) and np.all(shift == 0)):  # norm_fold_sites prevents it
                raise RuntimeError(f"site {site}: exact LayerNorm reached in a folded basis "
                                   f"(folded sites {sorted(sites)} break the rule)")
            if site in sites:
                scale, shift = g, b
                del holder["LayerNorm"]
            return
        if site in sites:
            scale, shift = g * scale, g * shift + b
            del holder["LayerNorm"]
        else:
            holder["LayerNorm"] = {"scale": (g * scale).astype(np.float32),
                                   "bias": (g * shift + b).astype(np.float32)}
            scale, shift = np.ones(width), np.zeros(width)

    at_site(0)
    for i in range(config.num_hidden_layers):
        layer = layers[str(i)]
        attention = dict(layer["attention"])
        self_att = {n: _read(d, scale, shift) for n, d in attention["self"].items()}
        out = dict(attention["output"])
        out["dense"] = _write(out["dense"], scale)
        attention["self"], attention["output"] = self_att, out
        layer["attention"] = attention
        at_site(2 * i + 1)
        layer["intermediate"] = {**layer["intermediate"],
                                 "dense": _read(layer["intermediate"]["dense"], scale, shift)}
        layer["output"] = {**layer["output"], "dense": _write(layer["output"]["dense"], scale)}
        at_site(2 * i + 2)
    encoder["layer"] = layers
    bert["encoder"], bert["embeddings"] = encoder, embeddings
    params = {**params, "bert": bert}
    if "pooler" in bert:
        bert["pooler"] = {"dense": _read(bert["pooler"]["dense"], scale, shift)}
    else:  # a linear pooler already folded into the classifier reads [CLS] directly
        params["classifier"] = _read(params["classifier"], scale, shift)
    return params
