"""GLUE and IMDb through `datasets.load_dataset`, from the hub or from local files in hub schema.

GLUE test labels are hidden, so every hub task here uses its labelled evaluation split as our
"test" and carves "dev" (for model selection) out of train: a seeded permutation (seed 0)
moves 10% of train, at most 5,000 examples, to dev (`dev_size=` overrides). MNLI's test is
validation_matched (`mnli_mm` uses validation_mismatched). IMDb's test is its own test split.

Offline, pass local files in the hub schema instead (the same column mapping then runs):
  load_task("sst2", data_files={"train": "train.csv", "validation": "val.csv"})
  load_task("mnli", data_dir="glue_mnli/")   # holds train.* and validation_matched.*
Files may be .csv, .tsv, .json/.jsonl or .parquet; labels are ClassLabel ids or class names.
"""

from __future__ import annotations

import dataclasses
import pathlib

from mpcformer_jax.data.types import Split, TaskData, carve_dev, default_dev_size, encode_labels


@dataclasses.dataclass(frozen=True)
class HubSpec:
    """Where a hub task lives and how its columns map onto (text, text pair, label)."""

    path: str
    config: str | None
    text_field: str
    pair_field: str | None
    label_names: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    eval_split: str = "validation"


HUB_TASKS = {
    "sst2": HubSpec("nyu-mll/glue", "sst2", "sentence", None, ("negative", "positive"),
                    ("accuracy",)),
    "cola": HubSpec("nyu-mll/glue", "cola", "sentence", None, ("unacceptable", "acceptable"),
                    ("matthews",)),
    "mrpc": HubSpec("nyu-mll/glue", "mrpc", "sentence1", "sentence2",
                    ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    "stsb": HubSpec("nyu-mll/glue", "stsb", "sentence1", "sentence2", None,
                    ("pearson", "spearman")),
    "qqp": HubSpec("nyu-mll/glue", "qqp", "question1", "question2",
                   ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    "mnli": HubSpec("nyu-mll/glue", "mnli", "premise", "hypothesis",
                    ("entailment", "neutral", "contradiction"), ("accuracy",),
                    "validation_matched"),
    "mnli_mm": HubSpec("nyu-mll/glue", "mnli", "premise", "hypothesis",
                       ("entailment", "neutral", "contradiction"), ("accuracy",),
                       "validation_mismatched"),
    "qnli": HubSpec("nyu-mll/glue", "qnli", "question", "sentence",
                    ("entailment", "not_entailment"), ("accuracy",)),
    "rte": HubSpec("nyu-mll/glue", "rte", "sentence1", "sentence2",
                   ("entailment", "not_entailment"), ("accuracy",)),
    "imdb": HubSpec("stanfordnlp/imdb", None, "text", None, ("neg", "pos"), ("accuracy",),
                    "test"),
}  # fmt: skip

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _builder_for(files: list[str]) -> tuple[str, dict]:
    suffixes = {pathlib.Path(f).suffix.lower() for f in files}
    builders = {_BUILDERS.get(s) for s in suffixes}
    # One builder reads all files with one delimiter, so .csv and .tsv cannot be mixed either.
    if None in builders or len(builders) != 1 or suffixes == {".csv", ".tsv"}:
        raise ValueError(
            f"local files must all be one of {sorted(_BUILDERS)}, got {sorted(suffixes)}"
        )
    builder = builders.pop()
    # csv/tsv go through pandas.read_csv inside `datasets`; tab-separated needs its delimiter.
    kwargs = {"delimiter": "\t"} if suffixes == {".tsv"} else {}
    return builder, kwargs


def _files_in_dir(data_dir: str, wanted: tuple[str, ...]) -> dict[str, str]:
    root = pathlib.Path(data_dir)
    found = {}
    for split in wanted:
        matches = sorted(p for p in root.glob(f"{split}.*") if p.suffix.lower() in _BUILDERS)
        if len(matches) != 1:
            raise ValueError(
                f"{root} must hold exactly one {split}.<csv|tsv|jsonl|parquet>, "
                f"found {[m.name for m in matches]}"
            )
        found[split] = str(matches[0])
    return found


def _hub_message(name: str, spec: HubSpec) -> str:
    return (
        f"could not load task {name!r} from the Hugging Face hub ({spec.path}"
        f"{'/' + spec.config if spec.config else ''}); this machine may be offline. Use an "
        "offline task (rt, banking77, clinc150, trec, dbpedia, 20ng), pass local files in the "
        "hub schema (data_files={'train': ..., '" + spec.eval_split + "': ...} or data_dir=...), "
        "or load your own csv/jsonl with load_task('file', train=..., test=...)."
    )


def load_hub_dataset(name: str, spec: HubSpec, data_files=None, data_dir=None, cache_dir=None):
    """Returns a `datasets.DatasetDict` for a hub task, from local files when given.

    Args:
      name: registry name (for error messages).
      spec: the task's HubSpec.
      data_files: {hub split name: path} of local files in the hub schema.
      data_dir: a folder holding `<hub split>.<ext>` files (train and the eval split).
      cache_dir: where `datasets` writes its arrow cache (default: its own).

    Returns:
      A DatasetDict with at least "train" and `spec.eval_split`.
    """
    import datasets  # heavy import; only the hub path pays for it

    if data_files is not None and data_dir is not None:
        raise ValueError("pass data_files or data_dir, not both")
    if data_dir is not None:
        data_files = _files_in_dir(data_dir, ("train", spec.eval_split))
    if data_files is not None:
        data_files = {k: str(v) for k, v in data_files.items()}
        builder, kwargs = _builder_for(list(data_files.values()))
        return datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir, **kwargs)
    try:
        return datasets.load_dataset(spec.path, spec.config, cache_dir=cache_dir)
    except (OSError, ConnectionError) as e:  # ConnectionError, DatasetNotFoundError, HTTP errors
        raise RuntimeError(_hub_message(name, spec)) from e


def split_from_columns(dataset, spec: HubSpec) -> Split:
    """Maps one hub-schema dataset split onto a Split (the one place columns are read).

    Args:
      dataset: a `datasets.Dataset` (or anything with `column_names` and `__getitem__(col)`).
      spec: the task's HubSpec naming its columns.

    Returns:
      Split with int64 ids (names or ids accepted) or float32 regression targets.
    """
    needed = [spec.text_field, "label"] + ([spec.pair_field] if spec.pair_field else [])
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(f"columns {missing} missing; found {dataset.column_names}")
    labels, _ = encode_labels(
        dataset["label"], spec.label_names, regression=spec.label_names is None
    )
    if spec.label_names is not None:
        bad = labels[(labels < 0) | (labels >= len(spec.label_names))]
        if bad.size:  # GLUE test rows carry -1: they must never reach training or metrics.
            raise ValueError(
                f"label ids {sorted(set(bad.tolist()))[:5]} outside [0, {len(spec.label_names)})"
            )
    texts = [str(t) for t in dataset[spec.text_field]]
    pairs = [str(t) for t in dataset[spec.pair_field]] if spec.pair_field else None
    return Split(texts, pairs, labels)


def load_hub(name: str, data_files=None, data_dir=None, cache_dir=None, dev_size=None) -> TaskData:
    """Loads a GLUE or IMDb task (see the module docstring for the split convention).

    Args:
      name: a key of HUB_TASKS.
      data_files: optional {hub split: path} of local files in the hub schema.
      data_dir: optional folder with `train.<ext>` and `<eval split>.<ext>`.
      cache_dir: optional `datasets` cache folder.
      dev_size: examples carved from train into dev (default: 10%, at most 5,000).

    Returns:
      TaskData with train/dev/test.
    """
    spec = HUB_TASKS[name]
    dsdict = load_hub_dataset(name, spec, data_files, data_dir, cache_dir)
    for required in ("train", spec.eval_split):
        if required not in dsdict:
            raise ValueError(f"task {name!r} needs split {required!r}; got {list(dsdict)}")
    full_train = split_from_columns(dsdict["train"], spec)
    size = default_dev_size(len(full_train)) if dev_size is None else dev_size
    train, dev = carve_dev(full_train, size)
    regression = spec.label_names is None
    return TaskData(
        name=name,
        splits={
            "train": train,
            "dev": dev,
            "test": split_from_columns(dsdict[spec.eval_split], spec),
        },
        num_labels=1 if regression else len(spec.label_names),
        is_regression=regression,
        metrics=spec.metrics,
        label_names=spec.label_names,
    )
