"""Which LayerNorm sites a student can give up: a greedy search by calibration alone.

A mixed normalisation ("affine@2", ``approx.split_norm``) keeps exact LayerNorm at a few sites
and replaces it everywhere else. This picks the sites. Start from a trained student with exact
LayerNorm (e.g. the quad+2quad KD student of a distillation run). Score each set of exact
sites E on the dev split, with no training: the student made "<norm>@E" by the same
calibration distillation starts from (``models.calibrate``: per-channel affine fits, site
after site, on training batches). The search is greedy. It starts with no exact site, then
adds the site whose addition scores best, up to ``--max-sites``.

    uv run python -m experiments.norm_sites runs/rt_public --student quad+2quad --max-sites 2

``--sites 2:6 4:8`` scores the named sets instead of searching.

    uv run python -m experiments.norm_sites runs/default_len_sites --student quad+2quad_len \
        --sites 2:6 4:8

Sites: 0 is the embedding's LayerNorm; 2l+1 and 2l+2 are layer l's attention and FFN outputs.
Each candidate's row goes to stdout, as a table or, with ``--json``, one JSON object per line.
Progress goes to stderr.

Each row also gives ``max_hidden``, the largest |hidden state| of each layer over the dev
split (inputs the affine fits never saw). Dev accuracy alone did not tell which sets train;
this column warns. quad+2quad_len+affine@2:6 reached 4e25 at trec's last layer and its
stage-1 loss was NaN at step 4, while @4:8 stays within 114 on rt and trec and trains
(experiments/configs/common.py, LEN_SITES). @2:6 reached 1.1e3 on rt and trained there: a
warning, not a threshold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import numpy as np

from mpcformer_jax import approx
from mpcformer_jax.data import batches, load_task, tokenize_split
from mpcformer_jax.models import forward, load_pretrained
from mpcformer_jax.models.calibrate import calibrate
from mpcformer_jax.pipeline import CALIBRATION_BATCH_SIZE, CALIBRATION_BATCHES
from mpcformer_jax.train import parallel
from mpcformer_jax.train.evaluation import evaluate
from mpcformer_jax.train.steps import make_predict_step


def load_run(run_dir: Path, student: str):
    """(config, params, dev split, training batches for calibration, buckets, metrics) of the
    ``student`` export of a distillation run, its data as the run had it."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise SystemExit(f"norm_sites: {run_dir} is not a distillation run (no config.json); "
                         "pass the out_dir of `python -m experiments.distill`.")
    cfg = json.loads(cfg_path.read_text())
    folder = run_dir / approx.Approximation.parse(student).name / "student"
    if not folder.exists():
        found = sorted(p.parent.name for p in run_dir.glob("*/student"))
        raise SystemExit(f"norm_sites: {run_dir} has no {student!r} student; it has: "
                         f"{', '.join(found) or 'none'}.")
    config, params, tokenizer = load_pretrained(folder)
    if config.norm_act != "layernorm":
        raise SystemExit(f"norm_sites: the {student!r} student already replaces LayerNorm "
                         f"({config.norm_act!r}); start from one with exact LayerNorm.")
    task = load_task(cfg["task"], max_examples={"train": cfg["max_train"] or None,
                                                "dev": cfg["max_dev"] or None, "test": 1},
                     subsample_seed=cfg.get("seed", 0))
    length = cfg["max_length"]
    tok = {name: tokenize_split(task.splits[name], tokenizer, length, config.max_length)
           for name in ("train", "dev")}
    buckets = tuple(cfg.get("buckets") or (length,))
    calibration = list(itertools.islice(
        batches(tok["train"], CALIBRATION_BATCH_SIZE, buckets, shuffle=True,
                seed=cfg.get("seed", 0)), CALIBRATION_BATCHES))
    return config, params, tok["dev"], calibration, buckets, tuple(task.metrics)


