"""The web UI's routes: a page served from static/ and a JSON API it calls.

Train: the form's keys become a YAML file (checked by lmtune.config as `lmtune train` checks it),
`lmtune.plan` summarises it, and the run trains in a child process (runs.py). Chat: streamed as
server-sent events from a ChatSession, loaded as `lmtune chat` loads it. Compare: compare.json and
compare.png of `lmtune compare` outputs below the working folder. Export: `lmtune export` of a run.

The page can start processes and read the working folder, and it has no login, so the server binds
127.0.0.1 and answers only requests addressed to a loopback name (a DNS-rebinding page cannot reach
it) and only same-origin writes (another site's page cannot post to it).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from lmtune.compare.spec import REPORT_JSON, REPORT_PNG
from lmtune.config import build_config, load_config
from lmtune.errors import ConfigError, LmtuneError, ModelError
from lmtune.train.logs import PLOT_FILE
from lmtune.webui.runs import (CONFIG_FILE, FORM_KEYS, Runs, child_env, field_spec, lmtune_command,
                               read_dataset_names)

STATIC = Path(__file__).parent / "static"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class RunForm(BaseModel):
    name: str
    form: dict[str, Any] = Field(default_factory=dict)
    extra: str = ""


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    messages: list[Message] = Field(min_length=1)
    run: str | None = Field(None, description="a finished run's name; None: the base model")
    model: str = Field("default", description="the base model (model_name_or_path) when run is None")
    sample: bool = False
    max_new_tokens: int = Field(256, ge=1, le=4096)


class ExportRequest(BaseModel):
    run: str
    export_dir: str


class ChatModels:
    """The one chat model kept in memory (a second would double the memory for little gain)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._key: tuple | None = None
        self._session = None

    def get(self, key: tuple, load: Callable[[], Any]):
        with self.lock:
            if key != self._key:
                self._key, self._session = None, None  # the old model goes before the new one loads
                self._session, self._key = load(), key
            return self._session


def _host(value: str) -> str:
    return urlsplit(f"//{value}").hostname or ""


