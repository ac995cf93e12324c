"""The frozen teacher's outputs on the training split, computed once instead of every step.

Stage 1 and stage 2 compare the student with a teacher that never changes and runs without
dropout, so its outputs on a training example are the same at every step, epoch and student
of a run. A distillation step that runs the teacher's forward spends about a fifth of its
time there (MiniLM-L6 on rt, batch 32: 0.23 of 1.12 s at 32 tokens, 0.31 of 2.28 s at 64).
``TeacherCache.build`` runs that forward once over the split; ``targets`` then gathers a
batch's rows by the batcher's ``index``, padded to the batch's length, and the objectives
read them from the batch (``objectives.LayerwiseObjective``, ``PredictionObjective``).

What is kept, per example and only over its real tokens: the embedding output and every
layer's hidden states (float32), the logits, and the attention scores only when the stage-1
loss weighs them (they grow with the square of the length). A padded position's teacher
output is never read: every loss masks it. Valid positions do not depend on how much padding
the batch around them has, up to float rounding (a masked key adds exactly 0 to a row).

The cache lives in host memory; ``estimate_bytes`` sizes it before anything is computed, and
the pipeline falls back to the teacher's forward in the step when it exceeds
``DistillConfig.teacher_cache_gib``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from mpcformer_jax.data import TokenizedSplit
from mpcformer_jax.models import BertConfig, forward
from mpcformer_jax.train import parallel
from mpcformer_jax.train.evaluation import MODEL_KEYS, eval_batches

# The batch keys the cached targets travel under (batch axis first, like every batch key).
TARGET_KEYS = ("teacher_embeddings", "teacher_hidden", "teacher_logits")
ATTENTION_KEY = "teacher_attention"


def estimate_bytes(config: BertConfig, lengths: np.ndarray, attention: bool) -> int:
    """Host bytes of a cache over examples of these real ``lengths``."""
    tokens = int(np.sum(lengths))
    size = tokens * (config.num_hidden_layers + 1) * config.hidden_size
    size += len(lengths) * config.num_labels
    if attention:
        size += int(np.sum(np.square(lengths.astype(np.int64)))) * \
            config.num_hidden_layers * config.num_attention_heads
    return 4 * size


@dataclasses.dataclass(eq=False)
class TeacherCache:
    """Per-example teacher outputs of one split (see the module docstring).

    Attributes:
      states: per example, (layers + 1, length, hidden): the embedding output, then each
        layer's hidden states.
      logits: (n, num_labels).
      attention: per example (layers, heads, length, length), or None when not kept.
    """

    states: list[np.ndarray]
    logits: np.ndarray
    attention: list[np.ndarray] | None = None

    @classmethod
    def build(cls, config: BertConfig, params, split: TokenizedSplit, batch_size: int,
              mesh: Mesh, buckets=None, attention: bool = False) -> TeacherCache:
        """Runs the teacher's forward (deterministic) once over ``split``.

        Args:
          config, params: the frozen teacher.
          split: the training split, in the batcher's example order (``index``).
          batch_size: rows per forward (the run's eval batch size).
          mesh: the data mesh; params are replicated on it.
          buckets: padded lengths, as the run batches them.
          attention: also keep the attention scores.
        """

        @jax.jit
        def run(params, batch):
            logits, inter = forward(config, params, batch["input_ids"], batch["attention_mask"],
                                    batch["token_type_ids"], output_intermediates=True)
            states = [inter["embeddings"], *inter["hidden_states"]]
            scores = inter["attention_scores"] if attention else []
            return logits, states, scores

        params = jax.device_put(params, parallel.replicated(mesh))
        states: list[np.ndarray | None] = [None] * len(split)
        scores: list[np.ndarray | None] = [None] * len(split)
        logits = np.zeros((len(split), config.num_labels), np.float32)
        for batch in eval_batches(split, batch_size, buckets):
            out_logits, out_states, out_scores = run(
                params, parallel.shard_batch({k: batch[k] for k in MODEL_KEYS}, mesh))
            out_logits = parallel.to_host(out_logits)
            out_states = np.stack([parallel.to_host(s) for s in out_states], axis=1)
            out_scores = (np.stack([parallel.to_host(s) for s in out_scores], axis=1)
                          if attention else None)
            for row, i in enumerate(batch["index"]):
                if i < 0:
                    continue  # a filler row
                n = len(split.input_ids[i])
                logits[i] = out_logits[row]
                states[i] = np.ascontiguousarray(out_states[row, :, :n])
                if attention:
                    scores[i] = np.ascontiguousarray(out_scores[row, :, :, :n, :n])
        return cls(states, logits, scores if attention else None)

    @property
    def has_attention(self) -> bool:
        return self.attention is not None

    def targets(self, index: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """The batch's teacher outputs, padded with zeros to ``length``.

        Args:
          index: the batch's ``index`` (example positions; -1 for filler rows, whose
            targets are zeros: they carry weight 0).
          length: the batch's padded length.

        Returns:
          ``teacher_embeddings`` (B, L, H), ``teacher_hidden`` (B, layers, L, H),
          ``teacher_logits`` (B, C) and, when kept, ``teacher_attention``
          (B, layers, heads, L, L).
        """
        layers_1, _, width = self.states[0].shape
        states = np.zeros((len(index), layers_1, length, width), np.float32)
        logits = np.zeros((len(index), self.logits.shape[1]), np.float32)
        scores = None
        if self.attention is not None:
            layers, heads = self.attention[0].shape[:2]
            scores = np.zeros((len(index), layers, heads, length, length), np.float32)
        for row, i in enumerate(index):
            if i < 0:
                continue
            n = self.states[i].shape[1]
            states[row, :, :n] = self.states[i]
            logits[row] = self.logits[i]
            if scores is not None:
                scores[row, :, :, :n, :n] = self.attention[i]
        out = {"teacher_embeddings": states[:, 0], "teacher_hidden": states[:, 1:],
               "teacher_logits": logits}
        if scores is not None:
            out[ATTENTION_KEY] = scores
        return out


class DeferredTeacherCache:
    """A ``TeacherCache`` built by ``build`` when a step first asks for targets.

    A resumed run whose remaining stages are all finished runs no step, so it never pays for
    the teacher's forward over the training split (17 s for the default run, 1-2 minutes on
    full data).
    """

    def __init__(self, build: Callable[[], TeacherCache], attention: bool):
        self._build, self.has_attention, self._cache = build, attention, None

    def targets(self, index: np.ndarray, length: int) -> dict[str, np.ndarray]:
        if self._cache is None:
            self._cache = self._build()
        return self._cache.targets(index, length)


def intermediates_from_batch(batch: dict) -> dict:
    """The teacher's ``intermediates`` (as ``models.forward`` returns them) rebuilt from a
    batch that carries cached targets."""
    hidden = batch["teacher_hidden"]
    inter = {"embeddings": batch["teacher_embeddings"],
             "hidden_states": [hidden[:, j] for j in range(hidden.shape[1])]}
    if ATTENTION_KEY in batch:
        scores = batch[ATTENTION_KEY]
        inter["attention_scores"] = [scores[:, j] for j in range(scores.shape[1])]
    return inter
