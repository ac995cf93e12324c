"""Your own csv / tsv / jsonl files as a task: `load_task("file", train=..., test=..., ...)`.

Labels may be integer ids, class names, or floats (with regression=True). Class names get ids
in sorted order of the names seen in train, unless `label_names=` fixes the order. A missing
dev file is carved from train the same way as for the hub tasks (seed 0, 10%, at most 5,000).
Files are read with the standard library, so this path needs neither `datasets` nor pandas.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Sequence

from mpcformer_jax.data.types import Split, TaskData, carve_dev, default_dev_size, encode_labels


def read_records(path: str | pathlib.Path) -> list[dict]:
    """Reads a .csv, .tsv, .jsonl or .json (list of objects, or one object per line) file.

    Args:
      path: the file.

    Returns:
      One dict per record, values as stored (strings for csv/tsv).
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .json")


def _column(records: list[dict], field: str, path) -> list:
    if records and field not in records[0]:
        raise ValueError(f"{path}: no field {field!r}; fields are {sorted(records[0])}")
    return [r[field] for r in records]


def _all_ints(values) -> bool:
    try:
        return all(float(v) == int(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def load_local(
    train: str | pathlib.Path,
    test: str | pathlib.Path,
    dev: str | pathlib.Path | None = None,
    text_field: str = "text",
    text_pair_field: str | None = None,
    label_field: str = "label",
    regression: bool = False,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
    metrics: Sequence[str] | None = None,
    dev_size: int | None = None,
    name: str = "file",
) -> TaskData:
    """Loads local files as a task.

    Args:
      train, test: paths (required). dev: path, or None to carve dev from train.
      text_field, text_pair_field, label_field: column names in the files.
      regression: float targets (num_labels 1, metrics pearson/spearman by default).
      label_names: class names in id order, when labels are names and the order matters.
      num_labels: number of classes for integer labels (default: max id + 1).
      metrics: metric names (default: accuracy, or pearson+spearman for regression).
      dev_size: examples carved from train when dev is None.
      name: name recorded in the TaskData.

    Returns:
      TaskData with train/dev/test.
    """
    paths = {"train": train, "dev": dev, "test": test}
    raw = {}
    for split, path in paths.items():
        if path is None:
            continue
        records = read_records(path)
        if not records:
            raise ValueError(f"{path}: no records")
        texts = [str(t) for t in _column(records, text_field, path)]
        pairs = (
            [str(t) for t in _column(records, text_pair_field, path)] if text_pair_field else None
        )
        raw[split] = (texts, pairs, _column(records, label_field, path))

    if not regression and label_names is None and not _all_ints(raw["train"][2]):
        # Class names: sorted, so the ids never depend on file order.
        label_names = tuple(sorted({str(v) for v in raw["train"][2]}))
    splits = {}
    for split, (texts, pairs, values) in raw.items():
        labels, _ = encode_labels(values, label_names, regression=regression)
        splits[split] = Split(texts, pairs, labels)

    if regression:
        num_labels = 1
    elif label_names is not None:
        num_labels = len(label_names)
    elif num_labels is None:
        num_labels = int(max(s.labels.max() for s in splits.values())) + 1
    if not regression:
        for split, s in splits.items():
            if s.labels.min() < 0 or s.labels.max() >= num_labels:
                raise ValueError(f"{split}: label ids outside [0, {num_labels})")
    if "dev" not in splits:
        size = default_dev_size(len(splits["train"])) if dev_size is None else dev_size
        splits["train"], splits["dev"] = carve_dev(splits["train"], size)
    default_metrics = ("pearson", "spearman") if regression else ("accuracy",)
    return TaskData(
        name=name,
        splits=splits,
        num_labels=num_labels,
        is_regression=regression,
        metrics=tuple(metrics) if metrics else default_metrics,
        label_names=tuple(label_names) if label_names is not None else None,
    )
