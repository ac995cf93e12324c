"""The public model card: what a client may know of a served model.

The *model card* is the public part of an exported model: ``config.json`` and the tokenizer
files, never the weights. The owner publishes it; the client needs only it (vocabulary size,
tokenizer, label names, the architecture) to prepare its inputs and to recompile the program
the nodes run. The *fingerprint* names one model (architecture and weights) without
revealing it: nodes refuse queries prepared for another one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

CARD_FILES = ("config.json", "tokenizer.json", "vocab.txt", "vocab.json", "merges.txt",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def export_card(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Copies the public files of an exported model (config + tokenizer) to ``out_dir``."""
    from mpcformer_jax.models import resolve_checkpoint

    try:
        folder = resolve_checkpoint(model_dir)
    except Exception as err:
        raise FileNotFoundError(f"model {str(model_dir)!r}: {err}") from None
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: pass the folder written by "
                                "save_pretrained (an exported student)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in CARD_FILES:
        if (folder / name).exists():
            shutil.copy2(folder / name, out / name)
    return out


def load_card(card_dir: str | Path):
    """(BertConfig, tokenizer, label names) from a model card folder."""
    from mpcformer_jax.models import BertConfig

    card = Path(card_dir)
    try:
        hf = json.loads((card / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FileNotFoundError(f"model card {card}: cannot read config.json ({err})") from None
    config = BertConfig.from_hf_config(hf)
    tokenizer = None
    if any((card / f).exists() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(card))
    return config, tokenizer, list(config.labels)


def fingerprint(model_config, weights: list[np.ndarray] | None = None) -> str:
    """A short hash of the architecture and, when given, the weights (a one-way digest)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model_config), sort_keys=True).encode())
    for w in weights or ():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:24]
