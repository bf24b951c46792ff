"""report_to: each tracker gets trainer_log.jsonl's numbers and the run config, offline, and is read
back here with the tool's own reader (tensorboard, mlflow) or its file format (wandb, swanlab)."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from unittest import mock

import pytest
import yaml

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.errors import ConfigError
from lmtune.train import trackers
from lmtune.train.logs import read_log
from tests.conftest import write_yaml

TRACKER_ENV = ("WANDB_MODE", "WANDB_API_KEY", "SWANLAB_MODE", "SWANLAB_API_KEY",
               "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "SWANLAB_PROJ_NAME")


@pytest.fixture
def clean_tracker_env(monkeypatch, tmp_path):
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    # The trackers' own settings and caches stay inside the test's folder.
    home = tmp_path / "home"
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "SWANLAB_SAVE_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))


def wandb_records(path: Path):
    """The records of a W&B transaction log: a 7-byte file header, then 32 KiB blocks of chunks
    (crc u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, offset, parts = path.read_bytes(), 32768, 7, []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset: offset + 7])
        if kind == 0:
            break
        parts.append(data[offset + 7: offset + 7 + length])
        offset += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def swanlab_scalars(run_file: Path) -> dict[str, dict[int, float]]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    reader, scalars = DataStoreReader(), {}
    reader.open(run_file)
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        if record.HasField("scalar"):
            scalars.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
    reader.close()
    return scalars


def expected_series(log: list[dict]) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for record in log:
        for key, value in record.items():
            if key != "step":
                series.setdefault(trackers.metric_name(key), {})[record["step"]] = value
    return series


def assert_same_series(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, points in want.items():
        assert got[name] == pytest.approx(points), name


def test_every_tracker_gets_the_log_numbers_and_the_config_offline(tmp_path, train_config,
                                                                   clean_tracker_env):
    for module in trackers.TRACKERS:
        pytest.importorskip(module)
    out = tmp_path / "out"
    config = train_config | {"report_to": "tensorboard,mlflow,wandb,swanlab", "run_name": "tiny-run",
                             "val_size": 2, "eval_strategy": "steps", "eval_steps": 2}
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 0
    want = expected_series(read_log(out / "trainer_log.jsonl"))
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss"} <= set(want)
    assert len(want["train/loss"]) == 4 and set(want["eval/loss"]) == {0, 2, 4}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs" / "tiny-run"))
    events.Reload()
    for name, points in want.items():
        got = {e.step: e.value for e in events.Scalars(name)}
        assert got == pytest.approx(points, rel=1e-6), name
    text = events.Tensors("run_config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(text.strip("`").removeprefix("yaml\n"))["lora_rank"] == 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    assert run.data.params["lora_rank"] == "4" and run.data.params["learning_rate"] == "0.001"
    for name, points in want.items():
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert got == pytest.approx(points), name

    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged: dict[str, dict[int, float]] = {}
    config_seen = {}
    for record in wandb_records(run_file):
        if record.HasField("history"):
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            for key, value in items.items():
                if key in want:
                    logged.setdefault(key, {})[items["_step"]] = value
        if record.HasField("run") and record.run.display_name:
            assert record.run.display_name == "tiny-run"
        if record.HasField("config") or record.HasField("run"):
            source = record.config if record.HasField("config") else record.run.config
            config_seen |= {i.key: json.loads(i.value_json) for i in source.update}
    assert_same_series(logged, want)
    assert config_seen["lora_rank"] == 4

    [swan_file] = (out / "swanlog").glob("run-*/run-*.swanlab")
    assert_same_series(swanlab_scalars(swan_file), want)
    [swan_config] = (out / "swanlog").glob("run-*/files/config.yaml")
    assert yaml.safe_load(swan_config.read_text())["lora_rank"]["value"] == 4


def test_a_tracker_not_installed_stops_the_run_before_it_starts(tmp_path, train_config, capsys):
    config = train_config | {"report_to": ["tensorboard", "wandb"]}
    with mock.patch.object(trackers, "_installed", lambda name: name != "wandb"):
        assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert "report_to: wandb is not installed." in err
    assert "pip install 'lmtune[wandb]'" in err
    assert not Path(config["output_dir"]).exists()


@pytest.mark.parametrize("value,names", [
    ("none", []), (["none"], []), ("tensorboard, mlflow", ["tensorboard", "mlflow"]),
    (["wandb", "swanlab", "wandb"], ["wandb", "swanlab"]), ("all", ["tensorboard", "swanlab"]),
])
def test_report_to_forms(value, names):
    with mock.patch.object(trackers, "_installed", lambda name: name in ("tensorboard", "swanlab")
                           or name in names):
        assert trackers.tracker_names(build_config({"report_to": value})) == names


@pytest.mark.parametrize("value", ["none,wandb", "comet_ml", ["tensorboard", "neptune"]])
def test_report_to_refuses_unknown_trackers_and_none_with_others(value):
    with pytest.raises(ConfigError, match="report_to"):
        build_config({"report_to": value})


def test_online_only_when_asked_or_with_a_key_and_a_reachable_service(monkeypatch):
    monkeypatch.delenv("X_MODE", raising=False)
    monkeypatch.delenv("X_KEY", raising=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert trackers._online("X_MODE", "X_KEY", "127.0.0.1", port) == "offline"  # no key
        monkeypatch.setenv("X_KEY", "secret")
        assert trackers._online("X_MODE", "X_KEY", "127.0.0.1", port) == "online"
        monkeypatch.setenv("X_MODE", "disabled")  # the tool reads the user's own setting
        assert trackers._online("X_MODE", "X_KEY", "127.0.0.1", port) is None
    monkeypatch.delenv("X_MODE")
    assert trackers._online("X_MODE", "X_KEY", "127.0.0.1", port) == "offline"  # nothing listens
