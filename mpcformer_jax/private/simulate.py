"""In-process SPU runner: one thread and one ``spu.Runtime`` per party over in-memory links.

Unlike SPU's stock ``Simulator`` it keeps profiling on for every party (the stock one turns it
off on ranks != 0) and runs a segmented executable list (compile.py) in order. SPU 0.9.5
writes profiles through one process-wide logger whose lines carry no rank, so per-op and
total figures are exact (summed over parties) but per-party link totals cannot be attributed
in-process; ``run(..., backend="processes")`` (one process per node) gives them.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import spu
import spu.libspu as libspu

from mpcformer_jax.private.cost import CostReport, PartyTraffic, fill_report, parse_profile
from mpcformer_jax.private.program import CompiledForward
from mpcformer_jax.private.runtime import make_shares, run_segments, setup_spu_log, share_bytes

_LOG_LOCK = threading.Lock()  # SPU's logger is process-wide: one profiled run at a time


def run_threads(compiled: CompiledForward, rt_config: libspu.RuntimeConfig, world_size: int,
                owner_arrays: dict[str, np.ndarray], client_arrays: dict[str, np.ndarray],
                timeout_s: float = 600.0, warm_queries: int = 0
                ) -> tuple[np.ndarray, CostReport]:
    """Runs a compiled forward with all parties as threads of this process.

    Args:
      compiled: from ``compile_forward``.
      rt_config: SPU runtime config (protocol, field...); profiling is switched on here.
      world_size: number of parties.
      owner_arrays: the weights, by SPU variable name (``compiled.param_names``).
      client_arrays: the one-hot tokens and mask, by name (``compiled.input_names``).
      timeout_s: bound on every wait (a recv that waits longer fails the run).
      warm_queries: queries each party runs first, unprofiled, on the same runtime: the
        report is then a later query's, as a long-lived node runs it (with SEMI2K's Beaver
        cache, ``beaver_cache_weights``, only the first query opens the weights' masks).

    Returns:
      ``(logits, report)``; the logits are reconstructed from the parties' output shares.
    """
    cfg = libspu.RuntimeConfig(rt_config)
    cfg.enable_pphlo_profile = True
    io = spu.Io(world_size, cfg)
    report = CostReport(spu.ProtocolKind(cfg.protocol).name, world_size)
    start = time.perf_counter()
    owner = make_shares(io, owner_arrays)
    client = make_shares(io, client_arrays)
    report.share_s = time.perf_counter() - start
    report.input_bytes = {"owner": sum(share_bytes(s) for s in owner.values()),
                          "client": sum(share_bytes(s) for s in client.values())}

    desc = libspu.link.Desc()
    desc.recv_timeout_ms = int(timeout_s * 1000)
    for rank in range(world_size):
        desc.add_party(f"p{rank}", f"thread_{rank}")
    executables = [seg.load() for seg in compiled.segments]
    barrier = threading.Barrier(world_size, timeout=timeout_s)
    outputs: list = [None] * world_size
    errors: list[BaseException] = []

    def party(rank: int) -> None:
        try:
            rt = spu.Runtime(libspu.link.create_mem(desc, rank), cfg)
            for name, shares in {**owner, **client}.items():
                rt.set_var(name, shares[rank])
            for _ in range(warm_queries):
                run_segments(rt, compiled, executables, barrier)
            profiled.wait()  # every party done warming up: the profile starts here
            run_segments(rt, compiled, executables, barrier)
            outputs[rank] = rt.get_var(compiled.output_name)
        except BaseException as err:  # surfaced below; the barrier frees the other parties
            errors.append(err)
            barrier.abort()
            profiled.abort()

    with _LOG_LOCK, tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "spu.log"
        setup_spu_log(Path(tmp) / "warm.log" if warm_queries else log)
        started = [0.0]

        def profile_from_here() -> None:  # run by one party once all are warm
            if warm_queries:
                setup_spu_log(log)
            started[0] = time.perf_counter()

        profiled = threading.Barrier(world_size, timeout=timeout_s, action=profile_from_here)
        threads = [threading.Thread(target=party, args=(r,), daemon=True)
                   for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
        report.wall_s = time.perf_counter() - started[0]
        setup_spu_log(Path(tmp) / "closed.log")  # flushes and closes the profile log
        text = log.read_text() if log.exists() else ""
    real_errors = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real_errors or any(o is None for o in outputs):
        raise RuntimeError(f"SPU run failed: {real_errors or errors or 'a party timed out'}")

    logits = np.asarray(io.reconstruct(outputs))
    by_exe, links, _ = parse_profile(text)
    fill_report(report, by_exe, world_size)
    total = PartyTraffic()
    for link in links:
        total.send_bytes += link.send_bytes
        total.send_messages += link.send_messages
    report.total.bytes, report.total.messages = total.send_bytes, total.send_messages
    report.notes.append("in-process threads: per-party link totals not attributable in SPU "
                        "0.9.5 (profile lines carry no rank); use backend='processes'")
    return logits, report
