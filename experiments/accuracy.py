"""Accuracy beside cost: plaintext and private (ABY3, in-process) accuracy of distilled runs.

    uv run python -m experiments.accuracy runs/default            # one pipeline run
    uv run python -m experiments.accuracy runs/*/ --max-private 64 --batch 8
    uv run python -m experiments.accuracy --render-only   # new cost columns, same accuracies

Rows accumulate in ``results/accuracy.json``: evaluating a run replaces only that run's rows.

For every run folder written by ``python -m experiments.distill`` (``results.json``,
``teacher/``, the exported students, and the no-distillation baseline's best checkpoint),
this evaluates teacher, each student and each baseline:
  * plaintext accuracy on the run's whole test split (the pipeline's own split and order);
  * private accuracy under ABY3 (simulated in-process, all parties profiled) on a fixed
    subset: the first ``--max-private`` test examples in that order, each padded to the
    smallest of the run's length buckets that holds it (private inference of a whole split
    takes hours on 2 cores);
  * agreement between private and plaintext labels on that subset.
Rows are approximations (``Approximation`` names and labels), with the cost ratios of
``results/benchmark.json`` (ABY3, BERT-base, seq 128) beside them. Writes
``results/accuracy.json`` and ``results/accuracy.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from mpcformer_jax.approx import EXACT, Approximation
from mpcformer_jax.bench.measure import cluster_config
from mpcformer_jax.data import load_task, tokenize_split
from mpcformer_jax.models import load_pretrained
from mpcformer_jax.private import run
from mpcformer_jax.private.model import (
    client_table,
    encode_client_inputs,
    prepare,
    reference_forward,
)
from mpcformer_jax.private.runtime import stdout_to_stderr


def padded(tok, idx, length: int) -> dict[str, np.ndarray]:
    """Right-padded (ids, mask) of examples ``idx`` at ``length`` tokens."""
    ids = np.full((len(idx), length), tok.pad_token_id, np.int32)
    mask = np.zeros((len(idx), length), np.int32)
    for row, i in enumerate(idx):
        x = tok.input_ids[i][:length]
        ids[row, :len(x)], mask[row, :len(x)] = x, 1
    return {"input_ids": ids, "attention_mask": mask}


def evaluate(config, params, tok, buckets: list[int], n_private: int, batch: int) -> dict:
    """Plaintext accuracy on the split; private accuracy and agreement on its first examples.

    Examples are padded to the smallest of the run's ``buckets`` that holds them, as the
    pipeline batches them (a client pads to a public length bucket, not to the maximum).
    """
    length = max(buckets)
    # What private inference runs: the prepared model (run() prepares it the same way) on the
    # client's input (public-table rows, hash-checked, or one-hot rows).
    config, params = prepare(config, params)
    table = client_table(config)
    fwd = jax.jit(reference_forward(config))
    plain = []
    for start in range(0, len(tok), 64):
        b = padded(tok, range(start, min(start + 64, len(tok))), length)
        plain.append(np.asarray(fwd(params, *encode_client_inputs(config, **b, table=table))))
    plain = np.concatenate(plain).argmax(-1)
    n = min(n_private, len(tok))
    fits = [min(b for b in buckets if b >= min(x, length)) for x in tok.lengths[:n]]
    private, diffs, wall = np.full(n, -1), [], 0.0
    for bucket in sorted(set(fits)):
        members = [i for i in range(n) if fits[i] == bucket]
        for start in range(0, len(members), batch):
            idx = members[start:start + batch]
            # The ready ABY3 config with a longer timeout: 2 shared cores are slow.
            res = run((config, params), padded(tok, idx, bucket), config=cluster_config("ABY3"),
                      compare=True, table=table)
            private[idx] = res.labels
            diffs.append(res.max_abs_diff)
            wall += res.report.wall_s
    return {"plain_acc": float(np.mean(plain == tok.labels)), "n_test": len(tok),
            "plain_acc_subset": float(np.mean(plain[:n] == tok.labels[:n])),
            "private_acc": float(np.mean(private == tok.labels[:n])) if n else None,
            "agreement": float(np.mean(private == plain[:n])) if n else None,
            "n_private": n, "max_abs_diff": float(max(diffs)) if diffs else None,
            "private_wall_s": wall}


def baseline_params(run_dir: Path, export_key: str, student_params):
    """The no-distillation baseline's best params (orbax), laid out like the student's.

    ``export_key``: the approximation as the run spelled it (its ``exports`` key and folder).
    """
    from mpcformer_jax.train.checkpoint import StageCheckpoints

    ckpt = run_dir / "ckpt" / export_key / "baseline"
    if not ckpt.exists():
        return None
    manager = StageCheckpoints(ckpt)
    try:
        restored = manager.restore_best(student_params)
    finally:
        manager.close()
    return None if restored is None else restored[0]


def evaluate_run(run_dir: Path, n_private: int, batch: int) -> list[dict]:
    """One row per model of a pipeline run."""
    cfg = json.loads((run_dir / "config.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    task = load_task(cfg["task"], max_examples={"train": cfg["max_train"] or None,
                                                "dev": cfg["max_dev"] or None,
                                                "test": cfg["max_test"] or None},
                     subsample_seed=cfg.get("seed", 0))
    length = cfg["max_length"]
    buckets = sorted(b for b in cfg.get("buckets") or [length] if b <= length) or [length]
    buckets = buckets if buckets[-1] == length else [*buckets, length]
    # (model, approximation, its folder, the baseline's checkpoint key or None)
    models = [("teacher", EXACT, run_dir / "teacher", None)]
    for key, folder in results["exports"].items():  # keyed by approximation spelling
        approximation = Approximation.parse(key)
        models += [("student (KD)", approximation, Path(folder), None),
                   ("baseline (no KD)", approximation, Path(folder), key)]
    rows = []
    for name, approximation, folder, baseline_key in models:
        config, params, tokenizer = load_pretrained(folder)
        if baseline_key is not None:
            params = baseline_params(run_dir, baseline_key, params)
            if params is None:
                continue
        tok = tokenize_split(task.splits["test"], tokenizer, length, config.max_length)
        row = {"run": run_dir.name, "task": cfg["task"], "model": name,
               "approximation": approximation.name,
               "max_length": length, **evaluate(config, params, tok, buckets, n_private, batch)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def approximation_of(row: dict) -> Approximation:
    """A row's approximation; rows written before the one vocabulary said "approx" (accuracy)
    or "variant" (benchmark), in spellings ``Approximation.parse`` reads."""
    return Approximation.parse(row.get("approximation") or row.get("approx") or row["variant"])


def cost_ratios(path: Path) -> dict[Approximation, dict]:
    """The benchmark's rows (ABY3, base-128) by approximation: bytes and LAN ratios."""
    if not path.exists():
        return {}
    for table in json.loads(path.read_text())["tables"]:
        if (table["protocol"], table["shape"]) == ("ABY3", "base-128"):
            return {approximation_of(r): r for r in table["rows"]}
    return {}


