"""Multiple-choice benchmarks in the MMLU / CMMLU / C-Eval folder layout, scored offline.

    task_dir/<name>/mapping.json        {subject: {"name": "abstract algebra", "category": "STEM"}}
    task_dir/<name>/data/dev/<subject>_dev.csv      solved examples for the n-shot prefix
    task_dir/<name>/data/<split>/<subject>_<split>.csv   the questions (also <subject>.csv, CMMLU)

`task: <name>_<split>` picks the folder and split (mmlu_test, cmmlu_test, ceval_validation; the
split folder is `val` for `validation`). A CSV either has no header and the columns question, A,
B, C, D, answer (MMLU), or a header row naming `question`, the choice letters and `answer` in any
case, other columns (an id, C-Eval's explanation) ignored (CMMLU, C-Eval).

Each question is asked as LLaMA-Factory's evaluator asked it: the first n_shot dev questions as
earlier user/assistant turns, the question with its lettered choices and an answer cue, all through
the model's chat template; the answer is the choice letter whose token has the highest next-token
logit after the generation prompt. `lmtune eval` writes results.json (accuracy per subject and
category, every prediction), results.log and results.png; given several models, the first is the
base and every other one's accuracy change against it is shown per category (what training forgot).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.config import RunConfig
from lmtune.data.encode import ChatEncoder
from lmtune.data.formats import Message
from lmtune.data.pipeline import make_encoder
from lmtune.errors import ConfigError, DataError
from lmtune.models.load import load_model, load_tokenizer, resolve_for, stop_token_ids, tokenizer_source
from lmtune.models.methods import load_adapters

AVERAGE = "Average"
# LLaMA-Factory's question frames, so scores compare with its evaluator's.
FRAMES = {
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n",
           "\n{letter}. {text}", "\nAnswer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
           "\n{letter}. {text}", "\n答案："),
}
_SPLIT_FOLDERS = {"validation": "val"}


@dataclass
class Question:
    question: str
    choices: list[str]
    answer: str  # a letter: A, B, ...


@dataclass
class Subject:
    key: str
    name: str
    category: str
    dev: list[Question]
    questions: list[Question]


@dataclass
class Benchmark:
    task: str
    folder: Path
    subjects: list[Subject]


# --- reading the layout ---------------------------------------------------------------------------

def split_task(task: str | None) -> tuple[str, str]:
    """'mmlu_test' -> ('mmlu', 'test'); the name may hold underscores ('mmlu_sample_test')."""
    if not task or "_" not in task.strip("_"):
        raise ConfigError(f"task: {task!r} is not <benchmark>_<split>.",
                          "write e.g. task: mmlu_test (folder mmlu of task_dir, split test).")
    name, split = task.rsplit("_", 1)
    return name, split


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _read_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text.", "save the CSV as UTF-8.", file=str(path)) from None
    except csv.Error as exc:
        raise DataError(f"not a readable CSV: {exc}", "check the quoting of that line.",
                        file=str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", "check the path.",
                        file=str(path)) from None


def _columns(header: list[str], path: Path) -> tuple[int, list[int], int]:
    """(question, choice letters in order, answer) column indexes from a header row."""
    names = [cell.strip() for cell in header]
    lower = [n.lower() for n in names]
    choices = sorted((n, i) for i, n in enumerate(names) if len(n) == 1 and "A" <= n <= "Z")
    if not choices or [n for n, _ in choices] != _letters(len(choices)):
        raise DataError(f"row 1: the header {names} has no choice columns A, B, ... in sequence.",
                        "name the choice columns A, B, C, D.", file=str(path))
    return lower.index("question"), [i for _, i in choices], lower.index("answer")


def read_questions(path: Path) -> list[Question]:
    """Questions of one CSV, with or without a header row (see the module doc)."""
    rows = _read_rows(path)
    if not rows:
        raise DataError("no questions in the file.", "each row is question, A, B, C, D, answer.",
                        file=str(path))
    first = [cell.strip().lower() for cell in rows[0]]
    if "question" in first and "answer" in first:
        q_col, choice_cols, a_col = _columns(rows[0], path)
        body, first_line, width = rows[1:], 2, len(rows[0])
    else:
        width = len(rows[0])
        if width < 4:
            raise DataError(f"row 1 has {width} columns; a headerless file has question, the "
                            "choices and answer (MMLU: 6 columns).",
                            "write question,A,B,C,D,answer per row, or add a header row.",
                            file=str(path))
        q_col, choice_cols, a_col = 0, list(range(1, width - 1)), width - 1
        body, first_line = rows, 1
    letters = _letters(len(choice_cols))
    questions = []
    for n, row in enumerate(body, start=first_line):
        if len(row) != width:
            raise DataError(f"row {n} has {len(row)} columns, the file {width}.",
                            "quote cells that contain commas, and give every row every column.",
                            file=str(path))
        answer = row[a_col].strip().upper()
        if answer not in letters:
            raise DataError(f"row {n}: answer {row[a_col]!r} is not one of {', '.join(letters)}.",
                            "give the letter of the right choice (C-Eval's test split has no "
                            "answers: use ceval_validation).", file=str(path))
        if not row[q_col].strip():
            raise DataError(f"row {n}: the question is empty.", "fill in the question.",
                            file=str(path))
        questions.append(Question(row[q_col].strip(), [row[i].strip() for i in choice_cols], answer))
    return questions


def _subject_file(folder: Path, split: str, subject: str) -> Path:
    split_dir = folder / "data" / _SPLIT_FOLDERS.get(split, split)
    candidates = [split_dir / f"{subject}_{split}.csv", split_dir / f"{subject}.csv"]
    if split in _SPLIT_FOLDERS:
        candidates.insert(1, split_dir / f"{subject}_{_SPLIT_FOLDERS[split]}.csv")
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"subject {subject} of mapping.json has no {split} file: tried "
                    f"{', '.join(str(p) for p in candidates)}.",
                    "add the CSV, or remove the subject from mapping.json.")


def read_mapping(folder: Path) -> dict[str, dict[str, str]]:
    path = folder / "mapping.json"
    if not path.is_file():
        raise DataError(f"benchmark folder {folder} has no mapping.json.",
                        "write {\"subject\": {\"name\": \"...\", \"category\": \"...\"}} for each "
                        "subject, or check task and task_dir.")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not valid JSON: {exc}", "fix the JSON syntax.", file=str(path)) from None
    if not isinstance(mapping, dict) or not mapping:
        raise DataError("must be a non-empty object of subject: {name, category}.",
                        "write {\"anatomy\": {\"name\": \"anatomy\", \"category\": \"STEM\"}}.",
                        file=str(path))
    for subject, entry in mapping.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("category"), str)):
            raise DataError(f"subject {subject!r} needs a text 'name' and 'category'.",
                            f"write \"{subject}\": {{\"name\": \"...\", \"category\": \"STEM\"}}.",
                            file=str(path))
    return mapping


def load_benchmark(task_dir: str, task: str | None, n_shot: int) -> Benchmark:
    name, split = split_task(task)
    folder = Path(task_dir) / name
    if not folder.is_dir():
        raise ConfigError(f"task {task}: no folder {folder}.",
                          "set task_dir to the folder that holds the benchmark folders (the "
                          "layout is in the README, section Evaluate).")
    subjects = []
    for key, entry in read_mapping(folder).items():
        dev = read_questions(_subject_file(folder, "dev", key)) if n_shot else []
        questions = read_questions(_subject_file(folder, split, key))
        widths = {len(q.choices) for q in questions + dev}
        if len(widths) > 1:
            raise DataError(f"subject {key} mixes questions with {sorted(widths)} choices.",
                            "give every question of a subject the same choices A, B, ...")
        subjects.append(Subject(key, entry["name"], entry["category"], dev[:n_shot], questions))
    return Benchmark(task or "", folder, subjects)


# --- asking and scoring ---------------------------------------------------------------------------

def _ask(q: Question, lang: str) -> str:
    _, choice, cue = FRAMES[lang]
    return q.question + "".join(choice.format(letter=l, text=t)
                                for l, t in zip(_letters(len(q.choices)), q.choices)) + cue


def question_messages(subject: Subject, q: Question, lang: str) -> list[Message]:
    """The solved dev questions as earlier turns, then the question; the frame's first line goes
    in front of the first user turn."""
    messages: list[Message] = []
    for shot in subject.dev:
        messages += [{"role": "user", "content": _ask(shot, lang)},
                     {"role": "assistant", "content": shot.answer}]
    messages.append({"role": "user", "content": _ask(q, lang)})
    messages[0] = {"role": "user", "content": FRAMES[lang][0].format(subject=subject.name)
                   + messages[0]["content"]}
    return messages


def choice_token_ids(tokenizer: PreTrainedTokenizerBase, n: int) -> list[int]:
    """The token of each letter as the reply's first token (the last token of its encoding, as
    LLaMA-Factory takes it)."""
    return [tokenizer.encode(letter, add_special_tokens=False)[-1] for letter in _letters(n)]


def pick_choices(last_logits: torch.Tensor, choice_ids: list[int]) -> list[str]:
    """The letter whose token has the highest logit, per row of [batch, vocab] logits."""
    best = last_logits[:, choice_ids].argmax(dim=-1)
    return [chr(ord("A") + int(i)) for i in best]


@torch.no_grad()
def _next_token_logits(model: PreTrainedModel, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """[batch, vocab] logits after each prompt; right padding, read at each prompt's last token.

    The output head runs on those last positions only (on a small model it costs more than the
    decoder over the whole prompt); prompt-side adapters, whose virtual tokens exist only inside
    peft's forward, and models that post-process logits take the full forward."""
    from peft import PeftModel

    width = max(len(p) for p in prompts)
    device = model.device
    ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], device=device)
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=device)
    rows = torch.arange(len(prompts), device=device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if (isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning) or \
            getattr(base.config, "final_logit_softcapping", None):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:]
        return logits[rows, last].float()
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return base.get_output_embeddings()(hidden[rows, last]).float()