def create_app(runs_dir: str = "saves/webui", any_host: bool = False) -> FastAPI:
    """The web UI for the current working folder; runs go into runs_dir below it."""
    app = FastAPI(title="lmtune", docs_url=None, redoc_url=None, openapi_url=None)
    runs = Runs(runs_dir)
    models = ChatModels()
    app.state.runs = runs

    @app.middleware("http")
    async def same_origin(request: Request, call_next):
        host = request.headers.get("host", "")
        if not any_host and _host(host) not in LOOPBACK:
            return JSONResponse({"error": f"host {host!r} is not this machine's loopback name"}, 403)
        origin = request.headers.get("origin")
        if request.method != "GET" and origin and urlsplit(origin).netloc != host:
            return JSONResponse({"error": f"requests from {origin} are not accepted"}, 403)
        return await call_next(request)

    @app.exception_handler(LmtuneError)
    async def user_error(request: Request, exc: LmtuneError):
        return JSONResponse({"error": str(exc)}, 400)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "the request"
        return JSONResponse({"error": f"{where}: {first['msg']}"}, 400)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/options")
    def options():
        return {"fields": [field_spec(k) for k in FORM_KEYS],
                "datasets": read_dataset_names("data"), "runs_dir": runs.root.as_posix(),
                "runs": [runs.summary(n) for n in runs.names()], "running": runs.running()}

    @app.get("/api/datasets")
    def datasets(dataset_dir: str = "data"):
        return {"names": read_dataset_names(dataset_dir)}

    @app.post("/api/plan")
    def plan(body: RunForm):
        from lmtune.plan import build_plan, plan_lines

        values = runs.compose(body.name, body.form, body.extra)
        result, data, _ = build_plan(build_config(values, source="the form"))
        return {"yaml": _yaml(values), "summary": "\n".join(plan_lines(result, data.report)),
                "warnings": result["warnings"],
                "config_path": (runs.folder(body.name) / CONFIG_FILE).as_posix()}

    @app.get("/api/runs")
    def list_runs():
        return {"runs": [runs.summary(n) for n in runs.names()], "running": runs.running()}

    @app.post("/api/runs")
    def start(body: RunForm):
        values = runs.compose(body.name, body.form, body.extra)
        runs.write_config(body.name, values)
        runs.start(body.name)
        return runs.details(body.name)

    @app.get("/api/runs/{name}")
    def run_details(name: str):
        return runs.details(name)

    @app.post("/api/runs/{name}/stop")
    def stop(name: str):
        runs.stop(name)
        return {"stopping": name}

    @app.post("/api/runs/{name}/resume")
    def resume(name: str):
        runs.resume(name)
        return runs.details(name)

    @app.get("/api/runs/{name}/plot.png")
    def run_plot(name: str):
        path = runs.output_dir(name) / PLOT_FILE
        if not path.is_file():
            raise ConfigError(f"run {name} has no {PLOT_FILE} yet.", "it is drawn when the run ends.")
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    @app.post("/api/chat")
    def chat(body: ChatRequest):
        from lmtune.infer.chat import ChatSession

        if body.run is not None:
            summary = runs.summary(body.run)
            if not summary["chat"]:
                raise ModelError(f"run {body.run} has no trained model yet ({summary['state']}).",
                                 "chat with it when it has finished, or with the base model.")
            cfg = load_config(runs.folder(body.run) / CONFIG_FILE)
            output = runs.output_dir(body.run)
            stamp = max(p.stat().st_mtime for p in output.glob("*.safetensors"))
            key: tuple = ("run", body.run, stamp)
            label = f"run {body.run}"
        else:
            cfg = build_config({"model_name_or_path": body.model}, source="the chat form")
            key, label = ("base", body.model), body.model
        session = models.get(key, lambda: ChatSession.from_config(cfg, use_trained=body.run is not None))
        session = dataclasses.replace(session, cfg=session.cfg.model_copy(
            update={"max_new_tokens": body.max_new_tokens}))
        messages = [m.model_dump() for m in body.messages]

        def events() -> Iterator[str]:
            yield _event({"model": label})
            try:
                with models.lock:
                    for piece in session.stream(messages, sample=body.sample):
                        yield _event({"text": piece})
            except LmtuneError as exc:
                yield _event({"error": str(exc)})
                return
            yield _event({"done": True})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @app.get("/api/compare")
    def compare_list():
        return {"reports": _compare_reports()}

    @app.get("/api/compare/report")
    def compare_report(dir: str):
        data = json.loads((_compare_dir(dir) / REPORT_JSON).read_text())
        return {"dir": dir, "variants": data.get("variants", []), "spec": data.get("spec", {}),
                "plot": (_compare_dir(dir) / REPORT_PNG).is_file()}

    @app.get("/api/compare/plot.png")
    def compare_plot(dir: str):
        return FileResponse(_compare_dir(dir) / REPORT_PNG, headers={"Cache-Control": "no-store"})

    @app.post("/api/export")
    def export(body: ExportRequest):
        config = runs.folder(body.run) / CONFIG_FILE
        if not runs.summary(body.run)["chat"]:
            raise ModelError(f"run {body.run} has no trained model to export.", "let it finish first.")
        target = _inside_working_folder(body.export_dir)
        proc = subprocess.run(lmtune_command("export", config.as_posix(), f"export_dir={target}"),
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, env=child_env())
        if proc.returncode != 0:
            raise ModelError(proc.stderr.strip().removeprefix("error: ") or "lmtune export failed.")
        return {"export_dir": target, "output": proc.stdout.strip().splitlines()[-5:],
                "files": sorted(p.name for p in Path(target).iterdir())}

    return app


def _yaml(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _compare_reports() -> list[str]:
    """Folders up to three levels below the working folder holding a compare.json (dot-folders,
    such as a virtual environment, are not searched)."""
    found = {str(Path(p).parent) for depth in range(1, 4)
             for p in glob.glob("/".join(["*"] * depth + [REPORT_JSON]))}
    return sorted(found)


def _compare_dir(name: str) -> Path:
    # Only folders the listing found: a request cannot name any other file on the machine.
    if name not in _compare_reports():
        raise ConfigError(f"no compare report in {name!r}.", "run lmtune compare first.")
    return Path(name)


def _inside_working_folder(value: str) -> str:
    path = Path(value)
    root = Path.cwd().resolve()
    if not value or path.is_absolute() or not (root / path).resolve().is_relative_to(root):
        raise ConfigError(f"export folder {value!r} is outside the working folder.",
                          "give a path relative to it, e.g. saves/merged.")
    return path.as_posix()


def serve(host: str = "127.0.0.1", port: int = 7860, runs_dir: str = "saves/webui",
          allow_remote: bool = False) -> None:
    import uvicorn

    if _host(host) not in LOOPBACK and not allow_remote:
        raise ConfigError(f"--host {host} would let anyone who reaches this machine train models and "
                          "read its files: the web UI has no login.",
                          "keep the default 127.0.0.1 (reach it from elsewhere through an SSH "
                          "tunnel), or add --allow-remote on a network you trust.")
    print(f"lmtune webui on http://{host}:{port} (runs in {runs_dir}); Ctrl-C stops it", flush=True)
    uvicorn.run(create_app(runs_dir, any_host=allow_remote), host=host, port=port,
                log_level="warning")