def markdown(rows: list[dict], costs: dict[Approximation, dict]) -> str:
    head = ("| run (task) | approximation | model | bytes / exact | bytes / floor | LAN speedup | "
            "plaintext acc (test) | private acc (subset) | plaintext acc (subset) | "
            "private = plaintext labels |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        approximation = approximation_of(r)
        c = costs.get(approximation) or {}

        def f(x, fmt="{:.3f}"):
            return "-" if x is None else fmt.format(x)

        lines.append(
            f"| {r['run']} ({r['task']}) | {approximation.label} | {r['model']} | "
            f"{f(c.get('bytes_vs_exact'))} | {f(c.get('bytes_vs_floor'), '{:.2f}')} | "
            f"{f(c.get('LAN_speedup_vs_exact'), '{:.2f}x')} | {r['plain_acc']:.4f} "
            f"(n={r['n_test']}) | {f(r['private_acc'], '{:.4f}')} (n={r['n_private']}) | "
            f"{r['plain_acc_subset']:.4f} | {f(r['agreement'], '{:.3f}')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="pipeline run folders (with results.json)")
    p.add_argument("--render-only", action="store_true",
                   help="rebuild accuracy.md from accuracy.json and the benchmark (no runs)")
    p.add_argument("--max-private", type=int, default=64, help="private subset size")
    p.add_argument("--batch", type=int, default=8, help="examples per private run")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--benchmark", type=Path, default=Path("results/benchmark.json"))
    args = p.parse_args(argv)
    runs = [] if args.render_only else args.runs
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:  # a typo, not an unfinished run: fail before any (hours-long) private work
        p.error(f"no such run folder: {', '.join(missing)} (give folders written by "
                "python -m experiments.distill, e.g. runs/default)")
    finished = [r for r in runs if (r / "results.json").exists()]
    for r in runs:
        if r not in finished:
            print(f"skipping {r}: no results.json (run not finished)", file=sys.stderr)
    # Rows of earlier invocations are kept, except those of the runs evaluated now, so runs can
    # be added one at a time as their training finishes.
    stored = args.out / "accuracy.json"
    rows = json.loads(stored.read_text()) if stored.exists() else []
    rows = [row for row in rows if row["run"] not in {r.name for r in finished}]
    with stdout_to_stderr():  # SPU's C++ log lines to stderr; the rows still reach stdout
        for run_dir in finished:
            rows += evaluate_run(run_dir, args.max_private, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(rows, indent=1))
    md = markdown(rows, cost_ratios(args.benchmark))
    (args.out / "accuracy.md").write_text(md + "\n")
    print(md)
    return rows


if __name__ == "__main__":
    main()
