"""The pure, jitted train and predict steps.

``train_step(state, teacher_params, batch, rng) -> (state, metrics)``: one function per stage
objective (``objectives.py``), jitted once, its state donated. Gradients are taken for the
student's parameters only; the teacher's are an ordinary argument (``None`` where a stage has
no teacher), so they are never in the optimizer state nor in a checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mpcformer_jax.models import BertConfig, forward
from mpcformer_jax.train.objectives import Objective


@struct.dataclass
class TrainState:
    """What a checkpoint holds: the step, the student's parameters and its optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> TrainState:
        """Step 0 with fresh optimizer moments for ``params``."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_train_step(objective: Objective, student_config: BertConfig,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> Callable:
    """Builds the jitted ``train_step`` of one stage.

    Args:
      objective: what the stage minimises (``objectives.TaskObjective``,
        ``LayerwiseObjective`` or ``PredictionObjective``); checked against the student here.
      student_config: the trained model's config (static).
      tx: the optimizer.
      schedule: the learning-rate schedule, only to report the rate in the metrics.

    Returns:
      ``train_step(state, teacher_params, batch, rng) -> (state, metrics)``. ``teacher_params``
      is ``objective.teacher_params`` placed on the mesh (None without a teacher); ``rng`` is
      the stage's base key, the step number folded in, so a resumed run draws the same
      dropout masks. ``batch`` holds input_ids, token_type_ids, attention_mask, labels and
      weights.

    Raises:
      ValueError: the objective does not fit the student (e.g. a bad layer map).
    """
    objective.check(student_config)
    loss_fn = functools.partial(objective.loss, student_config)

    def train_step(state: TrainState, teacher_params, batch, rng):
        dropout_rng = jax.random.fold_in(rng, state.step)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, teacher_params, batch, dropout_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **parts}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def make_predict_step(config: BertConfig) -> Callable:
    """``predict(params, batch) -> logits``, jitted (dropout off).

    One function per config: a student's stage-1 and stage-2 dev evaluations and its test
    score reuse one compiled program per padded length instead of compiling it three times.
    """

    def predict(params, batch):
        return forward(config, params, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"])

    return jax.jit(predict)
