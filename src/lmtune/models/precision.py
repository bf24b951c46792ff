"""The frozen base of an adapter method stored in half precision: half the weights' memory.

Under bf16 autocast every matmul already runs in bf16, casting each fp32 weight on every forward, so
a frozen weight stored in bf16 feeds the same numbers to the same kernels (and the per-forward casts
go away). What autocast does not cast stays as it was: the embedding's output is upcast to fp32, so
the residual stream is fp32 as before, and the small 1-D weights (norms, biases) and everything that
trains are fp32. Left out: full fine-tuning (fp32 master weights), freeze (its output is the whole
model, whose frozen layers would be saved rounded), a quantized base (bitsandbytes stores it), and
FSDP2 (one dtype per sharded unit).

In full precision (no bf16 or fp16), a checkpoint whose weights are stored in bf16 or fp16 (most
published ones) keeps them so under frozen_dtype: auto: each frozen linear layer casts its weight up
to fp32 inside its own forward and again in backward, keeping only the stored weight, so the run
computes in fp32 on the very values it would have loaded in fp32, at half the weights' memory.
`frozen_dtype: bfloat16` asks for the same storage of an fp32 checkpoint, rounded to bf16 once, at
load. Prefix tuning's keys and values are rounded too (peft hands them to the model in its base's
dtype), so auto leaves prefix tuning's base in fp32. The casts cost a few percent of a step on the
CPU (BENCHMARKS.md); `frozen_dtype: float32` keeps the base in fp32.

Loading: a checkpoint stored wider than the half precision (an fp32 folder) is loaded as stored,
which leaves its weights in the memory-mapped file, and each matrix is then converted on its own,
the file pages it was read from handed back at once. Converting while loading (transformers'
`dtype=`) reads the whole mapped file before it lets go of any of it, so the process held the fp32
file and the half copy together: 1.19 GiB at load for the default model's 0.25 GiB in bf16
(0.67 GiB this way). A base bitsandbytes quantizes as it loads is left with the same residue: the
weights it keeps as stored hold the file mapped, and with it every page the quantizer read; those
pages are handed back too (`release_quantized_sources`: the default model's QLoRA run starts
training at 0.52 GiB instead of 0.92).
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lmtune.config import RunConfig
from lmtune.config.rules import HALF_BASE_METHODS
from lmtune.errors import ConfigError

HALF = (torch.bfloat16, torch.float16)


def half_frozen_base(cfg: RunConfig, checkpoint_dtype: torch.dtype | None = None) -> bool:
    """Whether this run stores its frozen base in half precision: frozen_dtype auto under bf16, or
    in fp32 compute when the checkpoint stores its weights in half precision (`checkpoint_dtype`,
    see `checkpoint_half_dtype`: each layer then computes in fp32 on the very values stored, as
    if they were loaded in fp32), or bfloat16 asked for."""
    from lmtune.distributed import fsdp_settings

    # Not for prefix tuning, whose keys and values reach the model in its base's dtype (rounded),
    # nor under DeepSpeed, where (as for frozen_dtype: bfloat16) the fp32-compute path is not built.
    auto = cfg.bf16 or (computes_in_fp32(cfg) and checkpoint_dtype in HALF
                        and cfg.finetuning_type != "prefix" and not cfg.deepspeed)
    asked = cfg.frozen_dtype == "bfloat16" or (cfg.frozen_dtype == "auto" and auto)
    return (asked and cfg.finetuning_type in HALF_BASE_METHODS and cfg.quantization_bit is None
            and not fsdp_settings(cfg))


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `tensor` computes in here: autocast's where it is on for the
    tensor's device, else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def computes_in_fp32(cfg: RunConfig) -> bool:
    return not (cfg.bf16 or cfg.fp16 or cfg.pure_bf16)


def half_dtype(config, stored: torch.dtype | None = None) -> torch.dtype:
    """The half precision to store a frozen base in: the one its weights are `stored` in, else the
    one its config records (no rounding of float16 weights to bf16's shorter mantissa), else
    bf16."""
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    return stored if stored in HALF else own if own in HALF else torch.bfloat16


SAFETENSORS_HALF = {"BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_half_dtype(folder: str | Path) -> torch.dtype | None:
    """The half precision (bf16 or fp16) in which a checkpoint folder's safetensors store every
    floating-point weight; None when they store wider or mixed ones, or there are none. Read from
    the files' headers (what the config says can differ from what is stored). A damaged file
    counts as none: loading it reports it, with its name."""
    from safetensors import SafetensorError, safe_open

    codes = set()
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as weights:
                codes |= {weights.get_slice(name).get_dtype() for name in weights.keys()}
        except (SafetensorError, OSError):
            return None
    floats = {code for code in codes if code.startswith(("F", "BF"))}
    return SAFETENSORS_HALF.get(floats.pop()) if len(floats) == 1 else None


def stored_half(model: torch.nn.Module) -> torch.dtype | None:
    """The half precision the model's matrices are stored in, if any is."""
    return next((p.dtype for p in model.parameters() if p.ndim >= 2 and p.dtype in HALF), None)


def store_matrices_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Convert the model's floating-point matrices (embeddings, linear weights) to `dtype` one at a
    time, releasing each one's pages of the checkpoint's mapped file as it goes. 1-D weights (norms,
    biases) keep the checkpoint's values in full precision, and so do the modules the architecture
    keeps in fp32 (transformers' `_keep_in_fp32_modules`). Tied weights are one Parameter, converted
    once."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    files = _checkpoint_mappings()
    for name, param in model.named_parameters():
        if (not param.is_floating_point() or param.ndim < 2 or param.dtype == dtype
                or keep & set(name.split("."))):
            continue
        source = param.data
        param.data = source.to(dtype)
        _release_file_pages(source, files)
    model.config.dtype = dtype


MADV_DONTNEED = 4


def _checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of safetensors files (Linux; none elsewhere)."""
    return [(start, end) for start, end, _, _ in _mapped_checkpoint_files()]


def _mapped_checkpoint_files(folder: Path | None = None) -> list[tuple[int, int, int, Path]]:
    """(start, end, file offset, path) of each mapping of a safetensors file (in `folder` only,
    when given)."""
    maps = Path("/proc/self/maps")
    if not sys.platform.startswith("linux") or not maps.is_file():
        return []
    # a hub snapshot's files are links to blobs elsewhere: the maps name the blobs
    wanted = None if folder is None else {f.resolve() for f in folder.glob("*.safetensors")}
    mapped = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and (wanted is None and fields[5].endswith(".safetensors")
                                 or wanted is not None and Path(fields[5]) in wanted):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((start, end, int(fields[2], 16), Path(fields[5])))
    return mapped


def release_quantized_sources(model: torch.nn.Module, folder: str | Path) -> int:
    """After bitsandbytes quantized `model` from the checkpoint in `folder` as it loaded: hand back
    the file pages its quantized weights were read from, and return how many bytes. The weights kept
    as stored (an fp32 checkpoint's embeddings, norms) still live in the mapped file, which keeps
    the mapping, and with it every page the load read, resident: the whole full-precision
    checkpoint on top of its 4-bit copy. Only pages wholly inside a quantized weight's bytes go."""
    quantized = {name for name, p in model.named_parameters()
                 if hasattr(p, "quant_state") or p.dtype in (torch.uint8, torch.int8)}
    released = 0
    for start, end, offset, path in _mapped_checkpoint_files(Path(folder)):
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
        for name, entry in header.items():
            if name not in quantized:
                continue
            first, last = (start - offset + 8 + header_size + o for o in entry["data_offsets"])
            released += _release_range(max(first, start), min(last, end))
    return released


def _release_file_pages(tensor: torch.Tensor, files: list[tuple[int, int]]) -> None:
    """Hand back the pages that lie wholly inside `tensor`, when the tensor is read from a mapped
    checkpoint file and about to be dropped: the kernel keeps the file's data in its page cache,
    and any later read of these pages reads the file again. Memory of any other kind is left to
    its allocator."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if tensor.is_contiguous() and any(lo <= start and end <= hi for lo, hi in files):
        _release_range(start, end)


def _release_range(start: int, end: int) -> int:
    """madvise(DONTNEED) the pages wholly inside [start, end) of a mapped, never written file;
    returns the bytes released."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first:
        return 0
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(MADV_DONTNEED))
    return last - first


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def _fp32_output(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def settle_dtypes(model: torch.nn.Module, fp32_compute: bool) -> None:
    """After the method is applied to a base loaded in half precision: what trains, and the frozen
    1-D weights, back to fp32; the embedding hands fp32 to the residual stream; in fp32 compute,
    frozen linear layers cast their weight up as they use it. Tied weights stay tied (the same
    Parameter changes its data)."""
    for param in model.parameters():
        if param.dtype in HALF and (param.requires_grad or param.ndim < 2):
            param.data = param.data.float()
    embedding = model.get_input_embeddings()
    if embedding.weight.dtype in HALF:
        embedding.register_forward_hook(_fp32_output)
    if not fp32_compute:
        return
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype in HALF:
            module.__class__ = UpcastLinear
    # Any other half-precision weight (a convolution, an untied module of its own) computes in
    # fp32 from its stored values, widened once.
    owners = {id(m.weight) for m in model.modules() if isinstance(m, UpcastLinear)} | {id(embedding.weight)}
    for param in model.parameters():
        if param.dtype in HALF and id(param) not in owners:
            param.data = param.data.float()


class _UpcastMatmul(torch.autograd.Function):
    """y = x W^T + b with W stored in half precision and used in x's dtype. Autograd would keep the
    upcast copy of W for backward (a full-precision copy of every layer, the memory this saves);
    this keeps the stored W and casts it again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class UpcastLinear(torch.nn.Linear):
    """A frozen nn.Linear whose weight is stored in half precision and computes in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastMatmul.apply(x, self.weight, self.bias)
