"""Our BERT against transformers' Flax BERT, and the model's behaviour with approximations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_hf_folder

from mpcformer_jax import approx
from mpcformer_jax.models import BertConfig, forward, init_params, load_pretrained, make_apply

TOL = 1e-4


def _ids(vocab, shape, seed=0, low=3):
    return np.array(jax.random.randint(jax.random.PRNGKey(seed), shape, low, vocab), np.int32)


def test_tiny_random_matches_transformers(tiny_hf_bert):
    folder, hf_model = tiny_hf_bert
    config, params, _ = load_pretrained(folder)
    assert config.num_labels == 3 and config.intermediate_size == 37
    ids = _ids(99, (2, 7))
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)
    types = np.array([[0] * 4 + [1] * 3, [0] * 7], np.int32)
    hf = hf_model(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    logits, inter = forward(config, params, ids, mask, types, output_intermediates=True)
    np.testing.assert_allclose(logits, hf.logits, atol=TOL)
    for ours, theirs in zip(inter["hidden_states"], hf.hidden_states[1:], strict=True):
        np.testing.assert_allclose(ours, theirs, atol=TOL)
    np.testing.assert_allclose(inter["embeddings"], hf.hidden_states[0], atol=TOL)


def test_roberta_matches_transformers(tmp_path):
    from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

    hf_config = RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37,
                              max_position_embeddings=40, type_vocab_size=1, num_labels=2)
    hf_model = FlaxRobertaForSequenceClassification(hf_config, seed=2)
    config, params, _ = load_pretrained(write_hf_folder(tmp_path, hf_config, hf_model.params))
    assert config.is_roberta and config.position_offset == 2 and config.max_length == 38
    ids = _ids(99, (2, 9))  # ids >= 3: never RoBERTa's padding id 1
    mask = np.array([[1] * 9, [1] * 5 + [0] * 4], np.int32)
    ids[1, 5:] = 1  # right padding with the pad token, as a tokenizer would
    hf_logits = hf_model(ids, attention_mask=mask).logits
    np.testing.assert_allclose(forward(config, params, ids, mask), hf_logits, atol=TOL)


def test_minilm_matches_transformers():
    from transformers import FlaxBertModel

    from mpcformer_jax.models import BertModel, resolve_checkpoint

    config, params, tokenizer = load_pretrained("minilm-l6")
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    batch = tokenizer(["a gripping, beautifully shot film", "dull."], padding=True,
                      return_tensors="np")
    hf = FlaxBertModel.from_pretrained(str(resolve_checkpoint("minilm-l6")))(
        **batch, output_hidden_states=True)
    _, pooled, inter = BertModel(config).apply(
        {"params": params["bert"]}, batch["input_ids"], batch["attention_mask"],
        batch["token_type_ids"])
    for ours, theirs in zip(inter["hidden_states"], hf.hidden_states[1:], strict=True):
        np.testing.assert_allclose(ours, theirs, atol=TOL)
    np.testing.assert_allclose(pooled, hf.pooler_output, atol=TOL)


PAIRS = list(itertools.product(approx.GELU_APPROX, approx.SOFTMAX_APPROX))
LENGTHS = [10, 6, 3]


def _padded_batch(vocab):
    ids = _ids(vocab, (3, 10), seed=3)
    mask = (np.arange(10)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    # The same rows again with other tokens in the padded positions.
    other = np.where(mask > 0, ids, _ids(vocab, (3, 10), seed=4))
    return np.concatenate([ids, other]), np.concatenate([mask, mask])


@pytest.mark.parametrize(("act", "norm"), PAIRS)
def test_every_pair_finite_and_padding_invariant(act, norm):
    config = BertConfig.tiny(hidden_act=act, softmax_act=norm)
    params = init_params(config, 0)
    ids, mask = _padded_batch(config.vocab_size)
    logits = np.asarray(jax.jit(make_apply(config))(params, ids, mask))
    assert logits.shape == (6, 2) and np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits[:3], logits[3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("act", "norm"), [pytest.param("gelu", "softmax", marks=pytest.mark.slow),
                                         ("quad", "2quad")])
def test_padding_equals_unpadded_run(act, norm):
    config = BertConfig.tiny(hidden_act=act, softmax_act=norm)
    params = init_params(config, 0)
    ids, mask = _padded_batch(config.vocab_size)
    logits = np.asarray(forward(config, params, ids[:3], mask[:3]))
    for row, n in enumerate(LENGTHS):  # each sequence alone, unpadded
        alone = np.asarray(forward(config, params, ids[row:row + 1, :n], mask[row:row + 1, :n]))
        np.testing.assert_allclose(logits[row], alone[0], atol=1e-5, rtol=1e-5)


def test_one_hot_input_equals_ids():
    config = BertConfig.tiny(hidden_act="quad", softmax_act="2quad")
    params = init_params(config, 0)
    ids = _ids(config.vocab_size, (2, 5))
    mask = np.ones((2, 5), np.int32)
    one_hot = jax.nn.one_hot(ids, config.vocab_size)
    np.testing.assert_allclose(forward(config, params, one_hot, mask),
                               forward(config, params, ids, mask), atol=1e-5)


def test_intermediates_shapes():
    config = BertConfig.tiny()
    logits, inter = forward(config, init_params(config), _ids(128, (2, 6)), np.ones((2, 6)),
                            output_intermediates=True)
    assert inter["embeddings"].shape == (2, 6, 32)
    assert len(inter["hidden_states"]) == len(inter["attention_scores"]) == 2
    assert inter["attention_scores"][0].shape == (2, 4, 6, 6)


def test_dropout_needs_rng_and_changes_output():
    config = BertConfig.tiny()
    params = init_params(config)
    ids, mask = _ids(128, (2, 6)), jnp.ones((2, 6))
    a = forward(config, params, ids, mask, deterministic=False,
                rngs={"dropout": jax.random.PRNGKey(0)})
    b = forward(config, params, ids, mask)
    assert not np.allclose(a, b)


def test_config_validation():
    with pytest.raises(ValueError, match="Available activation"):
        BertConfig.tiny(hidden_act="cubic")
    with pytest.raises(ValueError, match="Available softmax"):
        BertConfig.tiny(softmax_act="nope")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        BertConfig.tiny(hidden_size=30)
    with pytest.raises(ValueError, match="label_names"):
        BertConfig.tiny(num_labels=3, label_names=("a", "b"))
    config = BertConfig.tiny()
    assert hash(config) == hash(BertConfig.tiny())  # usable as a jit static argument
    assert config.with_approximation("quad+2quad").softmax_act == "2quad"


def _forward_pair(config, **changes):
    """The forward of ``config`` and of ``config.replace(**changes)`` on one padded batch, the
    same parameters: ``(logits, intermediates)`` each."""
    params = init_params(config, 1)
    ids = np.array([[5, 9, 33, 7, 0, 0], [3, 4, 5, 6, 7, 8]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6])
    return tuple(forward(c, params, ids, mask, output_intermediates=True)
                 for c in (config, config.replace(**changes)))


@pytest.mark.parametrize("choice", ["exact", "quad+2quad", "quad+2quad_newton+affine",
                                    "quad+2quad_len+affine"])
def test_block_diagonal_heads_give_the_same_forward(choice):
    config = BertConfig.tiny(num_labels=3).with_approximation(choice)
    (a, ia), (b, ib) = _forward_pair(config, block_diagonal_heads=True)
    np.testing.assert_allclose(a, b, atol=1e-6)
    for x, y in zip(ia["attention_scores"] + ia["hidden_states"],
                    ib["attention_scores"] + ib["hidden_states"], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_mixed_norm_with_every_site_exact_is_layernorm():
    # "affine" at no site at all: the same modules, parameters and logits as LayerNorm.
    config = BertConfig.tiny(hidden_act="quad", softmax_act="2quad")
    mixed = config.replace(norm_act="affine@0:1:2:3:4")
    params = init_params(config, 0)
    ids, mask = _padded_batch(config.vocab_size)
    np.testing.assert_array_equal(np.asarray(forward(mixed, params, ids, mask)),
                                  np.asarray(forward(config, params, ids, mask)))
    partly = np.asarray(forward(config.replace(norm_act="affine@0:1:2:3"), params, ids, mask))
    assert not np.allclose(partly, np.asarray(forward(config, params, ids, mask)))


@pytest.mark.parametrize("shape", [(1, 6), (2, 40)])  # Gram product / squares (B L > H = 32)
def test_gram_variance_layernorm_gives_the_same_forward(shape):
    config = BertConfig.tiny(num_labels=3).with_approximation("quad+2quad+affine@0:2")
    params = init_params(config, 1)
    ids = _ids(config.vocab_size, shape, seed=5)
    mask = np.ones(shape, np.int32)
    mask[0, shape[1] // 2:] = 0
    a, ia = forward(config, params, ids, mask, output_intermediates=True)
    b, ib = forward(config.replace(gram_variance=True), params, ids, mask,
                    output_intermediates=True)
    np.testing.assert_allclose(a, b, atol=1e-5)
    for x, y in zip(ia["hidden_states"], ib["hidden_states"], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)


@pytest.mark.parametrize("choice, block_diagonal", [
    ("exact", False), ("quad+2quad", True), ("puma+puma", True),
    ("quad+2quad_len+affine@1", True)])
def test_cls_only_last_layer_gives_the_same_logits(choice, block_diagonal):
    # The last layer computes [CLS] alone: the logits (all the pooler reads) are unchanged,
    # the earlier layers' intermediates too; the last hidden state is the [CLS] row.
    config = BertConfig.tiny(num_labels=3).with_approximation(choice).replace(
        block_diagonal_heads=block_diagonal)
    (a, ia), (b, ib) = _forward_pair(config, cls_only_last_layer=True)
    np.testing.assert_allclose(a, b, atol=1e-5)
    for x, y in zip(ia["hidden_states"][:-1], ib["hidden_states"][:-1], strict=True):
        np.testing.assert_array_equal(x, y)
    assert ib["hidden_states"][-1].shape == (2, 1, config.hidden_size)
    np.testing.assert_allclose(ia["hidden_states"][-1][:, :1], ib["hidden_states"][-1],
                               atol=1e-5)
    np.testing.assert_allclose(ia["attention_scores"][-1][:, :, :1], ib["attention_scores"][-1],
                               atol=1e-5)
