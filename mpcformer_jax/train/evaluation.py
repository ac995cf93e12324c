"""Evaluation over a tokenized split, and the per-run JSONL metrics log."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mpcformer_jax.data import TokenizedSplit, batches, num_batches
from mpcformer_jax.train import parallel
from mpcformer_jax.train.metrics import compute_metrics

MODEL_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def progress(total: int, desc: str, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; redrawn rarely when stderr is a file (nohup logs stay short)."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                mininterval=0.5 if interactive else 30.0,
                disable=jax.process_index() != 0)


def eval_batches(data: TokenizedSplit, batch_size: int, buckets: Sequence[int] | None = None):
    """The batches an evaluation of ``data`` runs: every example once, grouped by length."""
    return batches(data, batch_size, buckets, group_by_length=True)


def predict_split(predict: Callable, params, data: TokenizedSplit, batch_size: int,
                  mesh: Mesh, buckets: Sequence[int] | None = None,
                  desc: str = "eval") -> np.ndarray:
    """Model outputs for every example of ``data``, in split order.

    Args:
      predict: ``predict(params, batch) -> logits`` (``steps.make_predict_step``).
      params: the model's parameters (replicated on the mesh).
      data: the tokenized split.
      batch_size: global evaluation batch size (a multiple of the device count).
      mesh: the data mesh.
      buckets: padded lengths; batches are grouped by length so most use a short bucket.
      desc: progress-bar label.

    Returns:
      (n, num_labels) float32 outputs.
    """
    outputs: np.ndarray | None = None
    bar = progress(num_batches(data, batch_size), desc)
    for batch in eval_batches(data, batch_size, buckets):
        logits = parallel.to_host(predict(params, parallel.shard_batch(
            {k: batch[k] for k in MODEL_KEYS}, mesh)))
        if outputs is None:
            outputs = np.zeros((len(data), logits.shape[-1]), np.float32)
        real = batch["weights"] > 0  # filler rows repeat a real row: score each example once
        outputs[batch["index"][real]] = logits[real]
        bar.update()
    bar.close()
    return outputs


def evaluate(predict: Callable, params, data: TokenizedSplit, metric_names: Sequence[str],
             batch_size: int, mesh: Mesh, buckets: Sequence[int] | None = None,
             desc: str = "eval") -> dict[str, float]:
    """Metrics of a model on a split: ``compute_metrics`` of its outputs, ``main`` included."""
    outputs = predict_split(predict, params, data, batch_size, mesh, buckets, desc)
    return compute_metrics(metric_names, outputs, data.labels)


class JsonlLog:
    """Appends one JSON object per line to ``path`` (process 0 only); a resumed run appends.

    Args:
      path: the log file; its folder is created.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._enabled = jax.process_index() == 0
        if self._enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        """Writes ``record`` with a wall-clock ``time``; arrays become Python numbers."""
        if not self._enabled:
            return
        clean = {"time": round(time.time(), 3)}
        for k, v in record.items():
            if hasattr(v, "item") and getattr(v, "size", 2) == 1:
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # JSON has no NaN; keep the line parseable
            clean[k] = v
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
