"""stage: pt. Continued pre-training: next-token loss on every token of plain text.

Documents end with EOS and are packed into rows of cutoff_len (packing is on by default for pt),
with position ids restarting per document so no document attends to another (data/batching.py).
The objective is SFT's token loss, with every token a target; eval reports perplexity,
exp(mean token loss on the val split).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmtune.config import RunConfig
from lmtune.models.methods import apply_method
from lmtune.train.engine import fit
from lmtune.train.setup import start_run
from lmtune.train.sft import token_objective


def run(cfg: RunConfig) -> dict[str, Any]:
    inputs = start_run(cfg)
    model = apply_method(inputs.take_model(), cfg)
    return fit(cfg, model, inputs.tokenizer, inputs.train_rows, inputs.val_rows,
               replace(token_objective(cfg), perplexity=True),
               inputs.output_dir, inputs.resume_dir, extra_results=inputs.row_counts(),
               eval_groups=inputs.val_groups)
