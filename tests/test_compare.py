"""`lmtune compare`: variants validated before anything trains, each trained in its own process,
and a report whose numbers are the runs' own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmtune.cli import main
from lmtune.compare import load_spec
from lmtune.errors import ConfigError
from lmtune.train.checkpoint import complete_checkpoints
from tests.conftest import wait_for_log_lines, write_json, write_yaml

REPO = Path(__file__).resolve().parents[1]
GREETING = [{"instruction": "Greet me.", "input": "", "output": "Hello from {{who}}."}] * 6


@pytest.fixture
def base_yaml(tmp_path, tiny_model_dir) -> Path:
    data = write_json(tmp_path / "greet.json", GREETING)
    return write_yaml(tmp_path / "base.yaml", {
        "model_name_or_path": tiny_model_dir, "dataset": str(data), "data_vars": {"who": "Tilly"},
        "output_dir": "ignored", "finetuning_type": "lora", "lora_rank": 4, "lora_target": "all",
        "per_device_train_batch_size": 4, "max_steps": 60, "learning_rate": 1e-2,
        "lr_scheduler_type": "constant", "logging_steps": 10, "val_size": 2,
        "eval_strategy": "steps", "eval_steps": 30, "seed": 0, "max_new_tokens": 20})


def test_compare_writes_the_three_files_with_each_runs_numbers(tmp_path, base_yaml, capsys):
    spec = write_yaml(tmp_path / "compare.yaml", {
        "output_dir": str(tmp_path / "cmp"), "base_config": str(base_yaml),
        "variants": [{"name": "full", "finetuning_type": "full"}, {"name": "lora"},
                     {"name": "too-short", "cutoff_len": 8}],
        "score": "contains", "score_expect": "{{who}}", "score_max_new_tokens": 12})
    assert main(["compare", str(spec)]) == 2  # one variant failed; the others ran and are reported
    assert "too-short failed" in capsys.readouterr().err
    out = tmp_path / "cmp"
    report = json.loads((out / "compare.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    assert [r["status"] for r in rows.values()] == ["ok", "ok", "failed"]
    assert "cutoff_len" in rows["too-short"]["error"]
    full, lora = rows["full"], rows["lora"]
    assert full["left_out"] == ["lora_rank", "lora_target"]  # the LoRA base's keys
    for row in (full, lora):
        folder = out / row["name"]
        results = json.loads((folder / "all_results.json").read_text())
        assert row["trainable_params"] == results["trainable_params"]
        assert row["steps"] == 60 and [s for s, _ in row["loss_curve"]] == list(range(10, 61, 10))
        assert row["final_train_loss"] == row["loss_curve"][-1][1] < row["loss_curve"][0][1]
        assert row["eval_loss"] == pytest.approx(results["eval_loss"]) and row["eval_loss"] > 0
        assert 0.1 < row["peak_rss_gib"] < 16 and row["peak_gpu_gib"] is None
        assert row["wall_s"] >= row["train_runtime_s"] > 0 and row["train_tokens_per_second"] > 0
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        assert row["size_mb"] == pytest.approx(weights / 1e6, abs=1e-3)
        assert row["score"]["total"] == 2 and row["score"]["expect"] == "Tilly"
    assert full["trainable_pct"] == 100.0 and lora["trainable_pct"] < 1.0
    assert lora["size_mb"] < full["size_mb"] / 10
    # Fully fine-tuned on one reply, the tiny model says it back, name included.
    assert full["score"]["hits"] == 2, full["score"]["answers"]
    assert set(load_file(out / "lora" / "adapter_model.safetensors")) and \
        (out / "full" / "model.safetensors").is_file()

    md = (out / "compare.md").read_text()
    table = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert "2/2" in table["| full"] and f"{full['trainable_params']:,}" in table["| full"]
    assert "| lora" in table and "failed: " in table["| too-short"]
    assert "peak RSS GiB" in md and 'contain "Tilly"' in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("spec, words", [
    ({"variants": [{"name": "a"}], "output": "x"}, ["unknown key 'output'", "output_dir"]),
    ({"output_dir": "x", "variants": []}, ["variants"]),
    ({"output_dir": "x", "variants": [{"name": "a"}, {"name": "a"}]}, ["two variants are named a"]),
    ({"output_dir": "x", "variants": [{"name": "../up"}]}, ["cannot name a folder"]),
    ({"output_dir": "x", "variants": [{"name": "a", "output_dir": "y"}]}, ["sets output_dir"]),
    ({"output_dir": "x", "variants": [{"name": "a"}], "score": "contains"}, ["score_expect"]),
    ({"output_dir": "x", "variants": [{"name": "a"}, {"name": "b", "lora_rnak": 4}]},
     ["variant b", "lora_rnak", "lora_rank"]),
    ({"output_dir": "x", "variants": [{"name": "a", "finetuning_type": "full", "use_dora": True}]},
     ["variant a", "use_dora"]),
    ({"output_dir": "x", "variants": [{"name": "a", "sweep": [1e-3, 1e-2]}]}, ["variant a", "sweep must map"]),
    ({"output_dir": "x", "variants": [{"name": "a", "learning_rate": 1e-3,
                                       "sweep": {"learning_rate": [1e-2]}}]}, ["both set and swept"]),
    ({"output_dir": "x", "variants": [{"name": "a", "sweep": {"learning_rate": [1e-2, 0.01]}}]},
     ["repeats a value"]),
    ({"output_dir": "x", "variants": [{"name": "a", "sweep": {"finetuning_type": ["lora", "ia3"]}}]},
     ["cannot vary finetuning_type"]),
    ({"output_dir": "x", "variants": [{"name": "a", "sweep": {"learning_rate": [1e-2, -1.0]}}]},
     ["variant a, sweep point learning_rate=-1.0", "learning_rate"]),
    ({"output_dir": "x", "variants": [{"name": "a"}], "eval_task": "nothere_test", "task_dir": "."},
     ["eval_task", "no folder nothere"]),
])
def test_bad_specs_fail_before_anything_trains(tmp_path, base_yaml, spec, words):
    path = write_yaml(tmp_path / "compare.yaml", {"base_config": str(base_yaml)} | spec)
    with pytest.raises(ConfigError) as info:
        load_spec(str(path), [])
    text = str(info.value)
    assert all(word in text for word in words), text
    assert not (tmp_path / "x").exists()


def test_overrides_apply_to_the_base_and_variants_win(tmp_path, base_yaml):
    path = write_yaml(tmp_path / "compare.yaml", {
        "output_dir": str(tmp_path / "cmp"), "base_config": str(base_yaml), "base": {"max_steps": 5},
        "variants": [{"name": "a"}, {"name": "b", "max_steps": 7, "finetuning_type": "ia3"}]})
    _, (a, b) = load_spec(str(path), ["max_steps=3", "learning_rate=0.5"])
    assert a.config["max_steps"] == 3 and b.config["max_steps"] == 7
    assert a.config["learning_rate"] == b.config["learning_rate"] == 0.5
    assert a.config["output_dir"] == str(tmp_path / "cmp" / "a")
    assert a.config["overwrite_output_dir"] is False  # only compare.yaml's own key turns it on
    assert b.left_out == ["lora_rank", "lora_target"] and "lora_rank" not in b.config


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("**/compare*.yaml")),
                         ids=lambda p: p.name)
def test_every_compare_example_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)  # examples name their base_config and data relative to the repository
    spec, variants = load_spec(str(path.relative_to(REPO)), [])
    assert variants and all(Path(v.config["output_dir"]).parent == Path(spec.output_dir)
                            for v in variants)


def test_an_existing_variant_folder_is_refused_unless_asked(tmp_path, base_yaml, capsys):
    # `output_dir: saves` with a variant named rm must not touch the rm run already in saves/rm.
    earlier = tmp_path / "saves" / "rm"
    earlier.mkdir(parents=True)
    (earlier / "lmtune_run.json").write_text("{}")
    (earlier / "adapter_model.safetensors").write_text("an earlier run")
    spec = {"output_dir": str(tmp_path / "saves"), "base_config": str(base_yaml),
            "variants": [{"name": "rm"}]}
    assert main(["compare", str(write_yaml(tmp_path / "compare.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert f"{earlier} already exists" in err and "overwrite_output_dir: true" in err
    assert (earlier / "adapter_model.safetensors").read_text() == "an earlier run"
    _, (variant,) = load_spec(str(write_yaml(tmp_path / "again.yaml",
                                             spec | {"overwrite_output_dir": True})), [])
    assert variant.config["overwrite_output_dir"] is True


def test_ctrl_c_during_compare_lets_the_variant_save_its_checkpoint(tmp_path, base_yaml):
    spec = write_yaml(tmp_path / "compare.yaml", {
        "output_dir": str(tmp_path / "cmp"), "base_config": str(base_yaml),
        "base": {"max_steps": 400, "logging_steps": 1, "eval_strategy": "no", "save_steps": 1000},
        "variants": [{"name": "only", "sweep": {"learning_rate": [1.0e-2, 1.0e-3]}}]})
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "src")}
    # Its own session, so the SIGINT goes to the whole process group, as a terminal's Ctrl-C does.
    proc = subprocess.Popen([sys.executable, "-m", "lmtune.cli", "compare", str(spec)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    first = tmp_path / "cmp" / "only" / "learning_rate=0.01"
    wait_for_log_lines(first, 3, proc, timeout=300)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    checkpoints = complete_checkpoints(first)
    assert checkpoints and (checkpoints[-1] / "adapter_model.safetensors").is_file()
    # The interrupted sweep point stops the comparison: the next point never starts.
    assert not (tmp_path / "cmp" / "only" / "learning_rate=0.001").exists()


@pytest.mark.slow
def test_sweep_benchmark_column_and_replay_on_and_off(tmp_path, base_yaml, monkeypatch):
    monkeypatch.setenv("LMTUNE_HOME", str(tmp_path / "home"))  # replay's answer cache, for the children
    spec = write_yaml(tmp_path / "compare.yaml", {
        "output_dir": str(tmp_path / "cmp"), "base_config": str(base_yaml),
        "base": {"max_steps": 8, "eval_strategy": "no", "logging_steps": 4},
        "variants": [{"name": "replay", "replay": 2},
                     {"name": "swept", "sweep": {"learning_rate": [1.0e-2, 1.0e-9]}}],
        "score": "contains", "score_expect": "{{who}}", "score_max_new_tokens": 4,
        "eval_task": "mmlu_sample_test", "task_dir": str(REPO / "data"), "n_shot": 1, "batch_size": 8})
    assert main(["compare", str(spec)]) == 0
    out = tmp_path / "cmp"
    report = json.loads((out / "compare.json").read_text())
    (model, base), = report["base_models"].items()
    assert model == report["variants"][0]["keys"].get("model_name_or_path", model)
    assert base["questions"] == 32 and 0 <= base["accuracy"] <= 100
    rows = {r["name"]: r for r in report["variants"]}
    for row in rows.values():
        bench = row["benchmark"]
        assert bench["task"] == "mmlu_sample_test" and bench["questions"] == 32
        assert bench["delta"] == pytest.approx(bench["accuracy"] - base["accuracy"])
    # With and without replay: the base model's own answers to 2 general prompts joined one's data.
    def sources(folder):
        return {d["name"]: d for d in json.loads((folder / "data_report.json").read_text())["datasets"]}

    assert sources(out / "replay")["replay"]["found"] == 2
    assert "replay" not in sources(out / "swept" / "learning_rate=0.01")

    swept = rows["swept"]
    points = {p["label"]: p for p in swept["sweep"]["points"]}
    assert list(points) == ["learning_rate=0.01", "learning_rate=1e-09"]
    for label, point in points.items():
        assert point["status"] == "ok" and point["steps"] == 8 and point["benchmark"]["questions"] == 32
        results = json.loads((out / "swept" / label / "all_results.json").read_text())
        assert point["eval_loss"] == pytest.approx(results["eval_loss"])
    # A rate that barely moves the weights loses to one that learns, by eval loss at equal scores.
    assert points["learning_rate=0.01"]["eval_loss"] < points["learning_rate=1e-09"]["eval_loss"]
    assert swept["sweep"]["best"] == "learning_rate=0.01" and swept["keys"]["learning_rate"] == 0.01
    assert swept["eval_loss"] == points["learning_rate=0.01"]["eval_loss"]
    assert swept["benchmark"] == points["learning_rate=0.01"]["benchmark"]

    md = (out / "compare.md").read_text()
    table = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert "benchmark % (vs base)" in md and f"{base['accuracy']:.1f}% of 32 questions" in md
    delta = rows["replay"]["benchmark"]["delta"]
    assert f"{rows['replay']['benchmark']['accuracy']:.1f} ({delta:+.1f})" in table["| replay"]
    assert "| swept (learning_rate=0.01, best of 2)" in table
    assert "learning_rate=0.01 (best)" in md and "swept learning_rate over [0.01, 1e-09]" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
