"""Helpers shared by the experiment configs (plain functions over frozen dataclasses)."""

from __future__ import annotations

import dataclasses

from mpcformer_jax.train.config import DistillConfig, StageConfig

# The four approximation pairs of the accuracy table (MPCFormer Table 2 / 3).
ALL_PAIRS = ("quad+2quad", "quad+2relu", "gelu+2quad", "quad+softmax")


def smoke(cfg: DistillConfig) -> DistillConfig:
    """A minutes-long variant of ``cfg``: 128 training examples, a few steps per stage.

    It checks that the whole pipeline runs, not that it learns.
    """
    short = StageConfig(epochs=1, batch_size=16, max_steps=4, learning_rate=1e-4)
    return dataclasses.replace(
        cfg, name=f"{cfg.name} (smoke)", max_train=128, max_dev=64, max_test=64,
        approximations=cfg.approximations[:1], teacher=short, stage1=short, stage2=short,
        baseline=short, eval_batch_size=32, out_dir=f"{cfg.out_dir}_smoke")


def full(task: str, max_length: int, buckets: tuple[int, ...], **overrides) -> DistillConfig:
    """A full run on ``task``: every training example, all four approximation pairs.

    Epochs follow MPCFormer's proportions, scaled to a CPU: teacher 3, stage 1 5, stage 2 3,
    and the baseline gets stage 1 + stage 2 = 8 epochs, the same number of passes as the
    student it is compared with.
    """
    kw = dict(
        name=f"{task} full", task=task, max_length=max_length, buckets=buckets,
        approximations=ALL_PAIRS,
        teacher=StageConfig(epochs=3, batch_size=32, learning_rate=1e-4),
        stage1=StageConfig(epochs=5, batch_size=32, learning_rate=5e-4),
        stage2=StageConfig(epochs=3, batch_size=32, learning_rate=1e-4),
        baseline=StageConfig(epochs=8, batch_size=32, learning_rate=1e-4),
        temperature=1.0, out_dir=f"runs/{task}_full")
    return DistillConfig(**{**kw, **overrides})


def cpu(cfg: DistillConfig, max_train: int, epochs: tuple[int, int, int]) -> DistillConfig:
    """The 2-CPU-core variant of a full config: ``max_train`` training examples, quad+2quad
    only, ``epochs`` = (teacher, stage 1, stage 2); the baseline gets stage 1 + stage 2.

    Learning rates stay those of ``cfg``. This is what the README's measured table ran.
    """
    teacher, s1, s2 = epochs
    return dataclasses.replace(
        cfg, name=f"{cfg.name} (cpu)", max_train=max_train, approximations=("quad+2quad",),
        teacher=dataclasses.replace(cfg.teacher, epochs=teacher),
        stage1=dataclasses.replace(cfg.stage1, epochs=s1),
        stage2=dataclasses.replace(cfg.stage2, epochs=s2),
        baseline=dataclasses.replace(cfg.baseline, epochs=s1 + s2),
        out_dir=f"{cfg.out_dir}_cpu")


def variant_of(cfg: DistillConfig, variant: str, cpu_variant: DistillConfig | None = None,
               config_name: str = "") -> DistillConfig:
    """Picks "" (the config), "smoke" or "cpu"; an unknown variant names the valid ones."""
    choices = {"": cfg, "smoke": smoke(cfg)}
    if cpu_variant is not None:
        choices["cpu"] = cpu_variant
    if variant not in choices:
        raise ValueError(f"Unknown variant {variant!r} of config {config_name!r}; available: "
                         f"{', '.join(v for v in choices if v)}.")
    return choices[variant]
