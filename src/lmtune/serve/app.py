"""`lmtune serve`: an HTTP API in OpenAI's shapes for a base model and its adapters.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both stream as server-sent
events with `stream: true`), and POST /v1/adapters / DELETE /v1/adapters/{name} to load and unload
adapters at run time. The request's `model` picks the adapter by name; the base answers as itself.

Safe by default: it binds 127.0.0.1; with an API key (--api-key or LMTUNE_API_KEY) every route needs
`Authorization: Bearer KEY`, compared in constant time, and loading adapters needs the key at all;
no CORS unless origins are named; request bodies and max_tokens are bounded. Every bad request gets
a 4xx JSON error in OpenAI's shape, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from lmtune.config import RunConfig
from lmtune.errors import ConfigError, LmtuneError, ModelError
from lmtune.infer.generate import Sampling
from lmtune.serve.adapters import AdapterSet, Served, adapter_name, check_name
from lmtune.serve.scheduler import Delta, Failed, Finished, Request, Scheduler

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_STOP_STRINGS = 4
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ApiError(Exception):
    """A request the server refuses; becomes {"error": {...}} with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# --- request bodies ---------------------------------------------------------------------------------

class _Body(BaseModel):
    # Fields of OpenAI's API that are not listed here are ignored, as OpenAI ignores what it does
    # not know; listed ones that lmtune cannot honour are refused when set.
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="lmtune answers one choice per request")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logprobs: Literal[False] | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: None = None
    response_format: dict[str, Literal["text"]] | None = None


class CompletionBody(_Body):
    prompt: str | list[str]
    echo: Literal[False] = False
    suffix: None = None
    best_of: int = Field(1, ge=1, le=1)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    name: str | None = None


def _message_text(message: _Message, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{index}]: only text content parts are supported "
                           f"(got type {part.get('type')!r}).", f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)


# --- the app --------------------------------------------------------------------------------------

class Server:
    """What the routes share: the adapters, the scheduler and the limits."""

    def __init__(self, adapters: AdapterSet, cfg: RunConfig, api_key: str | None = None,
                 max_batch: int = 16, max_tokens: int | None = None):
        self.adapters = adapters
        self.cfg = cfg
        self.api_key = api_key.encode() if api_key else None
        self.max_tokens = max_tokens or cfg.max_new_tokens
        self.scheduler = Scheduler(adapters, max_batch)
        self.created = int(time.time())

    def model(self, name: str) -> Served:
        served = self.adapters.models.get(name)
        if served is None:
            raise ApiError(404, f"The model '{name}' does not exist. Served: "
                           f"{', '.join(self.adapters.models)}.", "model", "model_not_found")
        return served

    def sampling(self, body: _Body, max_tokens: int | None) -> Sampling:
        wanted = max_tokens or min(self.cfg.max_new_tokens, self.max_tokens)
        if wanted > self.max_tokens:
            raise ApiError(400, f"max_tokens is {wanted}, over this server's limit of "
                           f"{self.max_tokens}.", "max_tokens")
        # Unset fields follow the config's generation keys, as `lmtune chat` does.
        temperature = body.temperature if body.temperature is not None else (
            self.cfg.temperature if self.cfg.do_sample else 0.0)
        top_p = body.top_p if body.top_p is not None else self.cfg.top_p
        top_k = self.cfg.top_k if body.temperature is None and self.cfg.do_sample else 0
        return Sampling(wanted, temperature, top_p, top_k, body.seed)

    def stops(self, body: _Body) -> list[str]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise ApiError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings.", "stop")
        return stop

    def check_length(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty.", "prompt")
        if len(ids) > self.cfg.cutoff_len:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, over this server's cutoff_len of "
                           f"{self.cfg.cutoff_len}.", "messages", "context_length_exceeded")
        return ids

    def chat_ids(self, served: Served, body: ChatBody) -> list[int]:
        if served.encoder is None:
            raise ApiError(400, f"model '{served.name}' has no chat template ({served.no_chat_reason}); "
                           "use /v1/completions, or serve it with template: set.", "model")
        messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
        try:
            return self.check_length(served.encoder.prompt_ids(messages))
        except ApiError:
            raise
        except Exception as exc:  # the chat template refused these messages (order, roles)
            raise ApiError(400, f"the chat template of '{served.name}' cannot render these messages: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                           "messages") from None

    def completion_ids(self, served: Served, body: CompletionBody) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: lmtune answers one prompt per request.", "prompt")
            prompt = prompt[0]
        return self.check_length(served.tokenizer(prompt)["input_ids"])

    def authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        # compare_digest takes as long whatever the prefix matched, so timing reveals nothing.
        return hmac.compare_digest(token.strip().encode(), self.api_key) and scheme.lower() == "bearer"


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param)


async def _read_json(http: HttpRequest) -> Any:
    size, chunks = 0, []
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes.", None,
                           "request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON.") from None


async def _parse(http: HttpRequest, model: type[BaseModel]) -> Any:
    data = await _read_json(http)
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