@dataclass
class SubjectResult:
    key: str
    name: str
    category: str
    predictions: list[str]
    answers: list[str]

    @property
    def correct(self) -> int:
        return sum(p == a for p, a in zip(self.predictions, self.answers))

    @property
    def accuracy(self) -> float:
        return 100 * self.correct / len(self.answers)


@dataclass
class Scores:
    task: str
    model: str
    subjects: list[SubjectResult] = field(default_factory=list)

    def categories(self) -> dict[str, float]:
        """Accuracy (%) per category over all its questions, then the Average over every question."""
        tally: dict[str, list[int]] = {}
        for s in self.subjects:
            for key in (s.category, AVERAGE):
                counts = tally.setdefault(key, [0, 0])
                counts[0] += s.correct
                counts[1] += len(s.answers)
        tally[AVERAGE] = tally.pop(AVERAGE)  # last, as in LLaMA-Factory's log
        return {k: round(100 * c / t, 4) for k, (c, t) in tally.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "model": self.model, "accuracy": self.categories()[AVERAGE],
                "categories": self.categories(),
                "subjects": {s.key: {"name": s.name, "category": s.category,
                                     "accuracy": round(s.accuracy, 4), "correct": s.correct,
                                     "total": len(s.answers),
                                     "predictions": dict(enumerate(s.predictions))}
                             for s in self.subjects}}


