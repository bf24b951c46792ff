"""Forgetting guard: before training, the base model answers general prompts, and its own answers
train alongside the task data, so the run keeps what the model already did well.

`replay: N` takes the first N of lmtune's built-in prompts (replay_prompts.py); `replay: FILE` the
prompts of a JSON list of {prompt | instruction}. Answers are greedy, batched, and cached by model,
template and prompts, so `lmtune plan` and every later run of the same base reuse them. An answer
that runs into the token limit (a rambling or looping reply) is dropped and counted, as
data/general_replay.json was made by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.config import RunConfig
from lmtune.data.encode import ChatEncoder
from lmtune.data.formats import Conversation
from lmtune.data.replay_prompts import GENERAL_PROMPTS
from lmtune.data.report import DatasetCounts
from lmtune.errors import ConfigError
from lmtune.models.load import cache_root, load_model, resolve_for

MAX_NEW_TOKENS = 200
BATCH_SIZE = 8


def replay_prompts(cfg: RunConfig) -> tuple[list[str], str]:
    """(prompts, where they come from)."""
    if isinstance(cfg.replay, int):
        if cfg.replay > len(GENERAL_PROMPTS):
            raise ConfigError(f"replay: {cfg.replay} asks for more than the {len(GENERAL_PROMPTS)} "
                              "built-in general prompts.",
                              f"use replay: {len(GENERAL_PROMPTS)} or less, or give a prompts file "
                              "(a JSON list of {\"prompt\": ...}).")
        return list(GENERAL_PROMPTS[: cfg.replay]), f"{cfg.replay} built-in general prompts"
    from lmtune.infer.chat import read_prompts

    return [item["prompt"] for item in read_prompts(str(cfg.replay), cfg.data_vars)], str(cfg.replay)


def _model_fingerprint(path: str) -> list:
    folder = Path(path)
    if not folder.is_dir():
        return [path]  # a hub id: its cached snapshot is immutable
    return [str(folder.resolve())] + sorted(
        [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in folder.glob("*.safetensors"))


def _cache_file(model_path: str, encoder: ChatEncoder, prompts: list[str]) -> Path:
    key = json.dumps({"model": _model_fingerprint(model_path),
                      "template": encoder.tokenizer.chat_template, "stops": sorted(encoder.stop_ids),
                      "max_new_tokens": MAX_NEW_TOKENS, "prompts": prompts})
    return cache_root() / "replay" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, encoder: ChatEncoder,
              prompts: list[str]) -> list[dict]:
    from lmtune.evaluate.predict import Generation, generate_batched

    ids = [encoder.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        answers, _ = generate_batched(model, tokenizer.pad_token_id, ids,
                                      Generation(max_new_tokens=MAX_NEW_TOKENS),
                                      sorted(encoder.stop_ids), BATCH_SIZE, desc="replay answers")
    finally:
        model.train(was_training)
    return [{"prompt": p, "answer": tokenizer.decode(a, skip_special_tokens=True).strip(),
             "finished": bool(a) and a[-1] in encoder.stop_ids} for p, a in zip(prompts, answers)]


def replay_records(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, encoder: ChatEncoder,
                   model: PreTrainedModel | None = None) -> tuple[list[Conversation], DatasetCounts, str]:
    """The base model's answers as conversations, their counts, and a note for the report. `model`
    is the base as loaded for training (full precision, no method applied yet); without it the base
    loads here, only when the answers are not cached."""
    prompts, source = replay_prompts(cfg)
    model_path = resolve_for(cfg)
    cache = _cache_file(model_path, encoder, prompts)
    if cache.is_file():
        answers, how = json.loads(cache.read_text(encoding="utf-8")), "from the cache"
    else:
        model = model if model is not None else load_model(model_path, cfg.trust_remote_code)
        answers, how = _generate(model, tokenizer, encoder, prompts), "generated now"
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        staging.write_text(json.dumps(answers, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(staging, cache)
    kept = [a for a in answers if a["finished"] and a["answer"]]
    counts = DatasetCounts(name="replay", file=source, found=len(answers),
                           dropped_unfinished=len(answers) - len(kept))
    records = [Conversation([{"role": "user", "content": a["prompt"]},
                             {"role": "assistant", "content": a["answer"]}]) for a in kept]
    note = (f"replay: the base model's own answers to {source} ({how}); {len(kept)} kept, "
            f"{len(answers) - len(kept)} left out for running past {MAX_NEW_TOKENS} tokens or "
            "being empty")
    return records, counts, note
