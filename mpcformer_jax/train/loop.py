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
import time
import zlib
from collections.abc import Sequence
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
from mpcformer_jax.train.evaluation import MODEL_KEYS, JsonlLog, evaluate, progress
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


def run_stage(name: str, kind: str, stage: StageConfig, config: BertConfig, params,
              train: TokenizedSplit, dev: TokenizedSplit, *, metric_names: Sequence[str],
              ckpt_dir: str | Path, log: JsonlLog, mesh: Mesh, seed: int = 0,
              buckets: Sequence[int] | None = None, eval_batch_size: int = 64,
              teacher_config: BertConfig | None = None, teacher_params=None,
              layer_map: tuple[int, ...] = (), temperature: float = 1.0,
              layerwise_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
              run_config: dict | None = None, select_best: bool = True) -> StageResult:
    """Trains ``params`` for one stage, resuming from ``ckpt_dir`` when it holds a checkpoint.

    Args:
      name: the stage's name in logs, progress bars and errors ("stage1", "teacher"...).
      kind: "task", "layerwise" or "prediction" (see ``steps.make_train_step``).
      stage: the stage's optimisation settings.
      config: the trained model's config.
      params: its starting parameters.
      train, dev: tokenized splits; dev picks the best checkpoint.
      metric_names: the task's metrics (``compute_metrics``); selection uses "main".
      ckpt_dir: the stage's checkpoint folder.
      log: the run's JSONL log.
      mesh: the data mesh; params are replicated, batches split over it.
      seed: data order and dropout seed.
      buckets: padded lengths of batches.
      eval_batch_size: batch size of dev evaluation.
      teacher_config, teacher_params: the frozen teacher (distillation kinds).
      layer_map: teacher layer per student layer (stage 1).
      temperature: stage-2 temperature.
      layerwise_weights: stage-1 (embedding, hidden, attention) term weights.
      run_config: JSON dict of the run's config, written beside the checkpoints.
      select_best: keep the params of the best dev score; False keeps the latest evaluated
        ones (stage 1: its student has no trained head for its new features, so dev accuracy
        does not rank its checkpoints; the layer-wise loss is what it minimises).

    Returns:
      StageResult with the best dev params.

    Raises:
      NonFiniteLossError: a NaN or inf loss, naming the stage and step.
      ValueError: a training split smaller than one batch, or a batch size that does not
        split over the devices.
    """
    start = time.time()
    rep = parallel.replicated(mesh)
    params = jax.device_put(params, rep)
    if stage.epochs == 0:
        return StageResult(params, {}, 0, 0, 0, 0.0)
    parallel.check_batch_size(stage.batch_size, mesh)
    parallel.check_batch_size(eval_batch_size, mesh)
    steps_per_epoch = len(train) // stage.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{name}: the training split has {len(train)} examples, fewer than "
                         f"one batch of {stage.batch_size}.")
    total = steps_per_epoch * stage.epochs
    if stage.max_steps:
        total = min(total, stage.max_steps)
    evals = _eval_points(steps_per_epoch, stage.epochs, stage.evals_per_epoch, total)

    tx = make_optimizer(stage, total)
    train_step = make_train_step(kind, config, tx, learning_rate_schedule(stage, total),
                                 teacher_config=teacher_config, layer_map=layer_map,
                                 temperature=temperature, layerwise_weights=layerwise_weights)
    predict = make_predict_step(config)
    if teacher_params is not None:
        teacher_params = jax.device_put(teacher_params, rep)
    # The state is donated to train_step, so it gets its own buffers: the caller's params
    # (often the teacher's own arrays, for a student initialised from it) must survive.
    own = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    state = jax.device_put(TrainState.create(own, tx), rep)
    ckpts = StageCheckpoints(ckpt_dir, run_config)
    meta = {"best_score": -math.inf, "best_step": -1, "best_dev": {}}
    restored = ckpts.restore_last(state)
    if restored is not None:
        state, meta = restored
    step = resumed_from = int(state.step)
    if restored is not None:
        log.write(stage=name, event="resumed", step=step, total_steps=total)
    # The stage name enters the key so two stages with one seed draw different masks.
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()))

    bar = progress(total, name, initial=step)
    running: dict[str, list[float]] = {}
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        stream = batches(train, stage.batch_size, buckets, shuffle=True, seed=seed,
                         epoch=epoch, group_by_length=True, drop_remainder=True)
        for i, batch in enumerate(stream):
            if i < skip:  # resuming mid-epoch: replay the order, skip what was done
                continue
            batch = parallel.shard_batch({k: batch[k] for k in TRAIN_KEYS}, mesh)
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
                dev_metrics = evaluate(predict, state.params, dev, metric_names,
                                       eval_batch_size, mesh, buckets, desc=f"{name} dev")
                log.write(stage=name, step=step, event="dev", **dev_metrics)
                if dev_metrics["main"] > meta["best_score"] or not select_best:
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