def score_benchmark(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, encoder: ChatEncoder,
                    bench: Benchmark, lang: str, batch_size: int, label: str = "model") -> Scores:
    """Ask every question of `bench` (batched, longest prompts first) and score the answers."""
    was_training = model.training
    model.eval()
    scores = Scores(bench.task, label)
    total = sum(len(s.questions) for s in bench.subjects)
    try:
        with tqdm(total=total, desc=f"eval {label}", unit="question", mininterval=0.5) as bar:
            for subject in bench.subjects:
                prompts = [encoder.prompt_ids(question_messages(subject, q, lang))
                           for q in subject.questions]
                choice_ids = choice_token_ids(tokenizer, len(subject.questions[0].choices))
                order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
                picks = [""] * len(prompts)
                for first in range(0, len(order), batch_size):
                    chunk = order[first: first + batch_size]
                    logits = _next_token_logits(model, [prompts[i] for i in chunk],
                                                tokenizer.pad_token_id)
                    for i, letter in zip(chunk, pick_choices(logits, choice_ids)):
                        picks[i] = letter
                    bar.update(len(chunk))
                scores.subjects.append(SubjectResult(subject.key, subject.name, subject.category,
                                                     picks, [q.answer for q in subject.questions]))
    finally:
        model.train(was_training)
    return scores


def evaluate_config(cfg: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    label: str = "model") -> Scores:
    """Score `model` on cfg.task (task_dir, n_shot, lang, batch_size, template) - what a caller
    holding a loaded model (compare's eval_task column) needs."""
    bench = load_benchmark(cfg.task_dir, cfg.task, cfg.n_shot)
    encoder, _ = make_encoder(cfg, tokenizer, stop_token_ids(tokenizer, model), "conversation")
    assert isinstance(encoder, ChatEncoder)  # kind "conversation" always gives one
    return score_benchmark(model, tokenizer, encoder, bench, cfg.lang, cfg.batch_size, label)


# --- forgetting: several models against the first ---------------------------------------------------

