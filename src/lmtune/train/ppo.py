"""stage: ppo. RLHF: optimise the policy against a reward, held close to a reference by a KL penalty.

PPO needs its own loop (rollouts between updates), so this file holds it, reusing the shared parts:
setup, method, optimizer, checkpoints, logs and plots. One iteration, as it reads below:

  1. rollout   sample a reply for each of ppo_buffer_size x batch prompts from the policy
  2. score     the reward model (a stage-rm output) or a Python function scores each reply
  3. reference per-token log-probs of the replies under the reference: the policy with its adapter
               switched off (no second copy in memory), or ref_model
  4. rewards   -kl_coef x (log pi - log ref) on every reply token, plus the score on the last one;
               GAE advantages from the value head's estimates (losses.py)
  5. update    ppo_epochs passes of clipped policy + value updates over mini-batches
  6. KL coef   moves toward ppo_target (adaptive) or stays at ppo_kl_coef

The value head is a zero-initialised linear layer on the policy's last hidden state (one forward
gives both log-probs and values). Held-out prompts are answered greedily and scored before the first
iteration and at the end (eval_reward, eval_kl), so the gain and the KL it cost are both reported.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lmtune.config import RunConfig
from lmtune.data.batching import collate, epoch_order
from lmtune.data.encode import IGNORE_INDEX, EncodedRow
from lmtune.errors import ConfigError, ModelError, RunInterrupted, TrainingError
from lmtune.models.load import stop_token_ids
from lmtune.models.methods import apply_method, evaluation
from lmtune.models.scalar_head import (VALUE_HEAD_FILE, ScalarHeadModel, decoder_hidden,
                                      is_lf_reward_head)
from lmtune.train import checkpoint as ckpt
from lmtune.train.engine import (Trainer, checkpoint_or_stop, finish, is_eval_step, is_log_step,
                                 prepare_trainer, schedule, stop_requests)
from lmtune.train.logs import PLOT_FILE, TrainerLog
from lmtune.train.trackers import open_trackers
from lmtune.train.losses import (AdaptiveKL, gae, kl_penalised_rewards, masked_mean,
                                 ppo_policy_loss, ppo_value_loss, whiten)
from lmtune.train.preference import load_ref_model
from lmtune.train.reward_fn import load_reward_function
from lmtune.train.setup import start_run

GAMMA, LAM = 1.0, 0.95  # no discount inside one reply; GAE's usual bias/variance trade-off
REWARD_PLOT = "training_reward.png"
Scorer = Callable[[list[list[int]], list[list[int]]], list[float]]  # prompt ids, reply ids -> scores


# --- prompts and rewards --------------------------------------------------------------------------

def prompt_of(row: EncodedRow) -> list[int]:
    """The ids before the row's last reply: the prompt the policy answers."""
    starts = [i for i in range(1, len(row.labels))
              if row.labels[i] != IGNORE_INDEX and row.labels[i - 1] == IGNORE_INDEX]
    return row.input_ids[: starts[-1]] if starts else row.input_ids


def reply_suffix(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the chat template writes after a reply's text (e.g. '<|im_end|>\\n')."""
    marker = "\x00REPLY\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": marker}], tokenize=False)
    return text.split(marker, 1)[1]


def reward_scorer(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> Scorer:
    """Score replies with the stage-rm model at cfg.reward_model, or the function it names."""
    spec = cfg.reward_model or ""
    if ":" in spec and not Path(spec).exists():
        return _function_scorer(spec, tokenizer, stop_ids)
    from lmtune.train.rm import RewardModel

    if not (Path(spec) / ckpt.RUN_CONFIG).is_file() and not is_lf_reward_head(Path(spec)):
        raise ConfigError(f"reward_model: {spec} is neither an output_dir of stage rm (lmtune's or "
                          "LLaMA-Factory's) nor 'module:function'.",
                          "train one with stage: rm, or name a function.")
    # A LoRA reward model of LLaMA-Factory's goes on the policy's base, as there (reward_model_type
    # lora); a full one is its own folder (reward_model_type full).
    reward = RewardModel(spec, batch_size=cfg.per_device_eval_batch_size,
                         base=cfg.model_name_or_path, cutoff_len=cfg.cutoff_len)
    if reward.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"reward_model {spec} uses another tokenizer than the policy.",
                         "train the reward model on the same base model as the policy.")
    suffix = tokenizer(reply_suffix(tokenizer), add_special_tokens=False)["input_ids"]

    def score(prompts: list[list[int]], replies: list[list[int]]) -> list[float]:
        # The reward model saw rendered conversations: prompt, reply text, the template's end.
        rows = [p + [t for t in r if t not in stop_ids] + suffix for p, r in zip(prompts, replies)]
        return reward.score_ids(rows)

    return score


