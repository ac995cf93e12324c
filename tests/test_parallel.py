"""Training beyond one device: data parallelism over forced host devices against one device.

Each run is a subprocess (the device count and the distributed runtime are fixed when jax
starts). The worker gets its data and models by pickle, so it imports no test module.
"""

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mpcformer_jax.models import BertConfig

REPO = Path(__file__).resolve().parents[1]
TEACHER = BertConfig.tiny(num_labels=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
STUDENT = TEACHER.with_approx("quad", "2quad")

# One stage-1 run of 3 steps (dropout off, so only the data split differs between layouts).
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
