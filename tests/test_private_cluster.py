"""spu_run as a multi-process cluster: fidelity, separately started roles, failures, isolation.

Tolerance as in test_private.py: |private - plaintext| < 0.05 on a tiny quad/2quad model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpcformer_jax.private.config import CONFIG_DIR, load_config
from mpcformer_jax.private.launcher import free_port, role_specs
from mpcformer_jax.private.roles import CARD_FILES, export_card

TOL = 0.05
TEXTS = ["a gripping film", "dull and boring plot", "great acting but bad plot"]
SPU_RUN = [sys.executable, "-m", "mpcformer_jax.private.cli"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from transformers import BertTokenizerFast

    from mpcformer_jax.models import BertConfig, init_params, save_pretrained

    root = tmp_path_factory.mktemp("student")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
        "a the film movie good bad great awful plot acting is was and but not very dull "
        "gripping fun boring").split()
    words += [f"w{i}" for i in range(100 - len(words))]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    config = BertConfig.tiny(hidden_act="quad", softmax_act="2quad", vocab_size=100)
    return save_pretrained(root / "model", config, init_params(config, 1), tokenizer)


def plaintext_logits(model_dir, texts, max_length):
    from mpcformer_jax.models import load_pretrained
    from mpcformer_jax.private.model import encode_client_inputs, make_private_forward, tokenize

    config, params, tokenizer = load_pretrained(model_dir)
    ids, mask = tokenize(tokenizer, texts, max_length)
    return np.asarray(make_private_forward(config)(params, *encode_client_inputs(config, ids,
                                                                                  mask)))


def fixed_config(tmp_path, name, timeout_s=None):
    """A copy of a ready config with free fixed ports (for separately started roles)."""
    data = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    for node in data["nodes"]:
        node["link"] = f"127.0.0.1:{free_port('127.0.0.1')}"
        node["io"] = f"127.0.0.1:{free_port('127.0.0.1')}"
    if timeout_s:
        data["timeout_s"] = timeout_s
    path = tmp_path / f"{name}_fixed.json"
    path.write_text(json.dumps(data))
    return path, data


def check_results(out: str, model_dir, texts, max_length=8):
    result = json.loads(out)
    private = np.array([r["logits"] for r in result["results"]])
    plain = plaintext_logits(model_dir, texts, max_length)
    assert np.max(np.abs(private - plain)) < TOL
    assert (private.argmax(-1) == plain.argmax(-1)).all()
    cost = result["cost"]
    assert cost["total"]["bytes"] > 0 and len(cost["per_party"]) == cost["world_size"]
    assert cost["groups"]["embedding"]["bytes"] > 0
    return result


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` again (connections in TIME_WAIT do not block a
    listener that sets SO_REUSEADDR, as brpc and spu_run do)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
            return True
        except OSError:
            return False


# ------------------------------------------------------------------ fast checks


def test_roles_are_given_only_their_own_data(student, tmp_path):
    card = export_card(student, tmp_path / "card")
    assert {p.name for p in card.iterdir()} <= set(CARD_FILES)
    assert not any(p.suffix in (".safetensors", ".bin", ".msgpack") for p in card.iterdir())
    cluster = load_config("aby3_3pc")
    specs = role_specs(cluster, str(student), str(card), TEXTS, None, 1, 8, b"k", False)
    client = json.dumps(specs["client"][1], default=str)
    owner = json.dumps(specs["owner"][1], default=str)
    assert str(student) not in client  # the client never learns where the weights are
    assert all(t not in owner for t in TEXTS)  # the owner never gets the text
    assert specs["owner"][1]["model_dir"] == str(student)
    for r in range(3):
        node = specs[f"node{r}"][1]
        assert set(node) == {"cluster", "rank", "key"}  # nodes get neither


def test_missing_model_is_a_clear_error(tmp_path):
    proc = subprocess.run(SPU_RUN + ["--config", "aby3_3pc", "--model", str(tmp_path / "none"),
                                     "--text", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "spu_run: error:" in proc.stderr and "none" in proc.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    path, data = fixed_config(tmp_path, "semi2k_2pc", timeout_s=5)
    port = int(data["nodes"][0]["io"].rsplit(":", 1)[1])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        proc = subprocess.run(SPU_RUN + ["node", "--rank", "0", "--config", str(path)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "SPU_RUN_KEY": "test"})
    assert proc.returncode == 2
    assert f"port 127.0.0.1:{port} is already in use" in proc.stderr


# ------------------------------------------------------------------ clusters


@pytest.mark.slow
def test_spu_run_aby3_matches_plaintext(student, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    proc = subprocess.run(SPU_RUN + ["--config", "spu_configs/aby3_3pc.json", "--model",
                                     str(student), "--input-file", str(texts), "--batch-size",
                                     "2", "--max-length", "8", "--json"],
                          capture_output=True, text=True, timeout=300,
                          cwd=CONFIG_DIR.parent)
    assert proc.returncode == 0, proc.stderr
    result = check_results(proc.stdout, student, TEXTS)
    assert len(result["cost"]["per_party"]) == 3


@pytest.mark.slow
def test_spu_run_cheetah_matches_plaintext(student):
    args = [a for t in TEXTS[:2] for a in ("--text", t)]
    proc = subprocess.run(SPU_RUN + ["--config", "cheetah_2pc", "--model", str(student), *args,
                                     "--batch-size", "2", "--max-length", "8", "--json"],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    check_results(proc.stdout, student, TEXTS[:2])


@pytest.mark.slow
def test_separately_started_roles(student, tmp_path):
    path, data = fixed_config(tmp_path, "semi2k_2pc", timeout_s=90)
    env = {**os.environ, "SPU_RUN_KEY": "a shared secret for this test"}
    card = tmp_path / "card"
    subprocess.run(SPU_RUN + ["card", "--model", str(student), "--out", str(card)], check=True,
                   env=env, capture_output=True, timeout=120)
    shape = ["--batch-size", "2", "--max-length", "8"]
    procs = [subprocess.Popen(SPU_RUN + ["node", "--rank", str(r), "--config", str(path)],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    procs.append(subprocess.Popen(SPU_RUN + ["owner", "--config", str(path), "--model",
                                             str(student), *shape], env=env,
                                  stderr=subprocess.PIPE, text=True))
    client = subprocess.Popen(SPU_RUN + ["client", "--config", str(path), "--card", str(card),
                                         "--json", *shape] + [a for t in TEXTS
                                                              for a in ("--text", t)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = client.communicate(timeout=300)
        assert client.returncode == 0, err
        for p in procs:
            assert p.wait(timeout=60) == 0, p.stderr.read()
    finally:
        for p in procs + [client]:
            if p.poll() is None:
                p.kill()
    check_results(out, student, TEXTS)
    ports = [int(a.rsplit(":", 1)[1]) for n in data["nodes"] for a in (n["link"], n["io"])]
    assert all(port_free(p) for p in ports)


def _node_pid(tmp: Path, rank: int, deadline: float, launcher) -> int:
    """The pid of node ``rank`` once it has started a batch (its profile log appears)."""
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"the cluster ended early: {launcher.stderr.read()}")
        for d in tmp.glob(f"spu_node{rank}_*"):
            if (d / "batch1.log").exists():
                return int(d.name.split("_")[2])
        time.sleep(0.1)
    raise AssertionError("the cluster never started running")


@pytest.mark.slow
def test_killing_a_node_ends_the_cluster(student, tmp_path):
    timeout_s = 20  # also bounds start-up waits, which take seconds on a loaded 2-core box
    path, data = fixed_config(tmp_path, "aby3_3pc", timeout_s=timeout_s)
    texts = tmp_path / "many.txt"
    texts.write_text("\n".join(TEXTS * 200) + "\n")  # long enough to be killed mid-run
    launcher = subprocess.Popen(SPU_RUN + ["--config", str(path), "--model", str(student),
                                           "--input-file", str(texts), "--max-length", "8"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        victim = _node_pid(tmp_path, 1, time.monotonic() + 240, launcher)
        children = [int(d.name.split("_")[2]) for d in tmp_path.glob("spu_node*_*")]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = launcher.communicate(timeout=3 * timeout_s + 30)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 2
    assert "node1 was killed by SIGKILL" in err
    assert elapsed < 2 * timeout_s + 10  # others notice within the timeout, then get killed
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    ports = [int(a.rsplit(":", 1)[1]) for n in data["nodes"] for a in (n["link"], n["io"])]
    assert all(port_free(p) for p in ports)


@pytest.mark.slow
def test_model_not_matching_its_config_is_a_clear_error(student, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(student, broken)
    hf = json.loads((broken / "config.json").read_text())
    hf["hidden_size"] = 48  # the weights are 32 wide
    (broken / "config.json").write_text(json.dumps(hf))
    proc = subprocess.run(SPU_RUN + ["--config", "semi2k_2pc", "--model", str(broken), "--text",
                                     "x", "--timeout", "10"],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 2
    assert "spu_run owner: error:" in proc.stderr and "wrong shapes" in proc.stderr
