"""stage: rm. A reward model from preference pairs: the LM with a scalar head, trained so the chosen
reply scores above the rejected one (Bradley-Terry: -log sigmoid(r_chosen - r_rejected)).

Reads top to bottom: setup -> method on the LM -> scalar head on top (models/scalar_head.py; it
always trains) -> the shared loop. Logged per step and on the val split: accuracy (share of pairs
scored chosen-first) and margin (mean r_chosen - r_rejected). The output folder holds the adapter
(or full model), scalar_head.safetensors and the same head in LLaMA-Factory's value_head.safetensors;
`RewardModel(folder)` below loads it by path for ppo and for scoring, and loads a reward model of
LLaMA-Factory's (an adapter or full model with value_head.safetensors) the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig

from lmtune.config import RunConfig
from lmtune.errors import ModelError
from lmtune.data.batching import collate
from lmtune.data.encode import ChatEncoder, EncodedRow
from lmtune.data.formats import Message
from lmtune.data.streaming import RowStream
from lmtune.models.load import load_model, load_tokenizer, resolve_model, stop_token_ids
from lmtune.models.methods import apply_method, load_adapters
from lmtune.models.scalar_head import LF_HEAD_FILE, LF_HEAD_NAMES, ScalarHeadModel, is_lf_reward_head
from lmtune.train.checkpoint import RUN_CONFIG, saved_run_config
from lmtune.train.engine import Batch, Metrics, Objective, fit
from lmtune.train.losses import bradley_terry
from lmtune.train.preference import ScoredPair, collate_pairs, count_pairs, pair_length
from lmtune.train.setup import start_run


def _rm_loss(model: ScalarHeadModel, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    scores = model(batch["input_ids"], batch["attention_mask"])
    n = count_pairs(batch)
    chosen, rejected = scores[:n], scores[n:]
    margin = (chosen - rejected).detach()
    return bradley_terry(chosen, rejected).sum(), {"accuracy": ((margin > 0).float().sum(), n),
                                                    "margin": (margin.sum(), n)}


RM_OBJECTIVE = Objective(loss=_rm_loss, units=count_pairs, collate=collate_pairs, length=pair_length)


def freeze_output_head(lm: torch.nn.Module) -> None:
    """A reward model scores from the decoder, so the LM's own output head never runs. Left
    trainable (full fine-tuning of a model with an untied head, an adapter on lm_head), its
    parameters get no gradient: DDP then stops at the second step, waiting for those gradients,
    and the optimizer would hold state for them. A head weight tied to the input embeddings runs
    as those and keeps training."""
    head = lm.get_output_embeddings()
    if head is None:
        return
    embeddings = lm.get_input_embeddings().weight
    for parameter in head.parameters():
        if parameter is not embeddings:
            parameter.requires_grad_(False)


def run(cfg: RunConfig) -> dict[str, Any]:
    inputs = start_run(cfg)
    lm = apply_method(inputs.take_model(), cfg)
    freeze_output_head(lm)
    model = ScalarHeadModel(lm)
    train = (inputs.train_rows.map(ScoredPair) if isinstance(inputs.train_rows, RowStream)
             else [ScoredPair(p) for p in inputs.train_rows])
    val = [ScoredPair(p) for p in inputs.val_rows]
    return fit(cfg, model, inputs.tokenizer, train, val, RM_OBJECTIVE, inputs.output_dir,
               inputs.resume_dir, extra_results=inputs.row_counts(),
               eval_groups=inputs.val_groups)


# --- using a trained reward model -----------------------------------------------------------------

class RewardModel:
    """A trained stage-rm output, loaded by path, that scores (conversation, reply) pairs."""

    def __init__(self, folder: str | Path, batch_size: int = 8, base: str | None = None,
                 cutoff_len: int | None = None):
        """`base` and `cutoff_len` serve a folder LLaMA-Factory wrote, which records neither in a form
        lmtune reads: its adapter goes on `base` (default: the base its adapter_config names), as
        LLaMA-Factory's ppo puts it on the policy's base; rows keep `cutoff_len` tokens (default
        2048, both tools' default)."""
        folder = Path(folder)
        adapter = (folder / "adapter_config.json").is_file()
        if (folder / RUN_CONFIG).is_file():
            run_config = saved_run_config(folder)
            base, cutoff_len = run_config["model_name_or_path"], run_config["cutoff_len"]
        elif is_lf_reward_head(folder):
            if not adapter:
                base = str(folder)
            elif base is None:
                base = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
            cutoff_len = cutoff_len or RunConfig.model_fields["cutoff_len"].default
            if base is None:
                raise ModelError(f"{folder / 'adapter_config.json'} names no base model.",
                                 "set base_model_name_or_path in it, or load the reward model with "
                                 "the policy's model_name_or_path (stage ppo does).")
        else:
            raise ModelError(f"{folder} is not a reward model: it has neither lmtune's {RUN_CONFIG} "
                             f"nor LLaMA-Factory's {LF_HEAD_FILE} (tensors "
                             f"{', '.join(LF_HEAD_NAMES.values())}).",
                             "point it at the output_dir of a stage rm run (lmtune's or "
                             "LLaMA-Factory's).")
        base = resolve_model(base)
        # LLaMA-Factory saves the tokenizer beside the head too; a folder without one uses the base's.
        self.tokenizer = load_tokenizer(str(folder) if (folder / "tokenizer_config.json").is_file()
                                        else base)
        if adapter:
            # Merged: scoring runs at the speed of the plain model.
            lm = load_adapters(load_model(base), [str(folder)], trainable_last=False, merge_last=True)
        else:
            lm = load_model(str(folder))
        self.model = ScalarHeadModel(lm, init_std=0.0)  # zero init: loading draws no random numbers
        self.model.load_head(folder)
        self.model.eval().requires_grad_(False)
        self.encoder = ChatEncoder(self.tokenizer, stop_token_ids(self.tokenizer, lm),
                                   cutoff_len=cutoff_len)
        self.batch_size = batch_size

    def ids(self, prompt: list[Message], reply: str) -> list[int]:
        """The ids training saw for prompt + reply."""
        return self.tokenizer(self.encoder.render(prompt + [{"role": "assistant", "content": reply}]),
                              add_special_tokens=False)["input_ids"]

    def score(self, prompts: list[list[Message]], replies: list[str]) -> list[float]:
        return self.score_ids([self.ids(p, r) for p, r in zip(prompts, replies)])

    @torch.no_grad()
    def score_ids(self, rows: list[list[int]]) -> list[float]:
        """Scores of rendered conversations; a long one keeps its end, where the score is read."""
        rows = [ids[-self.encoder.cutoff_len:] for ids in rows]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            batch = collate([EncodedRow(ids, ids) for ids in rows[i: i + self.batch_size]],
                            self.tokenizer.pad_token_id)
            out += self.model(batch["input_ids"].to(device),
                              batch["attention_mask"].to(device)).tolist()
        return out
