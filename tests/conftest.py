"""Shared fixtures: tiny random Hugging Face checkpoints written as PyTorch-named safetensors,
and a learnable synthetic tokenized split for training tests."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest


def write_hf_folder(folder: Path, hf_config, flax_params) -> Path:
    """Writes a transformers Flax model's params as an HF folder with PyTorch key names.

    The naming rule is transformers' own (PyTorch -> Flax): dots between modules, ``weight``
    for kernels (transposed), LayerNorm scales and embeddings. It is spelled out here,
    independently of mpcformer_jax's loader, so the loader is tested against it.
    """
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key_path, value in jax.tree_util.tree_flatten_with_path(flax_params)[0]:
        *mods, leaf = [k.key for k in key_path]
        value = np.asarray(value)
        if leaf == "kernel":
            value = value.T
        name = ".".join(mods) + (".bias" if leaf == "bias" else ".weight")
        tensors[name] = np.ascontiguousarray(value)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config.to_dict()))
    return folder


@pytest.fixture(scope="session")
def tiny_hf_bert(tmp_path_factory):
    """(folder, transformers model): a random 2-layer BertForSequenceClassification."""
    from transformers import BertConfig as HFBertConfig
    from transformers import FlaxBertForSequenceClassification

    hf_config = HFBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=37,
                             max_position_embeddings=64, num_labels=3)
    model = FlaxBertForSequenceClassification(hf_config, seed=1)
    folder = write_hf_folder(tmp_path_factory.mktemp("tiny_bert"), hf_config, model.params)
    # The PyTorch class nests the encoder under "bert."; our writer mirrors the Flax tree,
    # which already does.
    return folder, model


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory):
    """An exported tiny quad/2quad student with a word-level tokenizer (100 tokens), one
    layer deep.

    The service, batching, soak and deployment tests use it: they test what happens around an
    execution, and one layer halves each execution (0.74 against 1.39 s for 8x16 under ABY3
    in-process). Depth under MPC is tested on two-layer models (test_private.py)."""
    from transformers import BertTokenizerFast

    from mpcformer_jax.models import BertConfig, init_params, save_pretrained

    root = tmp_path_factory.mktemp("student")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
        "a the film movie good bad great awful plot acting is was and but not very dull "
        "gripping fun boring").split()
    words += [f"w{i}" for i in range(100 - len(words))]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    config = BertConfig.tiny(hidden_act="quad", softmax_act="2quad", vocab_size=100,
                             num_hidden_layers=1)
    # Kernels 10x the init scale: at BERT's 0.02 every text gets nearly the same logits
    # (1e-5 apart), so an answer handed to the wrong client would pass a 0.05 check. Here
    # texts' logits lie 0.1-0.3 apart (median 0.18; 5% of pairs of different texts within
    # 0.05) and the private forward stays within 0.01 of plaintext.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 10 if "kernel" in jax.tree_util.keystr(path) else x,
        init_params(config, 1))
    return save_pretrained(root / "model", config, params, tokenizer)


def plaintext_logits(model_dir, texts, length):
    """The plaintext forward of the prepared model (what the owner serves) on exactly what a
    client shares at ``length`` tokens."""
    from mpcformer_jax.private.model import plaintext_classifier

    return plaintext_classifier(model_dir)(texts, length)


def make_synthetic_split(n: int, seed: int, vocab: int = 128, max_len: int = 24):
    """Random sentences; the label says whether most tokens come from the lower half of the
    vocabulary, so a small model can learn it."""
    from mpcformer_jax.data import TokenizedSplit

    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(rng.integers(6, max_len + 1))
        label = int(rng.integers(0, 2))
        lo, hi = (2, vocab // 2) if label else (vocab // 2, vocab)
        body = np.where(rng.random(length - 2) < 0.8, rng.integers(lo, hi, length - 2),
                        rng.integers(2, vocab, length - 2))
        ids.append(np.concatenate([[1], body, [1]]).astype(np.int32))
        labels.append(label)
    types = [np.zeros_like(x) for x in ids]
    return TokenizedSplit(ids, types, np.asarray(labels, np.int32), max_len, 0)


@pytest.fixture
def synthetic_split():
    """``synthetic_split(n, seed)``: a learnable random TokenizedSplit (see above)."""
    return make_synthetic_split


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny BERT with MiniLM's vocabulary and tokenizer, as a checkpoint folder."""
    from mpcformer_jax.models import BertConfig, init_params, load_pretrained, save_pretrained

    _, _, tokenizer = load_pretrained("minilm-l6")
    cfg = BertConfig.tiny(vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    params = init_params(cfg, 0)
    del params["classifier"]  # like a base encoder: the pipeline sizes a new head
    flat = {"bert": params["bert"]}
    return save_pretrained(tmp_path_factory.mktemp("tiny") / "model", cfg, flat, tokenizer)
