"""The whole MPCFormer recipe as one importable function, ``run_pipeline(DistillConfig)``.

    teacher = fine-tune(pretrained, exact GeLU + softmax + LayerNorm)    [labels]
    for each approximation (e.g. quad+2quad, quad+2quad+affine):
        student = teacher weights + approximations (+ layer map), calibrated on the teacher
        stage 1: layer-wise KD (embeddings, hidden states, attention scores)
        stage 2: prediction KD (soft cross-entropy at a temperature / MSE)
        baseline: the same student fine-tuned on labels, no distillation
    test-split evaluation of all of them -> table; export of each student

Every stage checkpoints under ``out_dir/ckpt``; running the same config again resumes where a
killed run stopped and skips finished stages. The config is written to ``out_dir/config.json``
and a run refuses to continue a folder written by a different config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax

from mpcformer_jax.approx import (
    EXACT,
    PER_QUERY_KEY_WEIGHTS,
    Approximation,
    progressive_starts,
)
from mpcformer_jax.data import batches, load_task, tokenize_split
from mpcformer_jax.models import BertConfig, load_pretrained, resolve_checkpoint, save_pretrained
from mpcformer_jax.models.calibrate import calibrate
from mpcformer_jax.models.public_table import mark_public, word_table
from mpcformer_jax.train import parallel
from mpcformer_jax.train.config import DistillConfig, StageConfig
from mpcformer_jax.train.evaluation import JsonlLog, evaluate
from mpcformer_jax.train.loop import RunContext, run_stage
from mpcformer_jax.train.objectives import LayerwiseObjective, PredictionObjective, TaskObjective
from mpcformer_jax.train.steps import make_predict_step
from mpcformer_jax.train.teacher_cache import DeferredTeacherCache, TeacherCache, estimate_bytes

log = logging.getLogger(__name__)


def default_layer_map(n_student: int, n_teacher: int) -> tuple[int, ...]:
    """Evenly spaced teacher layers ending on the last one (TinyBERT's uniform mapping)."""
    return tuple((i + 1) * n_teacher // n_student - 1 for i in range(n_student))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A config checked against its model: what ``run_pipeline`` runs.

    Attributes:
      config: the run config.
      model_config: the teacher checkpoint's BertConfig as read from its config.json (the
        pipeline sizes the classifier head for the task).
      layer_map: the teacher layer each student layer copies and imitates in stage 1.
    """

    config: DistillConfig
    model_config: BertConfig
    layer_map: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class StudentPlan:
    """How one student of a run is trained.

    Attributes:
      approximation: the student's approximation.
      start: the run's distilled student it starts from (progressive replacement), or None
        for the teacher's weights.
      stage1: its stage 1, or None where it has none (a progressive student trained by
        stage 2 alone: ``norm_students_from="student_stage2"``, or one that differs from
        its start only in the pooler, whose layer-wise terms would go on training its start).
      stage2: whether it has a stage 2 (not for an inner link of a chain whose config sets
        ``link_stage2=False``: the next student starts from its stage-1 weights).
    """

    approximation: Approximation
    start: Approximation | None
    stage1: StageConfig | None
    stage2: bool = True


def student_plans(cfg: DistillConfig) -> list[StudentPlan]:
    """One StudentPlan per approximation of ``cfg``, in order."""
    plans, earlier = [], []
    for spelling in cfg.approximations:
        approximation = Approximation.parse(spelling)
        starts = [b for b in progressive_starts(approximation) if b in earlier]
        start = starts[0] if cfg.norm_students_from != "teacher" and starts else None
        stage1 = cfg.stage1
        if start is not None:
            pooler_only = dataclasses.replace(approximation, pooler=start.pooler) == start
            if cfg.norm_students_from == "student_stage2" or pooler_only:
                stage1 = None
            elif cfg.progressive_stage1_epochs:
                stage1 = dataclasses.replace(stage1, epochs=cfg.progressive_stage1_epochs)
        plans.append(StudentPlan(approximation, start, stage1))
        earlier.append(approximation)
    if not cfg.link_stage2:
        starts = {p.start for p in plans}
        plans = [dataclasses.replace(p, stage2=False)
                 if p.approximation in starts and p.stage1 is not None else p for p in plans]
    return plans


def check_config(cfg: DistillConfig) -> Plan:
    """Checks what the dataclass cannot check alone, before any work: that the model exists,
    that ``max_length`` fits its positions and that the layer map fits its layers.

    Returns:
      The resolved Plan (the model's config and the layer map), for ``run_pipeline``.

    Raises:
      FileNotFoundError / OSError: the model is neither a folder, a short name nor reachable.
      ValueError: max_length, the layer settings or an approximation's exact LayerNorm
        sites do not fit the model.
    """
    folder = resolve_checkpoint(cfg.model)
    hf = json.loads((folder / "config.json").read_text())
    model = BertConfig.from_hf_config(hf)
    if cfg.max_length > model.max_length:
        raise ValueError(f"max_length={cfg.max_length} exceeds the {model.max_length} positions "
                         f"of model {cfg.model!r}; use max_length <= {model.max_length}.")
    n_teacher = model.num_hidden_layers
    n_student = cfg.student_layers or n_teacher
    if n_student > n_teacher:
        raise ValueError(f"student_layers={n_student} exceeds the teacher's {n_teacher} layers.")
    layer_map = cfg.layer_map or default_layer_map(n_student, n_teacher)
    if len(layer_map) != n_student or not all(0 <= j < n_teacher for j in layer_map):
        raise ValueError(f"layer_map {layer_map} must give one teacher layer in [0, {n_teacher}) "
                         f"for each of the {n_student} student layers.")
    for choice in cfg.approximations:  # e.g. a mixed norm's sites against the student's depth
        model.with_approximation(choice).replace(num_hidden_layers=n_student)
    return Plan(cfg, model, tuple(layer_map))


# Training batches the calibration of a student reads (models.calibrate).
CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 8, 32


def make_student(teacher_config: BertConfig, teacher_params, approximation: str | Approximation,
                 layer_map: tuple[int, ...], calibration_data=None) -> tuple[BertConfig, Any]:
    """The teacher's architecture with other approximations, initialised from its weights.

    Args:
      teacher_config, teacher_params: the fine-tuned teacher.
      approximation: e.g. "quad+2quad" or "quad+2quad_newton+affine".
      layer_map: the teacher layer each student layer copies (and imitates in stage 1).
      calibration_data: training batches (dicts of input_ids, attention_mask) for the
        replacements that are calibrated on the teacher (``models.calibrate``); required
        for those.

    Returns:
      ``(student_config, student_params)``; params are host copies (the teacher is untouched).
    """
    config = teacher_config.with_approximation(approximation).replace(
        num_hidden_layers=len(layer_map))
    params = parallel.host_params(teacher_params)
    layers = params["bert"]["encoder"]["layer"]
    params["bert"]["encoder"]["layer"] = {str(i): layers[str(j)] for i, j in enumerate(layer_map)}
    start = teacher_config.replace(num_hidden_layers=len(layer_map))
    if calibration_data is None:
        from mpcformer_jax.models.calibrate import needs_calibration

        if needs_calibration(config, start):
            raise ValueError(f"{config.approximation} is calibrated on the teacher: pass "
                             "calibration_data (training batches).")
        return config, params
    return calibrate(config, params, calibration_data, start=start)


def _prepare_out_dir(cfg: DistillConfig, fresh: bool) -> Path:
    out = Path(cfg.out_dir)
    saved = out / "config.json"
    # Every process checks (so all stop together); process 0 alone deletes and writes, and the
    # others read once it is done.
    if fresh and out.exists() and any(out.iterdir()) and not saved.exists():
        raise ValueError(f"--fresh would delete {out.resolve()}, which is not empty and holds "
                         "no run (no config.json). Choose an out_dir for the run, or delete "
                         "the folder yourself.")
    parallel.sync("check fresh")
    if parallel.is_primary():
        if fresh and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    parallel.sync("prepare out_dir")
    current = json.loads(json.dumps(cfg.to_dict()))
    # A field added after the run started is absent from its config.json; at its default it
    # changes nothing, so the run still resumes.
    defaults = json.loads(json.dumps(DistillConfig().to_dict()))
    before = {**defaults, **json.loads(saved.read_text())} if saved.exists() else current
    if before != current:
        differ = ", ".join(f"{k}: {before.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
                           for k in sorted(set(before) | set(current))
                           if before.get(k) != current.get(k))
        raise ValueError(f"{out} holds a run with a different config ({saved}; {differ}). "
                         "Resume it with the same config, pass --fresh to start over, or "
                         "choose another out_dir.")
    if len(cfg.approximations) > 1:
        _check_student_link(out)  # refused now, not after the training
    parallel.sync("check out_dir")
    if parallel.is_primary():
        saved.write_text(json.dumps(current, indent=2) + "\n")
    return out


def run_pipeline(cfg: DistillConfig | Plan, *, fresh: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the whole pipeline of ``cfg``.

    Args:
      cfg: the run config, or the Plan ``check_config`` made of it (a config is checked here).
      fresh: delete ``cfg.out_dir`` first instead of resuming it.

    Returns:
      A JSON-ready dict: ``rows`` (one per model: name, approximation, dev and test metrics,
      ratio to the teacher's test score), ``exports`` (approximation -> exported student
      folder), ``seconds``.
      Also written to ``out_dir/results.json`` and, as a table, ``out_dir/results.md``:
      those two files mark a finished run. Until then ``results.partial.{json,md}`` hold the
      rows tested so far, so a student that fails late loses none of the scores before it.
    """
    start = time.time()
    plan = cfg if isinstance(cfg, Plan) else check_config(cfg)
    cfg = plan.config
    parallel.maybe_initialize_distributed()
    out = _prepare_out_dir(cfg, fresh)
    run_log = JsonlLog(out / "metrics.jsonl")
    run_log.write(event="start", config=cfg.to_dict(), devices=jax.device_count())
    mesh = parallel.make_mesh()

    task = load_task(cfg.task, max_examples={"train": cfg.max_train or None,
                                             "dev": cfg.max_dev or None,
                                             "test": cfg.max_test or None},
                     subsample_seed=cfg.seed)
    teacher_config, params, tokenizer = load_pretrained(
        cfg.model, num_labels=task.num_labels, seed=cfg.seed,
        label_names=tuple(task.label_names or ()))
    # The pretrained table, which a frozen table must still equal at export.
    public_table = word_table(params).copy() if cfg.public_word_embeddings else None
    if tokenizer is None:
        raise ValueError(f"Model {cfg.model!r} has no tokenizer files.")
    data = {name: tokenize_split(split, tokenizer, cfg.max_length, teacher_config.max_length)
            for name, split in task.splits.items()}
    run_log.write(event="data", task=cfg.task, **{k: len(v) for k, v in data.items()})
    ctx = RunContext(mesh=mesh, log=run_log, metric_names=tuple(task.metrics),
                     buckets=cfg.buckets or None, eval_batch_size=cfg.eval_batch_size,
                     seed=cfg.seed, run_config=cfg.to_dict(),
                     frozen=("word_embeddings",) if cfg.public_word_embeddings else ())

    def stage(name, objective, stage_cfg, config, start_params, ckpt):
        return run_stage(name, objective, stage_cfg, config, start_params, data["train"],
                         data["dev"], ckpt, ctx)

    def annealed(name, objective, stage_cfg, config, start_params, ckpt, start_config):
        # A normaliser that stops dividing rows by their sums, mixed in over phases
        # (DistillConfig.anneal_phases); each phase resumes from its own checkpoints.
        phases = cfg.anneal_phases
        if phases < 2 or stage_cfg.epochs == 0 or \
                config.softmax_act not in PER_QUERY_KEY_WEIGHTS or \
                start_config.softmax_act in PER_QUERY_KEY_WEIGHTS:
            return stage(name, objective, stage_cfg, config, start_params, ckpt)
        part = dataclasses.replace(stage_cfg, epochs=max(1, stage_cfg.epochs // phases),
                                   learning_rate=cfg.anneal_learning_rate or
                                   stage_cfg.learning_rate)
        for k in range(1, phases):
            start_params = stage(f"{name} mix {k}/{phases}", objective, part,
                                 config.replace(softmax_mix=k / phases), start_params,
                                 ckpt.with_name(f"{ckpt.name}_mix{k}of{phases}")).params
        return stage(name, objective, part, config, start_params, ckpt)

    def export(path, config, model_params):
        # Every process holds the same params; one writer keeps the folder swap atomic.
        host = parallel.host_params(model_params)
        if public_table is not None:
            config = mark_public(config, host, cfg.model, public_table)
        return save_pretrained(path, config, host, tokenizer) if parallel.is_primary() else path

    def test_score(config, model_params, desc):
        return evaluate(make_predict_step(config), model_params, data["test"], task.metrics,
                        cfg.eval_batch_size, mesh, ctx.buckets, desc=desc)

    teacher = stage("teacher", TaskObjective(), cfg.teacher, teacher_config, params,
                    out / "ckpt" / "teacher")
    rows = [{"model": "teacher", "approximation": EXACT.name, "dev": teacher.dev.get("main"),
             "test": test_score(teacher_config, teacher.params, "teacher test")}]
    export(out / "teacher", teacher_config, teacher.params)
    teacher_main = rows[0]["test"]["main"]

    def record(final=False):
        # The rows so far, with their ratio to the teacher: results.* once finished, else
        # results.partial.*; each file replaced whole, so a reader never sees half of one.
        for row in rows:
            row["vs_teacher"] = row["test"]["main"] / teacher_main if teacher_main else None
        results = {"name": cfg.name, "task": cfg.task,
                   "sizes": {k: len(v) for k, v in data.items()}, "rows": rows,
                   "exports": exports, "seconds": round(time.time() - start, 1)}
        if parallel.is_primary():
            stem = "results" if final else "results.partial"
            _write_atomic(out / f"{stem}.json", json.dumps(results, indent=2) + "\n")
            _write_atomic(out / f"{stem}.md", format_table(results) + "\n")
            if final:
                for suffix in (".json", ".md"):
                    (out / f"results.partial{suffix}").unlink(missing_ok=True)
        return results

    exports = {}
    record()

    cache = _teacher_cache(cfg, teacher_config, teacher.params, data["train"], ctx, run_log)
    layerwise = LayerwiseObjective(teacher_config, teacher.params, plan.layer_map,
                                   cfg.layerwise_weights, cache=cache)
    prediction = PredictionObjective(teacher_config, teacher.params, cfg.temperature,
                                     cache=cache)
    calibration_data = list(itertools.islice(batches(
        data["train"], CALIBRATION_BATCH_SIZE, ctx.buckets, shuffle=True, seed=cfg.seed),
        CALIBRATION_BATCHES))
    distilled = {}  # approximation -> (config, params) of its KD student
    for student in student_plans(cfg):
        approximation = student.approximation
        choice = approximation.name
        where = out if len(cfg.approximations) == 1 else out / choice
        ckpt = out / "ckpt" / choice
        progressive = student.start is not None
        if progressive:
            # Progressive replacement: the network first learned quad and 2quad with its
            # LayerNorms; the replaced sites are now fitted to that student's own LayerNorm
            # outputs (models.calibrate), a replaced normaliser takes over that student's
            # weights, and distillation goes on from there.
            start_config, base_params = distilled[student.start.name]
            began = time.time()
            student_config, student_params = calibrate(
                start_config.with_approximation(approximation),
                parallel.host_params(base_params), calibration_data, start=start_config)
            run_log.write(event="calibrated", stage=choice,
                          seconds=round(time.time() - began, 1))
        else:
            start_config = teacher_config
            student_config, student_params = make_student(
                teacher_config, teacher.params, choice, plan.layer_map, calibration_data)
        if student.stage1 is None:
            s2 = annealed(f"{choice} stage2", prediction, cfg.stage2, student_config,
                          student_params, ckpt / "stage2", start_config)
        else:
            s1 = annealed(f"{choice} stage1", layerwise, student.stage1, student_config,
                          student_params, ckpt / "stage1", start_config)
            s2 = stage(f"{choice} stage2", prediction, cfg.stage2, student_config,
                       s1.params, ckpt / "stage2") if student.stage2 else s1
        distilled[choice] = (student_config, s2.params)
        rows.append({"model": "student (KD)" if student.stage2 else "student (stage 1)",
                     "approximation": choice, "dev": s2.dev.get("main"),
                     "test": test_score(student_config, s2.params, f"{choice} student test")})
        exports[choice] = str(export(where / "student", student_config, s2.params))
        record()
        if cfg.run_baseline:
            if progressive:  # no distilled weights in a no-distillation baseline (and its
                # calibration constants are the teacher-started student's)
                student_config, student_params = make_student(
                    teacher_config, teacher.params, choice, plan.layer_map, calibration_data)
            base = stage(f"{choice} baseline", TaskObjective(), cfg.baseline, student_config,
                         student_params, ckpt / "baseline")
            rows.append({"model": "baseline (no KD)", "approximation": choice,
                         "dev": base.dev.get("main"),
                         "test": test_score(student_config, base.params,
                                            f"{choice} baseline test")})
            record()
    if len(cfg.approximations) > 1 and parallel.is_primary():
        _link_student(out, cfg.approximations[-1])
    results = record(final=True)
    run_log.write(event="results", **results)
    return results


def teacher_cache_plan(cfg: DistillConfig, config: BertConfig, train) -> tuple[bool, int]:
    """``(cached, bytes)``: whether the run caches its teacher's outputs on ``train`` (on, and
    within ``cfg.teacher_cache_gib``) and how large that cache is. Attention scores are kept
    only when the stage-1 loss weighs them."""
    size = estimate_bytes(config, train.lengths, bool(cfg.layerwise_weights[2]))
    return bool(cfg.teacher_cache_gib) and size <= cfg.teacher_cache_gib * 2**30, size


def _teacher_cache(cfg: DistillConfig, config: BertConfig, params, train, ctx: RunContext,
                   log: JsonlLog) -> DeferredTeacherCache | None:
    """The teacher's outputs on the training split when ``teacher_cache_plan`` says so (else
    None: each step runs the teacher), built when a step first needs them. Logged as a
    ``teacher_cache`` event."""
    if not cfg.teacher_cache_gib:
        return None
    cached, size = teacher_cache_plan(cfg, config, train)
    if not cached:
        log.write(event="teacher_cache", cached=False, gib=round(size / 2**30, 2))
        return None
    attention = bool(cfg.layerwise_weights[2])

    def build() -> TeacherCache:
        start = time.time()
        cache = TeacherCache.build(config, params, train, ctx.eval_batch_size, ctx.mesh,
                                   ctx.buckets, attention=attention)
        log.write(event="teacher_cache", cached=True, gib=round(size / 2**30, 2),
                  seconds=round(time.time() - start, 1))
        return cache

    return DeferredTeacherCache(build, attention)


def _link_student(out: Path, last: str) -> None:
    """Points ``out/student`` at the last listed student's export, the run's product (a
    progressive chain's end): the folder to serve, ``spu_run --model out/student``.

    A relative symlink, made beside and renamed into place, so ``out/student`` always names a
    whole export and ``ls -l`` says which student it is.
    """
    link, target = _check_student_link(out), Path(Approximation.parse(last).name) / "student"
    tmp = out / f".student.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def _check_student_link(out: Path) -> Path:
    """``out/student``, refused if something other than the run's link is there."""
    link = out / "student"
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} is a folder, not the link to the run's last student; "
                              "move it away or use a fresh out_dir.")
    return link


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table: one row per model, test metrics and % of the teacher."""
    rows = results["rows"]
    names = [k for k in rows[0]["test"] if k != "main"]
    head = ["model", "approximation", "dev main", *[f"test {n}" for n in names], "% of teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        dev = "-" if r["dev"] is None else f"{r['dev']:.4f}"
        ratio = "-" if r["vs_teacher"] is None else f"{100 * r['vs_teacher']:.1f}%"
        cells = [r["model"], r["approximation"], dev,
                 *[f"{r['test'][n]:.4f}" for n in names], ratio]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = results["sizes"]
    lines.append(f"\n{results['task']}: train {sizes['train']}, dev {sizes['dev']}, test "
                 f"{sizes['test']} examples; {results['seconds']:.0f} s.")
    return "\n".join(lines)
