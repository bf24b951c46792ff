"""The output head and its cross-entropy, a chunk of target positions at a time.

Plain autograd keeps every target position's logits (positions x vocabulary, in fp32 for the loss)
until backward, and backward adds a gradient of the same size: on a small model with a large
vocabulary that is the largest single buffer of a step. Here each chunk's logits live only while
the chunk is computed:

- summed loss (sft, pt): the gradient of a sum is known in forward up to the scalar that backward
  brings, so each chunk's gradients (hidden states, and the head's weight when it trains) are formed
  right after its loss and the logits dropped; backward only scales them. No extra FLOPs. A head that
  does not train (the adapter methods') goes further: one pass over the vocabulary a slice at a
  time keeps a running maximum and sum of exponentials per position (rescaled as the maximum grows)
  and the matching running sum for the hidden states' gradient, so not even one chunk's whole
  logits are held.
- per-token log-probabilities (dpo, kto, rm's preference data): each token's incoming gradient is
  known only in backward, so backward recomputes each chunk's logits from the saved hidden states
  and log-sum-exp (one more head matmul per chunk).

The arithmetic is the plain path's: logits in the precision the head computes in (autocast's, or
the hidden states'), log-softmax in fp32, gradients cast back the same way; only the order of the
sums differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Bytes of fp32 logits one chunk may hold: large enough that each chunk's matmul runs at full speed
# (on a GPU, whole 128-row tiles), small next to what the logits of a batch take.
CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}
# Vocabulary rows the head computes (and, stored in another dtype, casts) at a time where it does
# not hold whole logits.
SLICE_ROWS = 8192


def chunk_rows(vocab: int, device_type: str) -> int:
    """How many positions one chunk takes on a device of this type."""
    rows = max(1, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]) // (4 * vocab))
    return rows - rows % 128 if rows > 128 else rows


@dataclass(frozen=True)
class Head:
    """An output head's weight and bias, and the dtype its matmul computes in."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype


def linear_head(module: torch.nn.Module, hidden: torch.Tensor) -> Head | None:
    """The head as a plain weight and bias when `module` computes hidden @ W^T + b and nothing else;
    None for any other head (an adapter or a quantized layer on it, a weight that DeepSpeed's ZeRO-3
    or FSDP holds in pieces), which then runs as a module."""
    from torch.distributed.tensor import DTensor

    from lmtune.models.precision import UpcastLinear, compute_dtype

    if type(module) not in (torch.nn.Linear, UpcastLinear):
        return None
    weight = module.weight
    if isinstance(weight, DTensor) or weight.numel() == 0 or hasattr(weight, "ds_id"):
        return None
    return Head(weight, module.bias, compute_dtype(hidden))


def _chunks(hidden: torch.Tensor, vocab: int) -> Iterator[slice]:
    n, rows = len(hidden), chunk_rows(vocab, hidden.device.type)
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _weight_slices(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   always: bool = False
                   ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]]:
    """The head's weight and bias in the compute dtype, as (vocabulary rows, their weight, their
    bias): in slices when `always` asks, or when the weight is stored in another dtype (a bf16
    frozen base under fp32 compute), as a whole cast copy would be vocabulary x hidden in fp32,
    held at the step's peak (the forward's activations are all alive when the head runs)."""
    step = SLICE_ROWS if always or weight.dtype != dtype else weight.shape[0]
    for start in range(0, weight.shape[0], step):
        rows = slice(start, min(start + step, weight.shape[0]))
        yield rows, weight[rows].to(dtype), bias[rows].to(dtype) if bias is not None else None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """fp32 logits of `hidden` (already in the compute dtype), each rounded once to the compute
    dtype, as the head's own matmul would."""
    if weight.dtype == dtype:
        return F.linear(hidden, weight, bias.to(dtype) if bias is not None else None).float()
    logits = torch.empty(len(hidden), weight.shape[0], dtype=torch.float32, device=hidden.device)
    for rows, w, b in _weight_slices(weight, bias, dtype):
        logits[:, rows] = F.linear(hidden, w, b)
    return logits


