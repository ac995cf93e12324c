"""A Flax BERT family whose GeLU and softmax are chosen by name.

Submodules are named after Hugging Face's parameter paths (``embeddings/word_embeddings``,
``encoder/layer/0/attention/self/query``...), so checkpoints load by an almost-identity map.
Attention is written here rather than taken from flax or transformers, because theirs hardcode
``jax.nn.softmax``; the normaliser is passed in by name instead of patching ``jax.nn``.

Every layer returns its intermediates (pre-normaliser scores, output hidden states) so
layer-wise distillation can read them; inference ignores them and jit drops them.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpcformer_jax import approx
from mpcformer_jax.models.config import BertConfig

Array = jax.Array


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
    init = nn.initializers.normal(stddev=config.initializer_range)
    return nn.Dense(features, kernel_init=init, name=name)


class NormApprox(nn.Module):
    """A LayerNorm replacement of ``approx.NORM_APPROX`` with LayerNorm's parameters.

    Same parameter names and shapes as ``nn.LayerNorm`` (``scale``, ``bias``), so a student
    starts from its teacher's weights and the HF folder keeps its layout.
    """

    config: BertConfig
    site: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        bound = cfg.norm_bound(self.site)
        extra = {} if bound is None else {"bound": bound}
        norm = approx.get_norm(cfg.norm_at(self.site))
        return norm(x, scale, bias, eps=cfg.layer_norm_eps, **extra)


def _token_variances(centred: Array) -> Array:
    """Mean of squares over the last axis of ``centred`` (B, L, H) -> (B, L, 1).

    When the batch's tokens are fewer than the channels (B L <= H: every private query of
    the benchmark), read off the diagonal of one (B L x H) @ (H x B L) Gram product: under MPC
    a product reshares and truncates its outputs, (B L)^2 values here against B L H for the
    elementwise squares. The diagonal is a strided slice, free on shares. Otherwise the
    squares, which are then the smaller product.
    """
    batch, length, width = centred.shape
    tokens = batch * length
    if tokens > width:
        return jnp.mean(jnp.square(centred), -1, keepdims=True)
    flat = centred.reshape(tokens, width)
    diagonal = (flat @ flat.T).reshape(-1)[:: tokens + 1]
    return (diagonal / width).reshape(batch, length, 1)


class GramLayerNorm(nn.Module):
    """Exact LayerNorm with its variances from a Gram product (``_token_variances``).

    The same function and parameters (``scale``, ``bias``) as ``nn.LayerNorm``; used by a
    config with ``gram_variance`` (set by ``private.model.prepare``, never for training).
    """

    epsilon: float = 1e-12
    affine: bool = True  # False: the scale and bias are in the weights (``fold_norms``)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        centred = x - jnp.mean(x, -1, keepdims=True)
        normalised = centred * jax.lax.rsqrt(_token_variances(centred) + self.epsilon)
        if not self.affine:
            return normalised
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return normalised * scale + bias


def _residual_norm(config: BertConfig, site: int, name: str = "LayerNorm") -> nn.Module:
    """The residual-stream normalisation at ``site`` (0 = embedding, then 2 per layer).

    Exact LayerNorm, everywhere or at the sites a mixed ``norm_act`` keeps, is flax's own
    module (bit-identical to the checkpoints' training); every replacement is a
    ``NormApprox`` with the same parameters.
    """
    folded = site in config.folded_norm_sites  # its affine map is in the weights
    if config.norm_at(site) == "layernorm":
        if config.gram_variance:
            return GramLayerNorm(epsilon=config.layer_norm_eps, affine=not folded, name=name)
        return nn.LayerNorm(epsilon=config.layer_norm_eps, use_scale=not folded,
                            use_bias=not folded, name=name)
    if folded:
        return lambda x: x
    return NormApprox(config, site, name=name)


class _DenseParams(nn.Module):
    """The kernel and bias of a Dense layer, returned instead of applied (for fusing)."""

    in_features: int
    features: int
    stddev: float

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        kernel = self.param("kernel", nn.initializers.normal(stddev=self.stddev),
                            (self.in_features, self.features))
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,))


def _lookup(table: nn.Embed, ids: Array) -> Array:
    """Token lookup from integer ids, or from one-hot rows as a matmul.

    Under MPC the client one-hot encodes its own tokens before sharing them: a one-hot
    matmul costs no secret comparison, whereas indexing a secret table with secret ids costs
    an equality test per vocabulary entry per token.
    """
    if ids.ndim == 3:
        return jnp.einsum("blv,vh->blh", ids.astype(table.embedding.dtype), table.embedding)
    return table(ids)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array | None, token_type_ids: Array | None,
                 deterministic: bool, word_vectors: Array | None = None):
        cfg = self.config
        init = nn.initializers.normal(stddev=cfg.initializer_range)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                             name="position_embeddings")
        types = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                         name="token_type_embeddings")
        seq_len = (input_ids if word_vectors is None else word_vectors).shape[1]
        # Positions are public: they depend on the padded length only. Right padding is
        # assumed (padded positions are masked out of every attention row).
        pos = positions.embedding[cfg.position_offset: cfg.position_offset + seq_len]
        if token_type_ids is None:
            # Single-segment input: the same public row for every token, no lookup at all.
            tok_types = types.embedding[0]
        else:
            tok_types = _lookup(types, token_type_ids)
        if word_vectors is None:
            words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                             name="word_embeddings")
            word_vectors = _lookup(words, input_ids)
        # else: the client looked its tokens up in the public table itself (the table is not
        # a parameter of this call; positions, token types and the norm stay secret).
        x = word_vectors + pos[None] + tok_types
        x = _residual_norm(cfg, 0)(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


def _block_diagonal(blocks: Array) -> Array:
    """(B, H, r, c) -> (B, H*r, H*c) with block h on the diagonal and public zeros elsewhere.

    Built by concatenation, which is free under MPC (no product with a 0/1 matrix)."""
    zero = jnp.zeros_like(blocks[:, 0])
    heads = blocks.shape[1]
    rows = [jnp.concatenate([blocks[:, h] if g == h else zero for g in range(heads)], axis=-1)
            for h in range(heads)]
    return jnp.concatenate(rows, axis=1)


def _scores_block_diagonal(q: Array, k: Array) -> Array:
    """einsum("bqhd,bkhd->bhqk") as one (L x H d) @ (H d x H L) product per sequence.

    SPU 0.9.5 runs a dot_general with batch dimensions as one matmul per batch index, each
    with its own reshare and truncation: per head here, so 12 heads cost 12 rounds of
    communication where one product with a block-diagonal K^T costs one (measured, ABY3,
    BERT-base seq 128: 96 messages -> 8 + 3, bytes equal). The zeros multiply locally, so
    only local compute grows (H-fold for this product); plaintext training keeps the einsum.
    """
    batch, q_len, heads, head_dim = q.shape
    k_t = k.transpose(0, 2, 3, 1)  # (B, H, d, K)
    flat = jnp.matmul(q.reshape(batch, q_len, heads * head_dim), _block_diagonal(k_t))
    return flat.reshape(batch, q_len, heads, -1).transpose(0, 2, 1, 3)


def _context_block_diagonal(weights: Array, values: Array) -> Array:
    """einsum("bhqk,bkhd->bqhd") as one (L x H L) @ (H L x H d) product per sequence (see
    ``_scores_block_diagonal``)."""
    batch, heads, q_len, k_len = weights.shape
    w = weights.transpose(0, 2, 1, 3).reshape(batch, q_len, heads * k_len)
    flat = jnp.matmul(w, _block_diagonal(values.transpose(0, 2, 1, 3)))  # (B, Q, H d)
    return flat.reshape(batch, q_len, heads, -1)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention; with ``first_query_only`` only the first token's row is
    attended (every key and value is still read): what the last layer of a classifier
    needs, since only [CLS] reaches the pooler (``BertLayerStack``)."""

    config: BertConfig
    layer: int = 0
    first_query_only: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool,
                 key_weights: Array | None = None):
        cfg = self.config
        batch, _, hidden = x.shape
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def split(t):
            return t.reshape(batch, t.shape[1], heads, head_dim)

        # Q, K and V as one (H x 3H) product: under MPC one matmul and one truncation where
        # three would run one after another (two rounds fewer per layer). The parameters stay
        # HF's three Dense layers, unless the owner stored them fused (``stored_qkv``).
        if cfg.stored_qkv:
            kernel, bias = _DenseParams(hidden, 3 * cfg.hidden_size, cfg.initializer_range,
                                        name="qkv")()
            q, k, v = jnp.split(x @ kernel + bias, 3, axis=-1)
        else:
            parts = [_DenseParams(hidden, cfg.hidden_size, cfg.initializer_range, name=n)()
                     for n in ("query", "key", "value")]
            if cfg.fuse_qkv:
                kernel = jnp.concatenate([k for k, _ in parts], axis=1)
                bias = jnp.concatenate([b for _, b in parts])
                q, k, v = jnp.split(x @ kernel + bias, 3, axis=-1)
            else:
                q, k, v = (x @ kernel + bias for kernel, bias in parts)
        # The 1/sqrt(head_dim) scale goes on q (L x d per head) rather than on the scores
        # (L x L): the same product, half the fixed-point truncations under MPC at L = 128.
        # A model folded for MPC (``models.fold``) has it in the query weights already.
        if self.first_query_only:
            q = q[:, :1]
        q = split(q) if cfg.folded else split(q) * (1.0 / math.sqrt(head_dim))
        k, v = split(k), split(v)
        if cfg.block_diagonal_heads:
            scores = _scores_block_diagonal(q, k)
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        key_mask = mask[:, None, None, :].astype(scores.dtype)
        # probs @ v computed as (weights @ masked v) * (1 / row sums): the mask and the
        # division touch L x d elements per head instead of L x L (approx._finish). Dropout
        # on the weights equals dropout on the probabilities: the division is per row.
        bound = cfg.softmax_bound(self.layer)
        extra = {} if bound is None else {"bound": bound}
        if cfg.softmax_act in approx.PER_QUERY_KEY_WEIGHTS:
            extra["key_weights"] = key_weights  # computed once per query (BertLayerStack)
            extra["batched"] = cfg.batched_products  # set by prepare (MPC only)
            if cfg.softmax_mix < 1.0:  # training a student into it (approx.two_quad_len)
                extra["mix"] = cfg.softmax_mix
        weights, values, reciprocal = approx.get_normaliser(cfg.softmax_act)(
            scores, key_mask, values=v, **extra)
        weights = nn.Dropout(cfg.attention_probs_dropout_prob)(weights,
                                                               deterministic=deterministic)
        if cfg.block_diagonal_heads:
            context = _context_block_diagonal(weights, values)  # (B, Q, H, d)
            if reciprocal is not None:
                context = approx._normalise(context,
                                            reciprocal=reciprocal.transpose(0, 2, 1, 3))
        else:
            context = jnp.einsum("bhqk,bkhd->bhqd", weights, values)
            if reciprocal is not None:
                context = approx._normalise(context, reciprocal=reciprocal)
            context = context.transpose(0, 2, 1, 3)
        context = context.reshape(batch, -1, cfg.hidden_size)
        return context, scores


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(residual + .): HF's ``*Output`` blocks."""

    config: BertConfig
    site: int = 1

    @nn.compact
    def __call__(self, x: Array, residual: Array, deterministic: bool):
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, "dense")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return _residual_norm(cfg, self.site)(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    layer: int = 0
    first_query_only: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool,
                 key_weights: Array | None = None):
        context, scores = BertSelfAttention(self.config, self.layer, self.first_query_only,
                                            name="self")(x, mask, deterministic, key_weights)
        residual = x[:, :1] if self.first_query_only else x
        out = BertResidualOutput(self.config, 1 + 2 * self.layer, name="output")(
            context, residual, deterministic)
        return out, scores


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array):
        x = _dense(self.config, self.config.intermediate_size, "dense")(x)
        if self.config.folded and self.config.hidden_act == "quad":
            # quad's constants live in the weights of a folded model (``models.fold``).
            return approx.quad_folded(x)
        return approx.get_activation(self.config.hidden_act)(x)


