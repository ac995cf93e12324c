"""Training machinery on a tiny model and synthetic data: losses, optimizer, both KD stages
end to end, resume after an interruption, NaN detection."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpcformer_jax.models import BertConfig, init_params
from mpcformer_jax.train import loop, losses, parallel
from mpcformer_jax.train.config import StageConfig
from mpcformer_jax.train.evaluation import JsonlLog
from mpcformer_jax.train.objectives import LayerwiseObjective, PredictionObjective, TaskObjective
from mpcformer_jax.train.optim import decay_mask

TEACHER = BertConfig.tiny(num_labels=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
STUDENT = TEACHER.with_approximation("quad+2quad")
BUCKETS = (16, 24)


def _run(tmp_path, name, objective, config, params, stage, data):
    ctx = loop.RunContext(mesh=parallel.make_mesh(), log=JsonlLog(tmp_path / "metrics.jsonl"),
                          metric_names=("accuracy",), buckets=BUCKETS, eval_batch_size=16)
    train, dev = data
    return loop.run_stage(name, objective, stage, config, params, train, dev,
                          tmp_path / "ckpt" / name, ctx)


def _layerwise(teacher_params, layer_map=(0, 1)):
    return LayerwiseObjective(TEACHER, teacher_params, layer_map)


def _losses(tmp_path, stage):
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x.get("stage") == stage and "loss" in x]


def test_masked_losses_ignore_padding():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 5, 5)), rng.normal(size=(2, 3, 5, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    t_changed = t.copy()
    t_changed[0, :, 3:, :] += 100.0  # padded queries of example 0
    t_changed[0, :, :, 3:] += 100.0  # padded keys of example 0
    a = losses.masked_attention_mse(jnp.asarray(s), jnp.asarray(t), mask)
    b = losses.masked_attention_mse(jnp.asarray(s), jnp.asarray(t_changed), mask)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # With no padding it is the plain mean.
    full = losses.masked_attention_mse(jnp.asarray(s), jnp.asarray(t), np.ones((2, 5)))
    np.testing.assert_allclose(full, np.mean((s - t) ** 2), rtol=1e-5)
    h_s, h_t = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 4))
    h_t2 = h_t.copy()
    h_t2[0, 3:] = 1e3
    np.testing.assert_allclose(losses.masked_hidden_mse(h_s, h_t, mask),
                               losses.masked_hidden_mse(h_s, h_t2, mask), rtol=1e-6)


def test_layerwise_loss_weights_its_terms():
    rng = np.random.default_rng(1)

    def inter():
        return {"embeddings": jnp.asarray(rng.normal(size=(2, 4, 6))),
                "hidden_states": [jnp.asarray(rng.normal(size=(2, 4, 6))) for _ in range(2)],
                "attention_scores": [jnp.asarray(rng.normal(size=(2, 3, 4, 4)))
                                     for _ in range(2)]}

    s, t, mask, w = inter(), inter(), np.ones((2, 4), np.float32), np.ones(2, np.float32)
    plain, parts = losses.layerwise_distill_loss(s, t, mask, w, (0, 1))
    np.testing.assert_allclose(plain, parts["embedding"] + parts["hidden"] + parts["attention"],
                               rtol=1e-6)
    weighted, same_parts = losses.layerwise_distill_loss(s, t, mask, w, (0, 1), (0.5, 2.0, 0.0))
    np.testing.assert_allclose(weighted, 0.5 * parts["embedding"] + 2.0 * parts["hidden"],
                               rtol=1e-6)
    assert float(same_parts["attention"]) == float(parts["attention"])  # logged unweighted


def test_soft_cross_entropy_is_minimal_at_the_teacher():
    teacher = jnp.array([[2.0, -1.0, 0.5]])
    w = jnp.ones(1)
    at_teacher = losses.prediction_distill_loss(teacher, teacher, w, False, 2.0)
    elsewhere = losses.prediction_distill_loss(teacher * 0.3, teacher, w, False, 2.0)
    assert at_teacher < elsewhere
    assert losses.prediction_distill_loss(teacher, teacher + 1, w, True) == pytest.approx(1.0)


def test_weight_decay_skips_biases_and_layernorm():
    mask = decay_mask(init_params(TEACHER, 0))
    layer = mask["bert"]["encoder"]["layer"]["0"]
    assert layer["attention"]["self"]["query"]["kernel"]
    assert not layer["attention"]["self"]["query"]["bias"]
    assert not layer["output"]["LayerNorm"]["scale"]
    assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"]


@pytest.mark.slow  # three stages trained to a learnt task: ~25 s
def test_both_stages_end_to_end_and_the_loss_falls(tmp_path, synthetic_split):
    data = synthetic_split(256, 0), synthetic_split(32, 9)
    teacher = _run(tmp_path, "teacher", TaskObjective(), TEACHER, init_params(TEACHER, 0),
                   StageConfig(epochs=4, batch_size=16, learning_rate=3e-3), data)
    assert teacher.dev["accuracy"] > 0.7
    stage = StageConfig(epochs=2, batch_size=16, learning_rate=2e-3)
    s1 = _run(tmp_path, "stage1", _layerwise(teacher.params), STUDENT, teacher.params, stage,
              data)
    s2 = _run(tmp_path, "stage2", PredictionObjective(TEACHER, teacher.params, 2.0), STUDENT,
              s1.params, stage, data)
    for name in ("teacher", "stage1", "stage2"):
        curve = _losses(tmp_path, name)
        assert np.mean(curve[-2:]) < curve[0], (name, curve)
    assert s2.dev["accuracy"] > 0.6
    # The teacher was never trained by the distillation stages.
    jax.tree_util.tree_map(np.testing.assert_array_equal, teacher.params,
                           jax.device_get(teacher.params))


@pytest.mark.slow  # two training stages
def test_fewer_student_layers_with_a_layer_map(tmp_path, synthetic_split):
    data = synthetic_split(64, 0), synthetic_split(32, 9)
    student = STUDENT.replace(num_hidden_layers=1)
    params = init_params(student, 1)
    result = _run(tmp_path, "stage1", _layerwise(init_params(TEACHER, 0), (1,)), student,
                  params, StageConfig(epochs=1, batch_size=16, max_steps=3), data)
    assert result.steps == 3
    with pytest.raises(ValueError, match="layer_map"):
        _run(tmp_path, "bad", _layerwise(init_params(TEACHER, 0), (5,)), student, params,
             StageConfig(max_steps=1), data)


def test_zero_epochs_skips_the_stage(tmp_path, synthetic_split):
    params = init_params(TEACHER, 0)
    result = _run(tmp_path, "teacher", TaskObjective(), TEACHER, params,
                  StageConfig(epochs=0), (synthetic_split(32, 0), synthetic_split(32, 9)))
    assert (result.steps, result.dev) == (0, {})
    jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                           jax.device_get(result.params))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow  # two training runs
def test_two_identical_runs_give_bit_identical_params(tmp_path, synthetic_split):
    """The same command on the same code gives the same numbers: dropout on, shuffled data,
    both KD objectives' machinery (the task loss here), a full epoch and its evaluation."""
    data = synthetic_split(64, 4), synthetic_split(32, 9)
    config = BertConfig.tiny(num_labels=2).with_approximation("quad+2quad")
    assert config.hidden_dropout_prob > 0  # the dropout RNG is part of what must repeat
    stage = StageConfig(epochs=1, batch_size=16, learning_rate=1e-3)
    a, b = (_run(tmp_path / d, "stage2", TaskObjective(), config, init_params(config, 3),
                 stage, data) for d in ("a", "b"))
    assert a.steps == b.steps == 4
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a.params),
                           jax.device_get(b.params))
    assert a.dev == b.dev
    changed = jax.tree_util.tree_map(lambda x, y: bool(np.any(np.asarray(x) != y)),
                                     jax.device_get(a.params), init_params(config, 3))
    assert any(jax.tree_util.tree_leaves(changed))  # it did train


