"""LLaMA-Factory keys lmtune applies with their meaning (tests/lf_hparams.py lists every key):
scheduler names and arguments, save_strategy, and the other cheap ones, checked on real runs of
the tiny model or on what they change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.trainer_utils import SchedulerType

from lmtune.config import RunConfig, build_config
from lmtune.errors import ConfigError
from tests.conftest import ALPACA, train


def test_every_transformers_scheduler_name_is_known():
    choices = set(RunConfig.model_fields["lr_scheduler_type"].annotation.__args__)
    assert choices == {s.value for s in SchedulerType}


@pytest.mark.parametrize("values,message", [
    ({"lr_scheduler_type": "cosine_with_min_lr"},
     "lr_scheduler_type cosine_with_min_lr with no lr_scheduler_kwargs: One of min_lr or min_lr_rate"),
    ({"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"cycles": 2}},
     "lr_scheduler_type polynomial with lr_scheduler_kwargs {'cycles': 2}: "),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"},
     "lr_scheduler_type: reduce_lr_on_plateau changes the learning rate from a metric"),
    ({"lr_scheduler_type": "constant", "lr_scheduler_kwargs": {"power": 2}},
     "lr_scheduler_kwargs is set, but lr_scheduler_type constant takes no arguments"),
    ({"save_strategy": "epoch", "save_steps": 10}, "save_steps applies only with save_strategy: steps"),
])
def test_scheduler_and_save_mistakes_are_refused_before_loading(values, message):
    with pytest.raises(ConfigError) as info:
        build_config(values)
    assert info.value.message.startswith(message)


def test_scheduler_kwargs_as_json_text_from_the_command_line():
    cfg = build_config({"lr_scheduler_type": "cosine_with_restarts",
                        "lr_scheduler_kwargs": '{"num_cycles": 2}'})
    assert cfg.lr_scheduler_kwargs == {"num_cycles": 2}


def test_scheduler_kwargs_save_strategy_epoch_and_accuracy_on_a_real_run(tmp_path, train_config):
    per_epoch = -(-len(ALPACA) // 4)
    config = {k: v for k, v in train_config.items() if k not in ("save_steps", "max_steps")}
    config |= {"num_train_epochs": 2, "save_strategy": "epoch", "learning_rate": 1e-3,
               "per_device_train_batch_size": 4,
               "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.5},
               "compute_accuracy": True}
    train(tmp_path, config)
    out = Path(config["output_dir"])
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log if "lr" in r]
    assert all(0 <= r["accuracy"] <= 1 for r in log if "lr" in r)  # compute_accuracy, while training
    assert len(lrs) == 2 * per_epoch
    assert lrs[0] == pytest.approx(1e-3)
    assert min(lrs) >= 0.5e-3 * (1 - 1e-9) and lrs[-1] < 0.6e-3  # cosine down to half, not to 0
    # The end of epoch 1 is a checkpoint; the end of epoch 2 is the run's output itself.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{per_epoch}"]


def _encoder(tokenizer, **values):
    from lmtune.data.pipeline import make_encoder

    cfg = build_config(values)
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return make_encoder(cfg, tokenizer, stops, "conversation")[0]


def _trained_and_prompt(encoder, messages):
    from lmtune.data.formats import Conversation

    row, _ = encoder.encode(Conversation(messages))
    decode = encoder.tokenizer.decode
    trained = decode([i for i, label in zip(row.input_ids, row.labels) if label != -100])
    return trained, decode(row.input_ids)


def test_default_system_fills_in_where_the_data_has_none(tokenizer):
    asked = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Orrin."}]
    trained, text = _trained_and_prompt(_encoder(tokenizer, default_system="You are Orrin."), asked)
    assert "<|im_start|>system\nYou are Orrin.<|im_end|>" in text
    assert "SmolLM" not in text  # the template's own default system prompt is replaced
    assert trained == "Orrin.<|im_end|>"
    own = [{"role": "system", "content": "Be brief."}, *asked]
    _, text = _trained_and_prompt(_encoder(tokenizer, default_system="You are Orrin."), own)
    assert "Be brief." in text and "You are Orrin." not in text
    _, text = _trained_and_prompt(_encoder(tokenizer), asked)
    assert "You are Orrin." not in text


def test_enable_thinking_decides_whether_the_empty_reasoning_block_trains(tokenizer):
    import copy

    # A reasoning template of the Qwen3 kind: replies carry a reasoning block, and
    # enable_thinking: false puts an empty one in the generation prompt.
    thinking = copy.deepcopy(tokenizer)
    thinking.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
        "{% endif %}{% endif %}")
    asked = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    trained_on, text_on = _trained_and_prompt(_encoder(thinking), asked)
    trained_off, text_off = _trained_and_prompt(_encoder(thinking, enable_thinking=False), asked)
    assert text_on == text_off
    assert trained_on == "<think>\n\n</think>\n\n4<|im_end|>"
    assert trained_off == "4<|im_end|>"
    prompt = _encoder(thinking, enable_thinking=False).prompt_ids(asked[:1])
    assert thinking.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("flash_attn,implementation", [("disabled", "eager"), ("eager", "eager"),
                                                       ("sdpa", "sdpa"), ("flex", "flex_attention")])
def test_flash_attn_sets_the_attention_implementation(tiny_model_dir, flash_attn, implementation):
    from lmtune.models.load import attention, load_model

    cfg = build_config({"flash_attn": flash_attn})
    model = load_model(tiny_model_dir, attn_implementation=attention(cfg))
    assert model.config._attn_implementation == implementation


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the kernels may be there")
@pytest.mark.parametrize("flash_attn", ["fa2", "fa3"])
def test_flash_attention_kernels_are_refused_on_the_cpu(flash_attn):
    from lmtune.models.load import attention

    cfg = build_config({"flash_attn": flash_attn})  # a config is valid anywhere; the machine decides
    with pytest.raises(ConfigError) as info:
        attention(cfg)
    assert info.value.message == (f"flash_attn: {flash_attn} needs FlashAttention's CUDA kernels, and "
                                  "this machine has no CUDA GPU.")
    assert "flash_attn: sdpa" in info.value.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine flex trains")
def test_flex_attention_is_refused_for_training_on_the_cpu():
    from lmtune.models.load import attention, model_options

    cfg = build_config({"flash_attn": "flex"})
    assert attention(cfg) == "flex_attention"  # chat, serve and predict only run forward
    with pytest.raises(ConfigError) as info:
        model_options(cfg, training=True)
    assert info.value.message.startswith("flash_attn: flex trains on a CUDA GPU only")
    assert "flash_attn: sdpa" in info.value.fix


@pytest.mark.parametrize("values,packed", [
    ({"packing": True}, True), ({"stage": "pt"}, True), ({"neat_packing": True}, True),
    ({}, False), ({"packing": True, "flash_attn": "sdpa"}, False)])
def test_auto_attention_looks_for_flex_only_when_training_packed_rows(values, packed):
    from lmtune.models.load import model_options

    cfg = build_config(values)
    assert model_options(cfg, training=True)["packed_training"] is packed
    assert model_options(cfg)["packed_training"] is False  # chat, serve, predict, references


def test_packed_rows_get_flex_attention_on_a_gpu_where_the_architecture_has_it(tiny_model_dir,
                                                                                monkeypatch):
    import importlib.util

    from transformers import AutoConfig, GPT2Config

    from lmtune.models import load

    llama = AutoConfig.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load.packed_attention(llama) is None  # the CPU: sdpa, as transformers chooses
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "triton" else real_find_spec(name, *a))
    assert load.packed_attention(llama) == "flex_attention"
    assert load.packed_attention(GPT2Config()) is None  # transformers' GPT-2 has no flex attention


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_scaling_stretches_the_positions_to_cutoff_len(tiny_model_dir, rope_type):
    from lmtune.models.load import load_model, model_options

    plain = load_model(tiny_model_dir)
    old = plain.config.max_position_embeddings
    cfg = build_config({"rope_scaling": rope_type, "cutoff_len": 2 * old + 1})
    scaled = load_model(tiny_model_dir, **model_options(cfg))
    assert scaled.config.max_position_embeddings == 3 * old
    assert scaled.config.rope_parameters["rope_type"] == rope_type
    assert scaled.config.rope_parameters["factor"] == 3.0
    if rope_type == "linear":  # positions are divided by the factor: frequencies shrink by it
        torch.testing.assert_close(scaled.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq / 3)


def test_rope_scaling_is_refused_when_cutoff_len_already_fits(tiny_model_dir):
    from lmtune.models.load import load_model, model_options

    cfg = build_config({"rope_scaling": "linear", "cutoff_len": 64})
    with pytest.raises(ConfigError) as info:
        load_model(tiny_model_dir, **model_options(cfg))
    assert info.value.message.startswith("rope_scaling: linear, but cutoff_len 64 fits in the")


def test_best_model_is_the_output_and_early_stopping_ends_the_run(tmp_path, train_config):
    from safetensors.torch import load_file

    # Val loss falls as the tiny model learns, so "greater is better" makes the first evaluation
    # the best: two later ones without improvement stop the run, and step 1's weights are kept.
    config = train_config | {"max_steps": 8, "val_size": 2, "eval_strategy": "steps", "eval_steps": 1,
                             "save_steps": 1, "load_best_model_at_end": True,
                             "metric_for_best_model": "loss", "greater_is_better": True,
                             "early_stopping_steps": 2}
    results = train(tmp_path, config)
    out = Path(config["output_dir"])
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text()
                                                    .splitlines()) if "eval_loss" in r and r["step"] > 0}
    best = max(evals, key=evals.get)
    assert results["best_step"] == best == 1
    assert results["global_step"] == best + 2 == max(evals)  # stopped early, not at max_steps
    assert results["eval_loss"] == pytest.approx(evals[best], abs=1e-6)  # scored on the kept weights
    output = load_file(out / "adapter_model.safetensors")
    kept = load_file(out / f"checkpoint-{best}" / "adapter_model.safetensors")
    assert output.keys() == kept.keys() and all(torch.equal(output[k], kept[k]) for k in output)
    assert not (out / "best_weights.safetensors").exists()


@pytest.mark.parametrize("values,message", [
    ({"load_best_model_at_end": True},
     "load_best_model_at_end compares evaluations, but eval_strategy is no"),
    ({"greater_is_better": True}, "greater_is_better applies only with load_best_model_at_end: true"),
    ({"early_stopping_steps": 2, "eval_strategy": "steps", "val_size": 2, "stage": "ppo",
      "reward_model": "m:f"}, "early_stopping_steps applies to the stages trained on a val split"),
])
def test_best_model_keys_are_refused_where_they_would_do_nothing(values, message):
    with pytest.raises(ConfigError) as info:
        build_config(values)
    assert info.value.message.startswith(message)


def test_disable_shuffling_keeps_the_data_order_every_epoch():
    from lmtune.train.engine import _windows

    def first_steps(**values):
        windows = _windows(6, build_config({"per_device_train_batch_size": 2, **values}))
        return [next(windows) for _ in range(6)]  # two epochs of three steps

    assert first_steps(disable_shuffling=True) == [[[0, 1]], [[2, 3]], [[4, 5]]] * 2
    shuffled = first_steps()
    assert shuffled[:3] != shuffled[3:]
    assert sorted(i for window in shuffled[:3] for batch in window for i in batch) == list(range(6))


def test_logging_first_step_adds_a_log_line_after_step_one():
    from lmtune.train.engine import is_log_step

    def logged(**values):
        cfg = build_config({"logging_steps": 5, **values})
        return [step for step in range(1, 13) if is_log_step(cfg, step, 12)]

    assert logged() == [5, 10, 12]
    assert logged(logging_first_step=True) == [1, 5, 10, 12]


def test_best_weights_survive_a_resume(tmp_path):
    from lmtune.train.best import BEST_WEIGHTS, BestEvaluation

    cfg = build_config({"load_best_model_at_end": True, "early_stopping_steps": 3,
                        "eval_strategy": "steps", "val_size": 2})
    params = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.zeros(3))]
    state: dict = {}
    best = BestEvaluation(cfg, params, tmp_path, state)
    assert not best.update(1, {"eval_loss": 1.0})
    with torch.no_grad():
        params[0].fill_(5.0)
    assert not best.update(2, {"eval_loss": 2.0})  # worse: not kept
    assert (tmp_path / BEST_WEIGHTS).is_file()
    # A resumed run starts from the checkpoint's state (JSON) and freshly built parameters.
    resumed_params = [torch.nn.Parameter(torch.full((2, 2), 7.0)), torch.nn.Parameter(torch.ones(3))]
    resumed = BestEvaluation(cfg, resumed_params, tmp_path, json.loads(json.dumps(state)))
    assert not resumed.update(3, {"eval_loss": 1.5})
    assert resumed.update(4, {"eval_loss": 1.2})  # the third evaluation without improvement
    assert resumed.restore() == 1
    assert torch.equal(resumed_params[0], torch.ones(2, 2)) and torch.equal(resumed_params[1], torch.zeros(3))
    resumed.clean_up()
    assert not (tmp_path / BEST_WEIGHTS).exists()


def test_compute_accuracy_counts_reply_tokens_ranked_first(tiny):
    from lmtune.data.batching import collate
    from lmtune.data.formats import Conversation
    from lmtune.train import sft

    model, encoder = tiny
    rows = [encoder.encode(Conversation([{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}]))[0]
            for q, a in (("Say hi.", "Hi there!"), ("Name a colour.", "Blue."))]
    batch = collate(rows, encoder.tokenizer.pad_token_id)
    objective = sft.token_objective(build_config({"compute_accuracy": True}))
    with torch.no_grad():
        loss, metrics = objective.loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    targets = labels != -100
    expected = int((logits[:, :-1].argmax(-1)[targets] == labels[targets]).sum())
    correct, count = metrics["accuracy"]
    assert (int(correct), count) == (expected, int(targets.sum()))
    plain = sft.token_objective(build_config({"chunked_cross_entropy": False})).loss(model, batch)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[:, :-1][targets], labels[targets],
                                                        reduction="sum").item(), rel=1e-5)
    assert loss.item() == pytest.approx(plain[0].item(), rel=1e-5) and plain[1] == {}
    with pytest.raises(ConfigError, match="compute_accuracy scores the reply tokens of stage sft"):
        build_config({"compute_accuracy": True, "stage": "pt"})


def test_train_from_scratch_starts_from_fresh_weights(tmp_path, train_config, tiny_model_dir):
    from safetensors.torch import load_file

    with pytest.raises(ConfigError, match="set finetuning_type: full"):
        build_config({"train_from_scratch": True})
    config = {k: v for k, v in train_config.items() if k != "lora_rank"}
    # seed 1: the tiny model itself was initialised with seed 0, so a fresh start from seed 0 would
    # reproduce it.
    config |= {"finetuning_type": "full", "train_from_scratch": True, "max_steps": 1,
               "learning_rate": 1e-9, "seed": 1}
    train(tmp_path, config)
    name = "model.embed_tokens.weight"
    start = load_file(Path(tiny_model_dir) / "model.safetensors")[name]
    trained = load_file(Path(config["output_dir"]) / "model.safetensors")[name]
    # One step of 1e-9 moves no weight by 1e-6: a difference this size is the fresh start.
    assert (trained - start).abs().max() > 1e-2


def test_eval_num_beams_is_the_beam_count_of_predictions():
    from lmtune.evaluate.predict import Generation

    assert Generation.from_config(build_config({})).num_beams == 1
    cfg = build_config({"eval_num_beams": 3, "length_penalty": 1.2})
    settings = Generation.from_config(cfg)
    assert settings.kwargs([2], 0)["num_beams"] == 3 and settings.kwargs([2], 0)["length_penalty"] == 1.2
    assert cfg.num_beams == 1  # chat and serve keep their own
