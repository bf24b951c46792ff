"""Write a llama-architecture model and its tokenizer as one GGUF file (llama.cpp, Ollama).

Written with the `gguf` package as llama.cpp's own converter lays it out: llama.cpp rotates query
and key heads in interleaved pairs where HF rotates halves, so q_proj and k_proj rows are reordered
per head; 1-D tensors (norms) stay f32; a tied output head is left out (llama.cpp reuses the
embedding). transformers' GGUF loader undoes the same reordering, so the file loads back there too.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.errors import ModelError

TYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
         "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
         "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
         "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
FOR_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE. It must match, or llama.cpp
    and Ollama cut digits and punctuation otherwise than training did."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt2"  # GPT-2's split, which the default model's converted tokenizer uses
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"  # digits one by one, then GPT-2's split (SmolLM and StarCoder vocabularies)
    raise ModelError(f"export_format gguf: lmtune cannot tell llama.cpp's name for this tokenizer's "
                     f"pre-tokenizer ({json.dumps(pre)[:200]}).",
                     "export_format: hf, then convert that folder with llama.cpp's "
                     "convert_hf_to_gguf.py, which knows more tokenizers.")


def check_convertible(model: PreTrainedModel, tokenizer_folder: Path) -> None:
    """Refuse, before anything is written, a model or tokenizer this writer would get wrong."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    why = None
    if config.model_type != "llama":
        why = f"it writes llama-architecture models only, and this one is {config.model_type}"
    elif rope.get("rope_type", "default") != "default":
        why = f"rope scaling ({rope.get('rope_type')}) is not written"
    elif getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        why = "bias tensors are not written"
    elif config.head_dim * config.num_attention_heads != config.hidden_size:
        why = "head_dim times the head count differs from hidden_size"
    if why:
        raise ModelError(f"export_format gguf: {why}.",
                         "export_format: hf, then convert that folder with llama.cpp's "
                         "convert_hf_to_gguf.py.")
    tokenizer_json = tokenizer_folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelError("export_format gguf: the tokenizer has no tokenizer.json (a fast BPE "
                         "tokenizer) to write into the GGUF.",
                         "export_format: hf, then convert with llama.cpp's convert_hf_to_gguf.py.")
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE" or data["model"].get("byte_fallback"):
        raise ModelError("export_format gguf: lmtune writes byte-level BPE tokenizers only.",
                         "export_format: hf, then convert with llama.cpp's convert_hf_to_gguf.py.")
    _pre_tokenizer(data)


def _reorder_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _tensors(model: PreTrainedModel):
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise ModelError(f"export_format gguf: no GGUF name for the weight {hf_name}.",
                             "export_format: hf, then convert with llama.cpp's convert_hf_to_gguf.py.")
        tensor = tensor.detach().float()
        if hf_name.endswith("q_proj.weight"):
            tensor = _reorder_rope_rows(tensor, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _reorder_rope_rows(tensor, config.num_key_value_heads)
        yield name, tensor.numpy()


def _encode(array: np.ndarray, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    qtype = TYPES[kind][0]
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
        # q8_0 packs rows in blocks of 32; llama.cpp keeps a row that does not divide in f16 too.
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array, qtype), qtype


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokenizer_folder: Path,
               path: Path, kind: str, name: str) -> None:
    """Write `model` (weights in any float dtype) with the tokenizer saved in `tokenizer_folder`
    to `path`, the 2-D weights as `kind` (f32, f16, bf16, q8_0)."""
    config = model.config
    tokenizer_json = json.loads((tokenizer_folder / "tokenizer.json").read_text(encoding="utf-8"))
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(TYPES[kind][1])

    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    vocab = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), config.vocab_size))))
    for token in vocab:
        tokens.append(token)
        types.append(gguf.TokenType.NORMAL if token not in added else
                     gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    for i in range(len(tokens), config.vocab_size):  # embedding rows beyond the tokenizer
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_folder, load_merges=True, n_vocab=config.vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and tokenizer.chat_template:  # saved as chat_template.jinja
        writer.add_chat_template(tokenizer.chat_template)
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(False)  # the chat template writes every special token itself

    for tensor_name, array in _tensors(model):
        data, qtype = _encode(array, kind)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
