"""Losses of the three kinds of training: task fine-tuning, layer-wise KD, prediction KD.

Every loss takes a 0/1 per-example ``weights`` array (the batcher fills a short last batch
with weight-0 rows) and averages over the real examples only.

Scale of the layer-wise (stage 1) loss. MPCFormer follows TinyBERT: ``nn.MSELoss()`` (a mean
over every element, padding included) per layer, summed over layers. Here each term is the mean
squared error over the *real* elements only, then the terms are summed (embedding output + one
hidden-state term and one attention term per mapped layer). So a term's size does not depend on
how much padding a batch carries, and the total stays comparable to MPCFormer's.

  hidden term:    sum_{b,l,h} m_bl (s - t)^2 / (H * sum_{b,l} m_bl)
  attention term: sum_{b,a,q,k} m_bq m_bk (s - t)^2 / (heads * sum_b n_b^2)

with m the token mask times the example weight and n_b the real length of example b. The
attention scores are the scaled pre-normaliser scores; a padded query or key row holds
meaningless values, hence the mask on both axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _weighted_mean(values: Array, weights: Array) -> Array:
    # max(., 1) keeps an all-filler batch (never produced in training) from dividing by 0.
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def task_loss(logits: Array, labels: Array, weights: Array, is_regression: bool) -> Array:
    """Supervised loss: cross-entropy on class ids, or MSE on a scalar target.

    Args:
      logits: (B, num_labels) model outputs (num_labels = 1 for regression).
      labels: (B,) int class ids, or float targets.
      weights: (B,) 0/1 example weights.
      is_regression: use MSE on ``logits[:, 0]``.

    Returns:
      Scalar mean loss over the weighted examples.
    """
    if is_regression:
        per_example = jnp.square(logits[:, 0] - labels.astype(logits.dtype))
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return _weighted_mean(per_example, weights)


def prediction_distill_loss(student_logits: Array, teacher_logits: Array, weights: Array,
                            is_regression: bool, temperature: float = 1.0) -> Array:
    """Stage-2 loss: soft cross-entropy at a temperature, or MSE of the outputs for regression.

    The soft cross-entropy is -sum_c softmax(t / T)_c log_softmax(s / T)_c (TinyBERT's
    ``soft_cross_entropy``, as MPCFormer uses it). It is not multiplied by T^2: that factor
    only balances a soft term against a hard-label term, and stage 2 has no hard term.

    Args:
      student_logits, teacher_logits: (B, num_labels).
      weights: (B,) 0/1 example weights.
      is_regression: use MSE instead of soft cross-entropy.
      temperature: softening temperature T > 0.

    Returns:
      Scalar mean loss over the weighted examples.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    if is_regression:
        per_example = jnp.mean(jnp.square(student_logits - teacher_logits), axis=-1)
    else:
        soft_targets = jax.nn.softmax(teacher_logits / temperature, axis=-1)
        log_probs = jax.nn.log_softmax(student_logits / temperature, axis=-1)
        per_example = -jnp.sum(soft_targets * log_probs, axis=-1)
    return _weighted_mean(per_example, weights)


def masked_hidden_mse(student: Array, teacher: Array, token_mask: Array) -> Array:
    """MSE over the real tokens of (B, L, H) hidden states.

    Args:
      student, teacher: (B, L, H).
      token_mask: (B, L) 0/1, already multiplied by the example weights.

    Returns:
      Scalar: squared error summed over real tokens and features / (H * real tokens).
    """
    sq = jnp.sum(jnp.square(student - jax.lax.stop_gradient(teacher)), axis=-1)
    denom = jnp.maximum(jnp.sum(token_mask), 1.0) * student.shape[-1]
    return jnp.sum(sq * token_mask) / denom


def masked_attention_mse(student: Array, teacher: Array, token_mask: Array) -> Array:
    """MSE over the real (query, key) pairs of (B, heads, L, L) attention scores.

    Args:
      student, teacher: (B, heads, L, L) pre-normaliser scores.
      token_mask: (B, L) 0/1, already multiplied by the example weights.

    Returns:
      Scalar: squared error summed over real query-key pairs and heads / (heads * pairs).
    """
    pair_mask = token_mask[:, None, :, None] * token_mask[:, None, None, :]
    sq = jnp.square(student - jax.lax.stop_gradient(teacher)) * pair_mask
    denom = jnp.maximum(jnp.sum(pair_mask), 1.0) * student.shape[1]
    return jnp.sum(sq) / denom


def layerwise_distill_loss(student_inter: dict, teacher_inter: dict, attention_mask: Array,
                           weights: Array, layer_map: tuple[int, ...],
                           term_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                           ) -> tuple[Array, dict]:
    """Stage-1 loss: embedding, hidden-state and attention-score MSE, summed over layers.

    MPCFormer (and TinyBERT) add the three kinds of term with equal weight. ``term_weights``
    scales them (embedding, hidden, attention): pre-softmax scores are larger numbers than
    LayerNorm'd hidden states, so with equal weights the attention term can drown the
    hidden-state terms that the prediction layer actually reads.

    Args:
      student_inter, teacher_inter: the models' ``intermediates`` (see ``models.forward``).
      attention_mask: (B, L) 0/1 token mask.
      weights: (B,) 0/1 example weights.
      layer_map: ``layer_map[i]`` is the teacher layer that student layer i imitates.
      term_weights: multipliers of the (embedding, hidden, attention) terms.

    Returns:
      ``(loss, parts)``; parts holds the unweighted summed ``embedding``, ``hidden`` and
      ``attention`` terms for logging (no ``attention`` when ``teacher_inter`` has no scores:
      a teacher cache of a run whose attention weight is 0).
    """
    token_mask = attention_mask.astype(jnp.float32) * weights[:, None]
    emb = masked_hidden_mse(student_inter["embeddings"], teacher_inter["embeddings"], token_mask)
    hidden = sum(masked_hidden_mse(student_inter["hidden_states"][i],
                                   teacher_inter["hidden_states"][j], token_mask)
                 for i, j in enumerate(layer_map))
    w_emb, w_hidden, w_attention = term_weights
    loss = w_emb * emb + w_hidden * hidden
    parts = {"embedding": emb, "hidden": hidden}
    if "attention_scores" in teacher_inter:  # a teacher cache keeps them only when weighed
        attention = sum(masked_attention_mse(student_inter["attention_scores"][i],
                                             teacher_inter["attention_scores"][j], token_mask)
                        for i, j in enumerate(layer_map))
        loss = loss + w_attention * attention
        parts["attention"] = attention
    return loss, parts
