"""What the benchmark compares: approximation pairs, model shapes and protocols."""

from __future__ import annotations

import dataclasses

from mpcformer_jax.approx import Approximation, split_norm
from mpcformer_jax.models import BertConfig


@dataclasses.dataclass(frozen=True)
class Variant:
    """An approximation choice under its benchmark name."""

    name: str
    approximation: Approximation

    @classmethod
    def of(cls, text: str) -> Variant:
        a = Approximation.parse(text)
        return cls(a.label, a)


# Every variant runs under the same compiler and runtime options (one ClusterConfig per
# protocol); "exact" is BERT itself and "floor" is the same network with nothing in the
# nonlinearities' places (LayerNorm kept), the cost no approximation can go below.
VARIANTS: tuple[Variant, ...] = tuple(Variant.of(t) for t in (
    "exact", "quad+2quad", "quad+2relu", "gelu+2quad", "quad+softmax", "puma+puma",
    "quad+2quad_newton", "quad+2quad_newton+layernorm_newton", "quad+2quad+affine",
    "quad+2quad_newton+affine",
    "floor"))
EXACT, FLOOR = "exact", "floor"


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape and input length; ``config(layers)`` builds it with ``layers`` layers.

    ``fit_layers``: the layer counts actually run; cost is linear in the number of encoder
    layers (every layer is the same computation), so the full depth is extrapolated from them
    (see ``measure.extrapolate``). ``layers`` is the depth reported.
    """

    name: str
    seq_len: int
    layers: int
    fit_layers: tuple[int, int] = (1, 2)
    small: bool = False

    hidden: int = 768  # FFN = 4 x hidden, BERT's vocabulary
    heads: int = 0     # 0: hidden / 64 (BERT's head size)

    def fit_layers_for(self, approximation: Approximation) -> tuple[int, int]:
        """The layer counts run for ``approximation``: ``fit_layers``, moved deeper when a
        mixed norm (``approx.split_norm``) keeps exact LayerNorm in a later layer, so that
        both runs hold every exact site and differ by one layer like all the others (the
        line through them is then exact again). The last layer of each run must be an
        ordinary one too: a prepared model computes it for [CLS] alone
        (``cls_only_last_layer``), so an exact site there would cost less than in the full
        model."""
        _, exact_sites = split_norm(approximation.norm)
        last_layer = max(((s - 1) // 2 for s in exact_sites if s > 0), default=-1)
        first = max(self.fit_layers[0], last_layer + 2)
        return self.fit_layers if first == self.fit_layers[0] else (first, first + 1)

    def config(self, layers: int) -> BertConfig:
        if self.small:
            return BertConfig.tiny(num_hidden_layers=layers)
        return BertConfig.base(num_hidden_layers=layers, hidden_size=self.hidden,
                               num_attention_heads=self.heads or self.hidden // 64,
                               intermediate_size=4 * self.hidden)


SHAPES = {
    "base-128": Shape("base-128", 128, 12),
    "base-512": Shape("base-512", 512, 12),
    # CHEETAH on 2 cores and 23 GB: with the one-hot lookup BERT-base at seq 32 was killed
    # for memory (14 GB); with a public table BERT-base at seq 128 runs, all 12 layers, at a
    # peak of 21.3 GB (one FFN matmul alone peaks at 17 GB; README, issue 10). A 4-layer,
    # hidden-256 BERT with the real vocabulary, and the tiny model, fit either way.
    "base-32": Shape("base-32", 32, 12),
    "mini-32": Shape("mini-32", 32, 4, hidden=256),
    # The default student's shape (all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads) at the
    # issue-10 query, one text of 16 tokens; run at full depth (--full-depth) for its compute.
    "minilm-16": Shape("minilm-16", 16, 6, hidden=384, heads=12),
    "tiny-16": Shape("tiny-16", 16, 2, small=True),
}
PROTOCOLS = ("ABY3", "SEMI2K", "CHEETAH")


def get_variants(names: list[str] | None) -> list[Variant]:
    """The variants named (all by default): a listed name, or any approximation spelling."""
    if not names:
        return list(VARIANTS)
    by_name = {v.name: v for v in VARIANTS}
    return [by_name[n] if n in by_name else Variant.of(n) for n in names]
