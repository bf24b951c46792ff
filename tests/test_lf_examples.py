"""Configs in the shapes of LLaMA-Factory's examples/ folders (train_lora, train_full, train_qlora,
extras, inference, merge_lora), written for lmtune's tests and pointed at the tiny model: each loads
with no unknown key and runs its command (`plan` for training, `chat --prompt` for inference,
`export` for merging). Their keys, comments and sections follow those files; the values are small."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from lmtune.cli import main
from lmtune.config import load_config
from tests.conftest import ALPACA, PAIRS, write_json

TRAIN_HEAD = """\
### model
model_name_or_path: {model}
trust_remote_code: true

"""
DATASET = """\
### dataset
dataset: {dataset}
dataset_dir: {data}
cutoff_len: 256
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 1
dataloader_num_workers: 0

"""
OUTPUT_AND_TRAIN = """\
### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: {lr}
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: {bf16}
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: identity
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""


def training(method: str, dataset: str = "identity", lr: str = "1.0e-4", bf16: str = "false") -> str:
    return (TRAIN_HEAD + "### method\n" + method + "\n" + DATASET.replace("{dataset}", dataset)
            + OUTPUT_AND_TRAIN.replace("{lr}", lr).replace("{bf16}", bf16))


LORA = "do_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n"
TRAINING = {
    "train_lora/tiny_lora_sft.yaml": training("stage: sft\n" + LORA),
    "train_lora/tiny_lora_pretrain.yaml": training("stage: pt\n" + LORA, dataset="corpus"),
    "train_lora/tiny_lora_reward.yaml": training("stage: rm\n" + LORA, dataset="pairs"),
    "train_lora/tiny_lora_dpo.yaml": training(
        "stage: dpo\n" + LORA + "pref_beta: 0.1\npref_loss: sigmoid  # choices: [sigmoid (dpo), "
        "orpo, simpo]\n", dataset="pairs", lr="5.0e-6"),
    "train_lora/tiny_lora_kto.yaml": training(
        "stage: kto\n" + LORA + "pref_beta: 0.1\n", dataset="kto", lr="5.0e-6"),
    "train_lora/tiny_lora_ppo.yaml": training(
        "stage: ppo\n" + LORA + "reward_model: {reward}\n", lr="1.0e-5"),
    "train_full/tiny_full_sft.yaml": training(
        "stage: sft\ndo_train: true\nfinetuning_type: full\n"
        "deepspeed: {deepspeed}  # choices: [ds_z0_config.json, ds_z2_config.json, "
        "ds_z3_config.json]\n", lr="1.0e-5"),
    "train_qlora/tiny_lora_sft_otfq.yaml": training(
        "stage: sft\n" + LORA + "quantization_bit: 4  # choices: [8 (bnb/hqq/eetq), 4 "
        "(bnb/hqq), 3 (hqq), 2 (hqq)]\nquantization_method: bnb\ndouble_quantization: true\n"),
    "extras/loraplus/tiny_lora_sft.yaml": training("stage: sft\n" + LORA + "loraplus_lr_ratio: 16.0\n"),
    "extras/pissa/tiny_lora_sft.yaml": training(
        "stage: sft\n" + LORA + "pissa_init: true\npissa_iter: 16\npissa_convert: true\n"),
    "extras/dft/tiny_full_sft.yaml": training(
        "stage: sft\ndo_train: true\nfinetuning_type: full\nuse_dft_loss: true\n", lr="1.0e-5"),
    "extras/oft/tiny_oft_sft.yaml": training(
        "stage: sft\ndo_train: true\nfinetuning_type: oft\noft_block_size: 16\noft_target: all\n"),
}
INFERENCE = """\
model_name_or_path: {model}
adapter_name_or_path: {adapter}
template: chatml
infer_backend: huggingface  # choices: [huggingface, vllm, sglang]
trust_remote_code: true
max_new_tokens: 4
"""
MERGE = """\
### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: {model}
adapter_name_or_path: {adapter}
template: chatml
trust_remote_code: true

### export
export_dir: {export}
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
"""


@pytest.fixture(scope="module")
def places(tiny_model_dir, random_adapter, tmp_path_factory) -> dict[str, str]:
    """What the configs point at: the tiny model, an adapter, small data, a reward model in
    LLaMA-Factory's layout, a DeepSpeed config."""
    root = tmp_path_factory.mktemp("lf-examples")
    data = root / "data"
    write_json(data / "identity.json", ALPACA)
    write_json(data / "pairs.json", PAIRS)
    write_json(data / "kto.json", [{"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}], "label": ok}
                                   for q in ("Is ice cold?", "Is fire hot?")
                                   for a, ok in (("Yes.", True), ("No.", False))])
    (data / "corpus.jsonl").write_text("".join(json.dumps({"text": r["output"]}) + "\n" for r in ALPACA))
    write_json(data / "dataset_info.json", {
        "identity": {"file_name": "identity.json"},
        "pairs": {"file_name": "pairs.json", "ranking": True},
        "kto": {"file_name": "kto.json", "formatting": "openai", "columns": {"kto_tag": "label"}},
        "corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}})
    reward = root / "lf-reward"
    shutil.copytree(random_adapter, reward)
    save_file({"v_head.summary.weight": torch.zeros(1, 64), "v_head.summary.bias": torch.zeros(1)},
              reward / "value_head.safetensors")
    deepspeed = write_json(root / "ds_z3_config.json", {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3}})
    return {"model": tiny_model_dir, "adapter": random_adapter, "data": str(data),
            "reward": str(reward), "deepspeed": str(deepspeed), "root": str(root)}


def write(places: dict[str, str], name: str, text: str, **more: str) -> Path:
    path = Path(places["root"]) / "examples" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    values = places | more
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    assert "{" not in text, text
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_training_example_plans(places, name, tmp_path, capsys):
    path = write(places, name, TRAINING[name], out=str(tmp_path / "out"))
    load_config(path)  # every key known: an unknown one raises here
    assert main(["plan", str(path)]) == 0, capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # plan does not train


def test_inference_example_chats(places, capsys):
    path = write(places, "inference/tiny_lora_sft.yaml", INFERENCE)
    load_config(path)
    assert main(["chat", str(path), "--prompt", "Say hi."]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()


def test_merge_lora_example_exports(places, tmp_path, tiny_model_dir):
    export_dir = tmp_path / "merged"
    path = write(places, "merge_lora/tiny_lora_sft.yaml", MERGE, export=str(export_dir))
    load_config(path)
    assert main(["export", str(path)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(export_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # The adapter (random, not zero) is in the weights: q_proj moved, embeddings did not.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])
    assert torch.equal(merged.state_dict()["model.embed_tokens.weight"],
                       base.state_dict()["model.embed_tokens.weight"])
