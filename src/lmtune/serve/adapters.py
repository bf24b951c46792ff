"""Many adapters on one base model: what the server loads, names, renders for, and runs.

The base weights exist once. LoRA adapters live side by side in one peft LoRA model, so one more
adapter costs its own size; requests for different LoRA adapters and for the base share one forward
pass (peft's mixed-adapter batches, `adapter_names=`). What peft 0.21.2 cannot mix in a batch runs
in batches of its own, never wrongly mixed:
  - DoRA adapters and IA3 / AdaLoRA adapters (peft's mixed batches are plain LoRA only);
  - prefix, prompt and p-tuning adapters: their virtual tokens are the same for every row of a
    batch, so each runs with its own, through the base weights.
peft keeps one weight-adapter type per model, so a server holds LoRA adapters or adapters of one
other weight type (IA3 or AdaLoRA), plus any prompt-learning adapters; an adapter of a second
weight type is refused with the reason.

Every served model renders prompts with the ChatEncoder training used (the adapter folder's own
tokenizer and template when it has one) and stops at its end-of-turn ids.
"""

from __future__ import annotations

import re
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.config import RunConfig
from lmtune.data.encode import ChatEncoder
from lmtune.data.pipeline import make_encoder
from lmtune.errors import LmtuneError, ModelError
from lmtune.infer.generate import GenResult, GenRow, OnToken, generate
from lmtune.models.lineage import check_adapter
from lmtune.models.load import load_tokenizer, stop_token_ids
from lmtune.models.methods import adapter_type

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PROMPT_TYPES = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"}
WEIGHT_TYPES = {"LORA", "OFT", "IA3", "ADALORA"}
MIXED = "mixed"  # the batch group of the base and plain LoRA adapters


@dataclass
class Served:
    """One model name the server answers to: the base or an adapter."""

    name: str
    kind: str  # "base" or the adapter's peft_type
    path: str | None
    tokenizer: PreTrainedTokenizerBase
    encoder: ChatEncoder | None
    no_chat_reason: str  # why encoder is None
    stop_ids: frozenset[int]
    group: str  # requests with the same group may share a batch
    prompt_model: PeftModel | None = None  # prompt-learning adapters: holds their virtual tokens


def check_name(name: str, what: str) -> str:
    if not NAME.match(name):
        raise ModelError(f"{what} name '{name}' is not a valid model name.",
                         "use letters, digits, '.', '_' and '-' (up to 64), starting with a letter "
                         "or digit.")
    return name


def adapter_name(path: str) -> str:
    """An adapter's default name: its folder's name."""
    return Path(path).resolve().name


