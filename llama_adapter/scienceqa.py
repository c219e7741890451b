"""ScienceQA-style multiple choice: data, prompt format, training records, evaluation by answer likelihood.

A problem is a question, an optional text context, 2-26 choices, the index of the right one, an optional
image (its features come from an `ImageFeatures` file, looked up by image id) and a subject. Files: the
official problems.json (a dict qid -> {question, choices, answer, hint, image, subject, grade, split}; an
image's id is its qid, as `extract-features --ids parent` names images/SPLIT/QID/image.png), or a JSON /
JSONL list of {question, choices, answer, context?, image?, subject?, id?} whose image id is the file stem.

Prompt (the Alpaca template the trainer uses): instruction = question + "Options: (A) ... (B) ...",
input = context, output = "The answer is A.". Evaluation scores each option's full answer text by its
log-likelihood after the prompt and predicts the best: the model is asked exactly what it was trained
to say, and no free-form generation has to be parsed. The paper reports 85.19% average accuracy on the
test split (LLaMA-Adapter v1, 1.8M parameters); the table printed here has its subject (NAT, SOC, LAN),
image and grade columns.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_adapter.data import IGNORE_INDEX, DataError, collate, encode_example

LETTERS = string.ascii_uppercase


@dataclass
class Problem:
    qid: str
    question: str
    choices: list[str]
    answer: int
    context: str = ""
    image: str | None = None  # image id in the feature file
    subject: str = ""
    grade: str = ""
    split: str = ""


def _problem(qid: str, rec, where: str, official: bool) -> Problem:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for field in ("question", "choices", "answer"):
        if field not in rec:
            raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(rec)})")
    choices, answer = rec["choices"], rec["answer"]
    if (
        not isinstance(choices, list)
        or not 2 <= len(choices) <= len(LETTERS)
        or not all(isinstance(c, str) for c in choices)
    ):
        raise DataError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} strings, got {choices!r}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must be an index into the {len(choices)} choices, got {answer!r}")
    image = rec.get("image")
    if image is not None:
        image = qid if official else Path(str(image)).stem
    return Problem(
        qid=qid,
        question=str(rec["question"]),
        choices=choices,
        answer=answer,
        context=str(rec.get("context", rec.get("hint")) or ""),
        image=image,
        subject=str(rec.get("subject") or ""),
        grade=str(rec.get("grade") or ""),
        split=str(rec.get("split") or ""),
    )


def load_problems(path, split: str | None = None) -> list[Problem]:
    """Read problems (official dict, JSON list or JSONL); keep those of `split` when given (records need one)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ScienceQA file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "question" not in data:  # (a one-line JSONL file parses as one record)
        problems = [_problem(str(qid), rec, f"{path}: problem {qid}", True) for qid, rec in data.items()]
    elif isinstance(data, list):
        problems = [
            _problem(str(rec.get("id", i)) if isinstance(rec, dict) else str(i), rec, f"{path}: record {i}", False)
            for i, rec in enumerate(data)
        ]
    else:
        problems = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
                qid = str(rec.get("id", len(problems))) if isinstance(rec, dict) else str(len(problems))
                problems.append(_problem(qid, rec, f"{path}:{lineno}", False))
    if split is not None:
        if any(not p.split for p in problems):
            raise DataError(f"{path}: --split {split!r} was asked for but some records have no 'split' field")
        problems = [p for p in problems if p.split == split]
    if not problems:
        raise DataError(f"{path}: no problems" + (f" in split {split!r}" if split else ""))
    return problems


# ----------------------------------------------------------------------------- prompt format
def answer_text(letter: str) -> str:
    return f"The answer is {letter}."


def to_record(problem: Problem, choice: int | None = None) -> dict:
    """The instruction record (data.py's format, plus "image") answering `choice` (default: the right one)."""
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(problem.choices))
    choice = problem.answer if choice is None else choice
    return {
        "instruction": f"{problem.question}\nOptions: {options}",
        "input": problem.context,
        "output": answer_text(LETTERS[choice]),
        "image": problem.image,
    }


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, tokenizer, problems: list[Problem], features=None, *, progress: bool = False) -> list[int]:
    """The option with the highest answer log-likelihood, per problem; `features` (ImageFeatures) feed the
    model's visual projector (problems without an image get zeros, as in training)."""
    from tqdm import tqdm

    device = model.tok_embeddings.weight.device
    visual = getattr(model, "visual_proj", None) is not None
    if visual and features is None:
        raise ValueError("the adapter has a visual projector (visual_dim set): image features are required")
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
    predictions = []
    for problem in tqdm(problems, desc="eval-scienceqa", disable=not progress):
        items = [encode_example(tokenizer, to_record(problem, c)) for c in range(len(problem.choices))]
        batch = collate(items, pad)
        kwargs = {}
        if visual:
            row = features[problem.image] if problem.image is not None else torch.zeros(features.dim)
            kwargs["image_features"] = row.expand(len(items), -1).to(device)
        logits = model(batch["tokens"].to(device), **kwargs).float()
        labels = batch["labels"][:, 1:].to(device)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        scores = (logp * (labels != IGNORE_INDEX)).sum(-1)  # (choices,)
        predictions.append(int(scores.argmax()))
    return predictions


def _tally(groups: dict, key: str, correct: bool) -> None:
    n, c = groups.get(key, (0, 0))
    groups[key] = (n + 1, c + int(correct))


def _grade_band(grade: str) -> str:
    digits = "".join(ch for ch in grade if ch.isdigit())
    if not digits:
        return ""
    return "G1-6" if int(digits) <= 6 else "G7-12"


def accuracy_report(problems: list[Problem], predictions: list[int]) -> dict:
    """Accuracy overall and by subject, image / no image, right answer's letter and grade band (in %)."""
    if len(predictions) != len(problems):
        raise ValueError(f"{len(predictions)} predictions for {len(problems)} problems")
    groups = {"by_subject": {}, "by_image": {}, "by_answer": {}, "by_grade": {}}
    correct = 0
    for p, pred in zip(problems, predictions):
        ok = pred == p.answer
        correct += ok
        _tally(groups["by_subject"], p.subject or "(none)", ok)
        _tally(groups["by_image"], "with image" if p.image is not None else "without image", ok)
        _tally(groups["by_answer"], LETTERS[p.answer], ok)
        if _grade_band(p.grade):
            _tally(groups["by_grade"], _grade_band(p.grade), ok)

    def entry(n, c):
        return {"n": n, "correct": c, "accuracy": 100.0 * c / n}

    report = {"overall": entry(len(problems), correct)}
    for name, tally in groups.items():
        report[name] = {k: entry(*tally[k]) for k in sorted(tally)}
    return report


def format_report(report: dict) -> str:
    rows = [("overall", "all", report["overall"])]
    for group in ("by_subject", "by_image", "by_answer", "by_grade"):
        rows += [(group[3:], key, e) for key, e in report[group].items()]
    lines = [f"{'group':<8} {'value':<18} {'n':>6} {'correct':>8} {'accuracy':>9}"]
    lines += [f"{g:<8} {k:<18} {e['n']:>6} {e['correct']:>8} {e['accuracy']:>8.2f}%" for g, k, e in rows]
    return "\n".join(lines)


__all__ = ["Problem", "accuracy_report", "format_report", "load_problems", "predict", "to_record"]
