"""Distill an MPC-friendly BERT: ``python -m experiments.distill [--config NAME[:smoke]]``.

Runs ``mpcformer_jax.pipeline.run_pipeline`` on a config from ``experiments/configs``:
fine-tune the teacher, distill each student (stage 1, stage 2), train the no-distillation
baseline where the config asks for it, evaluate all of them on the test split, print the
table and export the students. With no arguments it runs ``configs/default.py`` (MiniLM-L6 on
rt, distilled to the shipped student quad+2quad_len+affine@4:8; 858 s alone on 2 CPU cores).
Running the same command again resumes a killed run.

Examples:
  python -m experiments.distill
  python -m experiments.distill --config rt_full
  python -m experiments.distill --config trec_full:smoke --set stage1.epochs=1
  python -m experiments.distill --config default --print-config
  python -m experiments.distill --check-expected    # exit 1 unless the table is the recorded one

A config module may record the table its run prints (``EXPECTED``, per variant);
``--check-expected`` compares a run with it cell by cell, so a code change that moves a
published figure is caught by the command that produced it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import re
import sys
from pathlib import Path

from experiments import configs
from mpcformer_jax.pipeline import check_config, format_table, run_pipeline
from mpcformer_jax.train.config import DistillConfig, apply_overrides


def load_config(spec: str) -> DistillConfig:
    """``NAME`` or ``NAME:VARIANT`` -> ``experiments.configs.NAME.get_config(VARIANT)``.

    Configs are imported as ordinary modules (no exec of arbitrary files).
    """
    name, _, variant = spec.partition(":")
    names = config_names()
    if name not in names:
        raise ValueError(f"Unknown config {name!r}. Available configs are: {', '.join(names)} "
                         "(files in experiments/configs/; add ':smoke' for a quick check).")
    module = importlib.import_module(f"experiments.configs.{name}")
    return module.get_config(variant) if variant else module.get_config()


def expected_tables(spec: str) -> dict[str, str]:
    """The tables (``| ... |`` rows) the config ``spec`` records for its run, by the CPU they
    were printed on (``host_cpu``); empty when it records none."""
    name, _, variant = spec.partition(":")
    module = importlib.import_module(f"experiments.configs.{name}")
    tables = getattr(module, "EXPECTED", {}).get(variant) or {}
    return {cpu: table_rows(table) for cpu, table in tables.items()}


def expected_table(spec: str, cpu: str | None = None) -> str | None:
    """The table ``spec`` records for ``cpu`` (default: this machine's), or None."""
    return expected_tables(spec).get(cpu or host_cpu())


def host_cpu() -> str:
    """The CPU XLA compiles a run for: vendor, family, model and vector ISA, from
    /proc/cpuinfo (the ISA capped by ``XLA_FLAGS=--xla_cpu_max_isa=...``); "unknown" where
    there is no /proc/cpuinfo.

    Why a recorded table names one: XLA:CPU compiles for the host, so another CPU model rounds
    a few results differently, and a training run, deterministic on one machine, diverges
    from another's. Measured (the default run, session 17): the same code printed one table
    twice on an AMD EPYC with AVX-512, another with XLA capped at AVX2 there, and a third on
    sessions 14-16's machine.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = info.get("flags", "").split()
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    capped = re.search(r"xla_cpu_max_isa=(\w+)", os.environ.get("XLA_FLAGS", ""))
    if capped:
        isa = capped.group(1).lower()
    return (f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} "
            f"model {info.get('model', '?')} {isa}")


def table_rows(text: str) -> str:
    """The Markdown table rows of ``text`` (``format_table``'s output or a docstring's copy),
    stripped: what a drift check compares (the wall time on the last line is not a result)."""
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    return "\n".join("|".join(cell.strip() for cell in row.split("|")) for row in rows
                     if not set(row) <= set("|-: "))  # cells unpadded, no separator line


def config_names() -> list[str]:
    """The runnable configs: modules of experiments/configs that define ``get_config``.

    Helpers (``common``) and the package itself are not configs; checking names against this
    list also keeps ``--config`` from importing arbitrary dotted module paths.
    """
    names = []
    for info in pkgutil.iter_modules(configs.__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        if hasattr(importlib.import_module(f"experiments.configs.{info.name}"), "get_config"):
            names.append(info.name)
    return sorted(names)


def enable_compile_cache(path: str | None) -> str | None:
    """Keeps XLA's compiled programs in ``path`` (None or "none": off), so a resumed run, or
    a probe with the same shapes, loads them instead of compiling again (``default:smoke``
    on 2 busy cores: 135 s cold, 51 s warm). Returns the folder used.

    Off unless asked for: on jaxlib 0.4.34's CPU backend one resumed run with a warm cache
    died of heap corruption (SIGABRT, "corrupted double-linked list") while loading its
    programs (seen once, in CI; the same test has always passed without the cache). JAX
    also trusts its cache (a writer of the folder could run code here): keep it private.

    Raises:
      ValueError: ``path`` is a file. OSError: the folder cannot be created.
    """
    if path is None or path.lower() in ("", "none"):
        return None
    import jax

    folder = os.path.expanduser(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        # JAX would only warn, once per program, and compile everything anyway.
        raise ValueError(f"--compile-cache {folder} is a file: give a folder (created if "
                         "missing) or 'none'.")
    os.makedirs(folder, exist_ok=True)  # an unwritable place fails here, before any work
    jax.config.update("jax_compilation_cache_dir", folder)
    # Every program, not only those over JAX's default 1 s: a run compiles dozens of eval and
    # predict programs per padded length, each short, together minutes.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


# XLA:CPU's legacy runtime ran every train step measured here 15-20% faster than jax 0.4.34's
# default thunk runtime (configs/RESULTS.md, "XLA:CPU runtime"). Results differ between the
# two by float rounding (~2e-7 after a few steps), so the recorded tables name the runtime.
LEGACY_CPU_RUNTIME = "--xla_cpu_use_thunk_runtime=false"


def prefer_legacy_cpu_runtime() -> str:
    """Adds ``LEGACY_CPU_RUNTIME`` to ``XLA_FLAGS`` unless the flag is already set either way
    (``XLA_FLAGS=--xla_cpu_use_thunk_runtime=true`` keeps the thunk runtime). XLA reads the
    flags when the backend starts, so this must run before the first computation; the
    commands call it before ``main``.

    Returns:
      The XLA_FLAGS now in effect.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_thunk_runtime" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {LEGACY_CPU_RUNTIME}".strip()
    return os.environ["XLA_FLAGS"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default",
                        help="experiments/configs module, optionally with :variant (e.g. :smoke)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a field, e.g. stage1.epochs=2")
    parser.add_argument("--fresh", action="store_true",
                        help="delete out_dir first instead of resuming it")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    parser.add_argument("--compile-cache", metavar="DIR", default=None,
                        help="keep XLA's compiled programs in DIR for later runs and resumes "
                             "(off by default: see enable_compile_cache)")
    parser.add_argument("--check-expected", action="store_true",
                        help="exit 1 unless the test table equals the one the config records "
                             "(EXPECTED in its module): catches drift of a published figure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = apply_overrides(load_config(args.config), args.overrides)
        plan = check_config(cfg)  # the model and layer map, resolved once for the run
        expected = _expected_for(args) if args.check_expected else None
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        enable_compile_cache(args.compile_cache)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run_pipeline(plan, fresh=args.fresh)
    print(f"\n## {cfg.name}\n")
    print(format_table(results))
    for pair, path in results["exports"].items():
        print(f"exported {pair} student: {path}")
    if expected is not None:
        got = table_rows(format_table(results))
        if got != expected:
            print(f"error: the table differs from the one {args.config} records (EXPECTED in "
                  f"experiments/configs/{args.config.partition(':')[0]}.py): the code or the "
                  f"data changed since it was taken. Expected:\n{expected}\nGot:\n{got}",
                  file=sys.stderr)
            return 1
        print(f"the table equals the one {args.config} records", file=sys.stderr)
    return 0


def _expected_for(args) -> str:
    """The recorded table ``--check-expected`` compares with; refuses before any work if
    there is none or if an override could change the results (only ``out_dir`` cannot)."""
    changing = [o for o in args.overrides if o.partition("=")[0].strip() != "out_dir"]
    if changing:
        raise ValueError(f"--check-expected compares with the recorded run of {args.config}; "
                         f"{', '.join(changing)} would change it: drop the override or the "
                         "check.")
    tables = expected_tables(args.config)
    if not tables:
        raise ValueError(f"{args.config} records no expected table (EXPECTED in its config "
                         "module); run without --check-expected.")
    cpu = host_cpu()
    if cpu not in tables:
        raise ValueError(f"{args.config} records no table for this CPU ({cpu}), only for: "
                         f"{'; '.join(tables)}. XLA compiles for the host CPU, so another "
                         "model's run differs (host_cpu); run without --check-expected and "
                         "record this machine's table in EXPECTED.")
    return tables[cpu]


if __name__ == "__main__":
    # Only as a command: main() called in a running program (a test, a notebook) must not
    # change the environment that program's later subprocesses inherit.
    prefer_legacy_cpu_runtime()
    sys.exit(main())
