"""Containers shared by every task source, and the deterministic split helpers they use."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SPLIT_NAMES = ("train", "dev", "test")


@dataclasses.dataclass(eq=False)
class Split:
    """One split of a task: parallel lists of texts, optional second texts, and labels.

    Attributes:
      texts: first segment of each example.
      text_pairs: second segment of each example (sentence-pair tasks), else None.
      labels: int64 class ids of shape (n,), or float32 targets for regression.
    """

    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray

    def __post_init__(self):
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.text_pairs)} text pairs")
        if len(self.labels) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int] | np.ndarray) -> Split:
        """Returns a new Split holding the examples at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in idx]
        return Split([self.texts[i] for i in idx], pairs, self.labels[idx].copy())


@dataclasses.dataclass(eq=False)
class TaskData:
    """A loaded task.

    Attributes:
      name: registry name of the task (e.g. "rt", "sst2").
      splits: {"train", "dev", "test"} -> Split.
      num_labels: number of classes, or 1 for regression.
      is_regression: True when labels are float targets.
      metrics: metric names understood by `mpcformer_jax.train.metrics.compute_metrics`.
      label_names: class names in id order when known (None for regression or opaque ids).
    """

    name: str
    splits: dict[str, Split]
    num_labels: int
    is_regression: bool
    metrics: tuple[str, ...]
    label_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if set(self.splits) != set(SPLIT_NAMES):
            raise ValueError(f"splits must be {SPLIT_NAMES}, got {sorted(self.splits)}")


def subsample(split: Split, max_examples: int | None, seed: int = 0) -> Split:
    """Keeps at most `max_examples` examples, chosen by a seeded permutation.

    The kept examples stay in their original order, so a smoke run on a subsample sees the
    same kind of ordering as the full split.

    Args:
      split: the split to shrink.
      max_examples: how many to keep; None (or >= len) keeps the split unchanged.
      seed: seed of the choice; the same seed always keeps the same examples.

    Returns:
      A Split (the input itself when nothing is dropped).
    """
    if max_examples is None or max_examples >= len(split):
        return split
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    keep = np.random.default_rng(seed).permutation(len(split))[:max_examples]
    return split.select(np.sort(keep))


def carve_dev(train: Split, dev_size: int, seed: int = 0) -> tuple[Split, Split]:
    """Splits `train` into (train minus dev, dev) with a seeded permutation.

    Used where a source has no labelled dev split of its own (GLUE and IMDb test labels are
    hidden, so their validation split becomes our test split and dev comes out of train).

    Args:
      train: the full training split.
      dev_size: number of examples moved to dev.
      seed: permutation seed; fixed so every stage sees the same carve.

    Returns:
      (train, dev), both keeping the original relative order.
    """
    if not 0 < dev_size < len(train):
        raise ValueError(f"dev_size must be in (0, {len(train)}), got {dev_size}")
    perm = np.random.default_rng(seed).permutation(len(train))
    return train.select(np.sort(perm[dev_size:])), train.select(np.sort(perm[:dev_size]))


def default_dev_size(n_train: int) -> int:
    """10% of train, at most 5,000 examples and at least 1 (a dev set big enough to rank)."""
    return max(1, min(5000, n_train // 10))


def encode_labels(
    values: Sequence, label_names: Sequence[str] | None = None, regression: bool = False
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Turns raw label values (ints, numeric strings, names or floats) into an array.

    Args:
      values: raw labels of one split.
      label_names: class names in id order; names in `values` map to their index here.
      regression: return float32 targets instead of class ids.

    Returns:
      (labels, label_names): int64 ids (or float32 targets) and the names actually used.
    """
    if regression:
        return np.asarray([float(v) for v in values], dtype=np.float32), None
    if label_names is not None:
        index = {name: i for i, name in enumerate(label_names)}
        out = []
        for v in values:
            if isinstance(v, str) and v in index:
                out.append(index[v])
            else:
                # Integer ids are allowed beside names: hub schemas store ClassLabel ids.
                out.append(_as_int(v, known=label_names))
        return np.asarray(out, dtype=np.int64), tuple(label_names)
    return np.asarray([_as_int(v) for v in values], dtype=np.int64), None


def _as_int(value, known: Sequence[str] | None = None) -> int:
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        hint = f"; known names: {list(known)}" if known else ""
        raise ValueError(
            f"label {value!r} is neither an integer id nor a known name{hint}"
        ) from None
    if as_float != int(as_float):
        raise ValueError(f"label {value!r} is not an integer (pass regression=True for floats)")
    return int(as_float)
