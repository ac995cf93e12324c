"""The model-specific part of private inference: the pure forward and the client's encoding.

Everything else in ``mpcformer_jax.private`` sees only a pure function of
``(params, client_input, mask)`` and arrays, so another model needs changes here only.

Who calls what: the owner ``prepare``s its model in plaintext, then compiles and shares it;
the client takes the prepared config (from the public card), gets the public word table with
``client_table`` when the config names one, and ``encode_client_inputs``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from mpcformer_jax.approx import PER_QUERY_KEY_WEIGHTS, key_weights_for_client
from mpcformer_jax.models import BertConfig, fold, forward
from mpcformer_jax.models.fold import fold_norms, norm_fold_sites
from mpcformer_jax.models.public_table import (
    check_public_table,
    load_checked_table,
    lookup,
    without_word_table,
)
from mpcformer_jax.private.compile import compile_cached

# How ``prepare`` lowers the products whose cheapest form depends on the protocol (issue 19;
# the measurements behind each choice are in the README, "Lowering per protocol"):
# * block_diagonal_heads: all heads' attention products as one matmul against a
#   block-diagonal operand (public zeros) instead of one matmul per head. SPU runs a batched
#   dot_general as one matmul per head, each with its own messages and truncation; one
#   matmul has them once, but opens (Beaver) or shares the 12x larger block operand;
# * gram_variance: exact LayerNorm's token variances off the diagonal of one Gram product
#   instead of B L H elementwise squares;
# * beaver_cache_weights (SEMI2K only: the one protocol here with Beaver triples): the
#   weights' opened masks are kept by each node and replayed (with_cached_weights); implies
#   stored_qkv. Measured per protocol: block-diagonal products and the Gram variance cost
#   fewer rounds on SEMI2K too (per-head products send fewer bytes there but pay 44 rounds
#   a BERT-base layer, a loss past ~31 ms one way at 100 Mbit/s), so those stay on.
# * cls_only_last_layer (every protocol): the last layer computes the [CLS] row alone, the
#   only row the classifier reads; its attention still reads every key and value. The same
#   logits, about 7% fewer bytes and multiply-adds at BERT-base seq 128 (README).
# * fold_norms (every protocol): affine norm sites, and exact LayerNorms' scale and bias,
#   moved into the Dense layers that read and write the residual stream where a public rule
#   of the architecture allows (``models.fold.fold_norms``): a folded site costs nothing.
# * batched_products (every protocol): a layer's independent elementwise products as one
#   product op (2quad_len's square and its values' key weighting): SPU pays a product op's
#   round trips once whatever its size (under ABY3 about 3 rounds a layer fewer).
# * chebyshev_pooler (every protocol): a tanh pooler evaluates the polynomial SPU's own tanh
#   evaluates (``approx.spu_tanh``) with one comparison instead of two and five sequential
#   products instead of nine: under ABY3 25 rounds a query instead of 50. The private
#   forward computes what it computed before; the plaintext side compares with tanh
#   (``reference_forward``).
_EVERY_PROTOCOL = {"block_diagonal_heads": True, "gram_variance": True,
                   "cls_only_last_layer": True, "fold_norms": True,
                   "batched_products": True, "chebyshev_pooler": True}
LOWERING: dict[str, dict[str, bool]] = {
    "ABY3": dict(_EVERY_PROTOCOL),
    "SEMI2K": {**_EVERY_PROTOCOL, "beaver_cache_weights": True},
    "CHEETAH": dict(_EVERY_PROTOCOL),
}


def lowering_for(protocol: str) -> dict[str, bool]:
    """The lowering ``prepare`` uses under ``protocol`` (ABY3, SEMI2K, CHEETAH)."""
    try:
        return LOWERING[protocol.upper()]
    except KeyError:
        raise ValueError(f"unknown protocol {protocol!r}: one of "
                         f"{', '.join(LOWERING)}") from None


def prepare(config: BertConfig, params, protocol: str = "ABY3",
            lowering: dict[str, bool] | None = None) -> tuple[BertConfig, dict]:
    """What the owner compiles and shares: the model folded for MPC (``models.fold``), lowered
    for ``protocol`` (``LOWERING``: the heads' attention products as one block-diagonal
    matmul or per head, LayerNorm variances from a Gram product or from squares; the same
    function either way), and without its word-embedding table when that table is public
    (the client looks up).

    ``lowering``: overrides ``LOWERING[protocol]`` field by field (for measurements).
    Run by the owner, in plaintext, before anything is shared; idempotent: a prepared model
    keeps its lowering unless ``lowering`` is given.
    """
    already_prepared = config.folded
    folded_sites = config.folded_norm_sites
    config, params = fold(config, params)  # a no-op on a folded model
    if not already_prepared or lowering:
        config = prepared_config(config, protocol, lowering)
    if config.folded_norm_sites != folded_sites:
        if folded_sites:
            raise ValueError("these weights were prepared with other norm sites folded "
                             f"({folded_sites}): prepare the model as exported instead")
        params = fold_norms(config, params)
    if config.stored_qkv and not _has_stored_qkv(params):
        params = store_fused_qkv(params)
    if config.public_table_source and "word_embeddings" in params["bert"]["embeddings"]:
        params = without_word_table(params)
    return config, params


def prepared_config(config: BertConfig, protocol: str = "ABY3",
                    lowering: dict[str, bool] | None = None) -> BertConfig:
    """The config ``prepare`` returns, from the config alone (no weights needed): what the
    public card carries, so a client compiles the program the nodes run."""
    if config.softmax_mix < 1.0:
        raise ValueError(f"softmax_mix {config.softmax_mix} is a training step of a student "
                         "whose normaliser is being mixed in: private inference runs a "
                         "finished student (mix 1).")
    # A length-normalised normaliser reads mask / n, which the client computes (it knows its
    # own lengths): no reciprocal under MPC (``encode_client_inputs``). ``lowering`` may
    # turn it off, to measure the reciprocal paid by the nodes instead.
    client_weights = {"client_key_weights": config.softmax_act in PER_QUERY_KEY_WEIGHTS}
    chosen = {**client_weights, **lowering_for(protocol), **(lowering or {})}
    if "fold_norms" in chosen:  # a choice of prepare, recorded as the sites it folds
        config = config.replace(folded_norm_sites=norm_fold_sites(config)
                                if chosen.pop("fold_norms") else ())
    config = config.replace(folded=True, **chosen)
    return config.replace(stored_qkv=config.stored_qkv or config.beaver_cache_weights)


def _has_stored_qkv(params) -> bool:
    layers = params["bert"]["encoder"]["layer"]
    return all("qkv" in layer["attention"]["self"] for layer in layers.values())


def store_fused_qkv(params) -> dict:
    """Every layer's query, key and value Dense layers as one ``qkv`` parameter (kernels and
    biases concatenated in that order, as the forward fuses them), so the fused kernel is a
    weight a node holds, not a buffer made per query (``stored_qkv``)."""
    layers = {}
    for name, layer in params["bert"]["encoder"]["layer"].items():
        self_att = dict(layer["attention"]["self"])
        parts = [self_att.pop(n) for n in ("query", "key", "value")]
        self_att["qkv"] = {"kernel": np.concatenate([np.asarray(p["kernel"]) for p in parts], 1),
                           "bias": np.concatenate([np.asarray(p["bias"]) for p in parts])}
        layers[name] = {**layer, "attention": {**layer["attention"], "self": self_att}}
    bert = {**params["bert"], "encoder": {**params["bert"]["encoder"], "layer": layers}}
    return {**params, "bert": bert}


def prepared_param_shapes(config: BertConfig) -> dict:
    """Shapes (ShapeDtypeStructs) of the parameters the owner shares for a ``prepare``d
    config: a client recompiles the program from them and the public card alone."""
    import jax

    from mpcformer_jax.models import init_params

    shapes = jax.eval_shape(lambda: init_params(config, 0))
    return without_word_table(shapes) if config.public_table_source else shapes


def client_table(config: BertConfig, table: np.ndarray | None = None) -> np.ndarray | None:
    """The public word-embedding table the client looks its tokens up in, hash-checked; None
    when the model's table is private (the client one-hot encodes).

    ``table``: the client's own copy, checked against the config's hash; default: loaded
    from the checkpoint the config names (``load_public_table``), once per process.

    Raises:
      ValueError: the table's hash differs from the one the config names (refused before
        anything is shared).
    """
    if not config.public_table_source:
        return None
    if table is None:
        return _loaded_table(config.public_table_source, config.public_table_sha256)
    check_public_table(config, table)
    return np.asarray(table, np.float32)


@functools.lru_cache(maxsize=2)
def _loaded_table(source: str, sha256: str) -> np.ndarray:
    # Keyed on (source, hash): a table is only returned for the hash it was checked against.
    table = np.asarray(load_checked_table(source, sha256), np.float32)
    table.setflags(write=False)  # shared by every later caller
    return table


def make_private_forward(config: BertConfig):
    """``f(params, client_input, mask) -> logits``, the function SPU compiles for ``config``
    (a ``prepare``d config).

    ``client_input`` is what ``encode_client_inputs`` makes: the rows of the public
    word-embedding table (B, L, hidden) when the config names one, else one-hot rows
    (B, L, vocab) whose lookup is ``one_hot @ word_embeddings``, a matmul on secrets (no
    secret equality test per vocabulary entry).
    """
    if config.public_table_source:
        def private_forward(params, word_vectors, attention_mask):
            return forward(config, params, None, attention_mask, word_vectors=word_vectors)
    else:
        def private_forward(params, one_hot_ids, attention_mask):
            return forward(config, params, one_hot_ids, attention_mask)

    return private_forward


def reference_forward(config: BertConfig):
    """``make_private_forward`` of the model as trained: what private answers are compared
    with. Every choice of ``prepare`` keeps the trained function but one, the pooler's
    tanh as SPU's Chebyshev series (``chebyshev_pooler``, within 4.9e-3 of tanh): SPU
    approximated tanh before that choice too, and the comparison keeps counting it."""
    return make_private_forward(config.replace(chebyshev_pooler=False))


def client_input_width(config: BertConfig) -> int:
    """The last dimension of the client's input: hidden size (public table) or vocabulary."""
    return config.hidden_size if config.public_table_source else config.vocab_size


