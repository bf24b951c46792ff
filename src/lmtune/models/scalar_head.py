"""A causal LM with a scalar head on its decoder: the reward model of stage rm, the value model of ppo.

The head is one linear layer on the decoder's last hidden state, so the LM's own output head never
runs. A reward model scores a sequence at its last real token; a value head scores every position.
Saved, it is the LM in its usual format (a PEFT adapter or a full HF model) plus
`scalar_head.safetensors` beside it, so the adapter stays loadable by anything that reads PEFT.
A reward model also writes its head as LLaMA-Factory does (`value_head.safetensors` holding trl's
`v_head.summary.weight` / `.bias`), so LLaMA-Factory's ppo takes it as reward_model, and a reward
model LLaMA-Factory trained (that file beside its adapter or full model) loads here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmtune.errors import ModelError

HEAD_FILE = "scalar_head.safetensors"  # a reward model's head
VALUE_HEAD_FILE = "value_head.safetensors"  # ppo's value head, kept apart so it is never taken for one
# LLaMA-Factory's file for any value-head model (its rm and ppo alike), in trl's tensor names; lmtune's
# ppo value head uses the same file name with its own names (head.*), which tells the two apart.
LF_HEAD_FILE = VALUE_HEAD_FILE
LF_HEAD_NAMES = {"weight": "v_head.summary.weight", "bias": "v_head.summary.bias"}


def is_lf_reward_head(folder: Path) -> bool:
    """Whether `folder` holds a value head in LLaMA-Factory's names (a reward model it trained)."""
    path = Path(folder) / LF_HEAD_FILE
    if not path.is_file():
        return False
    with safe_open(path, framework="pt") as handle:
        return set(LF_HEAD_NAMES.values()) <= set(handle.keys())


def decoder_hidden(lm: torch.nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (batch, length, hidden) of a causal LM, PEFT-wrapped or not."""
    base = lm.get_base_model() if isinstance(lm, PeftModel) else lm
    return base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (rows are right-padded)."""
    return attention_mask.sum(-1) - 1


class ScalarHeadModel(torch.nn.Module):
    """`lm` (with its method applied) and a linear head hidden -> 1."""

    def __init__(self, lm: torch.nn.Module, init_std: float | None = None, head_file: str = HEAD_FILE):
        super().__init__()
        self.lm = lm
        self.head_file = head_file
        hidden = lm.config.hidden_size
        self.head = torch.nn.Linear(hidden, 1)
        # A reward head starts small and random so the LM below gets gradients from the first step;
        # a value head starts at zero (init_std 0) so early values do not swamp the advantages.
        std = 1 / math.sqrt(hidden + 1) if init_std is None else init_std
        if std > 0:
            torch.nn.init.normal_(self.head.weight, std=std)
        else:
            torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.head.to(next(lm.parameters()).device)

    @property
    def config(self):
        return self.lm.config

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A scalar at every position: (batch, length)."""
        hidden = decoder_hidden(self.lm, input_ids, attention_mask)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score per sequence, read at its last real token: (batch,)."""
        hidden = decoder_hidden(self.lm, input_ids, attention_mask)
        last = hidden[torch.arange(len(hidden), device=hidden.device), last_token_index(attention_mask)]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, folder: Path, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs) -> None:
        """`state_dict`: this model's whole weights (`lm.*`, `head.*`), when its own parameters
        are sharded over ranks."""
        lm_state = head_state = None
        if state_dict is not None:
            lm_state = {k.removeprefix("lm."): v for k, v in state_dict.items() if k.startswith("lm.")}
            head_state = {k.removeprefix("head."): v for k, v in state_dict.items()
                          if k.startswith("head.")}
        self.lm.save_pretrained(folder, state_dict=lm_state, **kwargs)
        head = {k: v.detach().cpu().contiguous()
                for k, v in (head_state or self.head.state_dict()).items()}
        save_file(head, Path(folder) / self.head_file)
        if self.head_file == HEAD_FILE:
            save_file({LF_HEAD_NAMES[k]: v for k, v in head.items()}, Path(folder) / LF_HEAD_FILE,
                      metadata={"format": "pt"})

    def load_head(self, folder: Path) -> None:
        path = Path(folder) / self.head_file
        if self.head_file == HEAD_FILE and not path.is_file() and is_lf_reward_head(folder):
            state = load_file(Path(folder) / LF_HEAD_FILE, device=str(self.head.weight.device))
            weight = state[LF_HEAD_NAMES["weight"]]
            if weight.shape != self.head.weight.shape:
                raise ModelError(f"{folder / LF_HEAD_FILE}: {LF_HEAD_NAMES['weight']} has shape "
                                 f"{tuple(weight.shape)}, but this model's hidden size needs "
                                 f"{tuple(self.head.weight.shape)}.",
                                 "load the reward model on the base model it was trained on.")
            self.head.load_state_dict({k: state[name].to(self.head.weight.dtype)
                                       for k, name in LF_HEAD_NAMES.items()})
            return
        if not path.is_file():
            raise ModelError(f"{folder} has no {self.head_file}: it is not a reward model of stage rm.",
                             "point reward_model at the output_dir of an `lmtune train` run with "
                             f"stage: rm (or of LLaMA-Factory's, with {LF_HEAD_FILE} in trl's names).")
        self.head.load_state_dict(load_file(path, device=str(self.head.weight.device)))
