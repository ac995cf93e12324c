"""A public word-embedding table: the client's token lookup outside MPC.

A model fine-tuned from a public checkpoint with its word-embedding table frozen
(``DistillConfig.public_word_embeddings``) holds that checkpoint's table, unchanged. The
table then reveals nothing about the provider, and a private-inference client can look its
own tokens up in plaintext and secret-share L x H vectors instead of L x V one-hot rows: the
lookup's L x V x H multiply-adds leave MPC and the upload shrinks by V / H.

The config records where the table comes from and its hash; the client loads the table from
its own copy of that checkpoint and checks the hash before using it, so a provider cannot
make a client embed its tokens with a table other than the public one it names.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from mpcformer_jax.models.config import BertConfig

WORD_TABLE = ("bert", "embeddings", "word_embeddings", "embedding")


def word_table(params: dict[str, Any]) -> np.ndarray:
    """The (vocab, hidden) word-embedding table of a parameter tree."""
    node = params
    for key in WORD_TABLE:
        node = node[key]
    return np.asarray(node)


def without_word_table(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the word-embedding table (what the owner shares when it is public)."""
    bert = dict(params["bert"])
    bert["embeddings"] = {k: v for k, v in bert["embeddings"].items() if k != "word_embeddings"}
    return {**params, "bert": bert}


def table_sha256(table: np.ndarray) -> str:
    """SHA-256 of a table's shape and float32 little-endian bytes (hex)."""
    table = np.ascontiguousarray(np.asarray(table, dtype="<f4"))
    digest = hashlib.sha256(f"{table.shape}".encode())
    digest.update(table.tobytes())
    return digest.hexdigest()


def mark_public(config: BertConfig, params: dict[str, Any], source: str,
                source_table: np.ndarray) -> BertConfig:
    """``config`` recording that its table is ``source``'s public table.

    Raises:
      ValueError: the model's table differs from ``source_table`` (it was trained).
    """
    mine = word_table(params)
    if mine.shape != source_table.shape or not np.array_equal(mine, source_table):
        raise ValueError(f"the model's word-embedding table differs from {source!r}'s: it was "
                         "not frozen, so it is private; keep the one-hot lookup.")
    return config.replace(public_table_source=source,
                          public_table_sha256=table_sha256(source_table))


def load_public_table(config: BertConfig) -> np.ndarray:
    """The public table ``config`` names, loaded from the client's copy and hash-checked.

    Raises:
      ValueError: the config names no public table, or the table found has another hash.
    """
    if not config.public_table_source:
        raise ValueError("this model's word-embedding table is private (no public_table "
                         "source in its config): the client one-hot encodes its tokens.")
    return load_checked_table(config.public_table_source, config.public_table_sha256)


def load_checked_table(source: str, sha256: str) -> np.ndarray:
    """The word table of checkpoint ``source``, if its SHA-256 is ``sha256``.

    Raises:
      ValueError: the table found has another hash.
    """
    from mpcformer_jax.models import hf_io

    # Only the embedding table is read: the checkpoint's missing head ("initialised new
    # ones; fine-tune before use") is no concern of a client's lookup, so that warning is
    # not printed here.
    quiet = _WithoutFreshHeadWarning()
    hf_io.log.addFilter(quiet)
    try:
        _, params, _ = hf_io.load_pretrained(source)
    finally:
        hf_io.log.removeFilter(quiet)
    table = word_table(params)
    _check_sha256(source, sha256, table)
    return table


class _WithoutFreshHeadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialised new ones" not in record.getMessage()


def check_public_table(config: BertConfig, table: np.ndarray) -> None:
    """Raises ValueError unless ``table`` has the SHA-256 that ``config`` names."""
    if not config.public_table_source:
        raise ValueError("this model's word-embedding table is private (no public_table "
                         "source in its config): the client one-hot encodes its tokens.")
    _check_sha256(config.public_table_source, config.public_table_sha256, table)


def _check_sha256(source: str, sha256: str, table: np.ndarray) -> None:
    found = table_sha256(table)
    if found != sha256:
        raise ValueError(
            f"the word-embedding table given for {source!r} has SHA-256 {found[:16]}..., but "
            f"the model says {sha256[:16]}...: install the checkpoint the model was trained "
            "from, or do not trust this model (nothing was shared).")


def lookup(table: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
    """Rows of ``table`` for (B, L) token ids: (B, L, hidden) float32, in plaintext."""
    ids = np.asarray(input_ids)
    if ids.min() < 0 or ids.max() >= table.shape[0]:
        raise ValueError(f"token ids must lie in [0, {table.shape[0]}); got "
                         f"[{ids.min()}, {ids.max()}]: is the tokenizer the model's?")
    return np.asarray(table, np.float32)[ids]
