"""mpcformer_jax: MPC-friendly BERT approximations, distillation, and private inference.

    import mpcformer_jax as mj
    config, params, tokenizer = mj.load_pretrained("minilm-l6", hidden_act="quad",
                                                   softmax_act="2quad")
    logits = mj.forward(config, params, ids, mask)

Subpackages: ``data`` (tasks and batching), ``train`` (distillation), ``private`` (SPU).
"""

from mpcformer_jax.approx import GELU_APPROX, SOFTMAX_APPROX, get_activation, get_normaliser
from mpcformer_jax.models import (
    BertConfig,
    BertForSequenceClassification,
    CheckpointError,
    forward,
    init_params,
    load_pretrained,
    make_apply,
    save_pretrained,
)

__version__ = "0.1.0"

__all__ = [
    "GELU_APPROX",
    "SOFTMAX_APPROX",
    "BertConfig",
    "BertForSequenceClassification",
    "CheckpointError",
    "forward",
    "get_activation",
    "get_normaliser",
    "init_params",
    "load_pretrained",
    "make_apply",
    "save_pretrained",
]
