"""Profile a distillation config's training steps and estimate its wall time, without running it.

Command:
    python -m experiments.profile_run --config rt_full:cpu_full            # ~5 min on 2 cores
    python -m experiments.profile_run --config trec_full:cpu_full --steps 10
    python -m experiments.profile_run --config rt_full:cpu_full --set buckets=32,64

For each stage the config would run (teacher, then per student stage 1, stage 2 and the
baseline, as ``pipeline.student_plans`` lays them out: a progressive student takes
``progressive_stage1_epochs`` or no stage 1; annealing phases are not modelled) it
counts the batches of each padded length that the real batcher produces from the real
tokenized training split, times the real jitted ``train_step`` of that stage at each of those
shapes (after compiling it, ``--steps`` timed steps, the median counts) and the dev/test
forward, then prints per-shape step times, the share of each stage and the estimated wall
time: steps x step time + compile time + evaluations. Weights are random (cost does not
depend on them). It reports the machine's load average beside the figures, since other jobs
on the cores stretch every number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter

import jax
import numpy as np

from experiments.distill import load_config, prefer_legacy_cpu_runtime
from mpcformer_jax.data import batches, load_task, num_batches, tokenize_split
from mpcformer_jax.models import init_params, load_pretrained
from mpcformer_jax.pipeline import check_config, student_plans, teacher_cache_plan
from mpcformer_jax.train import parallel
from mpcformer_jax.train.config import apply_overrides
from mpcformer_jax.train.objectives import (
    LayerwiseObjective,
    PredictionObjective,
    TaskObjective,
    batch_targets,
    device_put_teacher,
)
from mpcformer_jax.train.optim import learning_rate_schedule, make_optimizer
from mpcformer_jax.train.steps import TrainState, make_predict_step, make_train_step
from mpcformer_jax.train.teacher_cache import TeacherCache


def bucket_counts(data, batch_size: int, buckets) -> Counter:
    """Batches per padded length in one training epoch (epoch 0's order; others differ by a
    few batches)."""
    return Counter(b["input_ids"].shape[1] for b in batches(
        data, batch_size, buckets, shuffle=True, seed=0, epoch=0, group_by_length=True,
        drop_remainder=True))


def _fake_batch(batch_size: int, length: int, num_labels: int, mesh,
                objective=None) -> dict:
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(1000, 30000, (batch_size, length)).astype(np.int32),
        "token_type_ids": np.zeros((batch_size, length), np.int32),
        "attention_mask": np.ones((batch_size, length), np.int32),
        "labels": rng.integers(0, num_labels, batch_size).astype(np.int32),
        "weights": np.ones(batch_size, np.float32)}
    # Cached teacher outputs where the objective has a cache (every row example 0's).
    targets = batch_targets(objective, {**batch, "index": np.zeros(batch_size, np.int32)})
    return parallel.shard_batch({**batch, **targets}, mesh)


def _shape_cache(teacher_cfg, attention: bool) -> TeacherCache:
    """A one-example teacher cache: ``targets`` gives arrays of the real shapes, enough to
    time a step that reads cached teacher outputs (the values do not change its cost)."""
    layers, width = teacher_cfg.num_hidden_layers, teacher_cfg.hidden_size
    return TeacherCache(
        states=[np.zeros((layers + 1, 1, width), np.float32)],
        logits=np.zeros((1, teacher_cfg.num_labels), np.float32),
        attention=[np.zeros((layers, teacher_cfg.num_attention_heads, 1, 1), np.float32)]
        if attention else None)


def time_train_step(objective, config, stage, total: int, batch: dict, steps: int):
    """(compile seconds, median seconds per step) of the stage's real train step."""
    mesh = parallel.make_mesh()
    rep = parallel.replicated(mesh)
    tx = make_optimizer(stage, total)
    step_fn = make_train_step(objective, config, tx, learning_rate_schedule(stage, total))
    teacher = device_put_teacher(objective, rep)
    state = jax.device_put(TrainState.create(init_params(config, 1), tx), rep)
    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    state, metrics = step_fn(state, teacher, batch, key)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step_fn(state, teacher, batch, key)
        float(metrics["loss"])  # the loop reads the loss every step, so it is timed too
        times.append(time.perf_counter() - t)
    return compile_s, statistics.median(times)


