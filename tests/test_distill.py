"""The pipeline and its entry point: config validation before any work, overrides, config
files, students with a layer map, and a whole pipeline run on a tiny checkpoint."""

import dataclasses
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import experiments.configs
from experiments import distill
from experiments.configs import common
from mpcformer_jax.models import BertConfig, forward, init_params, load_pretrained
from mpcformer_jax.pipeline import (
    check_config,
    default_layer_map,
    make_student,
    run_pipeline,
    student_plans,
)
from mpcformer_jax.train.checkpoint import StageCheckpoints
from mpcformer_jax.train.config import DistillConfig, StageConfig, apply_overrides

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ bad configs fail early


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="no_such_task"), "Unknown task 'no_such_task'. Available tasks are: rt"),
    (dict(approximations=("quad+3quad",)), "Unknown softmax approximation '3quad'"),
    (dict(approximations=("cubic+2quad",)), "Unknown activation approximation 'cubic'"),
    (dict(approximations=("quad",)), "must read '<gelu>\\+<softmax>'"),
    (dict(layerwise_weights=(1.0, 1.0)), "layerwise_weights must be 3 weights"),
    (dict(layerwise_weights=(1.0, -1.0, 1.0)), "layerwise_weights must be 3 weights"),
])
def test_bad_configs_fail_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kwargs)
    with pytest.raises(ValueError, match="Unknown schedule 'cosine'"):
        StageConfig(schedule="cosine")


def test_unknown_model_and_too_long_max_length_fail_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        run_pipeline(DistillConfig(model=str(tmp_path / "no_such_model"), out_dir=str(out)))
    with pytest.raises(ValueError, match="max_length=1024 exceeds the 512 positions"):
        run_pipeline(DistillConfig(max_length=1024, out_dir=str(out)))
    with pytest.raises(ValueError, match="student_layers=8 exceeds"):
        check_config(DistillConfig(student_layers=8))
    assert not out.exists()  # nothing was written


def test_cli_reports_bad_configs_and_unknown_keys(capsys):
    assert distill.main(["--set", "task=nope"]) == 2
    assert "Unknown task 'nope'" in capsys.readouterr().err
    assert distill.main(["--set", "stage1.epochz=2"]) == 2
    assert "Unknown config key 'stage1.epochz'. Valid keys here are: epochs" in \
        capsys.readouterr().err
    assert distill.main(["--config", "nope"]) == 2
    assert "Unknown config 'nope'" in capsys.readouterr().err
    assert distill.main(["--set", "max_length=600", "--set", "buckets=600"]) == 2
    assert "exceeds the 512 positions" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["common", "__init__", "", "common:smoke", "configs.default"])