class _Crash(RuntimeError):
    pass


@pytest.mark.slow  # four runs of one stage: ~25 s
def test_interrupted_run_resumes_to_the_same_params(tmp_path, monkeypatch, synthetic_split):
    data = synthetic_split(96, 3), synthetic_split(32, 9)
    stage = StageConfig(epochs=2, batch_size=16, learning_rate=1e-3, checkpoint_every=4)
    teacher = init_params(TEACHER, 0)
    start = init_params(STUDENT, 5)
    reference = _run(tmp_path / "a", "stage1", _layerwise(teacher), STUDENT, start, stage,
                     data)

    # Crash at step 11 (epoch 1): the last checkpoint is step 8 (checkpoint_every=4), so
    # steps 9-11 are lost and redone mid-epoch.
    real_write = JsonlLog.write

    def crashing_write(self, **record):
        if record.get("step") == 11 and "loss" in record:
            raise _Crash
        real_write(self, **record)

    monkeypatch.setattr(loop, "_LOG_EVERY", 1)
    monkeypatch.setattr(JsonlLog, "write", crashing_write)
    with pytest.raises(_Crash):
        _run(tmp_path / "b", "stage1", _layerwise(teacher), STUDENT, start, stage, data)
    monkeypatch.setattr(JsonlLog, "write", real_write)
    resumed = _run(tmp_path / "b", "stage1", _layerwise(teacher), STUDENT, start, stage,
                   data)
    assert resumed.resumed_from == 8
    assert resumed.best_step == reference.best_step
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(reference.params),
                           jax.device_get(resumed.params))
    # Running the finished stage again trains nothing and returns the same params.
    again = _run(tmp_path / "b", "stage1", _layerwise(teacher), STUDENT, start, stage, data)
    assert again.resumed_from == again.steps
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(reference.params),
                           jax.device_get(again.params))


