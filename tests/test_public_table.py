"""The prepared model of private inference: fold and fused QKV change nothing, a public word
table is looked up by the client (smaller upload, same logits), a wrong table is refused
before anything is shared, and the newer approximation variants run privately.

Private runs: SPU in-process, ABY3, tiny model; tolerance as in test_private.py.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mpcformer_jax.approx import key_weights_for_client
from mpcformer_jax.models import BertConfig, fold, forward, init_params, save_pretrained
from mpcformer_jax.models.fold import norm_fold_sites
from mpcformer_jax.models.public_table import lookup, mark_public, word_table
from mpcformer_jax.private import run
from mpcformer_jax.private.model import (
    client_table,
    encode_client_inputs,
    lowering_for,
    prepare,
    prepared_param_shapes,
)

TOL = 0.05
STUDENT = BertConfig.tiny(hidden_act="quad", softmax_act="2quad", vocab_size=100)


def _batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, vocab, (2, 8))
    mask = np.ones((2, 8), np.int32)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def public_student(tmp_path_factory):
    """(config, params, source folder): a student whose word table is a saved checkpoint's,
    unchanged (as after training with frozen word embeddings)."""
    source_params = init_params(STUDENT, 3)
    source = save_pretrained(tmp_path_factory.mktemp("public") / "source", STUDENT,
                             source_params)
    table = word_table(source_params)
    params = jax.tree_util.tree_map(np.asarray, init_params(STUDENT, 0))
    params["bert"]["embeddings"]["word_embeddings"]["embedding"] = table
    config = mark_public(STUDENT, params, str(source), table)
    return config, params, source


# ------------------------------------------------------------------ plaintext identities


@pytest.mark.parametrize("approximation", ["quad+2quad", "exact", "quad+2quad_len+affine",
                                           "quad+2quad_len+affine@1+linear"])
def test_fold_changes_nothing(approximation):
    config = BertConfig.tiny().with_approximation(approximation)
    params = init_params(config, 1)
    batch = _batch(config.vocab_size)
    folded_config, folded = fold(config, params)
    assert folded_config.folded and not config.folded
    # A linear pooler is folded into the classifier: no pooler is left to compute or share.
    assert ("pooler" in folded["bert"]) == (config.pooler_act != "linear")
    assert jax.tree_util.tree_structure(folded) == \
        jax.tree_util.tree_structure(init_params(folded_config, 0))
    np.testing.assert_allclose(forward(folded_config, folded, *batch.values()),
                               forward(config, params, *batch.values()), atol=1e-5)
    assert fold(folded_config, folded)[1] is folded  # folding twice is a no-op


@pytest.mark.parametrize("protocol", ["ABY3", "SEMI2K", "CHEETAH"])
@pytest.mark.parametrize("approximation", ["exact", "quad+2quad", "quad+2quad_len+affine",
                                           "quad+2quad_len+affine@1+linear"])
def test_prepare_for_each_protocol_gives_the_same_forward(protocol, approximation):
    # Each protocol gets its own lowering (private.model.LOWERING); every lowering computes
    # the unprepared model's function, also for every combination of the two choices.
    config = BertConfig.tiny().with_approximation(approximation)
    params = init_params(config, 1)
    batch = _batch(config.vocab_size)
    expected = np.asarray(forward(config, params, *batch.values()))
    for lowering in [None, *({"block_diagonal_heads": b, "gram_variance": g}
                             for b in (True, False) for g in (True, False))]:
        prepared_config, prepared = prepare(config, params, protocol, lowering)
        assert prepared_config.folded
        if lowering is None:
            chosen = dict(lowering_for(protocol))
            assert chosen.pop("fold_norms")
            assert prepared_config.folded_norm_sites == norm_fold_sites(config)
            assert {k: getattr(prepared_config, k) for k in chosen} == chosen
        ids, mask = batch.values()
        # A length-normalised model reads mask / n, as its client sends it.
        assert prepared_config.client_key_weights == ("2quad_len" in approximation)
        sent = key_weights_for_client(np.asarray(mask, np.float32)) \
            if prepared_config.client_key_weights else mask
        # The pooler's tanh is SPU's series there (chebyshev_pooler, tested on its own):
        # the rest is compared with the pooler's tanh, as reference_forward does.
        reference = prepared_config.replace(chebyshev_pooler=False)
        np.testing.assert_allclose(
            np.asarray(forward(reference, prepared, ids, sent)), expected, atol=1e-5)
    # Preparing a prepared model (run() does, for a model given as (config, params)) keeps
    # its lowering: a measurement's override survives.
    per_head = {"block_diagonal_heads": False, "gram_variance": False}
    once = prepare(config, params, protocol, per_head)[0]
    assert prepare(once, params, protocol)[0] == once
    with pytest.raises(ValueError, match="unknown protocol 'SPDZ'.*ABY3"):
        prepare(config, params, "SPDZ")


def _random_norms(params, seed):
    """``params`` with every LayerNorm's scale and bias drawn at random (as training leaves
    them: init_params gives 1 and 0, under which folding a norm changes no weight)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "LayerNorm" not in name:
            return leaf
        if name.endswith("['scale']"):
            sign = rng.choice([-1, 1], leaf.shape)
            return (rng.uniform(0.2, 2.0, leaf.shape) * sign).astype(np.float32)
        return rng.normal(0, 0.5, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


@pytest.mark.parametrize("approximation, folded", [
    # odd sites fold, even ones materialise, the last folds into the pooler:
    ("quad+2quad+affine", (0, 1, 3, 4)),
    # site 1 precedes an exact site (which needs the true stream); exact 2 folds its affine:
    ("quad+2quad_len+affine@2+linear", (0, 2, 3, 4)),
    ("quad+2quad_len+affine@1:3", (1, 3, 4)),
    ("quad+2quad", (4,)),  # exact everywhere: only the last one's affine folds (the pooler's)
])
def test_norm_folding_keeps_the_function(approximation, folded):
    config = BertConfig.tiny(num_labels=3).with_approximation(approximation)
    assert norm_fold_sites(config) == folded
    params = _random_norms(init_params(config, 3), 4)
    ids, mask = _batch(config.vocab_size).values()
    expected = np.asarray(forward(config, params, ids, mask))
    prepared_config, prepared = prepare(config, params, "ABY3")
    assert prepared_config.folded_norm_sites == folded
    sent = key_weights_for_client(np.asarray(mask, np.float32)) \
        if prepared_config.client_key_weights else mask
    got = np.asarray(forward(prepared_config.replace(chebyshev_pooler=False), prepared, ids,
                             sent))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # A folded site's parameters are not shared at all, and the weights around it moved.
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(prepared)[0]}
    assert sum("LayerNorm" in n and n.endswith("['scale']") for n in names) == 5 - len(folded)
    unfolded_config, unfolded = prepare(config, params, "ABY3", {"fold_norms": False})
    assert unfolded_config.folded_norm_sites == ()
    kernels = [(jax.tree_util.keystr(p), w)
               for p, w in jax.tree_util.tree_flatten_with_path(unfolded)[0]
               if jax.tree_util.keystr(p).endswith("['kernel']")]
    moved = {jax.tree_util.keystr(p): w
             for p, w in jax.tree_util.tree_flatten_with_path(prepared)[0]}
    assert any(not np.allclose(w, moved[name]) for name, w in kernels)
    with pytest.raises(ValueError, match="other norm sites folded"):
        prepare(prepared_config, prepared, "ABY3", {"fold_norms": False})


