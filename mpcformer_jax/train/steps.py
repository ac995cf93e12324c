"""The pure, jitted train and predict steps.

``train_step(state, teacher_params, batch, rng) -> (state, metrics)``: one function per stage
kind, jitted once, its state donated. Gradients are taken for the student's parameters only;
the teacher's are an ordinary argument (``None`` where a stage has no teacher), so they are
never in the optimizer state nor in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mpcformer_jax.models import BertConfig, forward
from mpcformer_jax.train import losses

# "task": labels (teacher fine-tune, no-distillation baseline); "layerwise": stage 1;
# "prediction": stage 2.
STAGE_KINDS = ("task", "layerwise", "prediction")


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


def make_train_step(kind: str, student_config: BertConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, *,
                    teacher_config: BertConfig | None = None, layer_map: tuple[int, ...] = (),
                    temperature: float = 1.0,
                    layerwise_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                    ) -> Callable:
    """Builds the jitted ``train_step`` of one stage.

    Args:
      kind: "task" (labels), "layerwise" (stage 1) or "prediction" (stage 2).
      student_config: the trained model's config (static).
      tx: the optimizer.
      schedule: the learning-rate schedule, only to report the rate in the metrics.
      teacher_config: the teacher's config (distillation kinds).
      layer_map: teacher layer of each student layer (stage 1).
      temperature: stage-2 temperature.
      layerwise_weights: stage-1 (embedding, hidden, attention) term weights.

    Returns:
      ``train_step(state, teacher_params, batch, rng) -> (state, metrics)``. ``rng`` is the
      stage's base key; the step number is folded in, so a resumed run draws the same dropout
      masks. ``batch`` holds input_ids, token_type_ids, attention_mask, labels and weights.
    """
    if kind not in STAGE_KINDS:
        raise ValueError(f"Unknown stage kind {kind!r}; available: {STAGE_KINDS}.")
    if kind != "task" and teacher_config is None:
        raise ValueError(f"Stage kind {kind!r} needs a teacher_config.")
    if kind == "layerwise":
        n_teacher = teacher_config.num_hidden_layers
        if len(layer_map) != student_config.num_hidden_layers or \
                not all(0 <= j < n_teacher for j in layer_map):
            raise ValueError(f"layer_map {layer_map} must give one teacher layer in "
                             f"[0, {n_teacher}) per student layer "
                             f"({student_config.num_hidden_layers}).")

    def loss_fn(params, teacher_params, batch, dropout_rng):
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        weights = batch["weights"]
        out = forward(student_config, params, ids, mask, types, deterministic=False,
                      output_intermediates=kind == "layerwise", rngs={"dropout": dropout_rng})
        if kind == "task":
            loss = losses.task_loss(out, batch["labels"], weights, student_config.is_regression)
            return loss, {}
        teacher_out = forward(teacher_config, teacher_params, ids, mask, types,
                              output_intermediates=kind == "layerwise")
        if kind == "layerwise":
            return losses.layerwise_distill_loss(out[1], teacher_out[1], mask, weights,
                                                 layer_map, layerwise_weights)
        loss = losses.prediction_distill_loss(out, teacher_out, weights,
                                              student_config.is_regression, temperature)
        return loss, {}

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


def make_predict_step(config: BertConfig) -> Callable:
    """``predict(params, batch) -> logits``, jitted (dropout off)."""

    def predict(params, batch):
        return forward(config, params, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"])

    return jax.jit(predict)
