"""Export in the base's dtype or the one asked for, re-export of a full fine-tune in shards, GGUF
files that transformers' GGUF loader reads back with the same answers, and an Ollama Modelfile whose
Go template renders what the tokenizer's chat template renders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.data.templates import BUILTIN, to_jinja
from lmtune.errors import ConfigError
from lmtune.models.lineage import EXPORT_RECORD, adapter_fingerprint, weights_fingerprint
from lmtune.models.load import load_tokenizer
from lmtune.models.modelfile import message_format
from tests.conftest import train, write_yaml

IDS = torch.tensor([[1, 9690, 198, 33, 42, 2, 198, 1, 4093]])
PROMPTS = ["Greet me.", "What is 12 + 30?", "Name a colour."]


def export(tmp_path: Path, name: str, config: dict, *overrides: str) -> Path:
    target = tmp_path / name
    path = write_yaml(tmp_path / f"{name}.yaml", config | {"export_dir": str(target)})
    assert main(["export", str(path), *overrides]) == 0
    return target


def dtypes(folder: Path) -> set[str]:
    found = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            found |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return found


def size(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def greedy(model, tokenizer) -> list[str]:
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                    do_sample=False, pad_token_id=2)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:]))
    return answers


@pytest.fixture(scope="module")
def merge(tiny_model_dir, random_adapter) -> dict:
    return {"model_name_or_path": tiny_model_dir, "adapter_name_or_path": random_adapter}


def test_export_keeps_the_base_dtype_and_bf16_halves_the_size(merge, tiny_model_dir, tmp_path):
    fp32 = export(tmp_path, "fp32", merge)
    assert dtypes(fp32) == {"F32"}  # the tiny base is stored in float32
    assert json.loads((fp32 / "config.json").read_text())["dtype"] == "float32"
    bf16 = export(tmp_path, "bf16", merge, "infer_dtype=bfloat16")
    assert dtypes(bf16) == {"BF16"}
    assert 0.49 < size(bf16) / size(fp32) < 0.51
    loaded = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    full = AutoModelForCausalLM.from_pretrained(fp32)
    torch.testing.assert_close(logits(loaded.float()), logits(full), atol=0.05, rtol=0.05)
    assert json.loads((bf16 / EXPORT_RECORD).read_text())["lineage"]["merged_adapters"] == [
        {"path": merge["adapter_name_or_path"],
         "fingerprint": adapter_fingerprint(merge["adapter_name_or_path"])}]

    # A bf16 checkpoint re-exported with no adapter stays bf16 (LLaMA-Factory's merge config shape).
    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(base)
    load_tokenizer(tiny_model_dir).save_pretrained(base)
    again = export(tmp_path, "again", {"model_name_or_path": str(base)})
    assert dtypes(again) == {"BF16"} and size(again) == size(base)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(again)),
                               logits(AutoModelForCausalLM.from_pretrained(base)), atol=0, rtol=0)


def test_a_full_fine_tune_is_re_exported_in_shards_in_its_bases_dtype(train_config, tiny_model_dir,
                                                                     tmp_path, capsys):
    base = tmp_path / "bf16-base"  # a bf16 checkpoint, as most hub models are
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(base)
    load_tokenizer(tiny_model_dir).save_pretrained(base)
    run = {k: v for k, v in train_config.items() if k != "lora_rank"}
    run |= {"model_name_or_path": str(base), "finetuning_type": "full", "max_steps": 2}
    train(tmp_path, run)
    out = Path(run["output_dir"])
    assert dtypes(out) == {"F32"}  # lmtune trains and saves in float32
    # LLaMA-Factory's merge config for a full fine-tune: the run as model, no adapter, a shard size.
    sharded = export(tmp_path, "sharded", {"model_name_or_path": str(out), "export_size": 0.002})
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    for shard in shards:  # a tensor larger than export_size (the embedding) gets a shard alone
        with safe_open(shard, framework="pt") as f:
            assert shard.stat().st_size <= 0.002e9 + 1e5 or len(f.keys()) == 1
    assert dtypes(sharded) == {"BF16"}  # the dtype of the checkpoint the run started from
    widened = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    torch.testing.assert_close(logits(widened), logits(AutoModelForCausalLM.from_pretrained(out)),
                               atol=0.05, rtol=0.05)
    record = json.loads((sharded / EXPORT_RECORD).read_text())
    assert record["lineage"] == {"base_model_name_or_path": str(out),
                                 "base_fingerprint": weights_fingerprint(str(out)),
                                 "merged_adapters": []}
    # The run's own YAML exports what output_dir holds; in float32 it is the trained model exactly.
    exact = export(tmp_path, "exact", run, "infer_dtype=float32")
    assert dtypes(exact) == {"F32"} and "(float32)" in capsys.readouterr().out
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(exact)),
                               logits(AutoModelForCausalLM.from_pretrained(out)), atol=0, rtol=0)
    assert weights_fingerprint(str(exact)) == weights_fingerprint(str(out))


def test_gptq_export_is_refused_with_the_reason(merge, tmp_path, capsys):
    path = write_yaml(tmp_path / "q.yaml", merge | {"export_dir": str(tmp_path / "q"),
                                                    "export_quantization_bit": 4,
                                                    "export_quantization_dataset": "alpaca"})
    assert main(["export", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 keys lmtune cannot use" in err and "export_quantization_bit: 4" in err
    assert "export_quantization_dataset: 'alpaca'" in err
    assert "CUDA GPU" in err and "gptqmodel" in err and "q8_0" in err
    assert not (tmp_path / "q").exists()


# --- Ollama Modelfile ----------------------------------------------------------------------------

def _parse(pieces: list[str], i: int = 0) -> tuple[list, int]:
    """Go-template pieces from i to the next end/else action -> nodes and that action's index."""
    nodes: list = []
    while i < len(pieces):
        piece, i = pieces[i], i + 1
        if not piece.startswith("{{"):
            nodes.append(("text", piece))
            continue
        action = piece[2:-2].strip()
        if action == "end" or action.startswith("else"):
            return nodes, i - 1
        if action == "range .Messages":
            body, i = _parse(pieces, i)
            nodes.append(("range", body))
            i += 1
        elif match := re.fullmatch(r'if eq \.Role "(\w+)"', action):
            branches, role = [], match.group(1)
            while True:
                body, i = _parse(pieces, i)
                branches.append((role, body))
                action, i = pieces[i][2:-2].strip(), i + 1
                if action == "end":
                    break
                role = re.fullmatch(r'else if eq \.Role "(\w+)"', action).group(1)
            nodes.append(("if", branches))
        else:
            nodes.append(("field", action))
    return nodes, i


