"""clinc150, full run: MiniLM-L6 teacher, students for all four approximation pairs.

Commands:
    # full: every training example; pairs quad+2quad, quad+2relu, gelu+2quad, quad+softmax
    # (hours on 2 CPU cores; minutes on an accelerator)
    python -m experiments.distill --config clinc150_full
    # the subsampled quad+2quad run measured for the results table, on 2 CPU cores
    python -m experiments.distill --config clinc150_full:cpu
    # every training example, quad+2quad only, finer length buckets: the 2-core full run
    # (not profiled);
    # the XLA flag selects XLA:CPU's faster legacy runtime
    XLA_FLAGS=--xla_cpu_use_thunk_runtime=false \
        python -m experiments.distill --config clinc150_full:cpu_full
    # ~3 min pipeline check
    python -m experiments.distill --config clinc150_full:smoke

clinc150: 18,000 train / 2,250 dev / 2,250 test queries, 150 intents; max_length 32.
The cpu variant: 4,000 training queries (not run for the README).

Expected output: a table with the teacher, then for each pair the student (KD) and the
no-KD baseline, test metrics and % of the teacher's score; the students exported to
runs/clinc150_full/<pair>/student (the cpu variant: runs/clinc150_full_cpu/student).
The MPCFormer target is quad+2quad >= 97% of the teacher, and KD above the baseline.
"""

from __future__ import annotations

from experiments.configs.common import cpu, full, variant_of
from mpcformer_jax.train.config import DistillConfig


def get_config(variant: str = "") -> DistillConfig:
    """The full config; variants "cpu" (the measured subsampled run), "cpu_full" (every
    example, quad+2quad, sized for 2 CPU cores) and "smoke"."""
    cfg = full("clinc150", max_length=32, buckets=(16, 32), out_dir="runs/clinc150_full")
    return variant_of(cfg, variant, cpu(cfg, max_train=4000, epochs=(3, 3, 2)), "clinc150_full")