@pytest.mark.slow  # a training stage
def test_nan_loss_stops_with_stage_and_step(tmp_path, synthetic_split):
    stage = StageConfig(epochs=1, batch_size=16, learning_rate=1e30, warmup_ratio=0.0,
                        clip_norm=0.0)
    params = jax.tree_util.tree_map(lambda x: x * 1e20, init_params(TEACHER, 0))
    with pytest.raises(loop.NonFiniteLossError, match=r"Stage 'teacher'.* at step \d+"):
        _run(tmp_path, "teacher", TaskObjective(), TEACHER, params, stage,
             (synthetic_split(64, 0), synthetic_split(32, 9)))


def test_one_compiled_predict_per_config():
    # A student's dev evaluations in both stages and its test score share one program per
    # padded length: the step is the same jitted function, and a second call with the same
    # shapes compiles nothing.
    from mpcformer_jax.train.steps import make_predict_step

    predict = make_predict_step(STUDENT)
    assert make_predict_step(STUDENT.replace()) is predict
    assert make_predict_step(TEACHER) is not predict
    params = init_params(STUDENT, jax.random.PRNGKey(0))
    ones = jnp.ones((2, 16), jnp.int32)
    batch = {"input_ids": ones, "attention_mask": ones, "token_type_ids": 0 * ones}
    first = predict(params, batch)
    compiled = predict._cache_size()  # other tests may have compiled other shapes already
    np.testing.assert_array_equal(make_predict_step(STUDENT)(params, batch), first)
    assert predict._cache_size() == compiled



