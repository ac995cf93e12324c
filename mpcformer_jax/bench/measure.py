"""One private forward of a benchmark variant, as a Record (extrapolation: records.py).

Runs go through ``mpcformer_jax.private.run`` (the client one-hot encodes its tokens and the
model does ``one_hot @ word_embeddings`` under MPC, so the token lookup is included), with the
protocol's ready config from ``spu_configs/`` plus optional runtime/compiler overrides, the
same for every variant. Figures are SPU's link counters (bytes and messages, all parties)
and its per-segment profile (per op group; rounds as network.py derives them).
"""

from __future__ import annotations

import json
import resource
import time

import jax
import numpy as np

from mpcformer_jax.bench import network
from mpcformer_jax.bench.records import CPU_METHOD, GroupCost, Record, extrapolate  # noqa: F401
from mpcformer_jax.bench.variants import Shape, Variant
from mpcformer_jax.models import init_params
from mpcformer_jax.models.public_table import table_sha256, word_table
from mpcformer_jax.private import load_config, run
from mpcformer_jax.private.api import DEFAULT_CONFIGS
from mpcformer_jax.private.config import CONFIG_DIR
from mpcformer_jax.private.model import (
    compile_for,
    encode_client_inputs,
    prepare,
    reference_forward,
)


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads, exited ones included) less the main thread's.

    The parties run as threads; the main thread only shares inputs and waits, so this is the
    parties' CPU time, and it barely moves when other jobs share the cores (wall time does).
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime - time.thread_time()


def cluster_config(protocol: str, runtime: dict | None = None, compiler: dict | None = None,
                   timeout_s: float = 3600.0):
    """The protocol's ready config with ``runtime``/``compiler`` fields overridden."""
    data = json.loads((CONFIG_DIR / f"{DEFAULT_CONFIGS[protocol.upper()]}.json").read_text())
    data["runtime"].update(runtime or {})
    data["compiler"].update(compiler or {})
    data["timeout_s"] = timeout_s
    data["link"]["recv_timeout_ms"] = int(timeout_s * 1000)
    return load_config(data)


def client_batch(vocab_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One sequence of random token ids, no padding (cost does not depend on the values)."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, (1, seq_len))
    return {"input_ids": ids, "attention_mask": np.ones((1, seq_len), np.int32)}


def measure(variant: Variant, shape: Shape, protocol: str, layers: int, *,
            runtime: dict | None = None, compiler: dict | None = None,
            seed: int = 0, public_table: bool = False,
            lowering: dict[str, bool] | None = None) -> Record:
    """Runs ``variant`` at ``shape`` with ``layers`` encoder layers; returns its Record.

    The record holds wall time, bytes, messages and rounds (all parties; rounds as in
    network.py), the per-group breakdown, the client's upload (its input shares), and the
    gap to the plaintext logits.

    ``public_table``: the word-embedding table is public (the random model's own stands in
    for a public checkpoint's): the client looks up and shares (L, hidden) vectors.
    ``lowering``: overrides the protocol's lowering (``private.model.LOWERING``).

    With SEMI2K's Beaver cache on (``beaver_cache_weights``) the record is a node's second
    query (``warm_queries=1``): what every query after the first costs a long-lived service.
    The first costs what the same run without the cache costs (tested).
    """
    config = shape.config(layers).with_approximation(variant.approximation)
    params = init_params(config, seed)  # random weights: cost does not depend on them
    table = None
    if public_table:
        table = word_table(params)
        config = config.replace(public_table_source="random",
                                public_table_sha256=table_sha256(table))
    config, params = prepare(config, params, protocol, lowering)  # what the owner shares
    batch = client_batch(config.vocab_size, shape.seq_len, seed)
    cluster = cluster_config(protocol, runtime, compiler)
    one_hot, mask = encode_client_inputs(config, batch["input_ids"], batch["attention_mask"],
                                         table=table)
    compile_s = time.perf_counter()
    compile_for(config, params, *one_hot.shape[:2], cluster.compiler_options())  # for run()
    compile_s = time.perf_counter() - compile_s
    warm = int(config.beaver_cache_weights and protocol.upper() == "SEMI2K")
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    result = run((config, params), batch, config=cluster, attribution="segments", compare=False,
                 table=table, warm_queries=warm)
    rep = result.report
    # The parties' threads only (see _cpu_seconds), per query: a warm-up query costs about
    # the same CPU as the one measured (the cache saves bytes, not arithmetic).
    cpu_s = (_cpu_seconds() - cpu_start) / (1 + warm)
    total_s = time.perf_counter() - start
    # The plaintext comparison runs outside that window (its XLA compile is CPU time too).
    plain = np.asarray(jax.jit(reference_forward(config))(params, one_hot, mask))
    diff = float(np.max(np.abs(plain - result.logits)))
    agree = float(np.mean(plain.argmax(-1) == result.logits.argmax(-1)))
    return Record(
        approximation=variant.approximation, protocol=protocol.upper(), shape=shape.name,
        seq_len=shape.seq_len, layers=layers, parties=rep.world_size,
        runtime=runtime or {}, compiler=compiler or {}, lowering=lowering or {},
        public_table=public_table,
        wall_s=rep.wall_s, cpu_s=cpu_s, cpu_method=CPU_METHOD,
        compile_s=compile_s, total_s=total_s,
        bytes=rep.total.bytes, messages=rep.total.messages,
        rounds=rep.total.rounds, rounds_method=network.MEASURED,
        groups={g: GroupCost(t.bytes, t.messages, t.rounds, t.time_s)
                for g, t in rep.groups.items()},
        client_bytes=rep.input_bytes.get("client", 0),
        max_abs_diff=diff, label_agreement=agree, warm_queries=warm)