class BertLayer(nn.Module):
    config: BertConfig
    layer: int = 0
    first_query_only: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool,
                 key_weights: Array | None = None):
        attended, scores = BertAttention(self.config, self.layer, self.first_query_only,
                                         name="attention")(x, mask, deterministic, key_weights)
        hidden = BertIntermediate(self.config, name="intermediate")(attended)
        out = BertResidualOutput(self.config, 2 + 2 * self.layer, name="output")(
            hidden, attended, deterministic)
        return out, scores


class BertLayerStack(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool):
        hidden_states, scores = [], []
        key_weights = None
        if self.config.client_key_weights:
            # The client sent mask / n in the mask's place: no reciprocal here at all.
            key_weights = approx.client_key_weights_scaled(mask.astype(x.dtype),
                                                           folded=self.config.folded)
        elif self.config.softmax_act in approx.PER_QUERY_KEY_WEIGHTS:
            # Once per query, shared by every layer: the normaliser's only reciprocal.
            key_weights = approx.query_key_weights(mask.astype(x.dtype),
                                                   folded=self.config.folded)
        last = self.config.num_hidden_layers - 1
        for i in range(self.config.num_hidden_layers):
            # Only [CLS] reaches the pooler: with ``cls_only_last_layer`` the last layer
            # computes its row alone (keys and values still read every token). Its hidden
            # state is then (B, 1, H).
            first_only = self.config.cls_only_last_layer and i == last
            x, s = BertLayer(self.config, i, first_only, name=str(i))(x, mask, deterministic,
                                                                      key_weights)
            hidden_states.append(x)
            scores.append(s)
        return x, tuple(hidden_states), tuple(scores)


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool):
        return BertLayerStack(self.config, name="layer")(x, mask, deterministic)


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array):
        cfg = self.config
        # tanh in BERT; under MPC SPU's own tanh series, evaluated at lower depth.
        squash = approx.spu_tanh if cfg.chebyshev_pooler and cfg.pooler_act == "tanh" \
            else approx.get_pooler(cfg.pooler_act)
        return squash(_dense(cfg, cfg.hidden_size, "dense")(x[:, 0]))