class AdapterSet:
    """The base model and its adapters; load, unload, and run a batch of one group.

    `lock` is held while a batch runs and while adapters change, so a batch never sees an adapter
    come or go halfway."""

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig,
                 base_name: str):
        self.base = base.eval()
        self.cfg = cfg
        self.peft: PeftModel | None = None  # the weight adapters (one peft type)
        self.lock = threading.Lock()
        self.models: dict[str, Served] = {}
        self.models[check_name(base_name, "base model")] = self._served(base_name, "base", None, tokenizer)

    # --- naming and rendering -------------------------------------------------------------------

    def _served(self, name: str, kind: str, path: str | None,
                tokenizer: PreTrainedTokenizerBase) -> Served:
        stops = stop_token_ids(tokenizer, self.base)
        encoder, reason = None, ""
        try:
            encoder, _ = make_encoder(self.cfg, tokenizer, stops, "conversation")
            stops = sorted(encoder.stop_ids)
        except LmtuneError as exc:  # no chat template: completions still work
            reason = exc.message
        return Served(name, kind, path, tokenizer, encoder, reason, frozenset(stops), MIXED)

    def _tokenizer_for(self, path: str) -> PreTrainedTokenizerBase:
        """The adapter's own tokenizer (and template) when it carries one, else the base's."""
        base_tokenizer = self.models[self.base_name].tokenizer
        if not (Path(path) / "tokenizer_config.json").is_file():
            return base_tokenizer
        tokenizer = load_tokenizer(path, self.cfg.trust_remote_code)
        if len(tokenizer) > len(base_tokenizer):
            # Its new tokens need the base's embeddings grown, which the adapters beside it on the
            # same base would then share.
            raise ModelError(f"adapter {path} adds {len(tokenizer) - len(base_tokenizer)} tokens "
                             "(add_tokens/add_special_tokens) to the base model's tokenizer.",
                             "merge it with `lmtune export` and serve the merged folder (its "
                             "tokenizer goes with it).")
        if len(tokenizer) != len(base_tokenizer):
            raise ModelError(f"adapter {path} carries a tokenizer of {len(tokenizer)} tokens, but the "
                             f"base model's has {len(base_tokenizer)}.",
                             "serve it with the base model it was trained on.")
        return tokenizer

    @property
    def base_name(self) -> str:
        return next(iter(self.models))

    # --- loading and unloading ------------------------------------------------------------------

    def load(self, name: str, path: str) -> Served:
        """Load the adapter in `path` under `name`. Raises ModelError with the reason if it cannot
        be served beside what is loaded."""
        check_name(name, "adapter")
        if name in self.models:
            raise ModelError(f"a model named '{name}' is already served.",
                             "pick another name, or unload it first.")
        folder = Path(path)
        if not (folder / "adapter_model.safetensors").is_file():
            raise ModelError(f"adapter {path} has no adapter_model.safetensors.",
                             "point to a folder written by lmtune train (an adapter method) or by "
                             "peft's save_pretrained(safe_serialization=True).")
        kind = adapter_type(path)
        if kind not in WEIGHT_TYPES | PROMPT_TYPES:
            raise ModelError(f"adapter {path} is a {kind} adapter, which lmtune does not serve.",
                             "merge it into the base with peft and serve the merged folder.")
        tokenizer = self._tokenizer_for(path)
        with self.lock:
            served = self._served(name, kind, path, tokenizer)
            if kind in PROMPT_TYPES:
                served.prompt_model = self._load_prompt(path)
                served.group = f"adapter:{name}"
            else:
                self._load_weights(name, path, kind)
                if not self._mixable(name):
                    served.group = f"adapter:{name}"
            self.models[name] = served
        return served

    def _fits(self, exc: Exception, path: str) -> ModelError:
        return ModelError(f"adapter {path} does not fit the base model: {str(exc).splitlines()[0]}",
                          "serve it with the base model it was trained on.")

    def _load_prompt(self, path: str) -> PeftModel:
        # peft keeps prompt-learning adapters outside the base's modules, so this container adds
        # only the virtual tokens; the base weights are shared.
        check_adapter(self.base, path)
        try:
            model = PeftModel.from_pretrained(self.base, path)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise self._fits(exc, path) from None
        return model.eval()

    def _load_weights(self, name: str, path: str, kind: str) -> None:
        if self.peft is not None and self.peft.peft_type != kind:
            raise ModelError(f"adapter {path} is a {kind} adapter, but this server already holds "
                             f"{self.peft.peft_type} adapters, and peft keeps one weight-adapter type "
                             "per base model.",
                             f"serve {kind} adapters from another `lmtune serve`, or merge this one "
                             "into its base with `lmtune export` and serve the export.")
        check_adapter(self.base, path)
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
            else:
                self.peft.load_adapter(path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise self._fits(exc, path) from None

    def _mixable(self, name: str) -> bool:
        """Whether peft can run this adapter in a mixed batch (plain LoRA, not DoRA)."""
        assert self.peft is not None
        config = self.peft.peft_config[name]
        return config.peft_type == "LORA" and not getattr(config, "use_dora", False)

    def unload(self, name: str) -> None:
        if name == self.base_name:
            raise ModelError("the base model cannot be unloaded.", "unload one of its adapters.")
        if name not in self.models:
            raise KeyError(name)
        with self.lock:
            served = self.models.pop(name)
            if served.prompt_model is not None:
                return
            assert self.peft is not None
            if len(self.peft.peft_config) == 1:  # the last one: give the base its own layers back
                self.peft = self.peft.unload().eval()
                self.peft = None
            else:
                self.peft.delete_adapter(name)

    # --- running --------------------------------------------------------------------------------

    def generate(self, served: Served, rows: list[GenRow], on_token: OnToken) -> list[GenResult]:
        """One batched generation for rows that all belong to `served.group`. Call with `lock` held."""
        pad = self.models[self.base_name].tokenizer.pad_token_id
        model = self.peft if self.peft is not None else self.base
        mixed = self.peft is not None and self.peft.peft_type == "LORA"
        for row in rows:
            row.adapter = self._row_adapter(row.adapter)
        if served.prompt_model is not None:
            config = served.prompt_model.active_peft_config
            virtual = served.prompt_model.get_prompt(len(rows))
            for row in rows:
                row.adapter = "__base__"
            with self._weights_off(mixed):
                if config.peft_type == "PREFIX_TUNING":
                    return generate(model, rows, pad, on_token, prefix=virtual, mixed_adapters=mixed)
                return generate(model, rows, pad, on_token, prompt_embeds=virtual[0],
                                mixed_adapters=mixed)
        if mixed and served.group == MIXED:
            return generate(model, rows, pad, on_token, mixed_adapters=True)
        if served.kind == "base":
            with self._weights_off(mixed):
                return generate(model, rows, pad, on_token)
        assert self.peft is not None
        self.peft.set_adapter(served.name)
        return generate(model, rows, pad, on_token)

    def _row_adapter(self, name: str | None) -> str:
        return "__base__" if name in (None, self.base_name) else name

    def _weights_off(self, mixed: bool):
        """The base alone. A LoRA model runs the base by name in its batch ("__base__") instead."""
        if self.peft is None or mixed:
            return nullcontext()
        return self.peft.disable_adapter()
