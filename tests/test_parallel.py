"""Training beyond one device: data parallelism over forced host devices, and two processes
joined through ``jax.distributed`` (gloo collectives on CPU; the coordinator bound to
127.0.0.1), both against one device: one training stage, and the whole distill command.

Each run is a subprocess (the device count and the distributed runtime are fixed when jax
starts). The worker gets its data and models by pickle, so it imports no test module.
"""

import contextlib
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mpcformer_jax.models import BertConfig
from mpcformer_jax.train import parallel

REPO = Path(__file__).resolve().parents[1]
TEACHER = BertConfig.tiny(num_labels=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
STUDENT = TEACHER.with_approximation("quad+2quad")

# One stage-1 run of 3 steps (dropout off, so only the data split differs between layouts).
# Multi-process runs take their role from the JAX_* variables the README documents; each
# process writes its own copy of the final params, to show that all hold the same ones.
_WORKER = textwrap.dedent("""
    import pickle, sys
    import jax, numpy as np
    from mpcformer_jax.models import init_params
    from mpcformer_jax.train import loop, parallel
    from mpcformer_jax.train.config import StageConfig
    from mpcformer_jax.train.evaluation import JsonlLog
    from mpcformer_jax.train.objectives import LayerwiseObjective

    out, setup = sys.argv[1], sys.argv[2]
    distributed = parallel.maybe_initialize_distributed()
    with open(setup, "rb") as f:
        teacher, student, train, dev = pickle.load(f)
    ctx = loop.RunContext(mesh=parallel.make_mesh(), log=JsonlLog(out + "/m.jsonl"),
                          metric_names=("accuracy",), buckets=(16, 24), eval_batch_size=16)
    objective = LayerwiseObjective(teacher, init_params(teacher, 0), (0, 1))
    r = loop.run_stage("stage1", objective, StageConfig(epochs=1, batch_size=16, max_steps=3),
                       student, init_params(student, 1), train, dev, out + "/ckpt", ctx)
    leaves = jax.tree_util.tree_leaves(r.params)
    # Replicated over the mesh: every process holds the whole value on its own devices.
    np.savez(f"{out}/params{jax.process_index()}.npz",
             *[np.asarray(x.addressable_data(0)) for x in leaves])
    print("DEVICES", jax.process_count(), jax.device_count(),
          len(leaves[0].sharding.device_set), distributed)
""")


def _setup(tmp_path, make_split) -> Path:
    path = tmp_path / "setup.pkl"
    path.write_bytes(pickle.dumps((TEACHER, STUDENT, make_split(64, 0), make_split(32, 1))))
    return path


def _env(devices: int, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", **extra}


def _load(path: Path) -> list[np.ndarray]:
    data = np.load(path)
    return [data[k] for k in data.files]


def _one_process(tmp_path, setup, devices: int) -> list[np.ndarray]:
    out = tmp_path / f"dp{devices}"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(out), str(setup)], cwd=REPO,
                          env=_env(devices), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"DEVICES 1 {devices} {devices} False" in proc.stdout
    return _load(out / "params0.npz")


def _assert_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        # The gradient all-reduce sums in another order than one device does.
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.slow  # two subprocesses, each importing jax and compiling: ~40 s
def test_data_parallel_over_four_devices_matches_one(tmp_path, synthetic_split):
    setup = _setup(tmp_path, synthetic_split)
    _assert_close(_one_process(tmp_path, setup, 4), _one_process(tmp_path, setup, 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _processes(commands):
    """Starts every (argv, env) and kills whichever still runs on the way out, failure or not."""
    procs = []
    try:
        for argv, env, log in commands:
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _run_processes(tmp_path, argv, n: int = 2, timeout: float = 300) -> list[str]:
    """Runs ``argv`` as processes 0..n-1 of one jax.distributed runtime on 127.0.0.1; returns
    their logs once all exited 0 (fails with the logs otherwise, killing any left)."""
    port = _free_port()
    commands = []
    for pid in range(n):
        env = _env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(pid))
        commands.append((argv, env, (tmp_path / f"process{pid}.log").open("w")))
    with _processes(commands) as procs:
        deadline = time.time() + timeout
        while time.time() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the others would wait for it until their own timeout
            time.sleep(0.5)
        codes = [p.poll() for p in procs]
    logs = [(tmp_path / f"process{pid}.log").read_text() for pid in range(n)]
    assert codes == [0] * n, "\n\n".join(log[-3000:] for log in logs)
    return logs


@pytest.mark.slow  # three subprocesses importing jax and compiling: ~1 min
def test_two_processes_through_jax_distributed_match_one(tmp_path, synthetic_split):
    setup = _setup(tmp_path, synthetic_split)
    one = _one_process(tmp_path, setup, 1)
    out = tmp_path / "mp"
    out.mkdir()
    logs = _run_processes(tmp_path, [sys.executable, "-c", _WORKER, str(out), str(setup)])
    for log in logs:
        assert "DEVICES 2 2 2 True" in log, log[-3000:]
    first, second = _load(out / "params0.npz"), _load(out / "params1.npz")
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)  # one replicated value, not two diverging copies
    _assert_close(first, one)


def _distill_cli(model, out_dir) -> list[str]:
    return [sys.executable, "-m", "experiments.distill", "--config", "default:smoke",
            "--set", f"model={model}", "--set", f"out_dir={out_dir}", "--set", "max_length=32",
            "--set", "buckets=32", "--fresh"]


@pytest.mark.slow  # the tiny pipeline in one process, then in two: ~1.5 min
def test_distill_command_in_two_processes_matches_one(tmp_path, tiny_checkpoint):
    """The README's multi-host recipe: the same command, three variables per process."""
    ref = subprocess.run(_distill_cli(tiny_checkpoint, tmp_path / "one"), cwd=REPO,
                         env=_env(1), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _run_processes(tmp_path, _distill_cli(tiny_checkpoint, tmp_path / "two"))
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert [r["model"] for r in two["rows"]] == [r["model"] for r in one["rows"]]
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert b["test"]["accuracy"] == pytest.approx(a["test"]["accuracy"], abs=1 / 64)
    # The exported student, written once by process 0, holds the one-process weights.
    from safetensors.numpy import load_file

    w1, w2 = (load_file(str(tmp_path / d / "student" / "model.safetensors"))
              for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    _assert_close([w2[k] for k in sorted(w2)], [w1[k] for k in sorted(w1)])
    assert not list((tmp_path / "two").glob(".student.partial-*"))


def test_distributed_env_needs_all_three_variables(monkeypatch):
    monkeypatch.setattr(parallel.maybe_initialize_distributed, "_done", False, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="also set JAX_NUM_PROCESSES"):
        parallel.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must lie in \[0, "):
        parallel.maybe_initialize_distributed()