def test_fused_qkv_changes_nothing():
    config = STUDENT
    assert config.fuse_qkv
    params = init_params(config, 2)
    batch = _batch(config.vocab_size)
    np.testing.assert_allclose(forward(config, params, *batch.values()),
                               forward(config.replace(fuse_qkv=False), params, *batch.values()),
                               atol=1e-6)


def test_prepared_public_model_is_the_same_function(public_student):
    config, params, _ = public_student
    prepared, shared = prepare(config, params)
    assert "word_embeddings" not in shared["bert"]["embeddings"]
    batch = _batch(config.vocab_size)
    vectors, mask = encode_client_inputs(prepared, *batch.values(), table=word_table(params))
    np.testing.assert_allclose(forward(prepared.replace(chebyshev_pooler=False), shared, None,
                                       mask, word_vectors=vectors),
                               forward(config, params, *batch.values()), atol=1e-5)
    np.testing.assert_allclose(vectors, lookup(word_table(params), batch["input_ids"]))


# ------------------------------------------------------------------ the public table, private


def test_public_table_private_matches_plaintext_and_uploads_less(public_student):
    config, params, _ = public_student
    batch = _batch(config.vocab_size)
    public = run((config, params), batch, protocol="ABY3")  # loads the table from the source
    assert public.max_abs_diff < TOL and public.label_agreement == 1.0
    private_table = config.replace(public_table_source="", public_table_sha256="")
    one_hot = run((private_table, params), batch, protocol="ABY3", compare=False)
    np.testing.assert_allclose(public.logits, one_hot.logits, atol=TOL)
    # The client shares (L, hidden) vectors instead of (L, vocab) rows; the owner no table.
    assert 0 < public.report.input_bytes["client"] < one_hot.report.input_bytes["client"]
    assert public.report.input_bytes["owner"] < one_hot.report.input_bytes["owner"]