class BertModel(nn.Module):
    """The encoder with pooler, parameter tree equal to transformers' ``FlaxBertModel``.

    Returns ``(sequence_output, pooled, intermediates)`` where ``intermediates`` holds
    ``embeddings`` (B, L, H), ``hidden_states`` (one (B, L, H) per layer) and
    ``attention_scores`` (one (B, heads, L, L) per layer, scaled, before the normaliser).
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic=True,
                 word_vectors=None):
        emb = BertEmbeddings(self.config, name="embeddings")(input_ids, token_type_ids,
                                                             deterministic, word_vectors)
        x, hidden_states, scores = BertEncoder(self.config, name="encoder")(
            emb, attention_mask, deterministic)
        if self.config.folded and self.config.pooler_act == "linear":
            pooled = x[:, 0]  # the pooler's dense layer is in the classifier (models.fold)
        else:
            pooled = BertPooler(self.config, name="pooler")(x)
        intermediates = {"embeddings": emb, "hidden_states": hidden_states,
                         "attention_scores": scores}
        return x, pooled, intermediates


class BertForSequenceClassification(nn.Module):
    """BERT + pooler + dropout + linear head; the tree equals ``FlaxBertForSequenceClassification``.

    Call with ``input_ids`` (B, L) int or (B, L, vocab) one-hot, ``attention_mask`` (B, L) of
    0/1, optional ``token_type_ids``. Returns logits (B, num_labels), and the intermediates
    of ``BertModel`` as well when ``output_intermediates`` is set.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic=True,
                 output_intermediates=False, word_vectors=None):
        cfg = self.config
        _, pooled, intermediates = BertModel(cfg, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic, word_vectors)
        pooled = nn.Dropout(cfg.hidden_dropout_prob)(pooled, deterministic=deterministic)
        logits = _dense(cfg, cfg.num_labels, "classifier")(pooled)
        return (logits, intermediates) if output_intermediates else logits


