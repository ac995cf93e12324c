"""Frozen, validated configs of a distillation run, and ``a.b=value`` overrides.

A config is a tree of frozen dataclasses: hashable, printable, written beside the checkpoints
as JSON, and checked field by field when built, so a typo fails before any work. Experiment
files (``experiments/configs/*.py``) build one in ``get_config()``; the command line changes
fields with ``--set stage1.epochs=2``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from mpcformer_jax import approx

SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Optimisation of one training stage (teacher fine-tune, stage 1, stage 2 or baseline).

    Attributes:
      epochs: passes over the training split (0 skips the stage).
      batch_size: global batch size (split over all devices).
      learning_rate: peak learning rate.
      warmup_ratio: fraction of the steps spent warming up linearly from 0.
      schedule: after warmup, "constant" or "linear" decay to 0.
      weight_decay: AdamW decoupled decay (not applied to biases and LayerNorm).
      clip_norm: global gradient-norm clip (0 disables it).
      evals_per_epoch: dev evaluations (each followed by a checkpoint) per epoch.
      checkpoint_every: also checkpoint every this many steps (0: only at evaluations).
      max_steps: stop after this many steps (0: no cap); for smoke runs.
    """

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    evals_per_epoch: int = 1
    checkpoint_every: int = 0
    max_steps: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; available: {SCHEDULES}.")
        for name in ("epochs", "checkpoint_every", "max_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("batch_size", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        # NaN compares false with everything, so "lr <= 0" alone lets it through: test
        # finiteness first.
        _check_float("learning_rate", self.learning_rate, "> 0", lambda v: v > 0)
        _check_float("warmup_ratio", self.warmup_ratio, "in [0, 1)", lambda v: 0 <= v < 1)
        _check_float("weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)
        _check_float("clip_norm", self.clip_norm, ">= 0 (0 disables clipping)",
                     lambda v: v >= 0)


NORM_STUDENT_STARTS = ("teacher", "student", "student_stage2")


def _check_float(name: str, value: float, rule: str, ok) -> None:
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a finite number {rule}, got {value}.")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The whole pipeline: teacher fine-tune, then per approximation stage 1, stage 2 and
    the no-distillation baseline, then test evaluation and export.

    Attributes:
      name: label of the run (shown in the table).
      task: a task of ``mpcformer_jax.data.TASKS``.
      max_train, max_dev, max_test: keep at most this many examples of a split (0 = all),
        chosen by a seeded permutation.
      model: checkpoint of the teacher: a short name (``minilm-l6``) or a folder.
      max_length: token truncation length; must fit the model's position table.
      buckets: padded lengths a batch may take (empty: powers of two up to max_length).
      approximations: one ``approx.Approximation`` name per student, e.g. ("quad+2quad",
        "quad+2quad+affine").
      student_layers: layers of the students (0: as many as the teacher).
      layer_map: teacher layer imitated by each student layer (empty: evenly spaced,
        the last student layer on the last teacher layer).
      temperature: stage-2 softening temperature.
      layerwise_weights: stage-1 weights of the (embedding, hidden-state, attention-score)
        MSE terms; MPCFormer uses (1, 1, 1).
      teacher, stage1, stage2, baseline: optimisation of each stage.
      run_baseline: also train the no-distillation baseline.
      norm_students_from: where a student that replaces LayerNorm, or whose normaliser is
        one ``approx.PROGRESSIVE_FROM`` replaces (2quad_len), starts (progressive
        replacement). "teacher" (the default): the teacher's weights, like every student.
        "student": the distilled student of the same run with the same activation and
        softmax and exact LayerNorm (listed before it), calibrated from there, then both
        stages. "student_stage2": the same start, stage 2 only (its hidden states were
        already matched as that student).
      progressive_stage1_epochs: stage-1 epochs of a progressive student (one that starts
        from another distilled student of the run, ``norm_students_from``); 0: ``stage1``'s.
        Such a student starts near its target, so the full-data chains give it fewer passes
        than the first student (``experiments.configs.common.link_epochs``).
      link_stage2: give stage 2 to a student that a later student of the run starts from
        (an inner link of a progressive chain). False: such a student hands its stage-1
        weights on and is tested with them ("student (stage 1)"); only the students at the
        ends of their chains learn the teacher's predictions. It saves a stage a link.
      teacher_cache_gib: the host memory the frozen teacher's outputs on the training split
        may take (``train.teacher_cache``): computed once, at the first step a student
        stage takes, they replace its forward in every stage-1 and stage-2 step. A split
        whose cache would be larger runs the teacher in the step, as with 0 (off).
      anneal_phases: a student whose normaliser stops dividing each row by its sum
        (2quad_len) after weights trained with row sums (the teacher, a 2quad student)
        gets its first training stage in this many phases, the new normaliser mixed in at
        1/n, 2/n, ... 1 (``BertConfig.softmax_mix``), each phase the stage's epochs / n
        (at least one). 0 or 1: switched at once.
      anneal_learning_rate: the peak learning rate of those phases (each warms up and
        decays on its own), 0 for the stage's own. Measured on rt: at stage 1's 1e-3 the
        loss turned NaN a few steps past the warm-up of the phase at mix 1/2 (8 phases)
        or 3/4 (4 phases).
      public_word_embeddings: freeze the word-embedding table at the pretrained checkpoint's
        values through the teacher, both stages and the baseline; the exports then record
        the table's source and hash, and private inference looks tokens up on the client
        (``models.public_table``).
      eval_batch_size: batch size of dev/test evaluation.
      seed: seeds data order, dropout and head initialisation.
      out_dir: where checkpoints, logs, results and exports go.
    """

    name: str = "default"
    task: str = "rt"
    max_train: int = 0
    max_dev: int = 0
    max_test: int = 0
    model: str = "minilm-l6"
    max_length: int = 64
    buckets: tuple[int, ...] = ()
    approximations: tuple[str, ...] = ("quad+2quad",)
    student_layers: int = 0
    layer_map: tuple[int, ...] = ()
    temperature: float = 1.0
    layerwise_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    teacher: StageConfig = StageConfig(epochs=3, learning_rate=5e-5)
    stage1: StageConfig = StageConfig(epochs=5, learning_rate=5e-5)
    stage2: StageConfig = StageConfig(epochs=3, learning_rate=5e-5)
    baseline: StageConfig = StageConfig(epochs=8, learning_rate=5e-5)
    run_baseline: bool = True
    norm_students_from: str = "teacher"
    progressive_stage1_epochs: int = 0
    link_stage2: bool = True
    teacher_cache_gib: float = 4.0
    anneal_phases: int = 0
    anneal_learning_rate: float = 0.0
    public_word_embeddings: bool = False
    eval_batch_size: int = 64
    seed: int = 0
    out_dir: str = "runs/default"

    def __post_init__(self):
        from mpcformer_jax.data import TASKS  # cheap; kept local so configs import fast

        if self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}. Available tasks are: "
                             f"{', '.join(TASKS)}.")
        if not self.approximations:
            raise ValueError("approximations is empty: name at least one, e.g. 'quad+2quad'.")
        for name in self.approximations:
            if approx.Approximation.parse(name) == approx.EXACT:
                raise ValueError(f"approximations: {name!r} is the teacher itself; name "
                                 "replacements, e.g. 'quad+2quad'.")
        if len({approx.Approximation.parse(a) for a in self.approximations}) != \
                len(self.approximations):
            raise ValueError(f"approximations has duplicates: {self.approximations}.")
        if self.norm_students_from not in NORM_STUDENT_STARTS:
            raise ValueError(f"norm_students_from must be one of {', '.join(NORM_STUDENT_STARTS)}"
                             f", got {self.norm_students_from!r}.")
        if self.norm_students_from != "teacher":
            listed = [approx.Approximation.parse(a) for a in self.approximations]
            for i, a in enumerate(listed):
                starts = approx.progressive_starts(a)
                if starts and not any(b in listed[:i] for b in starts):
                    names = " or ".join(repr(b.name) for b in starts)
                    raise ValueError(
                        f"norm_students_from={self.norm_students_from!r}: {a.name} starts from "
                        f"the {starts[0].name} student, so list {names} before it in "
                        "approximations.")
        if self.progressive_stage1_epochs < 0:
            raise ValueError(f"progressive_stage1_epochs must be >= 0 (0: stage1.epochs), got "
                             f"{self.progressive_stage1_epochs}.")
        _check_float("teacher_cache_gib", self.teacher_cache_gib, ">= 0 (0: off)",
                     lambda v: v >= 0)
        if self.anneal_phases < 0:
            raise ValueError(f"anneal_phases must be >= 0 (0: no annealing), got "
                             f"{self.anneal_phases}.")
        _check_float("anneal_learning_rate", self.anneal_learning_rate,
                     ">= 0 (0: the stage's own)", lambda v: v >= 0)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}.")
        if self.buckets and (max(self.buckets) < self.max_length or min(self.buckets) < 2):
            raise ValueError(f"buckets {self.buckets} must be lengths >= 2 that reach "
                             f"max_length {self.max_length}.")
        if self.layer_map and self.student_layers and len(self.layer_map) != self.student_layers:
            raise ValueError(f"layer_map {self.layer_map} has {len(self.layer_map)} entries "
                             f"for student_layers={self.student_layers}.")
        if len(self.layerwise_weights) != 3 or \
                not all(math.isfinite(w) and w >= 0 for w in self.layerwise_weights):
            raise ValueError(f"layerwise_weights must be 3 weights >= 0 and finite (embedding, "
                             f"hidden, attention), got {self.layerwise_weights}.")
        _check_float("temperature", self.temperature, "> 0", lambda v: v > 0)
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}.")
        if not self.model.strip():
            raise ValueError("model is empty: name a checkpoint (e.g. minilm-l6) or a folder "
                             "holding config.json and the weights.")
        if not self.out_dir.strip():
            raise ValueError("out_dir is empty: name the run's folder, e.g. runs/my_run.")
        for name in ("max_train", "max_dev", "max_test", "student_layers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- overrides


def _convert(text: str, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        item = typing.get_args(kind)[0]
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            return tuple(_convert(p, item, key) for p in parts)
        except ValueError:
            expected = {int: "integers", float: "numbers"}.get(item, f"{item.__name__}s")
            raise ValueError(f"--set {key}={text}: expected comma-separated {expected}, "
                             f"e.g. {key}=1,2.") from None
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--set {key}={text}: expected true or false.")
    try:
        return kind(text)
    except ValueError:
        expected = {int: "an integer", float: "a number"}.get(kind, f"a {kind.__name__}")
        raise ValueError(f"--set {key}={text}: expected {expected}.") from None


def apply_overrides(config, overrides: list[str] | tuple[str, ...]):
    """Returns ``config`` with ``key=value`` overrides applied (nested keys with dots).

    Values are parsed by the field's type: ints, floats, bools (true/false), strings and
    comma-separated tuples (``approximations=quad+2quad,quad+2relu``, ``buckets=32,64``).
    All overrides are applied before the new config is validated, so overrides that only
    make sense together (``max_length=256 buckets=128,256``) are accepted.

    Raises:
      ValueError: an unknown key (the message lists the valid ones) or a bad value.
    """
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Override {item!r} must read key=value, e.g. stage1.epochs=2.")
        node, target = config, changes
        path = key.strip().split(".")
        for depth, name in enumerate(path):
            hints = typing.get_type_hints(type(node))
            if name not in hints:
                raise ValueError(f"Unknown config key {key!r}. Valid keys here are: "
                                 f"{', '.join(hints)}.")
            child = getattr(node, name)
            last = depth == len(path) - 1
            if last and dataclasses.is_dataclass(child):
                raise ValueError(f"Config key {key!r} is a group; set one of its fields, "
                                 f"e.g. {key}.epochs=2.")
            if not last and not dataclasses.is_dataclass(child):
                raise ValueError(f"Config key {key!r}: {name} has no sub-keys.")
            if last:
                target[name] = _convert(value.strip(), hints[name], key)
            else:
                node, target = child, target.setdefault(name, {})
    return _rebuild(config, changes)


def _rebuild(node, changes: dict[str, Any]):
    kw = {name: _rebuild(getattr(node, name), v) if isinstance(v, dict) else v
          for name, v in changes.items()}
    return dataclasses.replace(node, **kw) if kw else node