def forgetting(base: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """Accuracy change (percentage points) per category of `other` against `base`."""
    return {k: round(other[k] - base[k], 4) for k in base if k in other}


def result_lines(scores: Scores) -> list[str]:
    lines = [f"{k:>15}: {v:.2f}" for k, v in scores.categories().items()]
    lines += [f"{s.name:>32}: {s.accuracy:6.2f} ({s.correct}/{len(s.answers)})" for s in scores.subjects]
    return lines


def forgetting_lines(all_scores: list[Scores]) -> list[str]:
    base = all_scores[0].categories()
    width = max(15, *(len(k) for k in base))
    head = f"{'category':<{width}}  {all_scores[0].model[-22:]:>22}"
    head += "".join(f"  {s.model[-22:]:>22}" for s in all_scores[1:])
    lines = [head]
    for key, value in base.items():
        line = f"{key:<{width}}  {value:>22.2f}"
        for s in all_scores[1:]:
            acc = s.categories().get(key)
            line += f"  {'-':>22}" if acc is None else f"  {f'{acc:.2f} ({acc - value:+.2f})':>22}"
        lines.append(line)
    return lines


def _plot(all_scores: list[Scores], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(all_scores[0].categories())
    subjects = [s.name for s in all_scores[0].subjects]
    rows = keys + subjects
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) * len(all_scores) + 1.5))
    height = 0.8 / len(all_scores)
    for m, scores in enumerate(all_scores):
        cats = scores.categories()
        values = [cats.get(k, 0.0) for k in keys] + [s.accuracy for s in scores.subjects]
        positions = [i + m * height for i in range(len(rows))]
        ax.barh(positions, values, height=height, label=scores.model[-40:])
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], rows)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(all_scores[0].task)
    if len(all_scores) > 1:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_results(all_scores: list[Scores], save_dir: Path) -> None:
    """results.json, results.log and results.png; with several models also each one's deltas."""
    save_dir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any]
    if len(all_scores) == 1:
        payload = all_scores[0].to_dict()
        log = result_lines(all_scores[0])
    else:
        base = all_scores[0].categories()
        payload = {"task": all_scores[0].task, "base": all_scores[0].model,
                   "models": [s.to_dict() | {"delta": forgetting(base, s.categories())}
                              for s in all_scores]}
        log = forgetting_lines(all_scores)
        for s in all_scores:
            log += ["", s.model] + result_lines(s)
    (save_dir / "results.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    (save_dir / "results.log").write_text("\n".join(log) + "\n", encoding="utf-8")
    _plot(all_scores, save_dir / "results.png")


# --- lmtune eval ----------------------------------------------------------------------------------

def _strip_adapter(model):
    """The base model again after an adapter's evaluation, without reloading it."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    if model.active_peft_config.is_prompt_learning:
        return model.get_base_model()
    return model.unload()  # removes the injected layers; the base weights were never changed


def run_eval(cfg: RunConfig, models: list[str] | None = None) -> list[Scores]:
    """Score the config's model, or each of `models` (model folders, .gguf, 'default', hub ids, or
    adapter folders applied to model_name_or_path, which loads once for all of them)."""
    if not cfg.task:
        raise ConfigError("lmtune eval needs task: the benchmark and split.",
                          "add e.g. task: mmlu_test and task_dir: the folder holding mmlu/.")
    bench = load_benchmark(cfg.task_dir, cfg.task, cfg.n_shot)
    n = sum(len(s.questions) for s in bench.subjects)
    print(f"{cfg.task}: {len(bench.subjects)} subjects, {n} questions, {cfg.n_shot}-shot")
    entries = [(m, []) if not (Path(m) / "adapter_config.json").is_file() else
               (cfg.model_name_or_path, [m]) for m in models] if models else \
        [(cfg.model_name_or_path, cfg.adapter_paths)]
    all_scores: list[Scores] = []
    loaded: tuple[str, PreTrainedModel] | None = None
    for name, adapters in entries:
        path = resolve_for(cfg, name)
        if loaded is None or loaded[0] != path:
            loaded = (path, load_model(path, cfg.trust_remote_code))
        tokenizer = load_tokenizer(tokenizer_source(path, adapters), cfg.trust_remote_code)
        model = load_adapters(loaded[1], adapters, trainable_last=False) if adapters else loaded[1]
        label = adapters[-1] if adapters else name
        all_scores.append(evaluate_config(cfg, model, tokenizer, label))
        if adapters:
            loaded = (path, _strip_adapter(model)) if len(adapters) == 1 else None
        print("\n".join(result_lines(all_scores[-1])))
    if len(all_scores) > 1:
        print("\n".join(["", "accuracy against the base (percentage points):"]
                        + forgetting_lines(all_scores)))
    if cfg.save_dir:
        save_results(all_scores, Path(cfg.save_dir))
        print(f"results written to {cfg.save_dir}")
    return all_scores