def _exp_in_place(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp(logits - each row's max), each row's sum of those, the max), the first made in place
    of the logits: one exp pass, and no temporary of the chunk's size beside them. The row's
    log-sum-exp is max + log(sum)."""
    top = logits.amax(-1, keepdim=True)
    exp = logits.sub_(top).exp_()
    sums = exp.sum(-1, keepdim=True)
    return exp, sums, top


def _frozen_head_pass(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, dtype: torch.dtype, want_grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sum of -log p(y), how many rows rank y first, the sum's gradient for h when `want_grad`)
    for a head whose weight and bias do not train, in one pass over its vocabulary slices. The
    gradient is softmax @ W - W[y]; softmax @ W is summed slice by slice as exp(z - running max) @ W,
    rescaled whenever a row's maximum grows, and divided by the sum of exponentials at the end."""
    n = len(h)
    top = torch.full((n,), float("-inf"), device=h.device)
    sums = torch.zeros(n, device=h.device)
    target = torch.zeros(n, device=h.device)
    best = torch.zeros(n, dtype=torch.long, device=h.device)
    grad = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if want_grad else None
    for cols, w, b in _weight_slices(weight, bias, dtype, always=True):
        z = F.linear(h, w, b).float()
        slice_top, slice_best = z.max(-1)
        best = torch.where(slice_top > top, slice_best + cols.start, best)  # the first maximum wins
        inside = (y >= cols.start) & (y < cols.stop)
        at = (y - cols.start).clamp(0, z.shape[1] - 1)[:, None]
        target = torch.where(inside, z.gather(1, at).squeeze(1), target)
        new_top = torch.maximum(top, slice_top)
        rescale = (top - new_top).exp()  # 0 on the first slice (top is -inf)
        exp = z.sub_(new_top[:, None]).exp_()
        sums = sums.mul_(rescale).add_(exp.sum(-1))
        if grad is not None:
            grad = grad.mul_(rescale[:, None]).add_((exp.to(dtype) @ w).float())
        top = new_top
    loss = (top + sums.log() - target).sum()
    if grad is not None:
        grad = grad.div_(sums[:, None]).sub_(weight[y].to(dtype).float())
    return loss, (best == y).sum(), grad


class _Grads:
    """The gradients a chunked pass builds: of the hidden states chunk by chunk, and sums over the
    chunks (in fp32) for the head's weight and bias; each only where `need` asks."""

    def __init__(self, hidden, weight, bias, need: tuple[bool, bool, bool]):
        self.hidden = torch.empty_like(hidden) if need[0] else None
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need[1] else None
        self.bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] else None

    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add(self, rows: slice, grad_logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
            dtype: torch.dtype) -> None:
        """One chunk's share, from the gradient of its logits and its inputs (compute dtype)."""
        grad_hidden = None
        for cols, w, _ in _weight_slices(weight, None, dtype):
            if self.hidden is not None:
                part = (grad_logits[:, cols] @ w).float()  # slices summed in fp32
                grad_hidden = part if grad_hidden is None else grad_hidden.add_(part)
            if self.weight is not None:
                self.weight[cols] += (grad_logits[:, cols].T @ h).float()
        if grad_hidden is not None:
            self.hidden[rows] = grad_hidden.to(self.hidden.dtype)
        if self.bias is not None:
            self.bias += grad_logits.float().sum(0)


class _SummedLoss(torch.autograd.Function):
    """sum of -log p(label) over the rows of `hidden`; with `want_grad`, the gradients are made in
    forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype, want_grad):
        need = tuple(want_grad and n for n in ctx.needs_input_grad[:3])
        grads = _Grads(hidden, weight, bias, need)
        head_trains = need[1] or need[2]
        with torch.autocast(hidden.device.type, enabled=False):
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            for rows in _chunks(hidden, weight.shape[0] if head_trains else SLICE_ROWS):
                h, y = hidden[rows].to(dtype), labels[rows]
                if not head_trains:
                    loss, hits, grad_h = _frozen_head_pass(h, y, weight, bias, dtype, need[0])
                    total += loss
                    correct += hits
                    if grad_h is not None:
                        grads.hidden[rows] = grad_h.to(grads.hidden.dtype)
                    continue
                # The head trains: its gradient needs every logit's final probability.
                logits = _logits(h, weight, bias, dtype)
                correct += (logits.argmax(-1) == y).sum()
                target = logits.gather(1, y[:, None])
                exp, sums, top = _exp_in_place(logits)
                total += (top + sums.log() - target).sum()
                if grads.any():
                    # d(sum of -log p)/d logits = softmax - one_hot, made in place of the logits
                    grad = exp.div_(sums)
                    grad[torch.arange(len(y), device=y.device), y] -= 1
                    grads.add(rows, grad.to(dtype), h, weight, dtype)
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.mark_non_differentiable(correct)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        grads = [None if g is None else (g * grad_total).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None)


class _TokenLogps(torch.autograd.Function):
    """log p(label) of each row of `hidden`; backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            logps = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(logps)
            for rows in _chunks(hidden, weight.shape[0]):
                logits = _logits(hidden[rows].to(dtype), weight, bias, dtype)
                target = logits.gather(1, labels[rows][:, None]).squeeze(1)
                _, sums, top = _exp_in_place(logits)
                lse[rows] = (top + sums.log()).squeeze(1)
                logps[rows] = target - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.dtype = dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        dtype = ctx.dtype
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in _chunks(hidden, weight.shape[0]):
                h, y = hidden[rows].to(dtype), labels[rows]
                # d log p(y)/d logits = one_hot - softmax, times the token's incoming gradient
                grad = _logits(h, weight, bias, dtype).sub_(lse[rows, None]).exp_().neg_()
                grad[torch.arange(len(y), device=y.device), y] += 1
                grads.add(rows, (grad * grad_logps[rows, None]).to(dtype), h, weight, dtype)
        return (grads.hidden, grads.weight.to(weight.dtype) if grads.weight is not None else None,
                grads.bias.to(bias.dtype) if grads.bias is not None else None, None, None)


def summed_loss(head: Head, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of the cross-entropy of hidden @ W^T + b against labels, how many rows the
    head ranks the label first), never holding more than one chunk's logits."""
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    return _SummedLoss.apply(hidden, head.weight, head.bias, labels, head.dtype, want_grad)


def token_logps(head: Head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: log p(label) under hidden @ W^T + b, never holding more than one chunk's logits."""
    return _TokenLogps.apply(hidden, head.weight, head.bias, labels, head.dtype)
