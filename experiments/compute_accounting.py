"""Where a private query's compute goes, per SPU op, beside the GEMM rate SPU reaches.

    uv run python -m experiments.compute_accounting runs/default/student --bucket 1x32
    uv run python -m experiments.compute_accounting runs/default/student --config semi2k_2pc --json

One query of ``bucket`` (rows x length, random token ids, no padding: cost does not depend on
them) runs in-process under the config's protocol with SPU's per-op profile on (segmented, so
each op's time is also attributed to its group: linear, attention normaliser, activation,
LayerNorm, other). Times are SPU's own per-op durations, the mean over parties (each party a
thread here; a party's duration includes its waits for the others). Beside them:

* every linear layer of the model, its multiply-adds (the products the model needs; the
  block-diagonal attention products, ``private.model.LOWERING``, execute ``heads`` times as
  many, which is listed too);
* the rate SPU reaches on one secret x secret matmul of each of those shapes, timed in the
  same run, same runtime (so the same truncation and communication per product), and
  numpy's int64 GEMM rate at the same shape (one party's local arithmetic, no protocol);
* the GEMM-bound time of the linear group: each linear layer's multiply-adds at the rate SPU
  reached on its shape alone, and the measured linear group over it.

Data movement (transpose, reshape, slice, concatenate, broadcast, pad) is listed by op name:
the part of each group's time that is not arithmetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

# pphlo ops that move or relabel data without arithmetic on it.
DATA_MOVEMENT = frozenset({
    "pphlo.transpose", "pphlo.reshape", "pphlo.slice", "pphlo.concatenate",
    "pphlo.broadcast", "pphlo.pad", "pphlo.convert", "pphlo.dynamic_slice",
    "pphlo.dynamic_update_slice", "pphlo.reverse", "pphlo.iota", "pphlo.constant",
    "pphlo.free",
})


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """One linear layer (or attention product) as executed: an (m x k) @ (k x n) product run
    ``runs`` times per query, of which the model needs ``macs_needed`` multiply-adds."""

    name: str
    m: int
    k: int
    n: int
    runs: int
    macs_needed: int

    @property
    def macs_executed(self) -> int:
        return self.m * self.k * self.n * self.runs


def linear_sites(config, rows: int, length: int) -> list[LinearSite]:
    """The prepared model's matmuls per query: QKV, attention scores, attention x values,
    attention output, FFN in and out (per layer; with ``cls_only_last_layer`` the last
    layer's as separate one-row sites, its QKV still on every token), pooler, classifier."""
    tokens, hidden, heads = rows * length, config.hidden_size, config.num_attention_heads
    layers, head, inner = config.num_hidden_layers, hidden // heads, config.intermediate_size
    last_alone = config.cls_only_last_layer
    full = layers - 1 if last_alone else layers  # layers computing every row

    def dense(name, m, k, n, runs):
        return LinearSite(name, m, k, n, runs, m * k * n * runs)

    def attention(suffix, q_len, n_layers):
        needed = q_len * length * hidden * rows * n_layers  # each product, all heads
        if config.block_diagonal_heads:  # one (Q x H) @ (H x heads L) product per row, layer
            return [LinearSite("attention scores" + suffix, q_len, hidden, heads * length,
                               rows * n_layers, needed),
                    LinearSite("attention x values" + suffix, q_len, heads * length, hidden,
                               rows * n_layers, needed)]
        # one (Q x d) @ (d x L) product per row, head and layer
        return [LinearSite("attention scores" + suffix, q_len, head, length,
                           rows * heads * n_layers, needed),
                LinearSite("attention x values" + suffix, q_len, length, head,
                           rows * heads * n_layers, needed)]

    qkv = ([dense("qkv", tokens, hidden, 3 * hidden, layers)] if config.fuse_qkv else
           [dense(n, tokens, hidden, hidden, layers) for n in ("query", "key", "value")])
    sites = qkv + attention("", length, full) + [
        dense("attention output", tokens, hidden, hidden, full),
        dense("ffn in", tokens, hidden, inner, full),
        dense("ffn out", tokens, inner, hidden, full)]
    if last_alone:
        suffix = " (last layer, [CLS])"
        sites += attention(suffix, 1, 1) + [
            dense("attention output" + suffix, rows, hidden, hidden, 1),
            dense("ffn in" + suffix, rows, hidden, inner, 1),
            dense("ffn out" + suffix, rows, inner, hidden, 1)]
    return sites + [dense("pooler", rows, hidden, hidden, 1),
                    dense("classifier", rows, hidden, config.num_labels, 1)]


def spu_matmul_seconds(m: int, k: int, n: int, cluster, repeat: int = 2) -> float:
    """SPU's duration (mean per party, best of ``repeat``) of one secret (m x k) @ (k x n)."""
    import jax.numpy as jnp

    from mpcformer_jax.private.compile import compile_forward
    from mpcformer_jax.private.simulate import run_threads

    rng = np.random.default_rng(0)
    w = rng.normal(size=(k, n)).astype(np.float32) / np.sqrt(k)
    x = rng.normal(size=(m, k)).astype(np.float32)
    compiled = compile_forward(lambda p, a: jnp.dot(a, p["w"]), {"w": w}, (x,),
                               cluster.compiler_options(), attribution="ops")
    best = float("inf")
    for _ in range(repeat):
        out, report = run_threads(compiled, cluster.runtime_config(), cluster.world_size,
                                  {compiled.param_names[0]: w}, {compiled.input_names[0]: x})
        if not np.allclose(out, x @ w, atol=0.05):
            raise RuntimeError(f"SPU matmul {m}x{k}x{n} disagrees with numpy")
        best = min(best, sum(t.time_s for op, t in report.ops.items() if "dot" in op))
    return best


def numpy_int64_seconds(m: int, k: int, n: int, repeat: int = 3) -> float:
    """numpy's best time for one int64 (m x k) @ (k x n): the local arithmetic of one share
    product, no protocol (int64 GEMM has no BLAS: this is what a CPU does without it)."""
    rng = np.random.default_rng(0)
    a = rng.integers(-2**62, 2**62, (m, k), dtype=np.int64)
    b = rng.integers(-2**62, 2**62, (k, n), dtype=np.int64)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def account(model: str, rows: int, length: int, config_name: str) -> dict:
    """Runs one query of ``model`` and the matmul probes; returns the accounting."""
    from mpcformer_jax.models import load_pretrained
    from mpcformer_jax.private import load_config, run
    from mpcformer_jax.private.model import prepared_config

    cluster = load_config(config_name)
    model_config, params, tokenizer = load_pretrained(model)
    ids = np.random.default_rng(0).integers(model_config.vocab_size // 10,
                                            model_config.vocab_size, (rows, length))
    batch = {"input_ids": ids, "attention_mask": np.ones((rows, length), np.int32)}
    run((model_config, params, tokenizer), batch, config=cluster, attribution="segments",
        compare=False)  # warm-up: compiles, and the first run's allocations
    result = run((model_config, params, tokenizer), batch, config=cluster,
                 attribution="segments")
    rep = result.report
    prepared = prepared_config(model_config, cluster.protocol)
    sites = linear_sites(prepared, rows, length)
    probes = {}
    for site in sites:
        shape = (site.m, site.k, site.n)
        if shape not in probes:
            probes[shape] = {"spu_s": spu_matmul_seconds(*shape, cluster),
                             "numpy_int64_s": numpy_int64_seconds(*shape)}
    linear_rows = []
    for site in sites:
        probe = probes[(site.m, site.k, site.n)]
        one = site.m * site.k * site.n
        linear_rows.append({
            "site": site.name, "shape": [site.m, site.k, site.n], "runs": site.runs,
            "macs": site.macs_needed, "macs_executed": site.macs_executed,
            "spu_gemm_s": probe["spu_s"] * site.runs,
            "spu_gmacs_per_s": one / probe["spu_s"] / 1e9,
            "numpy_int64_gmacs_per_s": one / probe["numpy_int64_s"] / 1e9})
    bound_s = sum(r["spu_gemm_s"] for r in linear_rows)
    groups = {g: {"seconds": t.time_s, "bytes": t.bytes, "rounds": t.rounds}
              for g, t in rep.groups.items()}
    total_s = sum(t.time_s for t in rep.groups.values())
    ops = {g: {op: t.time_s for op, t in sorted(o.items(), key=lambda kv: -kv[1].time_s)}
           for g, o in rep.group_ops.items()}
    movement = sum(t for o in ops.values() for op, t in o.items() if op in DATA_MOVEMENT)
    linear_s = groups["linear"]["seconds"]
    nonlinear = sum(v["seconds"] for g, v in groups.items() if g not in ("linear", "embedding"))
    return {
        "model": model, "config": config_name, "protocol": cluster.protocol,
        "bucket": f"{rows}x{length}", "approximation": model_config.approximation.name,
        "wall_s": rep.wall_s, "seconds_per_party": total_s, "groups": groups, "ops": ops,
        "data_movement_s": movement, "linear": linear_rows,
        "linear_gemm_bound_s": bound_s, "linear_vs_gemm_bound": linear_s / bound_s,
        "nonlinear_share": nonlinear / total_s, "max_abs_diff": result.max_abs_diff,
        "label_agreement": result.label_agreement,
    }


def to_markdown(acc: dict, command: str) -> str:
    total = acc["seconds_per_party"]
    lines = [f"`{command}`", "",
             f"{acc['model']} ({acc['approximation']}), {acc['protocol']}, one "
             f"{acc['bucket']} query: {total:.2f} s per party in SPU ops (wall "
             f"{acc['wall_s']:.2f} s); max logit gap {acc['max_abs_diff']:.2e}.", "",
             "| group | s / party | share | rounds | top ops (s) |", "|---|---:|---:|---:|---|"]
    for g, v in sorted(acc["groups"].items(), key=lambda kv: -kv[1]["seconds"]):
        if not v["seconds"]:
            continue
        top = ", ".join(f"{op.removeprefix('pphlo.')} {t:.2f}"
                        for op, t in list(acc["ops"].get(g, {}).items())[:4])
        lines.append(f"| {g} | {v['seconds']:.2f} | {v['seconds'] / total:.1%} | "
                     f"{v['rounds']} | {top} |")
    lines += ["", f"Non-linear groups: {acc['nonlinear_share']:.1%} of the seconds. Data "
              f"movement (transpose, reshape, slice, concatenate, broadcast, pad, convert): "
              f"{acc['data_movement_s']:.2f} s ({acc['data_movement_s'] / total:.1%}).", "",
              "| linear site | product executed | runs | MACs needed | MACs executed | "
              "SPU GEMM s (alone) | SPU GMAC/s | numpy int64 GMAC/s |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in acc["linear"]:
        m, k, n = r["shape"]
        lines.append(f"| {r['site']} | {m}x{k}x{n} | {r['runs']} | {r['macs']:,} | "
                     f"{r['macs_executed']:,} | {r['spu_gemm_s']:.3f} | "
                     f"{r['spu_gmacs_per_s']:.3g} | "
                     f"{r['numpy_int64_gmacs_per_s']:.3g} |")
    lines += ["", f"Linear group measured {acc['groups']['linear']['seconds']:.2f} s per party; "
              f"GEMM-bound (each product alone at the rate SPU reached on its shape) "
              f"{acc['linear_gemm_bound_s']:.2f} s: {acc['linear_vs_gemm_bound']:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.compute_accounting",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an exported model folder (runs/default/student)")
    p.add_argument("--bucket", default="1x32", help="rows x length (default 1x32)")
    p.add_argument("--config", default="aby3_3pc", help="ready config or path (protocol)")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    p.add_argument("--json", action="store_true", help="print JSON (stdout) instead of a table")
    args = p.parse_args(argv)
    try:
        rows, length = (int(x) for x in args.bucket.lower().split("x"))
    except ValueError:
        p.error(f"--bucket {args.bucket!r}: write rows x length, e.g. 1x32")
    if not Path(args.model).is_dir():
        p.error(f"no model folder at {args.model}: pass an exported student folder "
                "(python -m experiments.distill writes runs/default/student)")
    from mpcformer_jax.private.runtime import stdout_to_stderr

    with stdout_to_stderr():  # SPU's C++ log lines go to stdout
        acc = account(args.model, rows, length, args.config)
    command = "python -m experiments.compute_accounting " + " ".join(argv or sys.argv[1:])
    text = to_markdown(acc, command)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps({"command": command, **acc}, indent=2))
        Path(f"{args.out}.md").write_text(text)
    print(json.dumps(acc) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
