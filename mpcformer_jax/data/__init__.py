"""Data layer: task registry (offline, hub, local files), tokenization and fixed-shape batches.

    task = load_task("rt", max_examples=2000)          # TaskData: train/dev/test Splits
    tok = tokenize_split(task.splits["train"], tokenizer, max_length=128, max_positions=512)
    for batch in batches(tok, 32, shuffle=True, seed=0, epoch=e): ...

Modules: types (Split, TaskData), offline (package-shipped corpora), hub (GLUE/IMDb via
`datasets`), local (your csv/jsonl), registry (load_task), batching (tokenize + batch).
"""

from mpcformer_jax.data.batching import (
    TokenizedSplit,
    batches,
    default_buckets,
    num_batches,
    tokenize_split,
)
from mpcformer_jax.data.registry import TASKS, available_tasks, load_task
from mpcformer_jax.data.types import Split, TaskData

__all__ = [
    "TASKS",
    "Split",
    "TaskData",
    "TokenizedSplit",
    "available_tasks",
    "batches",
    "default_buckets",
    "load_task",
    "num_batches",
    "tokenize_split",
]
