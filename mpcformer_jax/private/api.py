"""Research API: ``run(model, batch, protocol=...)`` -> private logits + cost report.

    from mpcformer_jax.private import run
    result = run("out/student", ["a gripping film", "dull"], protocol="ABY3", max_length=32)
    result.logits, result.report.format(), result.max_abs_diff, result.label_agreement

The forward compiles once per (model config, batch shape, compiler options) and is reused.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mpcformer_jax.private.config import ClusterConfig, ConfigError, load_config
from mpcformer_jax.private.cost import CostReport
from mpcformer_jax.private.model import (
    client_table,
    compile_for,
    encode_client_inputs,
    prepare,
    reference_forward,
    tokenize,
)

DEFAULT_CONFIGS = {"ABY3": "aby3_3pc", "SEMI2K": "semi2k_2pc", "CHEETAH": "cheetah_2pc"}


@dataclasses.dataclass
class PrivateResult:
    """Logits revealed to the client, the cost report, and the plaintext comparison."""

    logits: np.ndarray
    report: CostReport
    plaintext_logits: np.ndarray | None = None
    max_abs_diff: float | None = None
    label_agreement: float | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.argmax(self.logits, axis=-1)


def resolve_cluster(protocol: str | None, config: str | os.PathLike | ClusterConfig | None,
                    ) -> ClusterConfig:
    """A ClusterConfig from an explicit config, or the ready config of ``protocol``."""
    if config is not None:
        cluster = config if isinstance(config, ClusterConfig) else load_config(config)
        if protocol is not None and cluster.protocol != protocol.upper():
            raise ConfigError(f"protocol={protocol!r} but the config says {cluster.protocol!r}")
        return cluster
    name = (protocol or "ABY3").upper()
    if name not in DEFAULT_CONFIGS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {sorted(DEFAULT_CONFIGS)}")
    return load_config(DEFAULT_CONFIGS[name])


def load_model(model: Any):
    """(config, params, tokenizer) from a folder/name or a (config, params[, tokenizer]) tuple."""
    if isinstance(model, str | os.PathLike):
        from mpcformer_jax.models import load_pretrained

        return load_pretrained(Path(model) if Path(model).exists() else model)
    if isinstance(model, tuple) and len(model) in (2, 3):
        return (*model, None) if len(model) == 2 else model
    raise TypeError("model must be a folder, a short name, or a (config, params[, tokenizer]) "
                    f"tuple; got {type(model).__name__}")


def prepare_batch(config, tokenizer, batch, max_length: int | None):
    """Token ids and mask (int arrays) from texts or from a dict with input_ids/attention_mask."""
    if isinstance(batch, dict):
        ids = np.asarray(batch["input_ids"])
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
        return ids, mask
    if isinstance(batch, str):
        batch = [batch]
    if isinstance(batch, Sequence) and all(isinstance(t, str) for t in batch):
        return tokenize(tokenizer, batch, max_length or min(128, config.max_length))
    raise TypeError("batch must be texts or {'input_ids': (B, L), 'attention_mask': (B, L)}")


def run(model, batch, protocol: str | None = None, *, config=None, max_length: int | None = None,
        backend: str = "threads", attribution: str = "segments", compare: bool = True,
        timeout_s: float | None = None, table: np.ndarray | None = None,
        warm_queries: int = 0, lowering: dict[str, bool] | None = None) -> PrivateResult:
    """Runs one private forward pass and reports its cost.

    Args:
      model: an exported folder (or short name such as ``minilm-l6``), or a
        ``(config, params[, tokenizer])`` tuple.
      batch: texts (needs the model's tokenizer) or ``{"input_ids", "attention_mask"}``.
      protocol: "ABY3", "SEMI2K" or "CHEETAH" (uses ``spu_configs/<ready config>``).
      config: a config name, path or ClusterConfig (overrides the ready config).
      max_length: padded length for texts (default: min(128, model positions)).
      backend: "threads" (all parties in this process; per-party link totals unavailable) or
        "processes" (a local service: one process per node, mutual-TLS channels and tunnels,
        exact per-party figures; the model must be a folder).
      attribution: "segments" (exact per-group costs) or "ops" (one executable, grouped by
        pphlo op name).
      compare: also run the plaintext forward and report max |logit diff| and label agreement.
      timeout_s: bound on every wait (default: the config's ``timeout_s``).
      table: for a model whose word-embedding table is public, the client's copy of it
        (hash-checked against the config); default: loaded from the checkpoint the config
        names. Ignored for a model with a private table (the client one-hot encodes).
      warm_queries: (threads backend) queries run first on the same runtimes, unprofiled:
        the report is a later query's, as a long-lived node runs it.
      lowering: overrides the protocol's lowering (``private.model.LOWERING``).

    Returns:
      A PrivateResult. The plaintext comparison runs the prepared model on the same client
      input.

    Raises:
      ValueError: the public table's hash differs from the config's (before anything is
        shared), or bad token ids.
    """
    cluster = resolve_cluster(protocol, config)
    model_config, params, tokenizer = load_model(model)
    # The owner's plaintext step: fold, and drop a public word table from what is shared.
    model_config, params = prepare(model_config, params, cluster.protocol, lowering)
    ids, mask = prepare_batch(model_config, tokenizer, batch, max_length)
    # The client's: public-table rows (hash-checked table) or one-hot rows.
    client_input, mask_f = encode_client_inputs(model_config, ids, mask,
                                                client_table(model_config, table))
    start = time.perf_counter()
    compiled = compile_for(model_config, params, *ids.shape, cluster.compiler_options(),
                           attribution)
    compile_s = time.perf_counter() - start  # about 0 when the cache already held it
    owner = dict(zip(compiled.param_names,
                     (np.asarray(x) for x in jax.tree_util.tree_leaves(params)), strict=True))
    client = dict(zip(compiled.input_names, (client_input, mask_f), strict=True))
    timeout = timeout_s or cluster.timeout_s
    if backend == "threads":
        from mpcformer_jax.private.simulate import run_threads

        logits, report = run_threads(compiled, cluster.runtime_config(), cluster.world_size,
                                     owner, client, timeout, warm_queries)
    elif backend == "processes":
        logits, report = _run_service(model, cluster, ids.shape, [client_input, mask_f],
                                      timeout, attribution, table)
    else:
        raise ValueError(f"backend must be 'threads' or 'processes', got {backend!r}")
    report.compile_s = compile_s
    result = PrivateResult(logits, report)
    if compare:
        plain = np.asarray(jax.jit(reference_forward(model_config))(params, client_input,
                                                                       mask_f))
        result.plaintext_logits = plain
        result.max_abs_diff = float(np.max(np.abs(plain - logits)))
        result.label_agreement = float(np.mean(plain.argmax(-1) == logits.argmax(-1)))
        report.extra.update(max_abs_diff=result.max_abs_diff,
                            label_agreement=result.label_agreement)
    return result


def _run_service(model, cluster: ClusterConfig, shape, arrays, timeout_s: float,
                 attribution: str, table=None) -> tuple[np.ndarray, CostReport]:
    """One query through a local service started for it (the ``processes`` backend)."""
    import tempfile

    from mpcformer_jax.private.roles.client import Client
    from mpcformer_jax.private.service import Service

    if not isinstance(model, str | os.PathLike):
        raise TypeError("backend='processes' serves a model folder (the owner process loads "
                        "it); save it with mpcformer_jax.save_pretrained first")
    cluster = dataclasses.replace(cluster, timeout_s=timeout_s)
    with tempfile.TemporaryDirectory(prefix="spu_run_") as state:
        service = Service(cluster, model, state, [tuple(shape)], attribution=attribution)
        try:
            service.start()
            with Client(state, table=table) as client:
                logits, profiles, _ = client.run_query(arrays)
                upload = client.upload
        finally:
            service.stop()
    from mpcformer_jax.private.cost import report_from_profiles

    report = report_from_profiles(cluster.protocol, cluster.world_size, [profiles])
    report.input_bytes = {"owner": upload["bytes"], "client": profiles[0]["client_bytes"]}
    report.notes.append("processes backend: a local service, one process per node, "
                        "mutual-TLS channels")
    return logits, report