def encode_client_inputs(config: BertConfig, input_ids: np.ndarray,
                         attention_mask: np.ndarray | None = None,
                         table: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """The client's local step: token ids (B, L) -> (client input float32, mask float32).

    The client input is ``lookup(table, ids)`` (B, L, hidden) when the config names a public
    table (``table``: from ``models.public_table.load_public_table``, which checks its
    hash), else one-hot rows (B, L, V). The mask is 0/1, or mask / n for a config with
    ``client_key_weights`` (the client knows its own lengths; the nodes then pay no
    reciprocal for them). Runs on the client, in the clear, before anything is shared.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}); got "
                         f"[{ids.min()}, {ids.max()}]: is the tokenizer the model's?")
    if ids.shape[1] > config.max_length:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds the model's "
                         f"{config.max_length} positions")
    mask = np.ones(ids.shape, np.float32) if attention_mask is None else \
        np.asarray(attention_mask, np.float32)
    if config.client_key_weights:
        mask = key_weights_for_client(mask).astype(np.float32)
    if config.public_table_source:
        if table is None:
            raise ValueError("this model's word-embedding table is public: pass the table "
                             "(models.public_table.load_public_table(config)) to look the "
                             "tokens up on the client")
        if table.shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"the public table has shape {table.shape}, the model wants "
                             f"{(config.vocab_size, config.hidden_size)}")
        return lookup(table, ids), mask
    one_hot = np.zeros((*ids.shape, config.vocab_size), np.float32)
    np.put_along_axis(one_hot, ids[..., None], 1.0, axis=-1)
    return one_hot, mask


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes texts padded/truncated to ``max_length``: (input_ids, attention_mask) int32."""
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer files (tokenizer.json or vocab.txt):"
                         " pass token ids instead of text, or save the tokenizer with the model")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)