def test_wrong_public_table_is_refused_before_sharing(public_student, monkeypatch):
    import mpcformer_jax.private.simulate as simulate

    def shared(*_args, **_kwargs):
        raise AssertionError("inputs were shared despite a wrong table")

    monkeypatch.setattr(simulate, "run_threads", shared)
    config, params, _ = public_student
    batch = _batch(config.vocab_size)
    other = np.asarray(init_params(STUDENT, 9)["bert"]["embeddings"]["word_embeddings"]
                       ["embedding"])
    with pytest.raises(ValueError, match="SHA-256"):
        run((config, params), batch, protocol="ABY3", table=other)
    # The checkpoint on this machine is not the one the model names.
    wrong = config.replace(public_table_sha256="0" * 64)
    with pytest.raises(ValueError, match="install the checkpoint"):
        run((wrong, params), batch, protocol="ABY3")
    with pytest.raises(ValueError, match="pass the table"):
        encode_client_inputs(config, batch["input_ids"])


def test_card_carries_the_prepared_config(public_student, tmp_path):
    from mpcformer_jax.models import load_pretrained
    from mpcformer_jax.private.card import PRIVATE_CONFIG, export_card, load_card

    config, params, _ = public_student
    folder = save_pretrained(tmp_path / "student", config, params)
    owner_config, shared = prepare(*load_pretrained(folder)[:2])
    for card in (export_card(folder, tmp_path / "card", owner_config),  # as the service does
                 export_card(folder, tmp_path / "card2")):  # as `spu_run card` does
        card_config = load_card(card)[0]
        assert card_config == owner_config and card_config.folded
        shown = json.loads((card / PRIVATE_CONFIG).read_text())["public_table"]
        assert shown == {"source": config.public_table_source,
                         "sha256": config.public_table_sha256}
        # What Client.verify compiles from: the shapes of exactly what the owner shares.
        shapes = prepared_param_shapes(card_config)
        assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(shared)
        assert [s.shape for s in jax.tree_util.tree_leaves(shapes)] == \
            [np.shape(x) for x in jax.tree_util.tree_leaves(shared)]
    assert client_table(card_config) is not None  # the client finds and checks the table


# ------------------------------------------------------------------ newer variants, private


# quad+2quad_len+affine under ABY3: the per-protocol test below.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("approximation", [
    "quad+2quad+affine", pytest.param("quad+2quad+affine@0:2", marks=_SLOW),
    pytest.param("quad+2quad_newton+layernorm_newton", marks=_SLOW),
    pytest.param("quad+2quad_newton", marks=_SLOW)])
def test_variant_private_matches_plaintext(approximation):
    # Random weights at the default init (0.02) keep attention scores and residuals small,
    # inside the newton variants' default bounds.
    config = BertConfig.tiny(vocab_size=100).with_approximation(approximation)
    params = init_params(config, 0)
    result = run((config, params), _batch(config.vocab_size), protocol="ABY3")
    assert np.all(np.isfinite(result.plaintext_logits))
    assert result.max_abs_diff < TOL and result.label_agreement == 1.0


@pytest.mark.parametrize("protocol", ["ABY3", "SEMI2K",
                                      pytest.param("CHEETAH", marks=pytest.mark.slow)])
def test_length_normalised_2quad_private_matches_plaintext_under_each_protocol(protocol):
    config = BertConfig.tiny(vocab_size=100).with_approximation("quad+2quad_len+affine")
    params = init_params(config, 0)
    result = run((config, params), _batch(config.vocab_size), protocol=protocol)
    assert np.all(np.isfinite(result.plaintext_logits))
    assert result.max_abs_diff < TOL and result.label_agreement == 1.0


@pytest.mark.parametrize("protocol", ["ABY3", pytest.param("SEMI2K", marks=pytest.mark.slow),
                                      pytest.param("CHEETAH", marks=pytest.mark.slow)])
def test_linear_pooler_private_matches_plaintext_and_drops_the_tanh(protocol):
    config = BertConfig.tiny(vocab_size=100).with_approximation(
        "quad+2quad_len+affine@2+linear")
    params = init_params(config, 0)
    result = run((config, params), _batch(config.vocab_size), protocol=protocol)
    assert np.all(np.isfinite(result.plaintext_logits))
    assert result.max_abs_diff < TOL and result.label_agreement == 1.0
    assert "pphlo.tanh" not in result.report.ops  # nothing but linear algebra after [CLS]
    with_tanh = run((config.replace(pooler_act="tanh"), params), _batch(config.vocab_size),
                    protocol=protocol, compare=False)
    assert result.report.total.rounds < with_tanh.report.total.rounds


