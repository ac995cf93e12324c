"""Checkpoints of one stage with orbax ``CheckpointManager``: the last state and the best params.

Two managers under the stage's folder, one checkpoint each:
  last/  TrainState (step, student params, optimizer state) + JSON loop metadata (best dev
         score so far...). What a restarted run resumes from.
  best/  the student params of the best dev evaluation + its dev metrics. What the next stage
         starts from.
The teacher is never written: it is not part of ``TrainState``.

Saves are synchronous and orbax writes each step to a temporary folder renamed into place, so
a SIGKILL at any moment leaves the previous complete checkpoint. At an evaluation the best is
written before the last state: a kill between the two makes the resumed run redo that
evaluation and write the best again, never pair a new "best score" with old params.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _key_value_try_get(client, key: str) -> str:
    # The key's value if the coordination service holds it, else the JaxRuntimeError that
    # jaxlib's own key_value_try_get raises; 1 ms is the shortest wait the blocking get takes.
    return client.blocking_key_value_get(key, 1)


def _support_orbax_across_processes() -> None:
    """Lets orbax 0.11.5 save from several processes on jaxlib 0.4.34 (pinned by SPU).

    Across processes, orbax reads its commit-signal contract with
    ``DistributedRuntimeClient.key_value_try_get``, which jaxlib gained after 0.4.34: every
    multi-process save fails with an AttributeError without it. This adds the missing method,
    built on ``blocking_key_value_get``; nothing that exists is replaced, and a jaxlib that has
    the method keeps its own.
    """
    from jax._src.lib import xla_extension

    client_type = xla_extension.DistributedRuntimeClient
    if not hasattr(client_type, "key_value_try_get"):
        client_type.key_value_try_get = _key_value_try_get


def _options(barrier_prefix: str) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=barrier_prefix))


def _abstract(tree):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class StageCheckpoints:
    """The ``last`` and ``best`` checkpoint managers of one stage.

    Args:
      directory: the stage's checkpoint folder (created if needed).
      config: a JSON-ready dict of the run's config, stored as the managers' metadata so the
        folder says what produced it.
    """

    _instances = 0  # StageCheckpoints made by this process so far

    def __init__(self, directory: str | Path, config: dict[str, Any] | None = None):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        if jax.process_count() > 1:
            _support_orbax_across_processes()
        if config is not None and jax.process_index() == 0:
            (self.directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # Across processes, orbax names its barriers "<prefix>_CheckpointManager:finalize.<step>"
        # and a barrier id may be used once per run: best and last both save the step of an
        # evaluation, and every stage saves its own small step numbers. A per-instance prefix
        # keeps them apart; it is the same in every process, which runs the same stages in
        # the same order.
        StageCheckpoints._instances += 1
        prefix = f"stage{StageCheckpoints._instances}"
        self._last = ocp.CheckpointManager(self.directory / "last",
                                           options=_options(f"{prefix}_last"))
        self._best = ocp.CheckpointManager(self.directory / "best",
                                           options=_options(f"{prefix}_best"))

    # ------------------------------------------------------------------ last state
    def save_last(self, step: int, state, meta: dict[str, Any]) -> None:
        """Writes the full train state and loop metadata as step ``step``."""
        self._save(self._last, step, ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore_last(self, target_state) -> tuple[Any, dict[str, Any]] | None:
        """The latest ``(state, meta)``, laid out like ``target_state``; None if there is none."""
        step = self._last.latest_step()
        if step is None:
            return None
        out = self._last.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target_state)),
            meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    # ------------------------------------------------------------------ best params
    def save_best(self, step: int, params, meta: dict[str, Any]) -> None:
        """Writes the params of a new best dev evaluation (replacing the previous best)."""
        self._save(self._best, step, ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    def restore_best(self, target_params) -> tuple[Any, dict[str, Any]] | None:
        """The best ``(params, meta)``, laid out like ``target_params``; None if there is none."""
        step = self._best.latest_step()
        if step is None:
            return None
        out = self._best.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target_params)),
            meta=ocp.args.JsonRestore()))
        return out.params, out.meta

    def close(self) -> None:
        """Waits for pending writes and releases the managers."""
        self._last.close()
        self._best.close()

    @staticmethod
    def _save(manager: ocp.CheckpointManager, step: int, args) -> None:
        # A run killed after this step's save but before the next one redoes the step: the
        # second save of the same step replaces the first rather than failing.
        if step in manager.all_steps():
            manager.delete(step)
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
