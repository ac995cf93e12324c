"""The model-specific part of private inference: the pure forward and the client's encoding.

Everything else in ``mpcformer_jax.private`` sees only a pure function of
``(params, one_hot_ids, mask)`` and arrays, so another model needs changes here only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mpcformer_jax.models import BertConfig, fold, forward
from mpcformer_jax.models.public_table import lookup, without_word_table
from mpcformer_jax.private.compile import compile_cached


def prepare(config: BertConfig, params) -> tuple[BertConfig, dict]:
    """What the owner compiles and shares: the model folded for MPC (``models.fold``), its
    heads' attention products as single block-diagonal matmuls, and without its
    word-embedding table when that table is public (the client looks up).

    Run by the owner, in plaintext, before anything is shared; idempotent.
    """
    config, params = fold(config, params)
    config = config.replace(block_diagonal_heads=True)
    if config.public_table_source and "word_embeddings" in params["bert"]["embeddings"]:
        params = without_word_table(params)
    return config, params


def make_private_forward(config: BertConfig):
    """``f(params, client_input, mask) -> logits``, the function SPU compiles for ``config``
    (a ``prepare``d config).

    ``client_input`` is what ``encode_client_inputs`` makes: the rows of the public
    word-embedding table (B, L, hidden) when the config names one, else one-hot rows
    (B, L, vocab) whose lookup is ``one_hot @ word_embeddings``, a matmul on secrets (no
    secret equality test per vocabulary entry).
    """
    if config.public_table_source:
        def private_forward(params, word_vectors, attention_mask):
            return forward(config, params, None, attention_mask, word_vectors=word_vectors)
    else:
        def private_forward(params, one_hot_ids, attention_mask):
            return forward(config, params, one_hot_ids, attention_mask)

    return private_forward


def client_input_width(config: BertConfig) -> int:
    """The last dimension of the client's input: hidden size (public table) or vocabulary."""
    return config.hidden_size if config.public_table_source else config.vocab_size


def encode_client_inputs(config: BertConfig, input_ids: np.ndarray,
                         attention_mask: np.ndarray | None = None,
                         table: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """The client's local step: token ids (B, L) -> (client input float32, mask float32).

    The client input is ``lookup(table, ids)`` (B, L, hidden) when the config names a public
    table (``table``: from ``models.public_table.load_public_table``, which checks its
    hash), else one-hot rows (B, L, V). Runs on the client, in the clear, before anything
    is shared.
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
    if config.public_table_source:
        if table is None:
            raise ValueError("this model's word-embedding table is public: pass the table "
                             "(models.public_table.load_public_table(config)) to look the "
                             "tokens up on the client")
        if table.shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"the public table has shape {table.shape}, the model wants "
                             f"{(config.vocab_size, config.hidden_size)}")
        return lookup(table, ids), mask
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

    one_hot = jax.ShapeDtypeStruct((batch_size, length, client_input_width(config)), np.float32)
    mask = jax.ShapeDtypeStruct((batch_size, length), np.float32)
    return compile_cached(config, make_private_forward(config), params, (one_hot, mask), copts,
                          attribution)
