"""The optimizer: plain optax composition, clip -> AdamW(warmup schedule, decay mask)."""

from __future__ import annotations

import jax
import optax

from mpcformer_jax.train.config import StageConfig

# Parameters whose path contains one of these are not decayed: biases and LayerNorm
# scale/offset (BERT's recipe; decaying a LayerNorm scale towards 0 only hurts).
_NO_DECAY = ("bias", "LayerNorm")


def decay_mask(params) -> dict:
    """A tree of bools, True where weight decay applies (kernels and embedding tables)."""

    def keep(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        return not any(n in _NO_DECAY for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_schedule(stage: StageConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``stage.learning_rate``, then constant or linear decay to 0.

    Args:
      stage: the stage's hyperparameters (``learning_rate``, ``warmup_ratio``, ``schedule``).
      total_steps: optimizer steps of the whole stage.

    Returns:
      An optax schedule, step -> learning rate.
    """
    warmup = int(round(stage.warmup_ratio * total_steps))
    warm = optax.linear_schedule(0.0, stage.learning_rate, max(warmup, 1))
    if stage.schedule == "constant":
        after = optax.constant_schedule(stage.learning_rate)
    else:  # "linear", validated by StageConfig
        after = optax.linear_schedule(stage.learning_rate, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return after
    return optax.join_schedules([warm, after], boundaries=[warmup])


def frozen_labels(frozen: tuple[str, ...]):
    """params -> a tree of "frozen"/"train" labels: "frozen" where a path component is in
    ``frozen`` (e.g. ``("word_embeddings",)``)."""

    def label(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        return "frozen" if any(n in frozen for n in names) else "train"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(stage: StageConfig, total_steps: int,
                   frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm, adamw(schedule, mask=decay_mask))`` for one stage.

    Args:
      stage: the stage's hyperparameters.
      total_steps: optimizer steps of the whole stage (sizes the schedule).
      frozen: parameter names (path components) that never change: no update, no weight
        decay, not in the clipped norm (``optax.multi_transform`` with ``set_to_zero``).

    Returns:
      The optax transformation; its state holds only the student's moments.
    """
    parts = []
    if stage.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(stage.clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(stage, total_steps), b1=0.9, b2=0.999,
                             eps=1e-6, weight_decay=stage.weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    if not frozen:
        return tx
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 frozen_labels(frozen))
