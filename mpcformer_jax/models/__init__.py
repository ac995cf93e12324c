"""The BERT family: config, Flax modules and Hugging Face checkpoint I/O."""

from mpcformer_jax.models.bert import (
    BertForSequenceClassification,
    BertModel,
    forward,
    init_params,
    make_apply,
)
from mpcformer_jax.models.config import BertConfig
from mpcformer_jax.models.fold import fold
from mpcformer_jax.models.hf_io import (
    CheckpointError,
    load_pretrained,
    resolve_checkpoint,
    save_pretrained,
)

__all__ = [
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "CheckpointError",
    "fold",
    "forward",
    "init_params",
    "load_pretrained",
    "make_apply",
    "resolve_checkpoint",
    "save_pretrained",
]