# --------------------------------------------------------------------------- functional API


def init_params(config: BertConfig, rng: Array | int = 0) -> dict[str, Any]:
    """Randomly initialised parameters of ``BertForSequenceClassification(config)``."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    ids = jnp.zeros((1, 2), jnp.int32)
    return BertForSequenceClassification(config).init(rng, ids, jnp.ones((1, 2)))["params"]


def forward(config: BertConfig, params, input_ids, attention_mask, token_type_ids=None, *,
            deterministic: bool = True, output_intermediates: bool = False, rngs=None,
            word_vectors=None):
    """The model as a pure function of its parameters and inputs (config is static).

    Args:
      config: the model's hyperparameters and approximation names.
      params: the parameter tree (as from ``init_params`` or ``load_pretrained``).
      input_ids: (B, L) int token ids, or (B, L, vocab) one-hot rows (the private path), or
        None when ``word_vectors`` are given.
      attention_mask: (B, L) 0/1, 1 for real tokens.
      token_type_ids: optional (B, L) segment ids, or (B, L, type_vocab) one-hot.
      deterministic: False enables dropout (then ``rngs={"dropout": key}`` is needed).
      output_intermediates: also return the layer-wise intermediates.
      word_vectors: (B, L, hidden) rows of the word-embedding table, looked up by the caller
        (the private path of a model whose table is public); ``params`` then need no table.

    Returns:
      Logits (B, num_labels), or ``(logits, intermediates)``.
    """
    return BertForSequenceClassification(config).apply(
        {"params": params}, input_ids, attention_mask, token_type_ids, deterministic,
        output_intermediates, word_vectors, rngs=rngs)


def make_apply(config: BertConfig):
    """``apply(params, input_ids, attention_mask) -> logits``: the function SPU compiles."""

    def apply(params, input_ids, attention_mask):
        return forward(config, params, input_ids, attention_mask)

    return apply
