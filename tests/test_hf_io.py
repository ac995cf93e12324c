"""Checkpoint I/O: round trips, strict loading, and clear errors on bad files or names."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mpcformer_jax.models import (
    BertConfig,
    CheckpointError,
    forward,
    init_params,
    load_pretrained,
    resolve_checkpoint,
    save_pretrained,
)


def _assert_same_params(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_params_and_approximations(tmp_path):
    config = BertConfig.tiny(hidden_act="quad", softmax_act="2relu", num_labels=3,
                             label_names=("neg", "neu", "pos"))
    params = init_params(config, 4)
    save_pretrained(tmp_path / "student", config, params)
    config2, params2, tokenizer = load_pretrained(tmp_path / "student")
    assert config2 == config and tokenizer is None
    _assert_same_params(params, params2)
    # The file stays loadable by transformers: hidden_act is a name it knows.
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["hidden_act"] == "gelu" and saved["mpcformer"]["softmax_act"] == "2relu"


def test_round_trip_of_a_linear_pooler(tmp_path):
    config = BertConfig.tiny(num_labels=2).with_approximation("quad+2quad_len+affine@2+linear")
    params = init_params(config, 5)
    save_pretrained(tmp_path / "m", config, params)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["mpcformer"]
    assert saved["pooler_act"] == "linear"
    again, params2, _ = load_pretrained(tmp_path / "m")
    assert again == config and again.approximation.name == "quad+2quad_len+affine@2+linear"
    ids = np.array([[3, 9, 11, 4, 0], [5, 6, 7, 8, 9]])
    mask = np.array([[1, 1, 1, 1, 0], [1] * 5])
    linear = np.asarray(forward(config, params, ids, mask))
    np.testing.assert_array_equal(linear, np.asarray(forward(again, params2, ids, mask)))
    # The same weights with tanh give other logits: the slot is applied, not only stored.
    tanh = np.asarray(forward(config.replace(pooler_act="tanh"), params, ids, mask))
    assert not np.allclose(linear, tanh)
    # A tanh export writes no pooler_act: older files and newer ones read alike.
    save_pretrained(tmp_path / "t", config.replace(pooler_act="tanh"), params)
    assert "pooler_act" not in json.loads((tmp_path / "t" / "config.json").read_text())["mpcformer"]


def test_round_trip_of_the_length_normalised_2quad(tmp_path):
    config = BertConfig.tiny(num_labels=2).with_approximation("quad+2quad_len+affine")
    params = init_params(config, 5)
    save_pretrained(tmp_path / "m", config, params)
    again, params2, _ = load_pretrained(tmp_path / "m")
    assert again == config and again.softmax_act == "2quad_len"
    ids = np.array([[3, 9, 11, 4, 0], [5, 6, 7, 8, 9]])
    mask = np.array([[1, 1, 1, 1, 0], [1] * 5])
    np.testing.assert_array_equal(np.asarray(forward(config, params, ids, mask)),
                                  np.asarray(forward(again, params2, ids, mask)))


@pytest.mark.slow  # real checkpoint through transformers
def test_transformers_flax_class_loads_an_exported_model_to_the_same_logits(tmp_path):
    """An exported exact model is an ordinary HF checkpoint: transformers' own Flax class
    reads its safetensors (``from_pt``: PyTorch key names, no torch needed) and computes our
    logits. With approximations the file still loads, but transformers runs exact GeLU and
    softmax, so only our loader reproduces a student."""
    from transformers import FlaxBertForSequenceClassification

    config = BertConfig.tiny(num_labels=3, label_names=("neg", "neu", "pos"),
                             type_vocab_size=2)
    params = init_params(config, 7)
    # A random head's logits are ~0.01; scaled to ~1 so that 1e-4 is a tight tolerance.
    params["classifier"]["kernel"] = params["classifier"]["kernel"] * 100.0
    ids = np.array([[2, 15, 9, 41, 3, 0, 0], [2, 7, 88, 5, 60, 12, 3]], np.int32)
    mask = (ids > 0).astype(np.int32)
    types = np.array([[0, 0, 0, 1, 1, 0, 0], [0] * 7], np.int32)
    ours = np.asarray(forward(config, params, ids, mask, types))
    for name, choice in {"exact": "exact", "student": "quad+2quad"}.items():
        cfg = config.with_approximation(choice)
        folder = save_pretrained(tmp_path / name, cfg, params)
        hf = FlaxBertForSequenceClassification.from_pretrained(folder, from_pt=True)
        hf_logits = np.asarray(hf(ids, attention_mask=mask, token_type_ids=types).logits)
        assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
        assert np.abs(hf_logits).max() > 0.5
        if name == "exact":
            np.testing.assert_allclose(hf_logits, ours, atol=1e-4)
        else:
            student = np.asarray(forward(cfg, params, ids, mask, types))
            assert np.abs(hf_logits - ours).max() < 1e-4  # transformers ran the exact model
            assert np.abs(student - ours).max() > 1e-2  # ours ran quad and 2quad


@pytest.mark.slow  # real checkpoint
def test_round_trip_real_minilm_with_tokenizer(tmp_path):
    config, params, tokenizer = load_pretrained("minilm-l6", hidden_act="quad")
    save_pretrained(tmp_path / "m", config, params, tokenizer)
    config2, params2, tokenizer2 = load_pretrained(tmp_path / "m")
    assert config2 == config
    _assert_same_params(params, params2)
    assert tokenizer2("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_base_encoder_gets_new_head_of_requested_size():
    config, params, _ = load_pretrained("minilm-l6", num_labels=5)
    assert config.num_labels == 5 and params["classifier"]["kernel"].shape == (384, 5)


def test_head_size_mismatch_is_an_error(tiny_hf_bert):
    folder, _ = tiny_hf_bert
    with pytest.raises(CheckpointError, match="3 labels, not num_labels=2"):
        load_pretrained(folder, num_labels=2)


def _edit_weights(src, dst, edit):
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


KEY = "bert.encoder.layer.1.attention.self.key.weight"


def test_missing_key_named(tiny_hf_bert, tmp_path):
    folder = _edit_weights(tiny_hf_bert[0], tmp_path / "c", lambda w: w.pop(KEY))
    with pytest.raises(CheckpointError, match=f"missing keys: {KEY}"):
        load_pretrained(folder)


def test_unexpected_key_named(tiny_hf_bert, tmp_path):
    def add(w):
        w["bert.encoder.layer.1.adapter.weight"] = np.zeros(3, np.float32)
        w["cls.predictions.bias"] = np.zeros(3, np.float32)  # ignored: an MLM head

    folder = _edit_weights(tiny_hf_bert[0], tmp_path / "c", add)
    with pytest.raises(CheckpointError, match=r"Unexpected keys .*adapter\.weight\.") as err:
        load_pretrained(folder)
    assert "cls.predictions" not in str(err.value)


def test_wrong_shape_named(tiny_hf_bert, tmp_path):
    def shrink(w):
        w[KEY] = w[KEY][:16]

    folder = _edit_weights(tiny_hf_bert[0], tmp_path / "c", shrink)
    with pytest.raises(CheckpointError, match=rf"wrong shapes: {KEY}: file \(16, 32\)"):
        load_pretrained(folder)


def test_partial_head_is_an_error(tiny_hf_bert, tmp_path):
    folder = _edit_weights(tiny_hf_bert[0], tmp_path / "c", lambda w: w.pop("classifier.bias"))
    with pytest.raises(CheckpointError, match="missing keys: classifier.bias"):
        load_pretrained(folder)


def test_bad_files(tiny_hf_bert, tmp_path):
    src = tiny_hf_bert[0]
    no_config = tmp_path / "no_config"
    shutil.copytree(src, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="No config.json"):
        load_pretrained(no_config)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(corrupt)

    torch_only = tmp_path / "torch_only"
    shutil.copytree(src, torch_only)
    (torch_only / "model.safetensors").rename(torch_only / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="needs torch"):
        load_pretrained(torch_only)

    with pytest.raises(CheckpointError, match="is a file"):
        load_pretrained(src / "config.json")


def test_unsupported_model_type(tiny_hf_bert, tmp_path):
    folder = tmp_path / "gpt"
    shutil.copytree(tiny_hf_bert[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="Unsupported model_type 'gpt2'"):
        load_pretrained(folder)


def test_names_resolve_or_explain(tmp_path):
    assert (resolve_checkpoint("minilm-l6") / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        resolve_checkpoint(tmp_path / "nowhere")
    # No hub here (and in CI): the error must say how to point at a local folder.
    with pytest.raises(OSError, match="pass its folder, or use a short name: minilm-l6"):
        resolve_checkpoint("no-such-org-xyz/no-such-model")


def test_save_replaces_atomically(tmp_path):
    config = BertConfig.tiny()
    save_pretrained(tmp_path / "m", config, init_params(config, 0))
    save_pretrained(tmp_path / "m", config, init_params(config, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial or old folders
    _assert_same_params(load_pretrained(tmp_path / "m")[1], init_params(config, 1))


def test_round_trip_keeps_the_norm_slot_bounds_and_public_table(tmp_path):
    config = BertConfig.tiny(num_labels=2).with_approximation("quad+2quad_newton+layernorm_newton")
    config = config.replace(norm_bounds=(0.5, 1.5, 2.5, 3.5, 4.5), softmax_bounds=(30.0, 40.0),
                            public_table_source="minilm-l6", public_table_sha256="ab" * 32)
    params = init_params(config, 2)
    save_pretrained(tmp_path / "m", config, params)
    again, params2, _ = load_pretrained(tmp_path / "m")
    assert again == config
    _assert_same_params(params, params2)
    ours = json.loads((tmp_path / "m" / "config.json").read_text())["mpcformer"]
    assert ours["norm_act"] == "layernorm_newton" and ours["public_table"]["source"] == "minilm-l6"
    # A folder written before the norm slot existed loads with exact LayerNorm.
    del ours["norm_act"]
    assert BertConfig.from_hf_config({**json.loads(
        (tmp_path / "m" / "config.json").read_text()), "mpcformer": {}}).norm_act == "layernorm"


def test_round_trip_keeps_a_mixed_norm(tmp_path):
    config = BertConfig.tiny().with_approximation("quad+2quad+affine@4:0")
    save_pretrained(tmp_path / "m", config, init_params(config, 0))
    again = load_pretrained(tmp_path / "m")[0]
    assert again == config and again.norm_act == "affine@0:4"


def test_bad_bounds_and_half_a_public_table_are_refused():
    with pytest.raises(ValueError, match="norm_bounds must hold 5"):
        BertConfig.tiny(norm_bounds=(1.0, 2.0))
    with pytest.raises(ValueError, match="softmax_bounds must hold 2 positive"):
        BertConfig.tiny(softmax_bounds=(1.0, -2.0))
    with pytest.raises(ValueError, match="go together"):
        BertConfig.tiny(public_table_source="minilm-l6")
    with pytest.raises(ValueError, match="has sites 0..4"):
        BertConfig.tiny(norm_act="affine@5")