def time_predict(config, batch: dict, steps: int):
    """(compile seconds, median seconds per batch) of the eval forward."""
    predict = make_predict_step(config)
    params = jax.device_put(init_params(config, 1), parallel.replicated(parallel.make_mesh()))
    t = time.perf_counter()
    jax.block_until_ready(predict(params, batch))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(predict(params, batch))
        times.append(time.perf_counter() - t)
    return compile_s, statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per shape")
    args = parser.parse_args(argv)
    cfg = apply_overrides(load_config(args.config), args.overrides)
    plan = check_config(cfg)
    mesh = parallel.make_mesh()
    load0 = os.getloadavg()[0]
    task = load_task(cfg.task, max_examples={"train": cfg.max_train or None,
                                             "dev": cfg.max_dev or None,
                                             "test": cfg.max_test or None},
                     subsample_seed=cfg.seed)
    teacher_cfg, teacher_params, tokenizer = load_pretrained(cfg.model,
                                                             num_labels=task.num_labels)
    data = {k: tokenize_split(s, tokenizer, cfg.max_length, teacher_cfg.max_length)
            for k, s in task.splits.items()}
    buckets = cfg.buckets or None
    t = time.perf_counter()
    n_host = sum(1 for _ in batches(data["train"], cfg.teacher.batch_size, buckets,
                                    shuffle=True, group_by_length=True))
    host_s = (time.perf_counter() - t) / n_host

    # Each student as the pipeline trains it (pipeline.student_plans): a progressive one
    # takes its own stage-1 epochs or none, an inner link no stage 2 where the config says
    # so (link_stage2=False). Its config is timed with random weights, so a
    # student that calibrates replaced norms needs no calibration here.
    # With the teacher's outputs cached (as the pipeline does when they fit), the steps read
    # them from the batch; building the cache is one teacher forward over the split.
    n_student = len(plan.layer_map)
    cached, _ = teacher_cache_plan(cfg, teacher_cfg, data["train"])
    shape_cache = _shape_cache(teacher_cfg, bool(cfg.layerwise_weights[2])) if cached else None
    layerwise = LayerwiseObjective(teacher_cfg, teacher_params, plan.layer_map,
                                   cfg.layerwise_weights, cache=shape_cache)
    prediction = PredictionObjective(teacher_cfg, teacher_params, cfg.temperature,
                                     cache=shape_cache)
    stages = [("teacher", TaskObjective(), teacher_cfg, cfg.teacher)]
    for student in student_plans(cfg):
        student_cfg = teacher_cfg.with_approximation(student.approximation).replace(
            num_hidden_layers=n_student)
        if student.stage1 is not None:
            stages.append(("stage1", layerwise, student_cfg, student.stage1))
        if student.stage2:
            stages.append(("stage2", prediction, student_cfg, cfg.stage2))
        if cfg.run_baseline:
            stages.append(("baseline", TaskObjective(), student_cfg, cfg.baseline))
    models = {config for _, _, config, _ in stages}

    print(f"{cfg.name}: {len(data['train'])} train / {len(data['dev'])} dev / "
          f"{len(data['test'])} test, buckets {buckets or 'default'}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}, load average {load0:.1f}")
    print(f"host batching: {host_s * 1e3:.1f} ms per batch of {cfg.teacher.batch_size}")
    print("| stage | batch | steps | length: batches/epoch | ms/step by length | compile s | "
          "train s |")
    print("|---|---:|---:|---|---|---:|---:|")
    cache: dict = {}
    total_train = total_compile = 0.0
    examples = 0
    rows = []
    for name, objective, config, stage in stages:
        if stage.epochs == 0:
            continue
        counts = bucket_counts(data["train"], stage.batch_size, buckets)
        per_epoch = sum(counts.values())
        steps = per_epoch * stage.epochs
        if stage.max_steps:
            steps = min(steps, stage.max_steps)
        seconds = compile_s = 0.0
        cells = []
        for length, n in sorted(counts.items()):
            key = (name, config, length, stage.batch_size)
            if key not in cache:
                batch = _fake_batch(stage.batch_size, length, config.num_labels, mesh,
                                    objective)
                cache[key] = time_train_step(objective, config, stage, steps, batch, args.steps)
            c, s = cache[key]
            compile_s += c
            seconds += s * n * steps / per_epoch
            cells.append((length, n, s))
        total_train += seconds
        total_compile += compile_s
        examples += steps * stage.batch_size
        rows.append({"stage": name, "steps": steps, "seconds": seconds, "compile": compile_s,
                     "cells": cells})
        print(f"| {name} | {stage.batch_size} | {steps} | "
              + ", ".join(f"{length}: {n}" for length, n, _ in cells) + " | "
              + ", ".join(f"{length}: {s * 1e3:.0f}" for length, _, s in cells)
              + f" | {compile_s:.0f} | {seconds:.0f} |")

    # Evaluations: every stage evaluates dev evals_per_epoch times per epoch; each model
    # once on test. Forward cost is taken from the teacher at the eval batch size.
    eval_batches = {"dev": num_batches(data["dev"], cfg.eval_batch_size),
                    "test": num_batches(data["test"], cfg.eval_batch_size)}
    eval_counts = bucket_counts(data["dev"], cfg.eval_batch_size, buckets)
    fwd = {}
    for length in sorted(eval_counts):
        batch = _fake_batch(cfg.eval_batch_size, length, teacher_cfg.num_labels, mesh)
        fwd[length] = time_predict(teacher_cfg, batch, max(2, args.steps // 2))
    mean_fwd = sum(fwd[k][1] * n for k, n in eval_counts.items()) / sum(eval_counts.values())
    n_dev = sum(s.epochs * s.evals_per_epoch for _, _, _, s in stages if s.epochs)
    n_test = 1 + len(cfg.approximations) * (2 if cfg.run_baseline else 1)
    n_train = num_batches(data["train"], cfg.eval_batch_size) if cached else 0
    eval_s = mean_fwd * (n_dev * eval_batches["dev"] + n_test * eval_batches["test"] + n_train)
    eval_compile = sum(c for c, _ in fwd.values()) * len(models)  # one forward per model
    total = total_train + total_compile + eval_s + eval_compile
    print(f"\nevaluation: {n_dev} dev passes + {n_test} test passes"
          + (" + the teacher cache (one pass over train)" if cached else "")
          + f", {eval_s:.0f} s (+ {eval_compile:.0f} s compiling)")
    print(f"estimated wall time: {total:.0f} s = {total / 3600:.2f} h (training {total_train:.0f}"
          f" s, compiling {total_compile + eval_compile:.0f} s, evaluating {eval_s:.0f} s); "
          f"{examples / total_train:.1f} training examples/s; load average now "
          f"{os.getloadavg()[0]:.1f}")
    return {"rows": rows, "total_s": total, "train_s": total_train,
            "compile_s": total_compile + eval_compile, "eval_s": eval_s}


if __name__ == "__main__":
    prefer_legacy_cpu_runtime()  # time the runtime the distill command trains with
    main()
