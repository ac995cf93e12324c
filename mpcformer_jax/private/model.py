"""The model-specific part of private inference: the pure forward and the client's encoding.

Everything else in ``mpcformer_jax.private`` sees only a pure function of
``(params, one_hot_ids, mask)`` and arrays, so another model needs changes here only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mpcformer_jax.models import BertConfig, forward
from mpcformer_jax.private.compile import compile_cached


def make_private_forward(config: BertConfig):
    """``f(params, one_hot_ids, mask) -> logits``, the function SPU compiles for ``config``.

    The token lookup is ``one_hot @ word_embeddings`` (a matmul on secrets), so no secret
    equality test per vocabulary entry is needed: the client one-hot encodes its own tokens.
    """

    def private_forward(params, one_hot_ids, attention_mask):
        return forward(config, params, one_hot_ids, attention_mask)

    return private_forward


def encode_client_inputs(config: BertConfig, input_ids: np.ndarray,
                         attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """The client's local step: token ids (B, L) -> (one-hot (B, L, V) float32, mask float32).

    Runs on the client, in the clear, before anything is shared.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}); got "
                         f"[{ids.min()}, {ids.max()}]: is the tokenizer the model's?")
    if ids.shape[1] > config.max_length:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds the model's "
                         f"{config.max_length} positions")
    mask = np.ones(ids.shape, np.float32) if attention_mask is None else \
        np.asarray(attention_mask, np.float32)
    one_hot = np.zeros((*ids.shape, config.vocab_size), np.float32)
    np.put_along_axis(one_hot, ids[..., None], 1.0, axis=-1)
    return one_hot, mask


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes texts padded/truncated to ``max_length``: (input_ids, attention_mask) int32."""
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer files (tokenizer.json or vocab.txt):"
                         " pass token ids instead of text, or save the tokenizer with the model")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)



def compile_for(config: BertConfig, params, batch_size: int, length: int, copts,
                attribution: str = "segments"):
    """The forward of ``config`` compiled for SPU at one (batch, length) bucket (cached).

    Only shapes are used: the owner compiles without any client data, and a client can
    compile the same program from the public card (params as shape structs).
    """
    import jax

    one_hot = jax.ShapeDtypeStruct((batch_size, length, config.vocab_size), np.float32)
    mask = jax.ShapeDtypeStruct((batch_size, length), np.float32)
    return compile_cached(config, make_private_forward(config), params, (one_hot, mask), copts,
                          attribution)
