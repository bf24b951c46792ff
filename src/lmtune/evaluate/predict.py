"""Predict: generate an answer for every eval_dataset row and score it against the row's reply.

`lmtune predict CONFIG` (or `do_predict: true` in a train YAML) writes, in output_dir,
generated_predictions.jsonl (prompt, predict, label per row, in dataset order) and
predict_results.json with LLaMA-Factory's metric names (metrics.py) plus exact match, runtime,
samples/s and new tokens/s. With --compare-base the model without its adapter answers too, from the
same loaded weights, and the two are shown side by side.

Generation is batched: prompts are sorted by length (so a batch pads little) and left-padded (so
every row's answer starts at the same column), then answers go back to dataset order. Prompts render
through the training encoder, so the model sees exactly the ids it was trained on.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from lmtune.config import RunConfig
from lmtune.data.encode import IGNORE_INDEX, ChatEncoder, EncodedRow
from lmtune.data.formats import Conversation
from lmtune.data.pipeline import make_encoder
from lmtune.data.sources import load_records
from lmtune.errors import ConfigError, DataError, TrainingError
from lmtune.evaluate.metrics import similarity
from lmtune.models.lineage import run_output, weights_of
from lmtune.models.load import (is_quantized, load_model, load_tokenizer, model_options, resolve_for,
                                stop_token_ids, tokenizer_source)
from lmtune.models.methods import load_adapters

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"


@dataclass
class Generation:
    """The generation keys of the config. Predictions are greedy unless the YAML sets do_sample:
    true (the key's default is true for interactive chat), so scores repeat from run to run."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    num_beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    skip_special_tokens: bool = True

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "Generation":
        sample = cfg.do_sample and "do_sample" in cfg.model_fields_set
        return cls(cfg.max_new_tokens, sample, cfg.temperature, cfg.top_p, cfg.top_k,
                   cfg.eval_num_beams or cfg.num_beams, cfg.repetition_penalty, cfg.length_penalty,
                   cfg.skip_special_tokens)

    def kwargs(self, stop_ids: list[int], pad_id: int) -> dict[str, Any]:
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                               "num_beams": self.num_beams, "eos_token_id": sorted(stop_ids),
                               "pad_token_id": pad_id, "repetition_penalty": self.repetition_penalty}
        if self.num_beams > 1:
            out["length_penalty"] = self.length_penalty
        if self.do_sample:
            out |= {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        else:  # a model's generation_config may carry sampling defaults that greedy would warn about
            out |= {"temperature": None, "top_p": None, "top_k": None}
        return out


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """The answer through its first end-of-turn token; what follows is padding."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def generate_batched(model: PreTrainedModel, pad_id: int, prompts: list[list[int]],
                     settings: Generation, stop_ids: list[int], batch_size: int,
                     desc: str = "predict") -> tuple[list[list[int]], dict[str, float]]:
    """New token ids for every prompt (in the given order, each through its end-of-turn token) and
    {runtime, new_tokens}. A progress bar shows rows and new tokens per second."""
    stops = set(stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[list[int]] = [[] for _ in prompts]
    new_tokens = 0
    start = time.perf_counter()
    kwargs = settings.kwargs(stop_ids, pad_id)
    with tqdm(total=len(prompts), desc=desc, unit="row", mininterval=0.5) as bar:
        for first in range(0, len(order), batch_size):
            chunk = order[first: first + batch_size]
            ids, mask = _left_pad([prompts[i] for i in chunk], pad_id)
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 **kwargs)
            for row, index in zip(out[:, ids.shape[1]:].tolist(), chunk):
                answers[index] = _until_stop(row, stops)
                new_tokens += len(answers[index])
            bar.update(len(chunk))
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.1f} tokens/s")
    return answers, {"runtime": time.perf_counter() - start, "new_tokens": new_tokens}


def prompt_and_label(row: EncodedRow) -> tuple[list[int], list[int]]:
    """An encoded training row split before its last trained reply: (prompt ids, reply ids)."""
    labels = row.labels
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1) + 1
    if end == 0:
        raise ValueError("the row has no trained token")
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return row.input_ids[:start], row.input_ids[start:end]


def _refuse_quantized_cpu(model: PreTrainedModel) -> None:
    # On CPUs with avx512_bf16, generating repacks 4-bit weights for an inference kernel without
    # autograd; training after that computes wrong LoRA gradients (see environment notes).
    if is_quantized(model) and model.device.type == "cpu":
        raise TrainingError("generating with a quantized base on the CPU in the middle of training "
                            "would corrupt its LoRA gradients.",
                            "run `lmtune predict` on the saved adapter after training instead.")


def score_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[EncodedRow],
               stop_ids: list[int], settings: Generation, batch_size: int,
               prefix: str = "eval_") -> dict[str, float]:
    """Generate the last reply of each encoded row and score it against the row's own reply: BLEU-4,
    ROUGE and exact match named {prefix}bleu-4, ... For evaluation inside the training loop: rows
    are the val split as encoded, the model is left in the mode it came in."""
    _refuse_quantized_cpu(model)
    pairs = [prompt_and_label(row) for row in rows]
    was_training = model.training
    model.eval()
    try:
        answers, _ = generate_batched(model, tokenizer.pad_token_id, [p for p, _ in pairs], settings,
                                      stop_ids, batch_size, desc="generate val")
    finally:
        model.train(was_training)
    predicts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    labels = [tokenizer.decode(l, skip_special_tokens=True).strip() for _, l in pairs]
    return similarity(predicts, labels, prefix=prefix)


# --- lmtune predict ------------------------------------------------------------------------------

@dataclass
class PredictInputs:
    prompts: list[str]      # the rendered prompt text, as the model reads it
    prompt_ids: list[list[int]]
    labels: list[str]


def predict_inputs(cfg: RunConfig, encoder: ChatEncoder) -> PredictInputs:
    """Every eval_dataset conversation split before its last reply (the label)."""
    if not cfg.eval_dataset:
        raise ConfigError("predict needs eval_dataset: the rows to answer and score.",
                          "add e.g. eval_dataset: my_test (a name in dataset_info.json or a file).")
    per_dataset, _ = load_records(cfg.model_copy(update={"dataset": cfg.eval_dataset}), "conversation")
    records: list[Conversation] = [r for records in per_dataset for r in records]  # type: ignore[misc]
    if not records:
        raise DataError(f"eval_dataset {cfg.eval_dataset} has no rows to predict.",
                        "check the file and max_samples.")
    inputs = PredictInputs([], [], [])
    for conv in records:
        messages = conv.messages
        if messages[-1]["role"] == "assistant":
            messages, label = messages[:-1], messages[-1]["content"]
        else:
            label = ""
        inputs.prompts.append(encoder.render(messages, conv.tools, add_generation_prompt=True))
        inputs.prompt_ids.append(encoder.prompt_ids(messages, conv.tools))
        inputs.labels.append(label)
    return inputs


def predict_with(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, inputs: PredictInputs,
                 stop_ids: list[int], settings: Generation, batch_size: int, out_dir: Path,
                 desc: str = "predict") -> dict[str, float]:
    """Generate, score, and write the two files of one model into out_dir; returns the results."""
    model.eval()
    answers, timing = generate_batched(model, tokenizer.pad_token_id, inputs.prompt_ids, settings,
                                       stop_ids, batch_size, desc=desc)
    predicts = [tokenizer.decode(a, skip_special_tokens=settings.skip_special_tokens).strip()
                for a in answers]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
        for prompt, predict, label in zip(inputs.prompts, predicts, inputs.labels):
            f.write(json.dumps({"prompt": prompt, "predict": predict, "label": label},
                               ensure_ascii=False) + "\n")
    runtime = timing["runtime"]
    results = similarity(predicts, inputs.labels) | {
        "predict_samples": len(predicts), "predict_runtime": round(runtime, 4),
        "predict_samples_per_second": round(len(predicts) / runtime, 3),
        "predict_tokens_per_second": round(timing["new_tokens"] / runtime, 3)}
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _load(cfg: RunConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, str]:
    """(model, tokenizer, description, what): the config's adapters, else what output_dir holds;
    `what` is "adapter", "full" (a fully trained model) or "base"."""
    model_name, adapters = weights_of(cfg)
    what = "adapter" if adapters else "full" if model_name != cfg.model_name_or_path else "base"
    model_path = resolve_for(cfg, model_name)
    tokenizer = load_tokenizer(tokenizer_source(model_path, adapters), cfg.trust_remote_code)
    model = load_model(model_path, cfg.trust_remote_code, **model_options(cfg))
    if adapters:
        model = load_adapters(model, adapters, trainable_last=False)
    return model, tokenizer, model_name + "".join(f" + {a}" for a in adapters), what


def run_predict(cfg: RunConfig, compare_base: bool = False) -> dict[str, dict[str, float]]:
    """Predict eval_dataset into cfg.output_dir with the config's model (adapters, else what
    output_dir holds); returns {"model": results}, and "base" with compare_base."""
    if not cfg.output_dir:
        raise ConfigError("predict writes its files into output_dir, and none is set.",
                          "add e.g. output_dir: saves/my-run/predict.")
    set_seed(cfg.seed)
    model, tokenizer, source, what = _load(cfg)
    if compare_base and what == "base":
        raise ConfigError("--compare-base: the model to predict is the base itself (no adapter, and "
                          "output_dir holds no trained model).",
                          "set adapter_name_or_path, or point output_dir at a trained run.")
    print(f"model: {source}")
    encoder, _ = make_encoder(cfg, tokenizer, stop_token_ids(tokenizer, model), "conversation")
    assert isinstance(encoder, ChatEncoder)  # kind "conversation" always gives one
    stops = sorted(encoder.stop_ids)
    inputs = predict_inputs(cfg, encoder)
    settings = Generation.from_config(cfg)
    out = Path(cfg.output_dir)
    batch = cfg.per_device_eval_batch_size
    results = {"model": predict_with(model, tokenizer, inputs, stops, settings, batch, out)}
    if compare_base:
        # An adapter is switched off on the same weights; a full fine-tune has none to switch off,
        # so its base loads beside it.
        base = (model.disable_adapter() if what == "adapter"
                else nullcontext(load_model(resolve_for(cfg), cfg.trust_remote_code)))
        with base as loaded:
            results["base"] = predict_with(loaded if loaded is not None else model, tokenizer, inputs,
                                           stops, settings, batch, out / "base", desc="predict base")
    print_results(results, out)
    return results


def print_results(results: dict[str, dict[str, float]], out: Path) -> None:
    """One column per model, the base first."""
    names = list(reversed(results))
    keys = [k for k in results["model"] if k != "predict_samples"]
    print(f"{'':<32}" + "".join(f"{n:>14}" for n in names))
    for key in keys:
        print(f"{key:<32}" + "".join(f"{results[n][key]:>14.4f}" for n in names))
    print(f"predictions written to {out / PREDICTIONS_FILE}"
          + (f" and {out / 'base' / PREDICTIONS_FILE}" if "base" in results else ""))


def predict_after_training(cfg: RunConfig) -> dict[str, float]:
    """do_predict at the end of `lmtune train`: the run as saved in output_dir answers eval_dataset.

    Reloading what was saved (rather than using the weights in memory, which may still carry
    autocast wrappers or PiSSA's unconverted form) predicts exactly what `lmtune predict` would
    later. Adapters merged under the trained one are merged again; a new adapter trained over them
    (create_new_adapter) sits on top of all of them."""
    model_name, adapters = run_output(cfg)
    update = {"model_name_or_path": model_name, "adapter_name_or_path": ",".join(adapters) or None}
    return run_predict(cfg.model_copy(update=update))["model"]