def _evaluate(nodes: list, messages: list[dict], message: dict | None = None) -> str:
    out = ""
    for kind, value in nodes:
        if kind == "text":
            out += value
        elif kind == "field":  # .Role or .Content; anything else is a KeyError: unexpected syntax
            out += message[{".Role": "role", ".Content": "content"}[value]]
        elif kind == "range":
            out += "".join(_evaluate(value, messages, m) for m in messages)
        else:
            out += next((_evaluate(body, messages, message) for role, body in value
                         if message["role"] == role), "")
    return out


def go_render(template: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """Ollama's rendering of the Go-template subset lmtune writes (text, range .Messages, if / else
    if eq .Role, .Role, .Content). Ollama puts SYSTEM first when a chat has no system message."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    nodes, end = _parse(re.split(r"(\{\{.*?\}\})", template))
    assert end == len(re.split(r"(\{\{.*?\}\})", template))  # no stray end or else
    return _evaluate(nodes, messages)


def parse_modelfile(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1),
            "template": template and template.group(1), "system": system and system.group(1),
            "stop": [json.loads(s) for s in re.findall(r"^PARAMETER stop (.+)$", text, re.M)]}


CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Name a colour.\nOne only."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}],
]


def assert_renders_like(modelfile: dict, tokenizer) -> None:
    for chat in CHATS:
        expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert go_render(modelfile["template"], modelfile["system"], chat) == expected


def test_modelfile_renders_the_default_models_template_and_stops(merge, tokenizer, tmp_path):
    folder = export(tmp_path, "hf", merge, "do_sample=false")
    modelfile = parse_modelfile((folder / "Modelfile").read_text())
    assert modelfile["from"] == "."
    assert modelfile["template"] == ("{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}"
                                     "<|im_end|>\n{{ end }}<|im_start|>assistant\n")
    assert modelfile["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert modelfile["stop"] == ["<|im_end|>"] == [tokenizer.eos_token]
    assert "PARAMETER temperature 0\n" in (folder / "Modelfile").read_text()
    assert_renders_like(modelfile, tokenizer)


def test_modelfile_templates_of_the_builtin_formats(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    written = set()
    for name, fmt in BUILTIN.items():
        tokenizer.chat_template = to_jinja(fmt)
        found = message_format(tokenizer)
        if found is None:
            continue
        written.add(name)
        assert_renders_like({"template": found.go_template(), "system": found.default_system},
                            tokenizer)
    # A system prompt fused into the first user turn is not one block per message: no TEMPLATE.
    assert {"llama2", "mistral", "gemma"}.isdisjoint(written)
    assert {"alpaca", "chatml", "qwen", "llama3", "deepseekcoder", "default"} <= written


# --- GGUF ----------------------------------------------------------------------------------------

@pytest.mark.slow  # each GGUF parse of the 49k-token vocabulary takes ~10-20 s on 2 cores
def test_gguf_loads_back_with_the_same_answers(merge, tokenizer, random_adapter, tmp_path,
                                               monkeypatch, capsys):
    monkeypatch.setenv("LMTUNE_HOME", str(tmp_path / "home"))  # GGUF conversions land here
    hf = export(tmp_path, "hf16", merge, "infer_dtype=float16")
    gguf = export(tmp_path, "gguf16", merge, "export_format=gguf", "export_gguf_type=f16")
    assert sorted(p.name for p in gguf.iterdir()) == ["Modelfile", EXPORT_RECORD, "model-f16.gguf"]
    assert parse_modelfile((gguf / "Modelfile").read_text())["from"] == "./model-f16.gguf"
    # The same f16 weights as the HF export, plus the vocabulary and merges (~2 MB).
    assert 0 < size(gguf, "*.gguf") - size(hf) < 2.5e6

    loaded = AutoModelForCausalLM.from_pretrained(gguf, gguf_file="model-f16.gguf")
    from_gguf = AutoTokenizer.from_pretrained(gguf, gguf_file="model-f16.gguf")
    reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-5, rtol=1e-5)
    for chat in CHATS:  # the tokenizer and chat template travel inside the file
        assert from_gguf.apply_chat_template(chat, add_generation_prompt=True) == \
            tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert greedy(loaded, from_gguf) == greedy(reference, tokenizer)

    # q8_0 (34 bytes per 32 weights against f16's 64) stays close to f16; lmtune itself loads the
    # .gguf, and the export's record goes with it: the merged adapter is refused on it as on the HF
    # export.
    q8 = export(tmp_path, "gguf8", merge, "export_format=gguf", "export_gguf_type=q8_0")
    assert size(gguf, "*.gguf") - size(q8, "*.gguf") > 0.45 * size(hf)
    run = write_yaml(tmp_path / "q8.yaml", {"model_name_or_path": str(q8 / "model-q8_0.gguf"),
                                            "max_new_tokens": 8})
    assert main(["chat", str(run), "--prompt", "Greet me."]) == 0
    assert capsys.readouterr().out.strip()
    from lmtune.models.load import resolve_model
    q8_model = AutoModelForCausalLM.from_pretrained(resolve_model(str(q8 / "model-q8_0.gguf")))
    similarity = torch.nn.functional.cosine_similarity(logits(q8_model).flatten(),
                                                       logits(reference).flatten(), dim=0)
    # Rounded to 8 bits, and only slightly (the tiny model's logits spread by ~0.16 only, so its
    # 8-bit rounding shows more than a trained model's: 0.9989 here).
    assert 0.995 < similarity < 1 - 1e-6
    assert main(["chat", str(run), f"adapter_name_or_path={random_adapter}", "--prompt", "hi"]) == 2
    assert f"adapter {random_adapter} is already merged into" in capsys.readouterr().err


def test_gguf_keys_without_gguf_or_twice_are_refused(merge):
    with pytest.raises(ConfigError, match="export_gguf_type: q8_0 applies to export_format: gguf"):
        build_config(merge | {"export_gguf_type": "q8_0"})
    with pytest.raises(ConfigError, match="both set the type of the GGUF's weights"):
        build_config(merge | {"export_format": "gguf", "export_gguf_type": "f16",
                              "infer_dtype": "bfloat16"})


def test_gguf_refuses_what_it_cannot_write(merge, tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "qwen-like"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "qwen2",
                                                            "architectures": ["Qwen2ForCausalLM"]}))
    path = write_yaml(tmp_path / "g.yaml", {"model_name_or_path": str(other), "export_format": "gguf",
                                            "export_dir": str(tmp_path / "g")})
    assert main(["export", str(path)]) == 2
    err = capsys.readouterr().err
    assert "llama-architecture models only" in err and "qwen2" in err and "convert_hf_to_gguf" in err
    assert not (tmp_path / "g").exists()