def plaintext_classifier(model_dir):
    """``logits(texts, length)``: the plaintext forward of the model a service serves (the
    prepared one, ``reference_forward``) on exactly what a client shares at ``length``
    tokens. What tests and benchmarks compare private answers with."""
    import jax

    from mpcformer_jax.models import load_pretrained

    config, params, tokenizer = load_pretrained(model_dir)
    config, params = prepare(config, params)
    table = client_table(config)
    forward = jax.jit(reference_forward(config))

    def logits(texts: Sequence[str], length: int) -> np.ndarray:
        ids, mask = tokenize(tokenizer, texts, length)
        return np.asarray(forward(params, *encode_client_inputs(config, ids, mask, table)))

    logits.tokenizer = tokenizer
    return logits


def compile_for(config: BertConfig, params, batch_size: int, length: int, copts,
                attribution: str = "segments"):
    """The forward of a ``prepare``d ``config`` compiled for SPU at one (batch, length)
    bucket (cached).

    Only shapes are used: the owner compiles without any client data, and a client can
    compile the same program from the public card (params as shape structs).
    """
    import jax

    # Every path to SPU goes through prepare(): an unfolded model would pay truncations the
    # weights can absorb, and a public table would be shared although the client has it.
    if not config.folded:
        raise ValueError("compile the prepared model: config, params = "
                         "mpcformer_jax.private.model.prepare(config, params)")
    if config.public_table_source and "word_embeddings" in params["bert"]["embeddings"]:
        raise ValueError("this model's word-embedding table is public: prepare() drops it "
                         "from the shared weights (the client looks its tokens up)")
    client_input = jax.ShapeDtypeStruct((batch_size, length, client_input_width(config)),
                                        np.float32)
    mask = jax.ShapeDtypeStruct((batch_size, length), np.float32)
    fn = make_private_forward(config)
    if config.beaver_cache_weights:
        fn = with_cached_weights(fn)
    return compile_cached(config, fn, params, (client_input, mask), copts, attribution)


def with_cached_weights(private_forward):
    """``private_forward`` with every weight matrix (``kernel``, ``embedding``) marked for
    SPU's Beaver cache (``spu.experimental.make_cached_var``).

    Under SEMI2K a product of secrets opens both operands' masked values; for a weight that
    is W - B, the same every time the weight is used. With the mark a node keeps that opened
    value (and replays B's seed to the dealer) for as long as it holds the weight: the first
    query pays each weight's opening, later ones only the activations'. Under ABY3 and
    CHEETAH the mark is a no-op (no Beaver triples). Safe in a node because its weights stay
    set for its whole life (one model per node, ``roles.node``): SPU 0.9.5 keys the cache by
    buffer address, so a freed and reused buffer would read a stale entry. Only for SPU: a
    plain ``jax.jit`` cannot run the mark's custom call.
    """
    import jax
    from spu.experimental import make_cached_var

    def cached(params, *inputs):
        marked = jax.tree_util.tree_map_with_path(
            lambda path, w: make_cached_var(w)
            if jax.tree_util.keystr(path).endswith(("['kernel']", "['embedding']")) else w,
            params)
        return private_forward(marked, *inputs)

    return cached