def max_hidden(config, params, data: list[dict]) -> list[float]:
    """The largest |hidden state| of each layer over the batches ``data`` ("inf" or "nan"
    where the forward overflowed)."""
    @jax.jit
    def per_layer(p, ids, mask):
        _, inter = forward(config, p, ids, mask, output_intermediates=True)
        return jax.numpy.stack([jax.numpy.abs(h).max() for h in inter["hidden_states"]])

    worst = np.max([np.asarray(per_layer(params, b["input_ids"], b["attention_mask"]))
                    for b in data], axis=0)
    # JSON has no inf or nan: an overflowed layer reads "inf" or "nan", as in metrics.jsonl.
    return [round(float(x), 4) if np.isfinite(x) else str(float(x)) for x in worst]


def search(run: tuple, norm: str, max_sites: int, batch_size: int = 64,
           sites: list[tuple[int, ...]] | None = None):
    """Yields one row per scored candidate of a ``load_run``: exact sites, norm name, dev
    metrics, the largest |hidden state| per layer on the dev split. ``sites``:
    score these sets of exact sites instead of searching."""
    config, params, dev, calibration, buckets, metrics = run
    mesh = parallel.make_mesh()
    n_sites = 1 + 2 * config.num_hidden_layers
    dev_batches = list(batches(dev, batch_size, buckets, shuffle=False))

    def score(exact_sites: tuple[int, ...]) -> dict:
        name = approx.join_norm(norm, exact_sites)
        candidate, cand_params = calibrate(config.replace(norm_act=name), params, calibration)
        result = evaluate(make_predict_step(candidate), cand_params, dev, metrics, batch_size,
                          mesh, buckets, desc=name)
        return {"exact_sites": list(exact_sites), "norm": name, **result,
                "max_hidden": max_hidden(candidate, cand_params, dev_batches)}

    yield {"exact_sites": list(range(n_sites)), "norm": "layernorm",
           **evaluate(make_predict_step(config), params, dev, metrics, batch_size, mesh,
                      buckets, desc="layernorm"),
           "max_hidden": max_hidden(config, params, dev_batches)}
    if sites is not None:
        for exact in sites:
            yield score(tuple(sorted(set(exact))))
        return
    chosen: tuple[int, ...] = ()
    yield score(chosen)
    for _ in range(max_sites):
        rows = [score(tuple(sorted((*chosen, s)))) for s in range(n_sites) if s not in chosen]
        yield from rows
        chosen = tuple(max(rows, key=lambda r: r["main"])["exact_sites"])
        print(f"norm_sites: best with {len(chosen)} exact site(s): "
              f"{approx.join_norm(norm, chosen)}", file=sys.stderr, flush=True)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="out_dir of a distillation run")
    parser.add_argument("--student", default="quad+2quad",
                        help="the run's student to start from (exact LayerNorm)")
    parser.add_argument("--norm", default="affine", choices=sorted(
        set(approx.NORM_APPROX) - {"layernorm"}), help="the replacement")
    parser.add_argument("--max-sites", type=int, default=2, help="exact sites to add, greedily")
    parser.add_argument("--sites", nargs="+", metavar="A:B",
                        help="score these sets of exact sites (e.g. 2:6 4:8) instead of the "
                             "greedy search")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")
    args = parser.parse_args(argv)
    if args.max_sites < 0:
        parser.error("--max-sites must be >= 0")
    try:
        sites = None if args.sites is None else [
            tuple(int(x) for x in spec.split(":") if x) for spec in args.sites]
    except ValueError:
        parser.error(f"--sites takes exact sites as integers joined by ':', got {args.sites}")
    if sites and any(s < 0 for exact in sites for s in exact):
        parser.error("--sites: sites are >= 0")
    run = load_run(args.run_dir, args.student)  # a wrong path or name fails before any output
    n_sites = 1 + 2 * run[0].num_hidden_layers
    if sites and any(s >= n_sites for exact in sites for s in exact):
        raise SystemExit(f"norm_sites: --sites {' '.join(args.sites)} names a site beyond this "
                         f"model's 0..{n_sites - 1}")
    rows = []
    if not args.json:
        print("| exact sites | norm | dev main | max abs hidden state per layer |\n"
              "|---|---|---:|---|", flush=True)
    for row in search(run, args.norm, args.max_sites, sites=sites):
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            shown = ",".join(map(str, row["exact_sites"]))
            hidden = " ".join(f"{float(x):.3g}" for x in row["max_hidden"])
            print(f"| {shown or '-'} | {row['norm']} | {row['main']:.4f} | {hidden} |",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
