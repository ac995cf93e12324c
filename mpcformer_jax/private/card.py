"""The public model card: what a client may know of a served model.

The *model card* is the public part of an exported model: ``config.json`` and the tokenizer
files, never the weights. The owner publishes it; the client needs only it (vocabulary size,
tokenizer, label names, the architecture) to prepare its inputs and to recompile the program
the nodes run. The *fingerprint* names one model (architecture and weights) without
revealing it: nodes refuse queries prepared for another one.

The owner serves the *prepared* model (``private.model.prepare``: folded, a public word table
left out), whose config differs from config.json (``folded`` is never exported), so the card
also holds ``private_config.json``: the exact config the nodes' program was compiled from,
and the public word table's source and SHA-256 when the client looks its tokens up itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

PRIVATE_CONFIG = "private_config.json"
CARD_FILES = ("config.json", "tokenizer.json", "vocab.txt", "vocab.json", "merges.txt",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def export_card(model_dir: str | Path, out_dir: str | Path, config=None) -> Path:
    """Copies the public files of an exported model (config + tokenizer) to ``out_dir`` and
    writes ``private_config.json``.

    ``config``: the prepared config the owner compiled (default: prepared from the folder's
    config.json, which gives the same config: preparing changes the weights, not the shapes).
    """
    from mpcformer_jax.models import BertConfig, resolve_checkpoint
    from mpcformer_jax.private.model import prepared_config

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
    if config is None:
        config = prepared_config(BertConfig.from_hf_config(
            json.loads((folder / "config.json").read_text())))
    table = ({"source": config.public_table_source, "sha256": config.public_table_sha256}
             if config.public_table_source else None)
    card = {"config": dataclasses.asdict(config), "public_table": table,
            "client_input": "public table rows (batch, length, hidden)" if table else
                            "one-hot rows (batch, length, vocab)"}
    (out / PRIVATE_CONFIG).write_text(json.dumps(card, indent=2) + "\n")
    return out


def load_card(card_dir: str | Path):
    """(BertConfig, tokenizer, label names) from a model card folder; the config is the
    prepared one the nodes run (``private_config.json``; a card without it: config.json,
    prepared here)."""
    card = Path(card_dir)
    try:
        hf = json.loads((card / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FileNotFoundError(f"model card {card}: cannot read config.json ({err})") from None
    config = _private_config(card, hf)
    tokenizer = None
    if any((card / f).exists() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(card))
    return config, tokenizer, list(config.labels)


def _private_config(card: Path, hf: dict):
    """The prepared config of ``private_config.json``, or the card's config.json (``hf``)
    prepared."""
    from mpcformer_jax.models import BertConfig
    from mpcformer_jax.private.model import prepared_config

    path = card / PRIVATE_CONFIG
    if not path.exists():  # a card written before private_config.json existed
        return prepared_config(BertConfig.from_hf_config(hf))
    try:
        fields = json.loads(path.read_text())["config"]
        return BertConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in fields.items()})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise FileNotFoundError(f"model card {card}: cannot read {PRIVATE_CONFIG} ({err}); "
                                "ask the owner for the card of the served model") from None


def fingerprint(model_config, weights: list[np.ndarray] | None = None) -> str:
    """A short hash of the architecture and, when given, the weights (a one-way digest)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model_config), sort_keys=True).encode())
    for w in weights or ():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:24]
