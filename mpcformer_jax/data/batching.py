"""Tokenize a split once, then cut it into fixed-shape numpy batches as many times as needed.

Shapes are what jit sees, so they are kept to a handful: the batch dimension is always
`batch_size` (a short last batch is filled up with weight-0 rows) and the length dimension is
the smallest bucket that holds the batch's longest sequence (default buckets: powers of two
from 16, and max_length itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from mpcformer_jax.data.types import Split

# Length grouping sorts within windows of this many batches: enough to gather similar lengths,
# small enough that batches still mix examples from across the (shuffled) split.
_GROUP_WINDOW_BATCHES = 50


@dataclasses.dataclass(eq=False)
class TokenizedSplit:
    """Token ids of one split, unpadded (one int32 array per example, at most max_length).

    Attributes:
      input_ids: per-example token ids, [CLS] ... [SEP] (... [SEP]) included.
      token_type_ids: per-example segment ids (0 for the first text, 1 for the pair).
      labels: int32 class ids or float32 regression targets, shape (n,).
      max_length: truncation length used.
      pad_token_id: the tokenizer's padding id.
    """

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray
    max_length: int
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Number of real tokens of each example, shape (n,)."""
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))


def tokenize_split(
    split: Split, tokenizer, max_length: int, max_positions: int | None = None
) -> TokenizedSplit:
    """Tokenizes every example of a split once (pairs as [CLS] a [SEP] b [SEP]).

    Args:
      split: texts, optional text pairs and labels.
      tokenizer: a Hugging Face tokenizer (PreTrainedTokenizerFast recommended) of the
        checkpoint; its special tokens and pad id are used as they are.
      max_length: truncation length in tokens, special tokens included (pairs: longest first).
      max_positions: the model's max_position_embeddings; a larger max_length is rejected,
        since positions past it have no embedding.

    Returns:
      TokenizedSplit; labels int32, or float32 for float labels (regression).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    if max_positions is not None and max_length > max_positions:
        raise ValueError(
            f"max_length={max_length} exceeds the model's max positions ({max_positions}); "
            f"use max_length <= {max_positions}"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    encoded = tokenizer(
        split.texts,
        split.text_pairs,
        truncation=True,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=True,
    )
    ids = [np.asarray(x, dtype=np.int32) for x in encoded["input_ids"]]
    types = encoded.get("token_type_ids")
    # Tokenizers without segments (RoBERTa-style) return none: every token is segment 0.
    types = (
        [np.asarray(t, dtype=np.int32) for t in types]
        if types is not None
        else [np.zeros_like(x) for x in ids]
    )
    labels = np.asarray(split.labels)
    labels = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int32)
    return TokenizedSplit(ids, types, labels, max_length, int(tokenizer.pad_token_id))


def default_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below max_length, then max_length (e.g. 16, 32, 64, 128)."""
    buckets, b = [], smallest
    while b < max_length:
        buckets.append(b)
        b *= 2
    return (*buckets, max_length)


def num_batches(tokenized: TokenizedSplit, batch_size: int, drop_remainder: bool = False) -> int:
    """How many batches `batches` yields for these arguments (for schedules and progress bars)."""
    full, rest = divmod(len(tokenized), batch_size)
    return full + (1 if rest and not drop_remainder else 0)


def batches(
    tokenized: TokenizedSplit,
    batch_size: int,
    buckets: Sequence[int] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    group_by_length: bool = False,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields fixed-size padded batches.

    Every example appears exactly once per pass (unless drop_remainder drops the short last
    batch). Rows added to fill the last batch copy a real row of that batch (so a model sees
    ordinary input: fully masked rows can turn into NaN under some attention normalisers) and
    carry weight 0 and index -1; weight every loss and metric by `weights`.

    Args:
      tokenized: output of `tokenize_split`.
      batch_size: rows per batch, constant across batches.
      buckets: allowed sequence lengths; default `default_buckets(tokenized.max_length)`.
      shuffle: permute the examples; the order depends only on (seed, epoch).
      seed: shuffling seed.
      epoch: mixed into the seed so each epoch gets its own fixed order.
      group_by_length: sort within windows of 50 batches by length, so fewer batches need the
        long buckets (with shuffle the batch order is then shuffled too).
      drop_remainder: skip the short last batch instead of padding it (training).

    Returns:
      Iterator of dicts: input_ids, token_type_ids, attention_mask (int32, (batch, bucket)),
      labels ((batch,), int32 or float32), weights ((batch,), float32 0/1) and index
      ((batch,), int32 position in the split, -1 for filler rows).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buckets = sorted(set(buckets)) if buckets is not None else default_buckets(tokenized.max_length)
    if buckets[0] < 1 or buckets[-1] < tokenized.max_length:
        raise ValueError(
            f"buckets {buckets} must be positive and reach max_length {tokenized.max_length}"
        )
    n = len(tokenized)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        lengths = tokenized.lengths
        window = batch_size * _GROUP_WINDOW_BATCHES
        for start in range(0, n, window):
            chunk = order[start : start + window]
            order[start : start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    groups = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length and shuffle:
        # Sorting put short batches first; shuffle the batch order back. The short last group
        # moves too, and is still padded to batch_size.
        groups = [groups[i] for i in rng.permutation(len(groups))]
    for group in groups:
        if drop_remainder and len(group) < batch_size:
            continue
        yield _make_batch(tokenized, group, batch_size, buckets)


def _make_batch(tokenized: TokenizedSplit, idx: np.ndarray, batch_size: int, buckets) -> dict:
    longest = max(len(tokenized.input_ids[i]) for i in idx)
    length = next(b for b in buckets if b >= longest)
    rows = np.concatenate([idx, np.full(batch_size - len(idx), idx[0], dtype=idx.dtype)])
    input_ids = np.full((batch_size, length), tokenized.pad_token_id, dtype=np.int32)
    token_type_ids = np.zeros((batch_size, length), dtype=np.int32)
    attention_mask = np.zeros((batch_size, length), dtype=np.int32)
    for r, i in enumerate(rows):
        ids = tokenized.input_ids[i]
        input_ids[r, : len(ids)] = ids
        token_type_ids[r, : len(ids)] = tokenized.token_type_ids[i]
        attention_mask[r, : len(ids)] = 1
    weights = np.zeros(batch_size, dtype=np.float32)
    weights[: len(idx)] = 1.0
    index = np.full(batch_size, -1, dtype=np.int32)
    index[: len(idx)] = idx
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "labels": tokenized.labels[rows],
        "weights": weights,
        "index": index,
    }
