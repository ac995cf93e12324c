"""The training loop of one stage, written out: batches -> train_step -> eval -> checkpoint.

Resuming is the ordinary path: the loop always starts by restoring the stage's last
checkpoint. The data order depends only on (seed, epoch) and dropout only on (seed, stage,
step), so a run resumed at step s replays exactly what an uninterrupted run does after s. A
finished stage restores its checkpoint at the last step, skips the loop and returns the best
params, which is how a restarted pipeline passes over the stages it has already done.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mpcformer_jax.data import TokenizedSplit, batches
from mpcformer_jax.models import BertConfig
from mpcformer_jax.train import parallel
from mpcformer_jax.train.checkpoint import StageCheckpoints
from mpcformer_jax.train.config import StageConfig
from mpcformer_jax.train.evaluation import (
    MODEL_KEYS,
    JsonlLog,
    eval_batches,
    evaluate,
    progress,
)
from mpcformer_jax.train.objectives import Objective, batch_targets, device_put_teacher
from mpcformer_jax.train.optim import learning_rate_schedule, make_optimizer
from mpcformer_jax.train.steps import TrainState, make_predict_step, make_train_step

TRAIN_KEYS = (*MODEL_KEYS, "labels", "weights")
_LOG_EVERY = 10  # steps per averaged JSONL line


class NonFiniteLossError(FloatingPointError):
    """A NaN or inf training loss; the message names the stage and the step."""


@dataclasses.dataclass
class StageResult:
    """What a stage hands on.

    Attributes:
      params: the student's params at the best dev evaluation.
      dev: the dev metrics of those params ({} for a skipped stage).
      best_step: the step they were saved at.
      steps: the stage's total number of steps.
      resumed_from: the step training resumed from (0 for a fresh start).
      seconds: wall time spent in this call.
    """

    params: Any
    dev: dict[str, float]
    best_step: int
    steps: int
    resumed_from: int
    seconds: float


def _eval_points(steps_per_epoch: int, epochs: int, evals_per_epoch: int, total: int) -> set:
    points = {e * steps_per_epoch + math.ceil(k * steps_per_epoch / evals_per_epoch)
              for e in range(epochs) for k in range(1, evals_per_epoch + 1)}
    return {p for p in points if p <= total} | {total}


def _one_batch_per_length(stream, pick, mesh) -> list[dict]:
    seen: dict[int, dict] = {}
    for batch in stream:
        seen.setdefault(batch["input_ids"].shape[1], batch)
    return [parallel.shard_batch(pick(b), mesh) for b in seen.values()]


def compile_ahead(train_step, state, teacher_params, train_batches: list[dict], rng,
                  predict, dev_batches: list[dict]) -> None:
    """Compiles a stage's train step and dev forward for every batch shape, all at once.

    XLA compiles one program on one core: about 30 CPU seconds for a MiniLM stage-1 step at
    one length on this machine class, and a stage otherwise meets its lengths one after the
    other, mid-training. Compiled side by side on otherwise idle cores they take about the
    wall time of one, and jit's cache hands the executables to the real calls. Nothing runs:
    lowering does not consume the donated state.
    """
    jobs = ([lambda b=b: train_step.lower(state, teacher_params, b, rng).compile()
             for b in train_batches]
            + [lambda b=b: predict.lower(state.params, b).compile() for b in dev_batches])
    if len(jobs) < 2:
        return  # nothing to overlap: the first call compiles as usual
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


@dataclasses.dataclass(frozen=True, eq=False)
class RunContext:
    """What every stage of one run shares.

    Attributes:
      mesh: the data mesh; params are replicated, batches split over it.
      log: the run's JSONL log.
      metric_names: the task's metrics (``compute_metrics``); selection uses "main".
      buckets: padded lengths of batches (None: powers of two up to the split's max_length).
      eval_batch_size: batch size of dev evaluation.
      seed: data order and dropout seed.
      run_config: JSON dict of the run's config, written beside each stage's checkpoints.
      frozen: parameter names no stage updates (``optim.make_optimizer``), e.g. the public
        word-embedding table.
    """

    mesh: Mesh
    log: JsonlLog
    metric_names: tuple[str, ...]
    buckets: tuple[int, ...] | None = None
    eval_batch_size: int = 64
    seed: int = 0
    run_config: dict | None = None
    frozen: tuple[str, ...] = ()


def run_stage(name: str, objective: Objective, stage: StageConfig, config: BertConfig, params,
              train: TokenizedSplit, dev: TokenizedSplit, ckpt_dir: str | Path,
              ctx: RunContext) -> StageResult:
    """Trains ``params`` for one stage, resuming from ``ckpt_dir`` when it holds a checkpoint.

    Args:
      name: the stage's name in logs, progress bars and errors ("stage1", "teacher"...).
      objective: what the stage minimises (``objectives.py``), teacher included. Its
        ``select_best`` says whether the best dev score picks the returned params (True) or
        the latest evaluated ones do (False, stage 1).
      stage: the stage's optimisation settings.
      config: the trained model's config.
      params: its starting parameters.
      train, dev: tokenized splits; dev picks the best checkpoint.
      ckpt_dir: the stage's checkpoint folder.
      ctx: what the run's stages share (mesh, log, metrics, buckets, seed...).

    Returns:
      StageResult with the best dev params.

    Raises:
      NonFiniteLossError: a NaN or inf loss, naming the stage and step.
      ValueError: a training split smaller than one batch, a batch size that does not
        split over the devices, or an objective that does not fit the model.
    """
    start = time.time()
    mesh, log = ctx.mesh, ctx.log
    rep = parallel.replicated(mesh)
    params = jax.device_put(params, rep)
    if stage.epochs == 0:
        return StageResult(params, {}, 0, 0, 0, 0.0)
    parallel.check_batch_size(stage.batch_size, mesh)
    parallel.check_batch_size(ctx.eval_batch_size, mesh)
    steps_per_epoch = len(train) // stage.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{name}: the training split has {len(train)} examples, fewer than "
                         f"one batch of {stage.batch_size}.")
    total = steps_per_epoch * stage.epochs
    if stage.max_steps:
        total = min(total, stage.max_steps)
    evals = _eval_points(steps_per_epoch, stage.epochs, stage.evals_per_epoch, total)

    tx = make_optimizer(stage, total, ctx.frozen)
    train_step = make_train_step(objective, config, tx, learning_rate_schedule(stage, total))
    predict = make_predict_step(config)
    teacher_params = device_put_teacher(objective, rep)
    # The state is donated to train_step, so it gets its own buffers: the caller's params
    # (often the teacher's own arrays, for a student initialised from it) must survive.
    own = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    state = jax.device_put(TrainState.create(own, tx), rep)
    ckpts = StageCheckpoints(ckpt_dir, ctx.run_config)
    meta = {"best_score": -math.inf, "best_step": -1, "best_dev": {}}
    restored = ckpts.restore_last(state)
    if restored is not None:
        state, meta = restored
    step = resumed_from = int(state.step)
    if restored is not None:
        log.write(stage=name, event="resumed", step=step, total_steps=total)
    # The stage name enters the key so two stages with one seed draw different masks.
    rng = jax.random.fold_in(jax.random.PRNGKey(ctx.seed), zlib.crc32(name.encode()))

    def epoch_batches(epoch: int):
        return batches(train, stage.batch_size, ctx.buckets, shuffle=True, seed=ctx.seed,
                       epoch=epoch, group_by_length=True, drop_remainder=True)

    def train_inputs(batch):  # what the step reads, the teacher's cached outputs included
        return {**{k: batch[k] for k in TRAIN_KEYS}, **batch_targets(objective, batch)}

    if step < total:
        compile_ahead(
            train_step, state, teacher_params,
            _one_batch_per_length(epoch_batches(step // steps_per_epoch), train_inputs, mesh),
            rng, predict,
            _one_batch_per_length(eval_batches(dev, ctx.eval_batch_size, ctx.buckets),
                                  lambda b: {k: b[k] for k in MODEL_KEYS}, mesh))

    bar = progress(total, name, initial=step)
    running: dict[str, list[float]] = {}
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        for i, batch in enumerate(epoch_batches(epoch)):
            if i < skip:  # resuming mid-epoch: replay the order, skip what was done
                continue
            batch = parallel.shard_batch(train_inputs(batch), mesh)
            state, metrics = train_step(state, teacher_params, batch, rng)
            step += 1
            metrics = {k: float(v) for k, v in metrics.items()}
            if not math.isfinite(metrics["loss"]):
                raise NonFiniteLossError(
                    f"Stage {name!r}: loss is {metrics['loss']} at step {step} of {total} "
                    f"(epoch {epoch}). Lower {name}.learning_rate or check the inputs; the last "
                    f"good checkpoint is in {ckpts.directory}.")
            for k, v in metrics.items():
                running.setdefault(k, []).append(v)
            bar.update()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if step % _LOG_EVERY == 0 or step in evals:
                log.write(stage=name, step=step, epoch=epoch,
                          **{k: float(np.mean(v)) for k, v in running.items()})
                running = {}
            if step in evals:
                dev_metrics = evaluate(predict, state.params, dev, ctx.metric_names,
                                       ctx.eval_batch_size, mesh, ctx.buckets,
                                       desc=f"{name} dev")
                log.write(stage=name, step=step, event="dev", **dev_metrics)
                if dev_metrics["main"] > meta["best_score"] or not objective.select_best:
                    meta = {"best_score": dev_metrics["main"], "best_step": step,
                            "best_dev": dev_metrics}
                    ckpts.save_best(step, state.params, meta)
                ckpts.save_last(step, state, meta)
            elif stage.checkpoint_every and step % stage.checkpoint_every == 0:
                ckpts.save_last(step, state, meta)
            if step >= total:
                break
    bar.close()
    best, best_meta = ckpts.restore_best(state.params)
    ckpts.close()
    log.write(stage=name, event="done", steps=total, best_step=best_meta["best_step"],
              **{f"dev_{k}": v for k, v in best_meta["best_dev"].items()})
    return StageResult(best, best_meta["best_dev"], best_meta["best_step"], total,
                       resumed_from, time.time() - start)
