"""What a stage minimises, as a typed value: labels, the teacher's layers, or its predictions.

An objective is a small frozen dataclass that names its loss and its options, and builds the
loss the train step differentiates:

    TaskObjective()                                   labels (teacher fine-tune, baseline)
    LayerwiseObjective(teacher_config, teacher_params, layer_map, term_weights)   stage 1
    PredictionObjective(teacher_config, teacher_params, temperature)              stage 2

The teacher's parameters ride along so a stage is described by one value, but they are left
out of equality, hashing and repr, and the train step receives them as an ordinary argument
(``train_step(state, teacher_params, batch, rng)``): they are never baked into the compiled
step as constants, never in the optimizer state, never in a checkpoint. With a
``teacher_cache.TeacherCache`` the teacher's outputs come with the batch instead (the loop
adds them, ``batch_targets``) and its forward is not in the step at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from mpcformer_jax.models import BertConfig, forward
from mpcformer_jax.train import losses
from mpcformer_jax.train.teacher_cache import (
    DeferredTeacherCache,
    TeacherCache,
    intermediates_from_batch,
)


def _student(config: BertConfig, params, batch, dropout_rng, intermediates: bool):
    return forward(config, params, batch["input_ids"], batch["attention_mask"],
                   batch["token_type_ids"], deterministic=False,
                   output_intermediates=intermediates, rngs={"dropout": dropout_rng})


def _teacher(config: BertConfig, params, batch, intermediates: bool):
    if "teacher_logits" in batch:  # cached (teacher_cache): no forward in the step
        logits = batch["teacher_logits"]
        return (logits, intermediates_from_batch(batch)) if intermediates else logits
    return forward(config, params, batch["input_ids"], batch["attention_mask"],
                   batch["token_type_ids"], output_intermediates=intermediates)


def batch_targets(objective, batch: dict) -> dict:
    """The cached teacher outputs ``objective`` needs for ``batch`` ({} without a cache)."""
    cache = getattr(objective, "cache", None)
    if cache is None:
        return {}
    return cache.targets(batch["index"], batch["input_ids"].shape[1])


@dataclasses.dataclass(frozen=True)
class TaskObjective:
    """Supervised loss on the labels: cross-entropy, or MSE for regression."""

    # Dev accuracy ranks this stage's checkpoints (see ``loop.run_stage``).
    select_best: ClassVar[bool] = True
    teacher_config: ClassVar[None] = None
    teacher_params: ClassVar[None] = None

    def check(self, student_config: BertConfig) -> None:
        """Nothing to check: any model can be fitted to labels."""

    def loss(self, config: BertConfig, params, teacher_params, batch, dropout_rng):
        """``(loss, parts)`` of ``params`` on ``batch``; ``teacher_params`` is unused (None)."""
        del teacher_params
        out = _student(config, params, batch, dropout_rng, intermediates=False)
        return losses.task_loss(out, batch["labels"], batch["weights"], config.is_regression), {}


@dataclasses.dataclass(frozen=True)
class LayerwiseObjective:
    """Stage 1: MSE to the teacher's embedding output, hidden states and attention scores.

    Attributes:
      teacher_config: the frozen teacher's config.
      teacher_params: its parameters (not part of equality or hashing).
      layer_map: ``layer_map[i]`` is the teacher layer that student layer i imitates.
      term_weights: multipliers of the (embedding, hidden, attention) terms.
      cache: the teacher's outputs on the training split, or None to run its forward in
        every step. A cache without attention scores fits only an attention weight of 0.
    """

    teacher_config: BertConfig
    teacher_params: Any = dataclasses.field(compare=False, repr=False)
    layer_map: tuple[int, ...] = ()
    term_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    cache: TeacherCache | DeferredTeacherCache | None = dataclasses.field(
        default=None, compare=False, repr=False)

    # The stage-1 student has no trained head for its new features, so dev accuracy does not
    # rank its checkpoints; the layer-wise loss is what it minimises: keep the latest.
    select_best: ClassVar[bool] = False

    def check(self, student_config: BertConfig) -> None:
        """Raises ValueError unless the layer map gives one teacher layer per student layer,
        or when the attention term is weighed but the cache holds no attention scores."""
        if self.cache is not None and not self.cache.has_attention and self.term_weights[2]:
            raise ValueError("The layer-wise loss weighs the attention scores but the teacher "
                             "cache holds none: build it with attention=True.")
        n_teacher = self.teacher_config.num_hidden_layers
        if len(self.layer_map) != student_config.num_hidden_layers or \
                not all(0 <= j < n_teacher for j in self.layer_map):
            raise ValueError(f"layer_map {self.layer_map} must give one teacher layer in "
                             f"[0, {n_teacher}) per student layer "
                             f"({student_config.num_hidden_layers}).")

    def loss(self, config: BertConfig, params, teacher_params, batch, dropout_rng):
        """``(loss, parts)``; parts are the unweighted embedding, hidden and attention terms."""
        _, inter = _student(config, params, batch, dropout_rng, intermediates=True)
        _, teacher_inter = _teacher(self.teacher_config, teacher_params, batch, True)
        return losses.layerwise_distill_loss(inter, teacher_inter, batch["attention_mask"],
                                             batch["weights"], self.layer_map,
                                             self.term_weights)


@dataclasses.dataclass(frozen=True)
class PredictionObjective:
    """Stage 2: soft cross-entropy to the teacher's logits at a temperature (MSE for regression).

    Attributes:
      teacher_config: the frozen teacher's config.
      teacher_params: its parameters (not part of equality or hashing).
      temperature: softening temperature T > 0.
      cache: the teacher's outputs on the training split, or None (its forward every step).
    """

    teacher_config: BertConfig
    teacher_params: Any = dataclasses.field(compare=False, repr=False)
    temperature: float = 1.0
    cache: TeacherCache | DeferredTeacherCache | None = dataclasses.field(
        default=None, compare=False, repr=False)

    select_best: ClassVar[bool] = True

    def check(self, student_config: BertConfig) -> None:
        """Raises ValueError when student and teacher do not predict the same outputs."""
        if student_config.num_labels != self.teacher_config.num_labels:
            raise ValueError(f"The student has {student_config.num_labels} outputs and the "
                             f"teacher {self.teacher_config.num_labels}; distilling predictions "
                             "needs the same label set.")

    def loss(self, config: BertConfig, params, teacher_params, batch, dropout_rng):
        """``(loss, {})`` of the student's logits against the teacher's."""
        out = _student(config, params, batch, dropout_rng, intermediates=False)
        teacher_out = _teacher(self.teacher_config, teacher_params, batch, False)
        loss = losses.prediction_distill_loss(out, teacher_out, batch["weights"],
                                              config.is_regression, self.temperature)
        return loss, {}


Objective = TaskObjective | LayerwiseObjective | PredictionObjective


def device_put_teacher(objective: Objective, sharding: jax.sharding.Sharding):
    """The objective's teacher params placed with ``sharding`` (None when it has no teacher,
    or when its outputs are cached and the step never runs it)."""
    if objective.teacher_params is None or getattr(objective, "cache", None) is not None:
        return None
    return jax.device_put(objective.teacher_params, sharding)
