"""banking77, full run: MiniLM-L6 teacher, students for all four approximation pairs.

Commands:
    # full: every training example; pairs quad+2quad, quad+2relu, gelu+2quad, quad+softmax
    # (hours on 2 CPU cores; minutes on an accelerator)
    python -m experiments.distill --config banking77_full
    # the subsampled quad+2quad run measured for the results table, on 2 CPU cores
    python -m experiments.distill --config banking77_full:cpu
    # every training example, quad+2quad only, finer length buckets: the 2-core full run
    # (estimated 0.9 h on 2 shared cores; RESULTS.md);
    # the XLA flag selects XLA:CPU's faster legacy runtime
    XLA_FLAGS=--xla_cpu_use_thunk_runtime=false \
        python -m experiments.distill --config banking77_full:cpu_full
    # ~3 min pipeline check
    python -m experiments.distill --config banking77_full:smoke

banking77: 9,003 train / 1,000 dev / 3,080 test queries, 77 intents; max_length 64
(99th percentile 52). The cpu variant: 4,000 training queries, teacher 5 epochs (lr 2e-4: 3 epochs
at 1e-4 on 2,400 queries left the teacher at 0.43), stage 1 3, stage 2 2, baseline 5.

Expected output: a table with the teacher, then for each pair the student (KD) and the
no-KD baseline, test metrics and % of the teacher's score; the students exported to
runs/banking77_full/<pair>/student (the cpu variant: runs/banking77_full_cpu/student).
The MPCFormer target is quad+2quad >= 97% of the teacher, and KD above the baseline.
"""

from __future__ import annotations

from experiments.configs.common import cpu, full, variant_of
from mpcformer_jax.train.config import DistillConfig


def get_config(variant: str = "") -> DistillConfig:
    """The full config; variants "cpu" (the measured subsampled run), "cpu_full" (every
    example, quad+2quad, sized for 2 CPU cores) and "smoke"."""
    cfg = full("banking77", max_length=64, buckets=(16, 32, 64), teacher_lr=2e-4,
               out_dir="runs/banking77_full")
    return variant_of(cfg, variant, cpu(cfg, max_train=4000, epochs=(5, 3, 2)), "banking77_full")
