"""BertConfig: the hyperparameters of one BERT-family model, frozen and hashable.

Hashable so a config can be a static argument of ``jax.jit`` and a key of SPU's compile cache.
Approximations are carried by name (see ``mpcformer_jax.approx``), never as callables.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mpcformer_jax import approx

# Hugging Face's activation names -> ours (HF's "gelu" is the exact erf form).
_HF_ACT_TO_OURS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
_OURS_TO_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT or RoBERTa encoder with a sequence-classification head.

    Attributes mirror Hugging Face's ``BertConfig`` where they share a name. Beyond them:
      hidden_act: name in ``approx.GELU_APPROX`` used in every FFN ("gelu" is BERT's own).
      softmax_act: name in ``approx.SOFTMAX_APPROX`` used as the attention normaliser.
      norm_act: name in ``approx.NORM_APPROX`` used for every residual normalisation (the
        embedding's and two per layer; "layernorm" is BERT's own), or a mixed name such as
        "affine@2" that keeps exact LayerNorm at the listed sites (``approx.split_norm``).
      pooler_act: name in ``approx.POOLER_APPROX`` applied after the pooler's dense layer
        ("tanh" is BERT's own; RoBERTa's head reads the same module).
      norm_bounds: calibration constants of a calibrated norm (``approx.CALIBRATED``), one
        per normalisation site in forward order (embedding, then attention and FFN output of
        each layer); empty means the entry's default everywhere. Public, like the
        architecture: they are constants of the compiled program (``models.calibrate``).
      softmax_bounds: the same for a calibrated attention normaliser, one per layer.
      softmax_mix: below 1, a length-normalised normaliser (``approx.PER_QUERY_KEY_WEIGHTS``)
        is mixed with the row-normalised one it replaces, for training in steps
        (``DistillConfig.anneal_phases``). Training only: never exported or compiled.
      fuse_qkv: compute Q, K and V as one matmul (the parameters stay three Dense layers);
        False only to check that fusing changes nothing.
      folded: public constants are folded into the weights (``models.fold``): the attention
        scale into the query weights, quad's constants into the FFN output weights, a linear
        pooler into the classifier (no pooler parameters then). Set by the owner for private
        inference, never for training.
      block_diagonal_heads: compute the attention products of all heads as one matmul with
        a block-diagonal operand (the same values; one round instead of one per head under
        SPU, H-fold local compute). Set by ``private.model.prepare``, never for training.
      gram_variance: exact LayerNorms read their token variances off one Gram product
        (``bert.GramLayerNorm``: the same function; L x L values reshared under MPC instead
        of L x H). Set by ``private.model.prepare``, never for training.
      cls_only_last_layer: the last layer computes the [CLS] row alone (its attention
        reads every key and value; its output projection, FFN and norms run on one row):
        the only row the pooler reads, so the logits are the same. The last hidden state
        is then (B, 1, H). Set by ``private.model.prepare``, never for training.
      folded_norm_sites: normalisation sites whose per-channel affine map lives in the
        weights (``models.fold.fold_norms``, sites chosen by ``norm_fold_sites`` from the
        architecture alone): an affine site there is skipped, an exact LayerNorm there
        normalises without its scale and bias. Set by ``private.model.prepare``.
      batched_products: independent elementwise products of a layer run as one product
        op (``approx.elementwise_products``): 2quad_len's square and its values' key
        weighting. The same numbers; under MPC one round trip fewer a layer. Set by
        ``private.model.prepare``, never for training.
      chebyshev_pooler: a tanh pooler computes SPU's own tanh series (``approx.spu_tanh``:
        the polynomial SPU would evaluate, at less than half its communication depth), so
        the private forward is what SPU computed before, and within 4.9e-3 of tanh. No
        effect on another pooler. Set by ``private.model.prepare``, never for training;
        ``private.model.reference_forward`` turns it off to compare with the trained model.
      beaver_cache_weights: mark the weight matrices for SPU's Beaver cache (SEMI2K): a
        node opens each weight's mask once in its life and replays it in every later
        query, instead of once per query. Compilation only; set by ``prepare``.
      stored_qkv: the fused Q, K, V kernel and bias are stored as one parameter (``qkv``,
        made by ``prepare`` in plaintext) instead of concatenated in the forward: a weight
        that stays in a node's memory (what the Beaver cache keys on), not a fresh buffer
        per query. The same function.
      client_key_weights: the attention-mask input holds mask / n, n the row's number of
        real tokens, computed by the client (``private.model.encode_client_inputs``): it
        knows its own lengths, so a length-normalised normaliser pays no reciprocal under
        MPC at all (about 65 rounds a query under ABY3). Shared like the mask, so it tells
        no party more than the mask does. Set by ``prepare``; never exported.
      public_table_source, public_table_sha256: set when the word-embedding table is the
        public checkpoint's, unchanged (frozen through fine-tuning and distillation): the
        checkpoint to take it from and the table's hash. A private-inference client then
        looks its tokens up itself and shares vectors instead of one-hot rows.
      num_labels: classes of the head; 1 means regression (MSE, as HF's ``problem_type``).
      label_names: display names of the classes (``id2label``), empty for LABEL_i.
      is_roberta: RoBERTa's layout: positions start at ``pad_token_id + 1`` and the
        classification head's names differ (``classifier.dense``/``out_proj``).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    softmax_act: str = "softmax"
    norm_act: str = "layernorm"
    pooler_act: str = "tanh"
    norm_bounds: tuple[float, ...] = ()
    softmax_bounds: tuple[float, ...] = ()
    softmax_mix: float = 1.0
    public_table_source: str = ""
    public_table_sha256: str = ""
    fuse_qkv: bool = True
    folded: bool = False
    block_diagonal_heads: bool = False
    gram_variance: bool = False
    cls_only_last_layer: bool = False
    folded_norm_sites: tuple[int, ...] = ()
    batched_products: bool = False
    chebyshev_pooler: bool = False
    beaver_cache_weights: bool = False
    stored_qkv: bool = False
    client_key_weights: bool = False
    num_labels: int = 2
    is_roberta: bool = False
    label_names: tuple[str, ...] = ()

    def __post_init__(self):
        approx.get_activation(self.hidden_act)  # raises with the valid names
        approx.get_normaliser(self.softmax_act)
        approx.get_norm(self.norm_act)
        approx.get_pooler(self.pooler_act)
        norm, exact_sites = approx.split_norm(self.norm_act)
        object.__setattr__(self, "norm_act", approx.join_norm(norm, exact_sites))
        if exact_sites and exact_sites[-1] > 2 * self.num_hidden_layers:
            raise ValueError(
                f"norm_act {self.norm_act!r} keeps site {exact_sites[-1]} exact, but a "
                f"{self.num_hidden_layers}-layer model has sites 0..{2 * self.num_hidden_layers}"
                " (0 = embedding, 2l+1 and 2l+2 = layer l's attention and FFN outputs).")
        sites = {"norm_bounds": 1 + 2 * self.num_hidden_layers,
                 "softmax_bounds": self.num_hidden_layers}
        for field, n in sites.items():
            bounds = getattr(self, field)
            if bounds and (len(bounds) != n or not all(b > 0 for b in bounds)):
                raise ValueError(f"{field} must hold {n} positive numbers (one per site) or "
                                 f"none, got {bounds}.")
        if not 0.0 <= self.softmax_mix <= 1.0:
            raise ValueError(f"softmax_mix must be in [0, 1], got {self.softmax_mix}.")
        if self.softmax_mix < 1.0 and self.softmax_act not in approx.PER_QUERY_KEY_WEIGHTS:
            raise ValueError(f"softmax_mix {self.softmax_mix} mixes a length-normalised "
                             f"normaliser ({', '.join(sorted(approx.PER_QUERY_KEY_WEIGHTS))}) "
                             f"with 2Quad; softmax_act {self.softmax_act!r} is not one.")
        if self.client_key_weights and self.softmax_act not in approx.PER_QUERY_KEY_WEIGHTS:
            raise ValueError(f"client_key_weights: the mask input holds mask / n, which only "
                             f"a length-normalised normaliser reads "
                             f"({', '.join(sorted(approx.PER_QUERY_KEY_WEIGHTS))}); softmax_act "
                             f"{self.softmax_act!r} needs the 0/1 mask.")
        if bool(self.public_table_source) != bool(self.public_table_sha256):
            raise ValueError("public_table_source and public_table_sha256 go together: set "
                             "both (a public word-embedding table) or neither.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}."
            )
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {self.num_labels}.")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"label_names has {len(self.label_names)} names for "
                             f"{self.num_labels} labels.")
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                      "max_position_embeddings", "type_vocab_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}.")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names: ``label_names`` or LABEL_0, LABEL_1, ..."""
        return self.label_names or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    @property
    def position_offset(self) -> int:
        """First position id: RoBERTa reserves ids up to its padding index."""
        return self.pad_token_id + 1 if self.is_roberta else 0

    @property
    def max_length(self) -> int:
        """Longest token sequence the position table allows."""
        return self.max_position_embeddings - self.position_offset

    def replace(self, **changes: Any) -> BertConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def approximation(self) -> approx.Approximation:
        """The four slots' choice as one value."""
        return approx.Approximation(self.hidden_act, self.softmax_act, self.norm_act,
                                    self.pooler_act)

    def with_approximation(self, choice: approx.Approximation | str) -> BertConfig:
        """The same architecture with other approximations: how a student is made.

        Calibration constants are dropped (they belong to the old choice's sites)."""
        a = approx.Approximation.parse(choice)
        return self.replace(hidden_act=a.activation, softmax_act=a.softmax, norm_act=a.norm,
                            pooler_act=a.pooler,
                            norm_bounds=(), softmax_bounds=())

    @property
    def norm_replacement(self) -> str:
        """The registry entry that replaces LayerNorm ("affine" for "affine@2:5")."""
        return approx.split_norm(self.norm_act)[0]

    def norm_at(self, site: int) -> str:
        """The registry entry at normalisation site ``site``: "layernorm" at the sites a mixed
        ``norm_act`` keeps exact (``approx.split_norm``), its replacement elsewhere."""
        base, exact_sites = approx.split_norm(self.norm_act)
        return "layernorm" if site in exact_sites else base

    def norm_bound(self, site: int) -> float | None:
        """The calibration constant of normalisation site ``site`` (None if uncalibrated:
        the registry entry's default)."""
        return self.norm_bounds[site] if self.norm_bounds else None

    def softmax_bound(self, layer: int) -> float | None:
        """The calibration constant of layer ``layer``'s attention normaliser (None if
        uncalibrated: the registry entry's default)."""
        return self.softmax_bounds[layer] if self.softmax_bounds else None

    # ------------------------------------------------------------------ named variants
    @classmethod
    def base(cls, **overrides: Any) -> BertConfig:
        """BERT-base shape: 12 layers, hidden 768, 12 heads, FFN 3072."""
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides: Any) -> BertConfig:
        """BERT-large shape: 24 layers, hidden 1024, 16 heads, FFN 4096."""
        kw = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096)
        return cls(**{**kw, **overrides})

    @classmethod
    def minilm_l6(cls, **overrides: Any) -> BertConfig:
        """all-MiniLM-L6-v2 shape: 6 layers, hidden 384, 12 heads, FFN 1536."""
        kw = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                  intermediate_size=1536)
        return cls(**{**kw, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> BertConfig:
        """A model small enough for unit tests and SPU smoke runs (2 layers, hidden 32)."""
        kw = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
        return cls(**{**kw, **overrides})

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from a Hugging Face ``config.json`` dict (bert or roberta).

        Approximation names saved by ``to_hf_config`` (the ``mpcformer`` entry) are restored.
        """
        model_type = hf.get("model_type", "bert")
        if model_type not in ("bert", "roberta"):
            raise ValueError(
                f"Unsupported model_type {model_type!r}: mpcformer_jax loads 'bert' and "
                "'roberta' checkpoints."
            )
        act = hf.get("hidden_act", "gelu")
        if act not in _HF_ACT_TO_OURS:
            raise ValueError(f"Unsupported hidden_act {act!r} in config.json; "
                             f"supported: {', '.join(sorted(_HF_ACT_TO_OURS))}.")
        ours = hf.get("mpcformer", {})
        num_labels = hf.get("num_labels")
        if num_labels is None:
            num_labels = len(hf["id2label"]) if "id2label" in hf else 2
        if hf.get("problem_type") == "regression":
            num_labels = 1
        names = tuple(hf["id2label"][str(i)] for i in range(num_labels)) \
            if "id2label" in hf and len(hf["id2label"]) == num_labels else ()
        if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            names = ()
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout_prob=hf.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=hf.get("attention_probs_dropout_prob", 0.1),
            initializer_range=hf.get("initializer_range", 0.02),
            pad_token_id=hf.get("pad_token_id", 1 if model_type == "roberta" else 0),
            hidden_act=ours.get("hidden_act", _HF_ACT_TO_OURS[act]),
            softmax_act=ours.get("softmax_act", "softmax"),
            norm_act=ours.get("norm_act", "layernorm"),
            pooler_act=ours.get("pooler_act", "tanh"),
            norm_bounds=tuple(ours.get("norm_bounds", ())),
            softmax_bounds=tuple(ours.get("softmax_bounds", ())),
            public_table_source=ours.get("public_table", {}).get("source", ""),
            public_table_sha256=ours.get("public_table", {}).get("sha256", ""),
            num_labels=num_labels,
            is_roberta=model_type == "roberta",
            label_names=names,
        )
        return cls(**{**kw, **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict; our approximation names go in ``mpcformer``.

        ``hidden_act`` stays a name transformers understands, so the file also loads there
        (with exact activations).
        """
        model_type = "roberta" if self.is_roberta else "bert"
        arch = "RobertaForSequenceClassification" if self.is_roberta else \
            "BertForSequenceClassification"
        return {
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "hidden_act": _OURS_TO_HF_ACT.get(self.hidden_act, "gelu"),
            "num_labels": self.num_labels,
            "problem_type": "regression" if self.is_regression else "single_label_classification",
            "id2label": {str(i): n for i, n in enumerate(self.labels)},
            "label2id": {n: i for i, n in enumerate(self.labels)},
            "mpcformer": self._ours(),
        }

    def _ours(self) -> dict[str, Any]:
        if self.softmax_mix < 1.0:
            raise ValueError(f"softmax_mix {self.softmax_mix} is a training step, not a model: "
                             "export the student once its normaliser is whole (mix 1).")
        ours: dict[str, Any] = {"hidden_act": self.hidden_act, "softmax_act": self.softmax_act,
                                "norm_act": self.norm_act}
        if self.pooler_act != "tanh":  # absent means tanh: older exports read the same
            ours["pooler_act"] = self.pooler_act
        if self.norm_bounds:
            ours["norm_bounds"] = list(self.norm_bounds)
        if self.softmax_bounds:
            ours["softmax_bounds"] = list(self.softmax_bounds)
        if self.public_table_source:
            ours["public_table"] = {"source": self.public_table_source,
                                    "sha256": self.public_table_sha256}
        return ours
