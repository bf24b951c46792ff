"""Reward models across tools: LLaMA-Factory's layout (an adapter or a full model with
value_head.safetensors in trl's names) scores in lmtune, and lmtune's rm output carries that file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lmtune.cli import main
from lmtune.config import load_config
from lmtune.errors import ModelError
from lmtune.models.load import stop_token_ids
from lmtune.train.ppo import reward_scorer
from lmtune.train.rm import RewardModel
from tests.conftest import PAIRS, train, write_json, write_yaml

LF_NAMES = ("v_head.summary.weight", "v_head.summary.bias")
TEXTS = ["<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n",
         "Hi", "<|im_start|>user\nDo fish swim?<|im_end|>\n"]


def write_lf_head(folder: Path, hidden: int) -> dict[str, torch.Tensor]:
    """A value head as LLaMA-Factory's rm saves it (trl's ValueHead.summary: Linear(hidden, 1))."""
    torch.manual_seed(1)
    head = {LF_NAMES[0]: torch.randn(1, hidden), LF_NAMES[1]: torch.randn(1)}
    save_file(head, folder / "value_head.safetensors", metadata={"format": "pt"})
    return head


def by_hand(model, tokenizer, head: dict[str, torch.Tensor]) -> list[float]:
    """Each row alone (no padding): the last token's final hidden state through the head."""
    out = []
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            out.append((hidden @ head[LF_NAMES[0]][0] + head[LF_NAMES[1]][0]).item())
    return out


@pytest.fixture
def lf_lora_rm(tmp_path, tiny_model_dir) -> tuple[Path, list[float]]:
    """A LoRA reward model in LLaMA-Factory's layout, and its scores of TEXTS computed by hand."""
    from lmtune.models.load import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    # init_lora_weights=False: B is random, so the adapter really changes the hidden states.
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    folder = tmp_path / "lf-rm"
    model.save_pretrained(folder)
    head = write_lf_head(folder, model.config.hidden_size)
    model.eval()
    return folder, by_hand(model, tokenizer, head)


def score_texts(reward: RewardModel) -> list[float]:
    return reward.score_ids([reward.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS])


def test_llamafactory_lora_reward_model_scores_as_computed_by_hand(lf_lora_rm):
    folder, expected = lf_lora_rm
    assert not (folder / "tokenizer_config.json").exists()  # the base's tokenizer is used
    # Batched (right-padded) scoring reads each row at its last real token.
    assert score_texts(RewardModel(folder, batch_size=3)) == pytest.approx(expected, abs=1e-5)


def test_llamafactory_full_reward_model_scores_as_computed_by_hand(tmp_path, tiny_model_dir,
                                                                   tokenizer):
    folder = tmp_path / "lf-full-rm"
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    head = write_lf_head(folder, model.config.hidden_size)
    assert score_texts(RewardModel(folder)) == pytest.approx(by_hand(model, tokenizer, head),
                                                             abs=1e-5)


def test_ppo_takes_a_llamafactory_reward_model(tmp_path, lf_lora_rm, ppo_config, tokenizer):
    folder, expected = lf_lora_rm
    cfg = load_config(write_yaml(tmp_path / "ppo.yaml", ppo_config | {"reward_model": str(folder)}))
    score = reward_scorer(cfg, tokenizer, stop_token_ids(tokenizer))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    # The scorer appends the template's end of reply to prompt + reply; an empty reply after the
    # first row without its ending gives that row back.
    first = ids[0][:-len(tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"])]
    assert first != ids[0]
    assert score([first], [[]]) == pytest.approx(expected[:1], abs=1e-5)


def test_a_folder_with_a_ppo_value_head_is_not_a_reward_model(tmp_path, tiny_model_dir):
    folder = tmp_path / "not-rm"
    shutil.copytree(tiny_model_dir, folder)
    save_file({"head.weight": torch.zeros(1, 64), "head.bias": torch.zeros(1)},
              folder / "value_head.safetensors")
    with pytest.raises(ModelError, match="not a reward model"):
        RewardModel(folder)


def test_lmtune_reward_model_is_also_in_llamafactory_layout(tmp_path, tiny_model_dir):
    data = write_json(tmp_path / "data" / "pairs.json", PAIRS)
    out = tmp_path / "rm"
    train(tmp_path, {"model_name_or_path": tiny_model_dir, "stage": "rm", "dataset": str(data),
                     "output_dir": str(out), "finetuning_type": "lora", "lora_rank": 4,
                     "max_steps": 2, "seed": 0})
    ours, theirs = load_file(out / "scalar_head.safetensors"), load_file(out / "value_head.safetensors")
    assert set(theirs) == set(LF_NAMES)
    assert torch.equal(theirs[LF_NAMES[0]], ours["weight"]) and theirs[LF_NAMES[0]].shape == (1, 64)
    assert torch.equal(theirs[LF_NAMES[1]], ours["bias"]) and theirs[LF_NAMES[1]].shape == (1,)
    with safe_open(out / "value_head.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    # The folder as LLaMA-Factory would read it (adapter + value_head.safetensors, no lmtune files)
    # scores as lmtune's own loader does.
    lf_view = tmp_path / "lf-view"
    lf_view.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"):
        shutil.copyfile(out / name, lf_view / name)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lf_view)
    ours = score_texts(RewardModel(out))
    assert score_texts(RewardModel(lf_view, base=tiny_model_dir)) == pytest.approx(ours, abs=1e-5)

    # Exported, it is LLaMA-Factory's full layout (reward_model_type: full): merged weights and
    # value_head.safetensors, read the same with lmtune's own files taken away.
    merged = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run.yaml"), f"export_dir={merged}"]) == 0
    (merged / "scalar_head.safetensors").unlink()
    (merged / "run_config.yaml").unlink()
    assert score_texts(RewardModel(merged)) == pytest.approx(ours, abs=1e-4)