def test_every_shape_is_compiled_before_the_first_step(tmp_path, synthetic_split, monkeypatch,
                                                       caplog):
    # A stage compiles its train step at every padded length, and the dev forward, side by
    # side before training (loop.compile_ahead); the loop's own calls then compile nothing.
    def compiled(fn: str) -> int:
        return sum(f"XLA compilation of jit({fn})" in r.getMessage() for r in caplog.records)

    seen = {}
    compile_ahead = loop.compile_ahead

    def spy(train_step, state, teacher_params, train_batches, rng, predict, dev_batches):
        compile_ahead(train_step, state, teacher_params, train_batches, rng, predict,
                      dev_batches)
        seen.update(lengths=sorted(b["input_ids"].shape[1] for b in train_batches),
                    dev_lengths=len(dev_batches),
                    ahead=(compiled("train_step"), compiled("predict")))

    monkeypatch.setattr(loop, "compile_ahead", spy)
    data = synthetic_split(64, 0), synthetic_split(32, 9)
    config = TEACHER.replace(intermediate_size=48)  # a config no other test compiled
    # jax logs every backend compile at DEBUG (log_compiles, a per-thread setting, would
    # miss those in compile_ahead's threads).
    with caplog.at_level("DEBUG", logger="jax._src.dispatch"):
        _run(tmp_path, "teacher", TaskObjective(), config, init_params(config, 0),
             StageConfig(epochs=1, batch_size=16, learning_rate=1e-3), data)
    assert seen["lengths"] == list(BUCKETS)
    assert seen["ahead"] == (len(BUCKETS), seen["dev_lengths"]) and seen["dev_lengths"] >= 1
    assert (compiled("train_step"), compiled("predict")) == seen["ahead"]


@pytest.mark.parametrize("attention_weight", [0.0, 0.5])
def test_cached_teacher_gives_the_losses_of_the_teacher_in_the_step(synthetic_split,
                                                                      attention_weight):
    from mpcformer_jax.data import batches
    from mpcformer_jax.train.teacher_cache import TeacherCache, estimate_bytes

    train = synthetic_split(40, seed=3)
    teacher, student = init_params(TEACHER, 0), init_params(STUDENT, 1)
    weights = (1.0, 1.0, attention_weight)
    cache = TeacherCache.build(TEACHER, teacher, train, 16, parallel.make_mesh(), BUCKETS,
                               attention=bool(attention_weight))
    held = sum(x.nbytes for x in cache.states) + cache.logits.nbytes + \
        sum(x.nbytes for x in cache.attention or [])
    assert held == estimate_bytes(TEACHER, train.lengths, bool(attention_weight))
    rng = jax.random.PRNGKey(0)
    # A filler row (index -1, weight 0) in a short last batch, and both bucket lengths.
    seen = set()
    for batch in batches(train, 16, BUCKETS, shuffle=True, seed=1, group_by_length=True):
        seen.add((batch["input_ids"].shape[1], bool((batch["index"] < 0).any())))
        plain = {k: batch[k] for k in loop.TRAIN_KEYS}
        for live, cached in [
                (LayerwiseObjective(TEACHER, teacher, (0, 1), weights),
                 LayerwiseObjective(TEACHER, teacher, (0, 1), weights, cache=cache)),
                (PredictionObjective(TEACHER, teacher, 2.0),
                 PredictionObjective(TEACHER, teacher, 2.0, cache=cache))]:
            targets = cache.targets(batch["index"], batch["input_ids"].shape[1])
            assert np.all(targets["teacher_hidden"][batch["index"] < 0] == 0)
            want, want_parts = live.loss(STUDENT, student, teacher, plain, rng)
            got, got_parts = cached.loss(STUDENT, student, None, {**plain, **targets}, rng)
            np.testing.assert_allclose(got, want, rtol=2e-5)
            assert set(got_parts) == set(want_parts) - ({"attention"} if not attention_weight
                                                        else set())
            for k in got_parts:
                np.testing.assert_allclose(got_parts[k], want_parts[k], rtol=2e-5)
    assert {length for length, _ in seen} == set(BUCKETS) and any(f for _, f in seen)


def test_a_cache_without_attention_scores_refuses_a_weighted_attention_term(synthetic_split):
    from mpcformer_jax.train.teacher_cache import TeacherCache

    train = synthetic_split(16, seed=3)
    teacher = init_params(TEACHER, 0)
    cache = TeacherCache.build(TEACHER, teacher, train, 16, parallel.make_mesh(), BUCKETS)
    with pytest.raises(ValueError, match="build it with attention=True"):
        LayerwiseObjective(TEACHER, teacher, (0, 1), (1.0, 1.0, 1.0), cache=cache).check(STUDENT)
    LayerwiseObjective(TEACHER, teacher, (0, 1), (1.0, 1.0, 0.0), cache=cache).check(STUDENT)