class _Guard:
    """ASGI middleware: the API key and the declared body size, before any route runs."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = None
        if scope["method"] != "OPTIONS" and not self.server.authorized(headers.get("authorization")):
            error = ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                             None, "invalid_api_key")
        elif not headers.get("content-length", "0").isdigit():
            error = ApiError(400, "Content-Length is not a number.")
        elif int(headers.get("content-length", "0")) > MAX_BODY_BYTES:
            error = ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes.", None,
                             "request_too_large")
        if error is not None:
            return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def create_app(server: Server, cors_origins: list[str] | None = None) -> Any:
    """The ASGI app: FastAPI routes inside the key and size guard (and CORS when origins are named)."""
    app = FastAPI(title="lmtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):
        log.exception("unexpected error")
        return ApiError(500, f"internal error ({type(exc).__name__}); the server log has details.",
                        kind="server_error").response()

    def model_card(name: str) -> dict[str, Any]:
        served = server.adapters.models[name]
        return {"id": name, "object": "model", "created": server.created, "owned_by": "lmtune",
                "kind": served.kind}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in list(server.adapters.models)]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        server.model(name)
        return model_card(name)

    async def run(served: Served, ids: list[int], sampling: Sampling,
                  stop: list[str], stream: bool, include_usage: bool, chat: bool):
        request = Request(served, ids, sampling, stop, asyncio.get_running_loop())
        server.scheduler.submit(request)
        reply_id = _completion_id("chatcmpl" if chat else "cmpl")
        obj = "chat.completion" if chat else "text_completion"
        if stream:
            return StreamingResponse(_stream(request, reply_id, obj + (".chunk" if chat else ""),
                                             chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text = []
        try:
            while True:
                event = await request.events.get()
                if isinstance(event, Delta):
                    text.append(event.text)
                elif isinstance(event, Failed):
                    raise ApiError(event.status, event.message, "model" if event.status == 404 else None,
                                   kind="server_error" if event.status == 500 else "invalid_request_error")
                else:
                    break
        finally:
            request.cancel()
        choice: dict[str, Any] = {"index": 0, "finish_reason": event.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return {"id": reply_id, "object": obj, "created": int(time.time()), "model": served.name,
                "choices": [choice], "usage": _usage(event)}

    async def _stream(request: Request, reply_id: str, obj: str, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
            choices = [] if delta is None else [
                {"index": 0, "finish_reason": finish, "logprobs": None,
                 **({"delta": delta} if chat else {"text": delta.get("content", "")})}]
            body = {"id": reply_id, "object": obj, "created": int(time.time()),
                    "model": request.served.name, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await request.events.get()
                if isinstance(event, Delta):
                    yield chunk({"content": event.text})
                elif isinstance(event, Failed):
                    error = {"message": event.message, "param": None, "code": None,
                             "type": "server_error" if event.status == 500 else "invalid_request_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                else:
                    yield chunk({}, event.finish_reason)
                    if include_usage:
                        yield chunk(None, usage=_usage(event))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            # Also reached when the client goes away mid-stream: its row leaves the batch.
            request.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body: ChatBody = await _parse(http, ChatBody)
        served = server.model(body.model)
        ids = server.chat_ids(served, body)
        sampling = server.sampling(body, body.max_completion_tokens or body.max_tokens)
        return await run(served, ids, sampling, server.stops(body), body.stream,
                         bool((body.stream_options or {}).get("include_usage")), chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body: CompletionBody = await _parse(http, CompletionBody)
        served = server.model(body.model)
        ids = server.completion_ids(served, body)
        sampling = server.sampling(body, body.max_tokens)
        return await run(served, ids, sampling, server.stops(body), body.stream,
                         bool((body.stream_options or {}).get("include_usage")), chat=False)

    def require_key_for_adapters() -> None:
        if server.api_key is None:
            raise ApiError(403, "loading and unloading adapters needs the server to run with an API "
                           "key (--api-key or LMTUNE_API_KEY).", None, "api_key_required",
                           kind="permission_error")

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(http: HttpRequest):
        require_key_for_adapters()
        body: AdapterBody = await _parse(http, AdapterBody)
        name = body.name or adapter_name(body.path)
        if not Path(body.path).is_dir():
            raise ApiError(400, f"no adapter folder at {body.path}.", "path")
        try:
            await run_in_threadpool(server.adapters.load, name, body.path)
        except LmtuneError as exc:
            raise ApiError(409 if "already served" in exc.message else 400, str(exc), "path") from None
        return JSONResponse(model_card(name), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        require_key_for_adapters()
        server.model(name)
        try:
            await run_in_threadpool(server.adapters.unload, name)
        except KeyError:
            raise ApiError(404, f"The model '{name}' does not exist.", "model", "model_not_found") from None
        except LmtuneError as exc:
            raise ApiError(400, str(exc), "name") from None
        return {"id": name, "object": "model", "deleted": True}

    wrapped: Any = app
    if cors_origins:
        # Named origins only, and no credentials: the key travels in a header the page must set.
        wrapped = CORSMiddleware(app, allow_origins=cors_origins, allow_methods=["GET", "POST", "DELETE"],
                                 allow_headers=["Authorization", "Content-Type"])
    return _Guard(wrapped, server)


def _usage(event: Finished) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


# --- building and running ---------------------------------------------------------------------------

def _base_name(model_name: str) -> str:
    last = model_name.rstrip("/").split("/")[-1]
    last = last[: -len(".gguf")] if last.endswith(".gguf") else last
    return re.sub(r"[^A-Za-z0-9._-]", "-", last).lstrip(".-_")[:64] or "base"


def served_adapters(cfg: RunConfig, extra: list[str]) -> tuple[str, list[str], list[tuple[str, str]]]:
    """(base model, adapters merged into it, [(name, path)] served) from the config and --adapter.

    As in chat and training, adapter_name_or_path's folders before the last are merged into the
    base; the last is served by its folder's name. Without adapter_name_or_path, what output_dir
    holds is used: a full model becomes the base, an adapter is served (adapter_name_or_path=null
    on the command line: the base alone)."""
    from lmtune.models.lineage import trained_output
    from lmtune.models.scalar_head import HEAD_FILE

    model_name, merged, served = cfg.model_name_or_path, [], []
    if cfg.adapter_paths:
        merged, last = cfg.adapter_paths[:-1], cfg.adapter_paths[-1]
        served.append((adapter_name(last), last))
    elif not cfg.null_on_command_line("adapter_name_or_path"):
        if (Path(cfg.output_dir or "") / HEAD_FILE).is_file():
            raise ModelError(f"{cfg.output_dir} holds a reward model: it scores answers, it does not "
                             "write them.", "serve the model it was trained from, or another run.")
        full, trained = trained_output(cfg)
        model_name = full or model_name
        served += [(adapter_name(p), p) for p in trained]
    for item in extra:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {item}: expected NAME=PATH.", "write e.g. --adapter "
                              "support=saves/support-lora.")
        served.append((check_name(name, "adapter"), path))
    names = [n for n, _ in served]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two adapters are named '{name}'.",
                              "name them apart with --adapter NAME=PATH.")
    return model_name, merged, served


def build_server(cfg: RunConfig, extra_adapters: list[str], api_key: str | None = None,
                 max_batch: int = 16, max_tokens: int | None = None) -> Server:
    from lmtune.models.load import load_model, load_tokenizer, model_options, resolve_for
    from lmtune.models.methods import load_adapters

    _check_backend(cfg)
    model_name, merged, served = served_adapters(cfg, extra_adapters)
    path = resolve_for(cfg, model_name)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    base = load_model(path, cfg.trust_remote_code, **model_options(cfg))
    if merged:
        base = load_adapters(base, merged, trainable_last=False, merge_last=True)
    adapters = AdapterSet(base, tokenizer, cfg, _base_name(model_name))
    for name, adapter_path in served:
        adapters.load(name, adapter_path)
    return Server(adapters, cfg, api_key, max_batch, max_tokens)


def _check_backend(cfg: RunConfig) -> None:
    if cfg.infer_backend != "vllm":
        return
    import importlib.util

    import torch

    missing = "vLLM is not installed" if importlib.util.find_spec("vllm") is None else (
        "there is no CUDA GPU" if not torch.cuda.is_available() else "")
    reason = missing or "lmtune serve does not drive vLLM's engine yet"
    print(f"note: infer_backend: vllm: {reason}; serving with the built-in backend "
          "(batched, many adapters on one base).")


def start_in_thread(app: Any, host: str, port: int):
    """Run uvicorn in a daemon thread (tests, benchmarks); returns the uvicorn.Server once it
    accepts connections. Stop it with `server.should_exit = True`."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="lmtune-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ModelError(f"the server did not start on {host}:{port}.", "pick another --port.")
        time.sleep(0.02)
    server.thread = thread  # type: ignore[attr-defined]
    return server


def serve(cfg: RunConfig, extra_adapters: list[str], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, cors_origins: list[str] | None = None, max_batch: int = 16,
          max_tokens: int | None = None) -> None:
    import uvicorn

    if host not in LOOPBACK and not api_key:
        raise ConfigError(f"--host {host} makes the server reachable from other machines, and no API "
                          "key is set.", "give --api-key KEY (or set LMTUNE_API_KEY), or leave --host "
                          "out to bind 127.0.0.1.")
    if cors_origins and "*" in cors_origins and not api_key:
        raise ConfigError("--cors '*' lets any web page call this server, and no API key is set.",
                          "name the page's origin, e.g. --cors http://localhost:3000, or set a key.")
    server = build_server(cfg, extra_adapters, api_key, max_batch, max_tokens)
    names = ", ".join(server.adapters.models)
    print(f"serving {names} at http://{host}:{port}/v1 (OpenAI API"
          f"{', API key required' if api_key else ''}); Ctrl-C stops")
    try:
        uvicorn.run(create_app(server, cors_origins), host=host, port=port, log_level="warning",
                    lifespan="off")
    finally:
        server.scheduler.close()