def _function_scorer(spec: str, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> Scorer:
    function = load_reward_function(spec)

    def score(prompts: list[list[int]], replies: list[list[int]]) -> list[float]:
        texts = [tokenizer.decode([t for t in r if t not in stop_ids]) for r in replies]
        values = function([tokenizer.decode(p) for p in prompts], texts)
        if len(values) != len(texts) or not all(math.isfinite(float(v)) for v in values):
            raise TrainingError(f"reward function {spec} returned {values!r} for {len(texts)} replies.",
                                "return one finite number per reply.")
        return [float(v) for v in values]

    return score


class RunningMoments:
    """Mean and std of all scores so far (ppo_score_norm), kept in checkpoints."""

    def __init__(self, state: dict[str, float] | None = None):
        state = state or {"count": 0, "mean": 0.0, "m2": 0.0}
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]

    def update(self, values: torch.Tensor) -> None:
        for v in values.tolist():  # Welford's update
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    def normalise(self, values: torch.Tensor) -> torch.Tensor:
        std = math.sqrt(self.m2 / max(self.count - 1, 1)) if self.count > 1 else 1.0
        return (values - self.mean) / max(std, 1e-6)

    def state(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}


# --- the policy's forward and the reference -------------------------------------------------------

@dataclass
class Rollout:
    batch: dict[str, torch.Tensor]  # prompt + reply rows, labels on the reply tokens
    mask: torch.Tensor  # (rows, length - 1): position t predicts a reply token
    logps: torch.Tensor
    values: torch.Tensor
    ref_logps: torch.Tensor
    scores: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def rows(self, index: list[int]) -> "Rollout":
        pick = lambda t: t[index]  # noqa: E731
        return Rollout({k: pick(v) for k, v in self.batch.items()}, pick(self.mask), pick(self.logps),
                       pick(self.values), pick(self.ref_logps), pick(self.scores),
                       pick(self.advantages), pick(self.returns))


def token_logps(model: ScalarHeadModel, batch: dict[str, torch.Tensor],
                with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position t < length - 1: log p(token t + 1), the value, and the entropy; zero where no
    reply token is predicted. The output head runs only at reply positions."""
    hidden = decoder_hidden(model.lm, batch["input_ids"], batch["attention_mask"])[:, :-1]
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    base = model.lm.get_base_model() if isinstance(model.lm, PeftModel) else model.lm
    logits = base.get_output_embeddings()(hidden[mask]).float()
    logp_all = torch.log_softmax(logits, -1)
    picked = logp_all.gather(-1, batch["labels"][:, 1:][mask].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    dense = lambda v: torch.zeros(mask.shape, dtype=v.dtype, device=v.device).masked_scatter(mask, v)  # noqa: E731
    values = model.head(hidden.to(model.head.weight.dtype)).squeeze(-1).float() * mask \
        if with_values else torch.zeros(mask.shape, device=hidden.device)
    return dense(picked), values, dense(entropy)


def reference_model(cfg: RunConfig, model: ScalarHeadModel,
                    tokenizer: PreTrainedTokenizerBase) -> ScalarHeadModel:
    """A model whose token_logps are the reference's: ref_model when set, else the policy itself
    (its adapter is switched off around each use, see `reference_token_logps`), else (full, freeze,
    PiSSA) a frozen copy of the starting policy. Made before a resumed run loads its weights, so the
    reference is always the start."""
    if cfg.ref_model is not None:
        # Its head is never used; a zero init draws no random numbers.
        reference = ScalarHeadModel(load_ref_model(cfg, tokenizer), init_std=0.0)
        return reference.to(next(model.parameters()).device).eval()
    # A PiSSA adapter moved the base's top singular directions into itself, so switching it off
    # leaves the residual, not the starting model: PiSSA needs the frozen copy too.
    if isinstance(model.lm, PeftModel) and not cfg.pissa_init:
        return model
    return copy.deepcopy(model).eval().requires_grad_(False)


def reference_token_logps(reference: ScalarHeadModel, policy: ScalarHeadModel,
                          batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probs of the replies under the reference (zero off the replies)."""
    adapter_off = reference.lm.disable_adapter() if reference is policy else nullcontext()
    with adapter_off, evaluation(reference), torch.no_grad():
        return token_logps(reference, batch, with_values=False)[0]


# --- rollouts -------------------------------------------------------------------------------------

def generate(model: ScalarHeadModel, prompts: list[list[int]], cfg: RunConfig, pad_id: int,
             stop_ids: list[int], greedy: bool) -> list[list[int]]:
    """Replies (ids, ending with a stop id unless cut at max_new_tokens) to left-padded prompts."""
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
    with evaluation(model), torch.no_grad():
        out = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                eos_token_id=stop_ids, pad_token_id=pad_id,
                                repetition_penalty=cfg.repetition_penalty, **sampling)
    replies = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        replies.append(row[:max(end, 1)])
    return replies


