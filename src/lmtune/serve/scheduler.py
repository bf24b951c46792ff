"""The batching scheduler: requests queue, one worker thread runs them in batches.

The worker takes the oldest waiting request and every other waiting request of the same batch group
(the base and plain LoRA adapters share one; see adapters.py), up to `max_batch`, and runs one
batched generation. Each new token goes back to its own request as text: stop strings are cut (and
text that may still become one is held back until it cannot), and a request whose client left ends
its row at the next token, which frees its place in the batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from lmtune.infer.generate import STOP, GenRow, Sampling
from lmtune.serve.adapters import AdapterSet, Served

log = logging.getLogger(__name__)


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" or "length" (OpenAI's words)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500


Event = Delta | Finished | Failed


@dataclass
class Request:
    served: Served
    prompt_ids: list[int]
    sampling: Sampling
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already sent
    stopped_by_text: bool = False

    def push(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()

    # --- text from tokens -----------------------------------------------------------------------

    def _text(self) -> str:
        visible = [t for t in self.tokens if t not in self.served.stop_ids]
        return self.served.tokenizer.decode(visible, skip_special_tokens=True)

    def take_token(self, token: int) -> bool:
        """Record a new token and send the text that is now certain; False once a stop string
        appeared (the text is cut before it)."""
        self.tokens.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped_by_text = True
            self._send(text[:cut])
            return False
        # An incomplete UTF-8 character decodes as U+FFFD, and the tail of the text may be the start
        # of a stop string: both wait for the next token.
        hold = 1 if text.endswith("\ufffd") else 0
        for s in self.stop:
            hold = max(hold, next((k for k in range(min(len(s) - 1, len(text)), 0, -1)
                                   if text.endswith(s[:k])), 0))
        self._send(text[: len(text) - hold])
        return not self.cancelled.is_set()

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.push(Delta(text[self.sent:]))
            self.sent = len(text)

    def finish(self, reason: str) -> None:
        if not self.stopped_by_text:
            self._send(self._text())
        finish = "stop" if self.stopped_by_text or reason == STOP else "length"
        self.push(Finished(finish, len(self.prompt_ids), len(self.tokens)))


class Scheduler:
    def __init__(self, adapters: AdapterSet, max_batch: int = 16):
        self.adapters = adapters
        self.max_batch = max_batch
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.batches = 0  # batches run so far (tests and benchmarks read it)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="lmtune-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._cond:
            self.waiting.append(request)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[Request]:
        with self._cond:
            while not self.waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            group = self.waiting[0].served.group
            batch = [r for r in self.waiting if r.served.group == group][: self.max_batch]
            for request in batch:
                self.waiting.remove(request)
            self.running = [r for r in batch if not r.cancelled.is_set()]
            return self.running

    def _work(self) -> None:
        while not self._closed:
            batch = self._next_batch()
            if batch:
                self._run(batch)
            with self._cond:
                self.running = []

    def _run(self, batch: list[Request]) -> None:
        try:
            with self.adapters.lock:
                # An adapter unloaded while its requests waited: they fail alone, not the batch.
                gone = [r for r in batch if self.adapters.models.get(r.served.name) is not r.served]
                for request in gone:
                    request.push(Failed(f"the model '{request.served.name}' was unloaded.", 404))
                batch = [r for r in batch if r not in gone]
                if not batch:
                    return
                rows = [GenRow(r.prompt_ids, r.sampling, r.served.stop_ids, r.served.name) for r in batch]
                self.batches += 1
                results = self.adapters.generate(batch[0].served, rows,
                                                 lambda i, token: batch[i].take_token(token))
        except Exception as exc:  # a failed batch must not take the server down with it
            log.exception("generation failed")
            for request in batch:
                request.push(Failed(f"generation failed: {type(exc).__name__}"))
            return
        for request, result in zip(batch, results):
            request.finish(result.finish_reason)
