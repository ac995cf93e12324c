"""Entry points of the owner and client roles, and the public model card they share.

The *model card* is the public part of an exported model: ``config.json`` and the tokenizer
files, never the weights. The owner publishes it; the client needs only it (vocabulary size,
tokenizer, label names, the architecture fingerprint) to prepare its inputs.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mpcformer_jax.private.cluster import ClientSession, fingerprint, owner_send
from mpcformer_jax.private.config import ClusterConfig
from mpcformer_jax.private.program import INPUT_NAMES

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


def owner_main(cluster: ClusterConfig, model_dir: str, batch_size: int, max_length: int,
               key: bytes, attribution: str = "segments") -> None:
    """Model owner: loads the weights (only here), compiles, shares, sends to the nodes."""
    from mpcformer_jax.models import load_pretrained
    from mpcformer_jax.private.api import compile_for
    from mpcformer_jax.private.model import encode_client_inputs

    config, params, _ = load_pretrained(model_dir)
    if max_length > config.max_length:
        raise ValueError(f"--max-length {max_length} exceeds the model's {config.max_length}")
    ids = np.zeros((batch_size, max_length), np.int32)
    one_hot, mask = encode_client_inputs(config, ids)  # shapes only: no client data here
    compiled = compile_for(config, params, one_hot, mask, cluster, attribution)
    import jax

    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
    owner_send(cluster, compiled, dict(zip(compiled.param_names, leaves, strict=True)),
               fingerprint(config), key)


def read_texts(texts: list[str] | None, input_file: str | None) -> list[str]:
    """The client's texts: from --text values or one per line of --input-file."""
    if input_file:
        lines = Path(input_file).read_text().splitlines()
        texts = [t for t in lines if t.strip()]
    if not texts:
        raise ValueError("no text to classify: pass --text \"...\" or --input-file FILE")
    return texts


def client_main(cluster: ClusterConfig, card_dir: str, texts: list[str] | None,
                input_file: str | None, batch_size: int, max_length: int, key: bytes,
                as_json: bool = False) -> None:
    """Client: reads the text (only here), shares it, reconstructs and prints the results."""
    from mpcformer_jax.private.model import encode_client_inputs, tokenize

    config, tokenizer, names = load_card(card_dir)
    texts = read_texts(texts, input_file)
    start = time.perf_counter()
    session = ClientSession(cluster, key)
    ok = False
    try:
        logits = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            padded = chunk + [""] * (batch_size - len(chunk))  # fixed shape: compiled once
            ids, mask = tokenize(tokenizer, padded, max_length)
            one_hot, mask_f = encode_client_inputs(config, ids, mask)
            out = session.infer(INPUT_NAMES, [one_hot, mask_f], fingerprint(config))
            logits.append(out[:len(chunk)])
        ok = True
    finally:
        session.close(ok)
    logits = np.concatenate(logits)
    report = session.report()
    report.extra["end_to_end_s"] = time.perf_counter() - start
    print_results(texts, logits, names, report, as_json)


def print_results(texts, logits: np.ndarray, names: list[str], report, as_json: bool) -> None:
    """Prints labels and probabilities (a score for a regression model, whose single output
    is not a distribution) and the cost report (text or JSON) on stdout."""
    if logits.shape[-1] == 1:
        rows = [{"text": t, "score": float(lg[0]), "logits": [float(lg[0])]}
                for t, lg in zip(texts, logits, strict=True)]
    else:
        z = logits - logits.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        rows = [{"text": t, "label": names[int(p.argmax())], "probabilities":
                 {n: round(float(q), 4) for n, q in zip(names, p, strict=True)},
                 "logits": [float(x) for x in lg]}
                for t, p, lg in zip(texts, probs, logits, strict=True)]
    if as_json:
        print(json.dumps({"results": rows, "cost": report.to_dict()}, indent=2))
    else:
        for row in rows:
            if "score" in row:
                print(f"score\t{row['score']:.4f}\t{row['text']}")
            else:
                best = row["probabilities"][row["label"]]
                print(f"{row['label']}\t{best:.3f}\t{row['text']}")
        print(report.format())
    sys.stdout.flush()