def rollout_batch(prompts: list[list[int]], replies: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    rows = [EncodedRow(p + r, [IGNORE_INDEX] * len(p) + r) for p, r in zip(prompts, replies)]
    return collate(rows, pad_id)


@dataclass
class Sampler:
    """Answers prompts with the policy and measures the answers: scores, log-probs, values and the
    reference's log-probs, all without gradients."""

    trainer: Trainer
    reference: ScalarHeadModel
    score: Scorer
    stop_ids: list[int]

    @property
    def model(self) -> ScalarHeadModel:
        return self.trainer.unwrapped

    @property
    def cfg(self) -> RunConfig:
        return self.trainer.cfg

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    @property
    def pad_id(self) -> int:
        return self.trainer.tokenizer.pad_token_id

    def rollout(self, prompts: list[list[int]], greedy: bool) -> Rollout:
        with self.trainer.autocast():
            replies = generate(self.model, prompts, self.cfg, self.pad_id, self.stop_ids, greedy)
            batch = {k: v.to(self.device)
                     for k, v in rollout_batch(prompts, replies, self.pad_id).items()}
            with evaluation(self.model), torch.no_grad():
                logps, values, _ = token_logps(self.model, batch)
            ref = reference_token_logps(self.reference, self.model, batch)
        scores = torch.tensor(self.score(prompts, replies), device=self.device)
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
        return Rollout(batch, mask, logps, values, ref, scores)

    def held_out(self, prompts: list[list[int]]) -> dict[str, float]:
        """Greedy replies to held-out prompts: mean score, summed log-ratio to the reference (eval_kl)
        and reply length."""
        if not prompts:
            return {}
        scores, kls, lengths = [], [], []
        for i in range(0, len(prompts), self.cfg.per_device_eval_batch_size):
            r = self.rollout(prompts[i: i + self.cfg.per_device_eval_batch_size], greedy=True)
            scores += r.scores.tolist()
            kls += ((r.logps - r.ref_logps) * r.mask).sum(-1).tolist()
            lengths += r.mask.sum(-1).tolist()
        n = len(scores)
        return {"eval_reward": round(sum(scores) / n, 6), "eval_kl": round(sum(kls) / n, 6),
                "eval_response_length": round(sum(lengths) / n, 2)}


def set_advantages(rollouts: list[Rollout], cfg: RunConfig, kl_coef: float,
                   moments: RunningMoments) -> torch.Tensor:
    """Rewards (score minus the KL penalty), GAE advantages and returns of every rollout; -> the KL
    of each reply to the reference, summed over its tokens."""
    if cfg.ppo_score_norm:
        moments.update(torch.cat([r.scores for r in rollouts]))
    kls = []
    for r in rollouts:
        scores = moments.normalise(r.scores) if cfg.ppo_score_norm else r.scores
        rewards, kl = kl_penalised_rewards(scores, r.logps, r.ref_logps, r.mask, kl_coef)
        if cfg.ppo_whiten_rewards:
            rewards = whiten(rewards, r.mask, shift_mean=False)
        advantages, r.returns = gae(rewards, r.values, r.mask, GAMMA, LAM)
        r.advantages = whiten(advantages, r.mask)
        kls.append(kl.sum(-1))
    return torch.cat(kls)


def train_on_rollouts(trainer: Trainer, rollouts: list[Rollout], iteration: int,
                      updates_done: int) -> tuple[dict[str, float], float, float]:
    """ppo_epochs passes over the rollouts: per batch of rollouts, mini-batches of
    per_device_train_batch_size accumulate into one optimizer step (through the trainer's guarded
    step, like every stage's). -> mean losses, the last lr and grad norm."""
    cfg, model = trainer.cfg, trainer.model
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
    micro, lr, grad_norm = cfg.per_device_train_batch_size, 0.0, 0.0
    where = f"iteration {iteration}"
    for _ in range(cfg.ppo_epochs):
        for r in rollouts:
            perm = torch.randperm(len(r.scores)).tolist()
            parts = [perm[i: i + micro] for i in range(0, len(perm), micro)]
            for part in parts:
                mb = r.rows(part)
                with trainer.autocast():
                    logps, values, entropy = token_logps(model, mb.batch)
                policy_loss, clip_fraction = ppo_policy_loss(logps, mb.logps, mb.advantages, mb.mask,
                                                             cfg.ppo_clip_range)
                value_loss = ppo_value_loss(values, mb.values, mb.returns, mb.mask, cfg.ppo_clip_range)
                trainer.backward(policy_loss + cfg.ppo_vf_coef * value_loss, where,
                                 scale=1 / len(parts))
                weight = 1 / (len(parts) * cfg.ppo_epochs * len(rollouts))
                for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss),
                                   ("clip_fraction", clip_fraction),
                                   ("entropy", masked_mean(entropy, mb.mask))):
                    totals[key] += value.item() * weight
            updates_done += 1
            lr, grad_norm = trainer.optimizer_step(updates_done, where)
    return totals, lr, grad_norm