def test_chebyshev_pooler_is_spus_tanh_at_half_the_rounds():
    # prepare's chebyshev_pooler: the polynomial SPU's own tanh evaluates, with one
    # comparison and five sequential products instead of two and nine.
    config = BertConfig.tiny(vocab_size=100).with_approximation("quad+2quad_len+affine")
    params = init_params(config, 0)
    # A pooler input that reaches tanh's flat tails (|x| > 5), where the clamp decides.
    pooler = params["bert"]["pooler"]["dense"]
    params["bert"]["pooler"]["dense"] = {**pooler, "kernel": pooler["kernel"] * 400.0}
    batch = _batch(config.vocab_size)
    ours = run((config, params), batch, protocol="ABY3")
    spus = run((config, params), batch, protocol="ABY3", lowering={"chebyshev_pooler": False})
    assert "pphlo.tanh" in spus.report.ops and "pphlo.tanh" not in ours.report.ops
    # Both are compared with the trained model (tanh): the same gap, the same answers.
    np.testing.assert_allclose(ours.plaintext_logits, spus.plaintext_logits, atol=1e-6)
    np.testing.assert_allclose(ours.logits, spus.logits, atol=2e-3)
    assert ours.max_abs_diff < 2e-2 and ours.label_agreement == 1.0
    # The pooler's tanh (group "other") in 25 rounds instead of 50 (ABY3).
    other, spu_other = ours.report.groups["other"], spus.report.groups["other"]
    assert other.rounds <= 0.6 * spu_other.rounds
    assert ours.report.total.rounds < spus.report.total.rounds


def test_batched_products_save_a_round_trip_a_layer():
    # prepare's batched_products: 2quad_len's square and its values' weighting, one op.
    config = BertConfig.tiny(vocab_size=100).with_approximation("quad+2quad_len+affine")
    params = init_params(config, 0)
    batch = _batch(config.vocab_size)
    ours = run((config, params), batch, protocol="ABY3")
    apart = run((config, params), batch, protocol="ABY3", lowering={"batched_products": False})
    np.testing.assert_allclose(ours.plaintext_logits, apart.plaintext_logits, atol=1e-6)
    assert ours.max_abs_diff < TOL and ours.label_agreement == 1.0
    np.testing.assert_allclose(ours.logits, apart.logits, atol=TOL)
    normaliser = ours.report.groups["attention_normaliser"]
    separate = apart.report.groups["attention_normaliser"]
    assert normaliser.bytes == separate.bytes  # the same products, in fewer ops
    assert normaliser.messages < separate.messages
    assert normaliser.rounds <= separate.rounds - 2 * config.num_hidden_layers


def test_client_key_weights_remove_the_per_query_reciprocal():
    from mpcformer_jax.private.model import encode_client_inputs, prepare

    config = BertConfig.tiny(vocab_size=100).with_approximation("quad+2quad_len+affine")
    params = init_params(config, 0)
    batch = _batch(config.vocab_size)
    prepared, _ = prepare(config, params)
    assert prepared.client_key_weights  # set by prepare for a length-normalised normaliser
    assert not prepare(config.with_approximation("quad+2quad"), params)[0].client_key_weights
    # The client sends mask / n in the mask's place; a padded row's weights sum to one.
    _, sent = encode_client_inputs(prepared, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(sent.sum(-1), 1.0, rtol=1e-6)
    assert np.all((sent > 0) == (batch["attention_mask"] > 0))
    ours = run((config, params), batch, protocol="ABY3")
    theirs = run((config, params), batch, protocol="ABY3",
                 lowering={"client_key_weights": False})
    assert ours.max_abs_diff < TOL and ours.label_agreement == 1.0
    np.testing.assert_allclose(ours.plaintext_logits, theirs.plaintext_logits, atol=1e-6)
    assert "pphlo.reciprocal" not in ours.report.ops and "pphlo.reciprocal" in theirs.report.ops
    assert ours.report.total.rounds < theirs.report.total.rounds
    with pytest.raises(ValueError, match="client_key_weights: .*needs the 0/1 mask"):
        config.with_approximation("quad+2quad").replace(client_key_weights=True)


@pytest.mark.slow  # a measured SPU run
def test_measure_records_the_public_table_upload():
    from mpcformer_jax.bench.measure import measure
    from mpcformer_jax.bench.variants import Shape, Variant

    shape, variant = Shape("tiny-8", 8, 1, small=True), Variant.of("quad+2quad")
    public = measure(variant, shape, "ABY3", 1, public_table=True)
    one_hot = measure(variant, shape, "ABY3", 1)
    assert public.public_table and not one_hot.public_table
    assert public.max_abs_diff < TOL
    # One sequence of 8 tokens: 8 x hidden values instead of 8 x vocab (vocab 128, hidden 32).
    assert 0 < public.client_bytes < one_hot.client_bytes