def test_cli_names_the_valid_configs_for_a_module_that_is_not_one(spec, capsys):
    assert distill.main(["--config", spec, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"Unknown config {spec.partition(':')[0]!r}. Available configs are: " \
        "banking77_full, clinc150_full" in err
    assert "default" in err and "common" not in err.split("Available")[1]
    assert "Traceback" not in err


@pytest.mark.parametrize("override, message", [
    ("stage1.learning_rate=nan", "learning_rate must be a finite number > 0, got nan"),
    ("stage1.learning_rate=inf", "learning_rate must be a finite number > 0, got inf"),
    ("stage2.learning_rate=-1e-4", "learning_rate must be a finite number > 0, got -0.0001"),
    ("teacher.weight_decay=-1", "weight_decay must be a finite number >= 0"),
    ("baseline.clip_norm=nan", "clip_norm must be a finite number >= 0"),
    ("stage1.warmup_ratio=1", "warmup_ratio must be a finite number in [0, 1)"),
    ("stage1.batch_size=-1", "batch_size must be >= 1, got -1"),
    ("stage1.batch_size=0", "batch_size must be >= 1, got 0"),
    ("stage1.epochs=-1", "epochs must be >= 0, got -1"),
    ("stage1.epochs=1.5", "stage1.epochs=1.5: expected an integer"),
    ("stage1.evals_per_epoch=0", "evals_per_epoch must be >= 1"),
    ("eval_batch_size=0", "eval_batch_size must be >= 1"),
    ("temperature=nan", "temperature must be a finite number > 0, got nan"),
    ("layerwise_weights=nan,1,1", "layerwise_weights must be 3 weights >= 0 and finite"),
    ("buckets=0,64", "buckets (0, 64) must be lengths >= 2"),
    ("buckets=16,x", "buckets=16,x: expected comma-separated integers"),
    ("run_baseline=maybe", "run_baseline=maybe: expected true or false"),
    ("model=", "model is empty"),
    ("out_dir=", "out_dir is empty"),
    ("stage1=2", "is a group"),
    ("stage1.epochs", "must read key=value"),
])
def test_cli_rejects_bad_values_with_a_clear_error(override, message, capsys):
    assert distill.main(["--set", override, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_zero_epochs_is_a_valid_way_to_skip_a_stage(capsys):
    assert distill.main(["--set", "stage1.epochs=0", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["stage1"]["epochs"] == 0


def test_fresh_never_deletes_a_folder_that_holds_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and holds no run"):
        run_pipeline(DistillConfig(out_dir=str(tmp_path)), fresh=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(DistillConfig(), [
        "stage1.epochs=2", "stage2.learning_rate=3e-5", "approximations=quad+2quad,quad+2relu",
        "buckets=32,64", "run_baseline=false", "task=trec"])
    assert cfg.stage1.epochs == 2 and cfg.stage2.learning_rate == 3e-5
    assert cfg.approximations == ("quad+2quad", "quad+2relu") and cfg.buckets == (32, 64)
    assert cfg.run_baseline is False and cfg.task == "trec"
    with pytest.raises(ValueError, match="is a group"):
        apply_overrides(cfg, ["stage1=3"])


def test_every_config_file_builds_validates_and_documents_its_command():
    names = [m.name for m in pkgutil.iter_modules(experiments.configs.__path__)
             if m.name != "common"]
    assert "default" in names and len(names) >= 4
    assert distill.config_names() == sorted(names)
    for name in names:
        module = importlib.import_module(f"experiments.configs.{name}")
        assert "python -m experiments.distill" in module.__doc__, name
        for variant in ("", "smoke"):
            cfg = distill.load_config(f"{name}:{variant}" if variant else name)
            check_config(cfg)
        assert distill.load_config(f"{name}:smoke").out_dir.endswith("_smoke")
        if name != "default":  # the *_full configs: the 2-core run on every example
            full, cpu_full = distill.load_config(name), distill.load_config(f"{name}:cpu_full")
            check_config(cpu_full)
            assert (cpu_full.max_train, cpu_full.approximations) == (0, ("quad+2quad",))
            assert cpu_full.buckets[-1] == full.max_length and len(cpu_full.buckets) > \
                len(full.buckets)
            assert (cpu_full.teacher, cpu_full.stage1) == (full.teacher, full.stage1)
            assert cpu_full.out_dir == f"{full.out_dir}_cpu_full"
            for base in ("cpu", "cpu_full"):  # issue 19's chain on that run's data and stages
                chain = distill.load_config(f"{name}:{base}_len_sites")
                check_config(chain)
                run = distill.load_config(f"{name}:{base}")
                assert chain.approximations == common.len_sites_chain()
                assert (chain.max_train, chain.teacher, chain.stage1) == \
                    (run.max_train, run.teacher, run.stage1)
                assert chain.out_dir == f"{run.out_dir}_len_sites" and not chain.run_baseline
            shipped = distill.load_config(f"{name}:cpu_full_shipped")
            check_config(shipped)
            assert shipped.approximations == common.SHIPPED_CHAIN and not shipped.link_stage2
            assert (shipped.teacher, shipped.stage1, shipped.max_train) == \
                (cpu_full.teacher, cpu_full.stage1, 0)
    for variant in ("quad2quad", "pairs", "norms", "len", "len_affine", "len_sites",
                    "len_sites_2_6", "shipped_linear"):
        check_config(distill.load_config(f"default:{variant}"))
    # The default trains the shipped student at the end of its chain; quad2quad is the
    # pre-issue-19 default, MPCFormer's pair beside its baseline.
    default = distill.load_config("default")
    assert default.approximations[-1] == common.SHIPPED == "quad+2quad_len+affine@4:8"
    assert [p.stage2 for p in student_plans(default)] == [False, False, True]
    classic = distill.load_config("default:quad2quad")
    assert classic.approximations == ("quad+2quad",) and classic.run_baseline
    assert distill.load_config("default:len_sites").approximations[-1] == \
        "quad+2quad_len+affine@4:8+linear"
    pairs = distill.load_config("default:pairs")
    assert len(pairs.approximations) == 4
    assert pairs.out_dir != distill.load_config("default").out_dir
    with pytest.raises(ValueError, match="available: smoke, quad2quad, pairs"):
        distill.load_config("default:nope")
    with pytest.raises(ValueError, match="available: smoke, cpu_full, cpu_full_len_sites, "
                                         "cpu_full_shipped, cpu, cpu_len_sites"):
        distill.load_config("rt_full:nope")
    assert common.fine_buckets(64) == (16, 24, 32, 48, 64)
    assert common.fine_buckets(32) == (16, 24, 32) and common.fine_buckets(100)[-2:] == (96, 100)


def test_the_recorded_default_table_is_what_format_table_prints_for_it():
    from mpcformer_jax.pipeline import format_table

    def row(model, approximation, dev, test, ratio):
        return {"model": model, "approximation": approximation, "dev": dev,
                "test": {"main": test, "accuracy": test}, "vs_teacher": ratio}
    # Test accuracies as the run counted them: right answers of 965 (the AVX-512 EPYC's run).
    results = {"rows": [row("teacher", "gelu+softmax", 0.7550, 762 / 965, 1.0),
                        row("student (stage 1)", "quad+2quad", 0.7375, 763 / 965, 763 / 762),
                        row("student (stage 1)", "quad+2quad_len", 0.7475, 764 / 965,
                            764 / 762),
                        row("student (KD)", "quad+2quad_len+affine@4:8", 0.7600, 745 / 965,
                            745 / 762)],
               "sizes": {"train": 1600, "dev": 400, "test": 965}, "task": "rt", "seconds": 1.0}
    printed = format_table(results)
    epyc = "AuthenticAMD family 25 model 17 avx512"
    assert distill.table_rows(printed) == distill.expected_table("default", epyc)
    assert "1 s." in printed and "1 s." not in distill.table_rows(printed)  # time: not a result
    # Each CPU its own table: the same machine with XLA capped at AVX2 printed another.
    assert distill.expected_table("default", epyc.replace("avx512", "avx2")) != \
        distill.expected_table("default", epyc)
    results["rows"][3]["test"]["accuracy"] = 0.7959  # one figure moved: no longer equal
    assert distill.table_rows(format_table(results)) != distill.expected_table("default", epyc)
    assert distill.expected_table("rt_full") is None
    assert distill.expected_table("default", "unknown") is None


def test_host_cpu_names_the_isa_xla_compiles_for(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cpu = distill.host_cpu()
    assert cpu == "unknown" or " family " in cpu and cpu.split()[-1] in ("avx512", "avx2", "sse")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    assert cpu == "unknown" or distill.host_cpu().endswith(" avx2")


def test_check_expected_refuses_before_any_work(capsys, monkeypatch):
    assert distill.main(["--check-expected", "--set", "stage1.epochs=1"]) == 2
    assert "stage1.epochs=1 would change it" in capsys.readouterr().err
    assert distill.main(["--config", "rt_full", "--check-expected"]) == 2
    assert "records no expected table" in capsys.readouterr().err
    monkeypatch.setattr(distill, "host_cpu", lambda: "GenuineIntel family 6 model 85 avx512")
    assert distill.main(["--check-expected"]) == 2
    err = capsys.readouterr().err
    assert "no table for this CPU (GenuineIntel family 6 model 85 avx512)" in err
    assert "AuthenticAMD family 25 model 17 avx512" in err


# ------------------------------------------------------------------ students


def test_student_copies_the_mapped_teacher_layers():
    assert default_layer_map(6, 6) == (0, 1, 2, 3, 4, 5)
    assert default_layer_map(3, 6) == (1, 3, 5)
    teacher_cfg = BertConfig.tiny(num_hidden_layers=4)
    teacher = init_params(teacher_cfg, 0)
    cfg, params = make_student(teacher_cfg, teacher, "quad+2relu", (1, 3))
    assert (cfg.hidden_act, cfg.softmax_act, cfg.num_hidden_layers) == ("quad", "2relu", 2)
    layers = params["bert"]["encoder"]["layer"]
    np.testing.assert_array_equal(layers["1"]["output"]["dense"]["kernel"],
                                  teacher["bert"]["encoder"]["layer"]["3"]["output"]["dense"][
                                      "kernel"])
    layers["0"]["output"]["dense"]["kernel"][:] = 0  # a copy: the teacher is untouched
    assert np.any(teacher["bert"]["encoder"]["layer"]["1"]["output"]["dense"]["kernel"] != 0)


# ------------------------------------------------------------------ whole pipeline


def _tiny_run(tmp_path, tiny_checkpoint, approximations, steps: int, examples: int,
              **fields) -> DistillConfig:
    """A one-layer student of the tiny checkpoint on ``examples`` rt training snippets (half
    as many dev and test), every stage ``steps`` steps, in ``tmp_path / "run"``."""
    stage = StageConfig(epochs=1, batch_size=16, max_steps=steps, learning_rate=1e-3)
    return DistillConfig(name="tiny", task="rt", model=str(tiny_checkpoint),
                         max_train=examples, max_dev=examples // 2, max_test=examples // 2,
                         max_length=32, buckets=(32,), student_layers=1,
                         approximations=approximations, teacher=stage, stage1=stage,
                         stage2=stage, baseline=stage, eval_batch_size=16,
                         out_dir=str(tmp_path / "run"), **fields)


def test_a_folder_where_the_student_link_goes_is_refused_before_any_work(tmp_path,
                                                                        tiny_checkpoint):
    # A chain links out/student to its last export at the end; a real folder there (say,
    # an export copied in by hand) is refused at the start, not after the training.
    cfg = _tiny_run(tmp_path, tiny_checkpoint, ("quad+2quad", "quad+2quad+affine"), 1, 32)
    kept = tmp_path / "run" / "student" / "config.json"
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    with pytest.raises(FileExistsError, match="is a folder, not the link"):
        run_pipeline(cfg)
    assert kept.read_text() == "{}"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


@pytest.mark.slow  # every stage of the pipeline compiled once: ~40 s
def test_pipeline_end_to_end_on_a_tiny_checkpoint(tmp_path, tiny_checkpoint):
    cfg = _tiny_run(tmp_path, tiny_checkpoint,
                    ("quad+2quad", "quad+2quad+affine@1", "quad+2quad_len+affine"), 3, 64,
                    public_word_embeddings=True, norm_students_from="student_stage2",
                    anneal_phases=2)
    results = run_pipeline(cfg)
    # The affine student started from the distilled quad+2quad student: no stage 1 of its own.
    ckpt = tmp_path / "run" / "ckpt"
    assert (ckpt / "quad+2quad" / "stage1").exists()
    assert not (ckpt / "quad+2quad+affine@1" / "stage1").exists()
    assert (ckpt / "quad+2quad+affine@1" / "stage2").exists()
    # So did the length-normalised one (a new normaliser and affine norms at once), its
    # normaliser mixed in over two phases: half 2Quad, then whole.
    assert not (ckpt / "quad+2quad_len+affine" / "stage1").exists()
    assert (ckpt / "quad+2quad_len+affine" / "stage2_mix1of2").exists()
    assert (ckpt / "quad+2quad_len+affine" / "stage2").exists()
    assert not (ckpt / "quad+2quad+affine@1" / "stage2_mix1of2").exists()
    assert [r["model"] for r in results["rows"]] == ["teacher"] + \
        ["student (KD)", "baseline (no KD)"] * 3
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    student = Path(results["exports"]["quad+2quad"])
    config, _, _ = load_pretrained(student)
    assert (config.hidden_act, config.softmax_act, config.num_hidden_layers) == \
        ("quad", "2quad", 1)
    assert config.label_names == ("rotten", "fresh")
    # The frozen table is the checkpoint's, bit for bit, and the export says where it is from.
    from mpcformer_jax.models.public_table import load_public_table, word_table

    _, exported, _ = load_pretrained(student)
    np.testing.assert_array_equal(word_table(exported), load_public_table(config))
    assert config.public_table_source == str(tiny_checkpoint)
    affine, _, _ = load_pretrained(results["exports"]["quad+2quad+affine@1"])
    assert affine.norm_act == "affine@1"
    assert affine.public_table_sha256 == config.public_table_sha256
    length_normalised, _, _ = load_pretrained(results["exports"]["quad+2quad_len+affine"])
    assert (length_normalised.softmax_act, length_normalised.norm_act) == ("2quad_len", "affine")
    # A second run with the same config resumes: every stage is already done, so the
    # teacher's outputs are not computed again (the cache is built at a stage's first step).
    def cache_builds():
        events = [json.loads(line) for line in
                  (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        return sum(e.get("event") == "teacher_cache" and e.get("cached") for e in events)

    assert cache_builds() == 1
    again = run_pipeline(cfg)
    assert again["rows"] == results["rows"]
    assert cache_builds() == 1
    with pytest.raises(ValueError, match="different config.*; stage1: .*0.5"):
        run_pipeline(apply_overrides(cfg, ["stage1.learning_rate=0.5"]))
    # A run saved before a field existed resumes while the field keeps its default, and
    # not once it is set.
    saved = tmp_path / "run" / "config.json"
    older = json.loads(saved.read_text())
    del older["progressive_stage1_epochs"]
    saved.write_text(json.dumps(older))
    assert run_pipeline(cfg)["rows"] == results["rows"]
    saved.write_text(json.dumps(older))
    with pytest.raises(ValueError, match="progressive_stage1_epochs: 0 -> 3"):
        run_pipeline(dataclasses.replace(cfg, progressive_stage1_epochs=3))


@pytest.mark.slow  # three students trained: ~40 s
def test_progressive_links_take_their_own_stage_one_or_none(tmp_path, tiny_checkpoint):
    cfg = _tiny_run(tmp_path, tiny_checkpoint,
                    ("quad+2quad", "quad+2quad_len", "quad+2quad_len+layernorm+linear"), 2, 32,
                    run_baseline=False, norm_students_from="student",
                    progressive_stage1_epochs=1)
    # 32 examples in batches of 16: 2 steps an epoch; stage 1 runs 3 epochs, a link 1.
    cfg = dataclasses.replace(cfg, stage1=StageConfig(epochs=3, batch_size=16,
                                                      learning_rate=1e-3))
    results = run_pipeline(cfg)
    done = {r["stage"]: r["steps"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                                .read_text().splitlines())
            if r.get("event") == "done"}
    assert done["quad+2quad stage1"] == 6
    assert done["quad+2quad_len stage1"] == 2
    assert done["quad+2quad_len stage2"] == done["quad+2quad stage2"] == 2
    # A student that differs from its start only in the pooler is stage 2 of that start.
    ckpt = tmp_path / "run" / "ckpt"
    assert not (ckpt / "quad+2quad_len+layernorm+linear" / "stage1").exists()
    assert (ckpt / "quad+2quad_len+layernorm+linear" / "stage2").exists()
    config, _, _ = load_pretrained(results["exports"]["quad+2quad_len+layernorm+linear"])
    assert (config.softmax_act, config.norm_act, config.pooler_act) == \
        ("2quad_len", "layernorm", "linear")
    with pytest.raises(ValueError, match="progressive_stage1_epochs must be >= 0"):
        dataclasses.replace(cfg, progressive_stage1_epochs=-1)


@pytest.mark.slow  # two students trained: ~25 s
def test_an_inner_link_without_stage_two_hands_on_its_stage_one_weights(tmp_path,
                                                                         tiny_checkpoint):
    cfg = _tiny_run(tmp_path, tiny_checkpoint, ("quad+2quad", "quad+2quad_len"), 2, 32,
                    run_baseline=False, norm_students_from="student", link_stage2=False)
    results = run_pipeline(cfg)
    ckpt = tmp_path / "run" / "ckpt"
    assert (ckpt / "quad+2quad" / "stage1").exists()
    assert not (ckpt / "quad+2quad" / "stage2").exists()
    assert (ckpt / "quad+2quad_len" / "stage2").exists()
    assert [(r["model"], r["approximation"]) for r in results["rows"]] == [
        ("teacher", "gelu+softmax"), ("student (stage 1)", "quad+2quad"),
        ("student (KD)", "quad+2quad_len")]
    # The chain's end is the run's product: out/student points at it.
    link = tmp_path / "run" / "student"
    end = Path(results["exports"]["quad+2quad_len"]).resolve()
    assert link.is_symlink() and link.resolve() == end
    # The exported inner student is its stage-1 checkpoint, the next link's start.
    _, exported, _ = load_pretrained(results["exports"]["quad+2quad"])
    stage1, _ = StageCheckpoints(ckpt / "quad+2quad" / "stage1").restore_best(exported)
    for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(stage1),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_inner_links_skip_stage_two_only_when_the_config_says_so():
    chain = ("quad+2quad", "quad+2quad_len", "quad+2quad_len+affine@4:8",
             "quad+2quad_len+affine@4:8+linear", "quad+2relu")
    cfg = DistillConfig(task="rt", approximations=chain, norm_students_from="student",
                        run_baseline=False)
    assert [p.stage2 for p in student_plans(cfg)] == [True] * 5
    plans = student_plans(dataclasses.replace(cfg, link_stage2=False))
    # Every student another starts from hands its stage-1 weights on (the pooler-only
    # +linear student, which has no stage 1, starts its stage 2 from @4:8's stage 1); the
    # ends of the chains (the +linear student, quad+2relu) learn the teacher's predictions.
    assert [(p.approximation.name, p.stage1 is not None, p.stage2) for p in plans] == [
        ("quad+2quad", True, False), ("quad+2quad_len", True, False),
        ("quad+2quad_len+affine@4:8", True, False),
        ("quad+2quad_len+affine@4:8+linear", False, True), ("quad+2relu", True, True)]


def _cli(tiny_checkpoint, out_dir, extra=()):
    return [sys.executable, "-m", "experiments.distill", "--config", "default:smoke",
            "--set", f"model={tiny_checkpoint}", "--set", f"out_dir={out_dir}",
            "--set", "max_length=32", "--set", "buckets=32", "--set", "stage1.max_steps=30",
            "--set", "stage1.epochs=4", "--set", "stage1.checkpoint_every=5",
            "--set", "stage1.learning_rate=1e-3", "--set", "run_baseline=false", *extra]


@pytest.mark.slow  # three CLI runs of the tiny pipeline: ~2 min
def test_sigkilled_cli_run_resumes_to_the_same_result(tmp_path, tiny_checkpoint):
    import signal
    import time

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # The reference run also fills an opt-in compile cache (written, never read back here).
    ref = subprocess.run(_cli(tiny_checkpoint, tmp_path / "ref",
                              ("--compile-cache", str(tmp_path / "xla"))),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert any((tmp_path / "xla").iterdir())

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tiny_checkpoint, out), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once stage 1 has logged step 10 (of 30)
        steps = [json.loads(x).get("step", 0) for x in log.read_text().splitlines()
                 if "stage1" in x] if log.exists() else []
        if steps and max(steps) >= 10:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()  # results.json marks a finished run
    partial = json.loads((out / "results.partial.json").read_text())
    assert [r["model"] for r in partial["rows"]] == ["teacher"]  # the score before the kill
    assert partial["rows"][0]["vs_teacher"] == 1.0
    again = subprocess.run(_cli(tiny_checkpoint, out), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert '"event": "resumed"' in log.read_text()
    rows = [json.loads((d / "results.json").read_text())["rows"] for d in (tmp_path / "ref", out)]
    assert rows[0] == rows[1]
    assert not (out / "results.partial.json").exists() and not (out / "results.partial.md").exists()
    assert rows[0][0]["test"] == partial["rows"][0]["test"]  # the resumed teacher, same score
    weights = [(d / "student" / "model.safetensors").read_bytes() for d in (tmp_path / "ref", out)]
    assert weights[0] == weights[1]


@pytest.mark.slow  # compiles nine stages' steps: ~30 s
def test_profile_run_lays_out_every_stage_as_the_pipeline_runs_it(tiny_checkpoint, capsys):
    from experiments import profile_run

    out = profile_run.main([
        "--config", "default:smoke", "--set", f"model={tiny_checkpoint}", "--set", "max_length=32",
        "--set", "buckets=32", "--steps", "2",
        "--set", "approximations=quad+2quad,quad+2quad_len,quad+2quad_len+layernorm+linear",
        "--set", "norm_students_from=student", "--set", "progressive_stage1_epochs=1",
        "--set", "stage1.epochs=2", "--set", "stage1.max_steps=0"])
    # 128 smoke examples in batches of 16: 8 steps an epoch; the other stages stop at 4
    # (smoke's max_steps). The 2quad_len link takes one stage-1 epoch; the pooler-only link
    # has no stage 1; the inner links no stage 2 (the default's link_stage2=False), and the
    # default trains no baseline.
    assert [(r["stage"], r["steps"]) for r in out["rows"]] == [
        ("teacher", 4), ("stage1", 16), ("stage1", 8), ("stage2", 4)]
    for row in out["rows"]:
        assert [length for length, _, _ in row["cells"]] == [32]
        assert all(n > 0 and s > 0 for _, n, s in row["cells"])
    assert out["total_s"] == pytest.approx(out["train_s"] + out["compile_s"] + out["eval_s"])
    assert "estimated wall time" in capsys.readouterr().out


def _calibration_batches(config, n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, config.vocab_size, (4, 12))
        mask = np.ones_like(ids)
        mask[:2, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.slow  # calibrates four students
def test_calibrated_students_get_bounds_fits_and_finite_outputs():
    from mpcformer_jax.models.calibrate import MARGIN

    teacher_cfg = BertConfig.tiny(num_hidden_layers=2)
    teacher = init_params(teacher_cfg, 0)
    data = _calibration_batches(teacher_cfg)
    with pytest.raises(ValueError, match="calibration_data"):
        make_student(teacher_cfg, teacher, "quad+2quad+affine", (0, 1))

    cfg, params = make_student(teacher_cfg, teacher, "quad+2quad_newton+layernorm_newton",
                               (0, 1), data)
    assert len(cfg.norm_bounds) == 5 and len(cfg.softmax_bounds) == 2
    # The embedding site's bound: MARGIN x the largest token variance entering it.
    _, inter = forward(teacher_cfg.with_approximation("quad+2quad"), teacher,
                       data[0]["input_ids"], data[0]["attention_mask"],
                       output_intermediates=True)
    for b in data:
        logits = np.asarray(forward(cfg, params, b["input_ids"], b["attention_mask"]))
        assert np.all(np.isfinite(logits))
    assert all(v > 0 for v in cfg.norm_bounds) and cfg.norm_bounds[0] < MARGIN * 10

    # affine: the per-channel least-squares fit keeps each channel's mean over real tokens.
    cfg, params = make_student(teacher_cfg, teacher, "quad+2quad+affine", (0, 1), data)
    exact_student = teacher_cfg.with_approximation("quad+2quad")
    ids = np.concatenate([b["input_ids"] for b in data])
    mask = np.concatenate([b["attention_mask"] for b in data]).astype(bool)
    _, ours = forward(cfg, params, ids, mask, output_intermediates=True)
    _, ref = forward(exact_student, teacher, ids, mask, output_intermediates=True)
    np.testing.assert_allclose(np.asarray(ours["embeddings"])[mask].mean(0),
                               np.asarray(ref["embeddings"])[mask].mean(0), atol=1e-4)
    assert not np.allclose(params["bert"]["embeddings"]["LayerNorm"]["scale"],
                           teacher["bert"]["embeddings"]["LayerNorm"]["scale"])

    # affine with site 2 (layer 0's FFN output) kept exact: that site keeps its teacher's
    # LayerNorm and its flax module; every other site is fitted.
    cfg, params = make_student(teacher_cfg, teacher, "quad+2quad+affine@2", (0, 1), data)
    assert cfg.norm_act == "affine@2" and [cfg.norm_at(i) for i in range(5)] == \
        ["affine", "affine", "layernorm", "affine", "affine"]
    layers, t_layers = params["bert"]["encoder"]["layer"], teacher["bert"]["encoder"]["layer"]
    np.testing.assert_array_equal(layers["0"]["output"]["LayerNorm"]["scale"],
                                  t_layers["0"]["output"]["LayerNorm"]["scale"])
    assert not np.allclose(layers["1"]["output"]["LayerNorm"]["scale"],
                           t_layers["1"]["output"]["LayerNorm"]["scale"])
    for b in data:
        assert np.all(np.isfinite(np.asarray(forward(cfg, params, b["input_ids"],
                                                     b["attention_mask"]))))


def test_affine_sites_are_fitted_in_order_on_the_fitted_network_before_them():
    import flax.linen as nn

    from mpcformer_jax.models.bert import BertForSequenceClassification
    from mpcformer_jax.models.calibrate import _fit, _fit_affine_in_order

    probe = BertConfig.tiny(num_hidden_layers=2).with_approximation("quad+2quad")
    params = init_params(probe, 0)
    data = _calibration_batches(probe)
    replaced = np.array([True, True, False, True, True])
    fits = _fit_affine_in_order(probe, params, data, replaced)
    assert sorted(fits) == [0, 1, 3, 4]
    # Reference, one site at a time: site k's input with the sites before it already
    # replaced by their fits, against the exact network's output, over every real token.
    ids = np.concatenate([b["input_ids"] for b in data])
    mask = np.concatenate([b["attention_mask"] for b in data])
    model = BertForSequenceClassification(probe)

    def norm_io(fitted_before: int):
        seen = []

        def swap(next_fun, args, kwargs, ctx):
            if not (isinstance(ctx.module, nn.LayerNorm) and ctx.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            i, x = len(seen), args[0]
            exact = next_fun(*args, **kwargs)
            seen.append((np.asarray(x)[mask.astype(bool)], np.asarray(exact)[mask.astype(bool)]))
            if i < fitted_before and replaced[i]:
                return x * fits[i][0] + fits[i][1]
            return exact

        with nn.intercept_methods(swap):
            model.apply({"params": params}, ids, mask)
        return seen

    targets = [y for _, y in norm_io(0)]
    for k in fits:
        slope, intercept = _fit(norm_io(k)[k][0], targets[k])
        np.testing.assert_allclose(fits[k][0], slope, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(fits[k][1], intercept, rtol=1e-4, atol=1e-5)


def test_calibration_fits_only_what_differs_from_the_start():
    from mpcformer_jax.models.calibrate import calibrate

    base = BertConfig.tiny(num_hidden_layers=2)
    params = init_params(base, 0)
    data = _calibration_batches(base)
    student = base.with_approximation("quad+2quad_len+affine")
    # From an exact-LayerNorm network every site is fitted.
    _, fitted = calibrate(student, params, data, start=base.with_approximation("quad+2quad"))
    assert not np.allclose(fitted["bert"]["embeddings"]["LayerNorm"]["scale"],
                           params["bert"]["embeddings"]["LayerNorm"]["scale"])
    # From a network whose norms are affine already (the quad+2quad+affine student), the
    # norms keep their trained weights: nothing to calibrate.
    same, same_params = calibrate(student, params, data,
                                  start=base.with_approximation("quad+2quad+affine"))
    assert same is student and same_params is params


# ------------------------------------------------------------------ norm_sites


@pytest.mark.slow  # 6 calibrations and dev evaluations, each compiled: ~60 s
def test_norm_sites_greedy_search_on_a_tiny_run(tmp_path, tiny_checkpoint, capsys):
    from experiments import norm_sites
    from mpcformer_jax.models import save_pretrained

    _, _, tokenizer = load_pretrained(tiny_checkpoint)
    run = tmp_path / "run"
    cfg = DistillConfig(name="tiny", task="rt", model=str(tiny_checkpoint), max_train=64,
                        max_dev=32, max_test=32, max_length=32, buckets=(32,),
                        out_dir=str(run))
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    student = BertConfig.tiny(vocab_size=tokenizer.vocab_size, max_position_embeddings=64,
                              hidden_act="quad", softmax_act="2quad")
    save_pretrained(run / "quad+2quad" / "student", student, init_params(student, 0), tokenizer)

    rows = norm_sites.main([str(run), "--max-sites", "1", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == rows  # stdout holds the rows and nothing else
    assert rows[0]["norm"] == "layernorm" and rows[0]["exact_sites"] == [0, 1, 2, 3, 4]
    assert rows[1]["norm"] == "affine" and rows[1]["exact_sites"] == []
    assert [r["norm"] for r in rows[2:]] == [f"affine@{s}" for s in range(5)]
    assert all(0.0 <= r["main"] <= 1.0 and r["main"] == r["accuracy"] for r in rows)
    assert all(len(r["max_hidden"]) == 2 and all(0 < h < 1e3 for h in r["max_hidden"])
               for r in rows)
    named = norm_sites.main([str(run), "--sites", "1:3", "4", "--json"])
    assert [r["norm"] for r in named] == ["layernorm", "affine@1:3", "affine@4"]
    # The all-exact row is the search's, and a named set scores as the search scored it.
    assert named[0] == rows[0] and named[2] == rows[2 + 4]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="beyond this model's 0..4"):
        norm_sites.main([str(run), "--sites", "2:5"])

    with pytest.raises(SystemExit, match="not a distillation run"):
        norm_sites.main([str(tmp_path), "--json"])
    with pytest.raises(SystemExit, match="no 'quad\\+2relu' student; it has: quad\\+2quad\\."):
        norm_sites.main([str(run), "--student", "quad+2relu"])
    assert capsys.readouterr().out == ""  # refused before the table's header
    affine = student.replace(norm_act="affine")
    save_pretrained(run / "quad+2quad+affine" / "student", affine, init_params(affine, 0),
                    tokenizer)
    with pytest.raises(SystemExit, match="already replaces LayerNorm"):
        norm_sites.main([str(run), "--student", "quad+2quad+affine"])


def test_check_config_refuses_exact_sites_beyond_the_student_before_any_training():
    with pytest.raises(ValueError, match="a 6-layer model has sites 0..12"):
        check_config(DistillConfig(approximations=("quad+2quad+affine@20",)))
    with pytest.raises(ValueError, match="a 2-layer model has sites 0..4"):
        check_config(DistillConfig(approximations=("quad+2quad+affine@5",), student_layers=2))
    check_config(DistillConfig(approximations=("quad+2quad+affine@12",)))


def test_norm_students_from_needs_the_exact_layernorm_student_listed_first():
    ok = DistillConfig(approximations=("quad+2quad", "quad+2quad+affine@2"),
                       norm_students_from="student")
    assert ok.norm_students_from == "student"
    with pytest.raises(ValueError, match="list 'quad\\+2quad' before it"):
        DistillConfig(approximations=("quad+2quad+affine@2", "quad+2quad"),
                      norm_students_from="student_stage2")
    with pytest.raises(ValueError, match="norm_students_from must be one of teacher, student"):
        DistillConfig(norm_students_from="baseline")
    with pytest.raises(ValueError, match="anneal_phases must be >= 0"):
        DistillConfig(anneal_phases=-1)
    with pytest.raises(ValueError, match="anneal_learning_rate must be a finite number >= 0"):
        DistillConfig(anneal_learning_rate=float("nan"))
    # A replaced normaliser starts from its exact-LayerNorm form or from 2quad's student.
    DistillConfig(approximations=("quad+2quad", "quad+2quad_len+affine"),
                  norm_students_from="student")
    with pytest.raises(ValueError, match="list 'quad\\+2quad' before it"):
        DistillConfig(approximations=("quad+2quad_len",), norm_students_from="student")
    with pytest.raises(ValueError, match="list 'quad\\+2quad\\+affine' or 'quad\\+2quad_len' or "
                       "'quad\\+2quad' before"):
        DistillConfig(approximations=("quad+2quad_len+affine",), norm_students_from="student")


def test_compile_cache_is_off_unless_asked_for_and_refuses_a_file(tmp_path, capsys):
    from experiments.distill import enable_compile_cache, main

    assert enable_compile_cache(None) is None
    assert enable_compile_cache("None") is None
    file = tmp_path / "cache"
    file.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file: give a folder"):
        enable_compile_cache(str(file))
    assert main(["--config", "default:smoke", "--compile-cache", str(file),
                 "--set", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_the_command_prefers_the_legacy_cpu_runtime_but_main_leaves_the_environment(
        monkeypatch, capsys):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert distill.main(["--print-config"]) == 0  # in-process: what later subprocesses see
    assert "XLA_FLAGS" not in os.environ
    assert distill.prefer_legacy_cpu_runtime() == "--xla_cpu_use_thunk_runtime=false"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert distill.prefer_legacy_cpu_runtime() == \
        "--xla_force_host_platform_device_count=2 --xla_cpu_use_thunk_runtime=false"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")  # the user's choice
    assert distill.prefer_legacy_cpu_runtime() == "--xla_cpu_use_thunk_runtime=true"
