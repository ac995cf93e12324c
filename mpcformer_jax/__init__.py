"""mpcformer_jax: MPC-friendly BERT approximations, distillation, and private inference.

    import mpcformer_jax as mj
    config, params, tokenizer = mj.load_pretrained("minilm-l6", hidden_act="quad",
                                                   softmax_act="2quad")
    logits = mj.forward(config, params, ids, mask)

Subpackages: ``data`` (tasks and batching), ``train`` (distillation), ``private`` (SPU).
Names are imported on first use, so SPU node processes, which need neither jax nor flax,
start without them.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Approximation": "approx",
    "GELU_APPROX": "approx",
    "NORM_APPROX": "approx",
    "POOLER_APPROX": "approx",
    "SOFTMAX_APPROX": "approx",
    "get_activation": "approx",
    "get_norm": "approx",
    "get_normaliser": "approx",
    "get_pooler": "approx",
    "BertConfig": "models",
    "BertForSequenceClassification": "models",
    "CheckpointError": "models",
    "fold": "models",
    "forward": "models",
    "init_params": "models",
    "load_pretrained": "models",
    "make_apply": "models",
    "save_pretrained": "models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mpcformer_jax.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mpcformer_jax' has no attribute {name!r}")