# --- the run --------------------------------------------------------------------------------------

def run(cfg: RunConfig) -> dict[str, Any]:
    inputs = start_run(cfg)
    tokenizer, output_dir = inputs.tokenizer, inputs.output_dir
    base = inputs.take_model()
    stop_ids = stop_token_ids(tokenizer, base)
    prompts = [prompt_of(r) for r in inputs.train_rows]
    val_prompts = [prompt_of(r) for r in inputs.val_rows]
    model = ScalarHeadModel(apply_method(base, cfg), init_std=0.0, head_file=VALUE_HEAD_FILE)
    if not cfg.do_train:
        print("do_train is false: data, model and method checked; nothing trained.")
        return {}
    plan = schedule(cfg, len(prompts))
    trainer = prepare_trainer(cfg, model, tokenizer, output_dir, plan.optimizer_steps)
    # The reference is made before a resumed run loads its weights: it is always the start.
    sampler = Sampler(trainer, reference_model(cfg, trainer.unwrapped, tokenizer),
                      reward_scorer(cfg, tokenizer, stop_ids), stop_ids)
    state = trainer.resume(inputs.resume_dir, {"global_step": 0, "kl_coef": cfg.ppo_kl_coef,
                                               "score_moments": None, "eval_reward_start": None})
    kl_control = AdaptiveKL(state["kl_coef"], cfg.ppo_target, horizon=10_000)
    moments = RunningMoments(state["score_moments"])
    log = TrainerLog(output_dir, state["global_step"], open_trackers(cfg, output_dir))
    batch_size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    updates_per_iteration = plan.optimizer_steps // max(plan.total, 1)

    def order(iteration: int) -> list[int]:
        """The prompts of `iteration` (0-based): a seeded permutation per epoch, so resume replays it."""
        epoch, slot = divmod(iteration, plan.per_epoch)
        perm = epoch_order(len(prompts), cfg.seed, epoch, shuffle=not cfg.disable_shuffling)
        return perm[slot * plan.rows_per_step: (slot + 1) * plan.rows_per_step]

    if state["eval_reward_start"] is None and val_prompts:
        start = sampler.held_out(val_prompts)
        state["eval_reward_start"] = start["eval_reward"]
        log.write({"step": 0, "epoch": 0.0} | start)
        print(f"held-out reward before training: {start['eval_reward']:.4f}")

    progress = tqdm(total=plan.total, initial=state["global_step"], desc="ppo", unit="iter",
                    mininterval=1.0)
    run_start = time.perf_counter()
    last_eval: dict[str, Any] = {}
    with stop_requests() as stop_requested:
        for iteration in range(state["global_step"] + 1, plan.total + 1):
            started = time.perf_counter()
            chosen = [prompts[i] for i in order(iteration - 1)]
            # 1-3: sample, score, reference; 4: rewards and advantages
            rollouts = [sampler.rollout(chosen[b: b + batch_size], greedy=False)
                        for b in range(0, len(chosen), batch_size)]
            kls = set_advantages(rollouts, cfg, kl_control.value, moments)
            # 5: ppo_epochs of clipped updates
            totals, lr, grad_norm = train_on_rollouts(trainer, rollouts, iteration,
                                                      (iteration - 1) * updates_per_iteration)
            # 6: the KL coefficient, logs, eval, checkpoints
            scores = torch.cat([r.scores for r in rollouts])
            mean_kl = kls.mean().item()
            kl_control.update(mean_kl, len(scores))
            state.update(global_step=iteration, kl_coef=kl_control.value, kl=mean_kl,
                         reward=scores.mean().item(), score_moments=moments.state())
            progress.update(1)
            progress.set_postfix(reward=f"{state['reward']:.3f}", kl=f"{mean_kl:.3f}")
            record: dict[str, Any] = {}
            if is_log_step(cfg, iteration, plan.total):
                record |= {"reward": round(state["reward"], 6), "kl": round(mean_kl, 6),
                           "kl_coef": round(kl_control.value, 6),
                           "loss": round(totals["policy_loss"] + cfg.ppo_vf_coef * totals["value_loss"], 6),
                           **{k: round(v, 6) for k, v in totals.items()},
                           "response_length": round(
                               sum(r.mask.sum().item() for r in rollouts) / len(scores), 2),
                           "lr": lr, "grad_norm": round(grad_norm, 6),
                           "seconds": round(time.perf_counter() - started, 2)}
            if val_prompts and is_eval_step(cfg, iteration, plan):
                last_eval = {"step": iteration} | sampler.held_out(val_prompts)
                record |= {k: v for k, v in last_eval.items() if k != "step"}
            if record:
                log.write({"step": iteration, "epoch": round(iteration / plan.per_epoch, 4)} | record)
            try:
                checkpoint_or_stop(trainer, iteration, plan, stop_requested, state,
                                   unit="iteration")
            except RunInterrupted:
                progress.close()
                raise
    progress.close()
    runtime = time.perf_counter() - run_start
    # The last iteration's held-out answers are the final ones when they ran there.
    final = {k: v for k, v in last_eval.items() if k != "step"} \
        if last_eval.get("step") == plan.total else sampler.held_out(val_prompts)

    results = {"train_runtime": round(runtime, 2), "global_step": state["global_step"],
               "epoch": round(state["global_step"] / plan.per_epoch, 4), "kl_coef": state["kl_coef"],
               # the last iteration's mean reward and KL to the reference (summed over a reply)
               "reward": state.get("reward"), "kl": state.get("kl"),
               "train_prompts": len(prompts), "val_prompts": len(val_prompts)} | final
    if state["eval_reward_start"] is not None:
        results["eval_reward_start"] = state["eval_reward_start"]
    return finish(trainer, results, log, plots=(("loss", PLOT_FILE), ("reward", REWARD_PLOT)))
