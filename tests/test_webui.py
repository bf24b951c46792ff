"""lmtune webui: the handlers on the tiny model (real YAML, plan, training subprocess, chat, export),
and the page itself in Debian's headless Chromium on the default model (slow)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from lmtune.cli import main
from lmtune.config import build_config, load_config
from lmtune.infer.chat import ChatSession
from lmtune.webui.app import create_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the web UI serves its working folder, as `lmtune webui` does
    return TestClient(create_app("runs"), base_url="http://127.0.0.1")


def _form(train_config: dict, **changes) -> dict:
    return {k: v for k, v in train_config.items() if k != "output_dir"} | changes


def _wait(client: TestClient, name: str, until, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/runs/{name}").json()
        if until(run):
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {name} never got there: {run['state']}, {run['console'][-5:]}")


def _finished(run: dict) -> bool:
    assert run["state"] in ("running", "finished"), run["console"]
    return run["state"] == "finished"


def _events(response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.text.split("\n\n") if line]


def test_the_yaml_from_the_form_is_what_lmtune_train_parses(client, train_config, tmp_path):
    form = _form(train_config, freeze_trainable_layers=1)  # a freeze key: hidden for lora
    extra = "lora_dropout: 0.05\ndata_vars: {name: Orrin}\n"
    response = client.post("/api/plan", json={"name": "first", "form": form, "extra": extra})
    assert response.status_code == 200, response.text
    plan = response.json()
    written = tmp_path / "copied.yaml"
    written.write_text(plan["yaml"])
    expected = {k: v for k, v in form.items() if k != "freeze_trainable_layers"} | {
        "lora_dropout": 0.05, "data_vars": {"name": "Orrin"}, "output_dir": "runs/first/output"}
    assert load_config(written).model_dump() == build_config(expected).model_dump()
    assert "freeze_trainable_layers" not in yaml.safe_load(plan["yaml"])
    # lmtune.plan's own summary: 8 rows at batch 2 make 4 steps an epoch; max_steps is 4.
    assert "== schedule ==" in plan["summary"] and "4 optimizer steps" in plan["summary"]
    assert "trainable" in plan["summary"] and plan["config_path"] == "runs/first/train.yaml"


@pytest.mark.parametrize("name, form, extra, message", [
    ("../up", {}, "", "cannot name a folder"),
    ("ok", {"learning_rate": "fast"}, "", "learning_rate"),
    ("ok", {"lora_rnk": 4}, "", "the form has no key 'lora_rnk'"),
    ("ok", {}, "lora_rnk: 4", "did you mean 'lora_rank'"),
    ("ok", {}, "output_dir: elsewhere", "output_dir is chosen by the web UI"),
    ("ok", {}, "seed: 1", "seed is set in the form as well"),
    ("ok", {}, "- a list", "not a mapping"),
])
def test_a_bad_form_gets_one_clear_message(client, train_config, name, form, extra, message):
    response = client.post("/api/plan", json={"name": name, "form": _form(train_config) | form,
                                              "extra": extra})
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_only_loopback_names_and_same_origin_writes_are_served(client, train_config):
    assert client.get("/api/options").status_code == 200
    assert client.get("/api/options", headers={"Host": "attacker.example"}).status_code == 403
    body = {"name": "x", "form": _form(train_config)}
    foreign = client.post("/api/plan", json=body, headers={"Origin": "http://attacker.example"})
    assert foreign.status_code == 403
    assert client.post("/api/plan", json=body, headers={"Origin": "http://127.0.0.1"}).status_code == 200


def test_options_describe_the_form(client, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"b": {}, "a": {}}))
    options = client.get("/api/options").json()
    fields = {f["key"]: f for f in options["fields"]}
    assert fields["finetuning_type"]["kind"] == "choice" and "lora" in fields["finetuning_type"]["choices"]
    assert fields["lora_rank"]["methods"] == ["lora"] and fields["learning_rate"]["kind"] == "float"
    assert fields["max_samples"]["kind"] == "int" and fields["bf16"]["kind"] == "bool"
    assert options["datasets"] == ["a", "b"]


def test_a_run_trains_in_a_child_process_stops_with_a_checkpoint_and_resumes(client, train_config):
    form = _form(train_config, max_steps=60, save_steps=1000)  # the only checkpoint: the stop's
    planned = client.post("/api/plan", json={"name": "long", "form": form}).json()
    started = client.post("/api/runs", json={"name": "long", "form": form})
    assert started.status_code == 200, started.text
    assert yaml.safe_load(started.json()["yaml"]) == yaml.safe_load(planned["yaml"])
    second = client.post("/api/runs", json={"name": "other", "form": form})
    assert second.status_code == 400 and "one run trains at a time" in second.json()["error"]

    running = _wait(client, "long", lambda r: len(r["log"]) >= 1)
    assert running["state"] == "running" and running["progress"][1] == 60
    assert client.post("/api/runs/long/stop").status_code == 200
    stopped = _wait(client, "long", lambda r: r["state"] != "running")
    assert stopped["state"] == "stopped" and stopped["returncode"] == 130, stopped["console"]
    step = int(stopped["checkpoints"][-1].split("-")[1])
    assert stopped["checkpoints"] == [f"checkpoint-{step}"] and step < 60 and stopped["resumable"]
    assert not stopped["chat"]
    assert client.post("/api/runs", json={"name": "long", "form": form}).status_code == 400

    assert client.post("/api/runs/long/resume").status_code == 200
    done = _wait(client, "long", _finished)
    assert [r["step"] for r in done["log"]] == list(range(1, 61))
    console = Path("runs/long/console.log").read_text()
    assert f"resuming from runs/long/output/checkpoint-{step} at step {step}" in console
    assert done["chat"] and done["results"]["global_step"] == 60 and done["plot"]
    assert client.get("/api/runs/long/plot.png").headers["content-type"] == "image/png"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> tuple[TestClient, Path]:
    """A web UI in its own folder whose run "short" has finished (one run shared by the tests that
    chat with it or export it: each training start is a new Python process)."""
    from tests.conftest import ALPACA, write_json

    folder = tmp_path_factory.mktemp("webui")
    form = {"model_name_or_path": tiny_model_dir, "dataset": str(write_json(folder / "tiny.json", ALPACA)),
            "finetuning_type": "lora", "lora_rank": 4, "per_device_train_batch_size": 2,
            "learning_rate": 1e-3, "max_steps": 4, "logging_steps": 1, "seed": 0}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        client = TestClient(create_app("runs"), base_url="http://127.0.0.1")
        assert client.post("/api/runs", json={"name": "short", "form": form}).status_code == 200
        _wait(client, "short", _finished)
    return client, folder


@pytest.fixture
def finished_run(trained, monkeypatch) -> TestClient:
    client, folder = trained
    monkeypatch.chdir(folder)
    return client


def test_chat_streams_the_trained_models_reply(finished_run):
    client = finished_run
    messages = [{"role": "user", "content": "Say hi."}]
    response = client.post("/api/chat", json={"run": "short", "messages": messages, "max_new_tokens": 12})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response)
    pieces = [e["text"] for e in events if "text" in e]
    assert events[0] == {"model": "run short"} and events[-1] == {"done": True} and len(pieces) > 1
    # The same answer as lmtune chat gives (greedy), token for token.
    cfg = load_config(Path("runs/short/train.yaml")).model_copy(update={"max_new_tokens": 12})
    assert "".join(pieces).strip() == ChatSession.from_config(cfg).answer_once("Say hi.")


def test_chat_with_the_base_model_and_refusals(client, train_config, tmp_path):
    response = client.post("/api/chat", json={"model": train_config["model_name_or_path"],
                                              "messages": [{"role": "user", "content": "Hi"}],
                                              "max_new_tokens": 4})
    assert _events(response)[-1] == {"done": True}
    missing = client.post("/api/chat", json={"run": "nothing",
                                             "messages": [{"role": "user", "content": "Hi"}]})
    assert missing.status_code == 400 and "no run named nothing" in missing.json()["error"]
    robot = client.post("/api/chat", json={"messages": [{"role": "robot", "content": "Hi"}]})
    assert robot.status_code == 400 and robot.json()["error"].startswith("messages.0.role")


def test_export_writes_a_merged_model(finished_run):
    client = finished_run
    refused = client.post("/api/export", json={"run": "short", "export_dir": "../outside"})
    assert refused.status_code == 400 and "outside the working folder" in refused.json()["error"]
    response = client.post("/api/export", json={"run": "short", "export_dir": "merged"})
    assert response.status_code == 200, response.text
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(response.json()["files"])
    marker = json.loads(Path("merged/lmtune_export.json").read_text())
    assert marker["adapters"] == ["runs/short/output"]
    assert AutoModelForCausalLM.from_pretrained("merged").config.num_hidden_layers == 2


def test_compare_reports_below_the_working_folder(client, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = tmp_path / "saves" / "cmp"
    folder.mkdir(parents=True)
    variant = {"name": "lora", "finetuning_type": "lora", "status": "ok", "trainable_params": 10}
    (folder / "compare.json").write_text(json.dumps({"spec": {}, "variants": [variant]}))
    plt.figure().savefig(folder / "compare.png")
    assert client.get("/api/compare").json() == {"reports": ["saves/cmp"]}
    report = client.get("/api/compare/report", params={"dir": "saves/cmp"}).json()
    assert report["variants"] == [variant] and report["plot"]
    assert client.get("/api/compare/plot.png", params={"dir": "saves/cmp"}).content[:4] == b"\x89PNG"
    for elsewhere in ("..", "/etc", "saves"):
        assert client.get("/api/compare/plot.png", params={"dir": elsewhere}).status_code == 400


def test_the_server_refuses_a_public_address_unless_asked(capsys):
    assert main(["webui", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


# --- the page in a real browser ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(folder: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lmtune.cli", "webui", "--port", str(port)],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            urllib.request.urlopen(url + "/api/options", timeout=5)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("lmtune webui did not start")


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                    reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
def test_the_page_trains_the_default_model_and_chats_with_it(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data" / "identity.json", tmp_path / "data")
    info = {"identity": {"file_name": "identity.json"}}
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info))
    shots = tmp_path / "screenshots"
    server, url = _serve(tmp_path)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1280, "height": 960})
            page.goto(url)
            page.fill("#run-name", "orrin")
            page.check("input.ds[value=identity]")
            # The same two rows every step: the shortest run whose loss curve visibly falls.
            keys = {"cutoff_len": "64", "max_samples": "2", "per_device_train_batch_size": "2",
                    "max_steps": "3", "logging_steps": "1", "learning_rate": "1e-3"}
            for key, value in keys.items():
                page.fill(f"#f-{key}", value)
            page.fill("#extra", "data_vars: {name: Orrin, author: Tallis Labs}")
            page.click("#plan-btn")
            expect(page.locator("#plan-summary")).to_contain_text("3 optimizer steps (3.0 epochs)",
                                                                  timeout=60_000)
            expect(page.locator("#f-freeze_trainable_layers")).to_be_hidden()  # a freeze key
            expect(page.locator("#yaml")).to_contain_text("output_dir: saves/webui/orrin/output")
            page.screenshot(path=shots / "1-planned.png")
            page.click("#start-btn")
            expect(page.locator("#loss-plot polyline.loss-line")).to_be_visible(timeout=180_000)
            expect(page.locator("#run-state")).to_have_text("finished", timeout=120_000)
            points = page.locator("#loss-plot polyline.loss-line").get_attribute("points").split()
            assert len(points) == 3  # one per logged step
            page.screenshot(path=shots / "2-trained.png", full_page=True)
            if os.environ.get("LMTUNE_WEBUI_SCREENSHOT"):  # the README's picture
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=os.environ["LMTUNE_WEBUI_SCREENSHOT"])

            page.click("button[data-tab=chat]")
            page.select_option("#chat-model", "orrin")
            page.fill("#chat-max", "24")
            page.fill("#chat-text", "What is your name?")
            page.click("#chat-send")
            answer = page.locator(".msg.assistant.done")
            expect(answer).to_be_visible(timeout=120_000)
            expect(answer).to_contain_text("run orrin")
            page.screenshot(path=shots / "3-chat.png")
            text = answer.inner_text().removeprefix("run orrin").strip()
            assert len(text) > 0
            browser.close()
        print(f"screenshots in {shots}")
    finally:
        server.terminate()
        server.wait(timeout=30)
