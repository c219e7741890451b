"""Instruction data: loading, tokenization with prompt masking, validation split, batching.

A record is Alpaca's {instruction, input?, output} or a chat {messages: [{role, content}, ...]} ending with an
assistant message. In the Alpaca format one example is `bos + alpaca_prompt(instruction, input) + output + eos`;
the loss sees only the output and eos (labels are IGNORE_INDEX on the prompt). The prompt and the output are
encoded separately and concatenated, so the mask boundary is exact and the model learns to continue the very
token sequence `generate` feeds it. In a chat format (llama_adapter.chat) the loss sees the assistant turns
only, each with its end-of-turn token; Alpaca records become one user turn there.

Batches are built per epoch from a seeded permutation in three steps, each a plain function so that the
trainer, the distributed sharding and a future packed collate (issue 7) can reuse them:
`global_batches` (length-grouped, whole global batches only) -> `rank_micro_batches` (a deterministic share of
each global batch per rank) -> `collate` (right-padded tensors).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_adapter.chat import AlpacaFormat, ChatError, check_messages, messages_from_record
from llama_adapter.layout import Layout

IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction' and 'output', got {type(record).__name__}")
    if "messages" in record:
        try:
            out = {"messages": check_messages(record["messages"], ends_with="assistant", where="messages")}
        except ChatError as err:
            raise DataError(f"{where}: {err}") from None
        return _with_image(out, record, where)
    for field in ("instruction", "output"):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(record)})")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
    if not record["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    value = record.get("input")
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field 'input' must be a string or null, got {type(value).__name__}")
    out = {"instruction": record["instruction"], "input": value or "", "output": record["output"]}
    return _with_image(out, record, where)


def _with_image(out: dict, record: dict, where: str) -> dict:
    image = record.get("image")  # multimodal: the image id whose features `finetune --image-features` adds
    if image is not None:
        if not isinstance(image, str):
            raise DataError(f"{where}: field 'image' must be a string or null, got {type(image).__name__}")
        out["image"] = image
    return Record(out, where=where)


class Record(dict):
    """A loaded record (a plain dict to every reader) that remembers where it came from ("file:line"), so that an
    error found later, when a chat format encodes it after the train/val split, can name it."""

    def __init__(self, fields: dict, where: str):
        super().__init__(fields)
        self.where = where


def _json_array_records(text: str, path: Path):
    """Yield (line, record) from a JSON array, so that a bad record's error can name its line."""
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        yield line_of(pos), record
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == "]":
            if text[skip_ws(pos + 1) :].strip():
                raise DataError(f"{path}:{line_of(pos + 1)}: unexpected text after the JSON array")
            return
        if pos >= len(text) or text[pos] != ",":
            raise DataError(f"{path}:{line_of(pos)}: invalid JSON: expected ',' or ']' between records")
        pos = skip_ws(pos + 1)


def load_examples(path) -> list[dict]:
    """Read a JSON list or JSONL file of {instruction, input?, output} or {messages}; raises DataError naming file
    and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if text.lstrip().startswith("["):
        numbered = _json_array_records(text, path)
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
    examples = [_check_record(record, f"{path}:{lineno}") for lineno, record in numbered]
    if not examples:
        raise DataError(f"{path}: the dataset is empty (no instruction records)")
    return examples


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded train/validation split; val gets round(n * val_fraction) examples (at least 1 when > 0, unless that
    1 would leave nothing to train on: a one-example data set then has no validation)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(len(examples) * val_fraction))
    if n_val == len(examples) and round(len(examples) * val_fraction) == 0:
        n_val = 0
    if n_val >= len(examples):
        raise DataError(f"val_fraction={val_fraction} leaves no training examples out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in val_ids]
    val = [ex for i, ex in enumerate(examples) if i in val_ids]
    return train, val


def encode_example(tokenizer, example: dict, chat_format=None) -> tuple:
    """(tokens, prompt_len), the first prompt_len tokens masked, the rest learned; or (tokens, prompt_len, spans)
    when the learned tokens are not all those after prompt_len (a conversation with several assistant turns):
    spans = ((start, end), ...) of learned tokens. chat_format: a llama_adapter.chat format (default Alpaca)."""
    fmt = chat_format or AlpacaFormat()
    if "messages" not in example and isinstance(fmt, AlpacaFormat):
        return fmt.encode_record(tokenizer, example["instruction"], example.get("input"), example["output"])
    messages = example.get("messages") or messages_from_record(
        example["instruction"], example.get("input"), example["output"]
    )
    tokens, learned = fmt.encode_dialog(tokenizer, messages)
    return item_from_mask(tokens, learned)


def item_from_mask(tokens: list[int], learned: list[bool]) -> tuple:
    """A dataset item from per-token learned flags: (tokens, prompt_len) when they are a suffix, else with spans."""
    spans, start = [], None
    for i, flag in enumerate([*learned, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    prompt_len = spans[0][0] if spans else len(tokens)
    if len(spans) <= 1 and (not spans or spans[0][1] == len(tokens)):
        return tokens, prompt_len
    return tokens, prompt_len, tuple(spans)


def learned_spans(item: tuple) -> tuple:
    """The (start, end) token spans the loss covers in a dataset item."""
    if len(item) == 3:
        return item[2]
    tokens, prompt_len = item
    return ((prompt_len, len(tokens)),) if prompt_len < len(tokens) else ()


def truncate_item(item: tuple, max_len: int) -> tuple:
    """The item cut to its first max_len tokens, its learned spans with it."""
    tokens = item[0][:max_len]
    spans = tuple((a, min(b, max_len)) for a, b in learned_spans(item) if a < max_len)
    return item_from_mask(tokens, [any(a <= i < b for a, b in spans) for i in range(len(tokens))])


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0  # longer than max_seq_len, cut to it
    dropped: int = 0  # prompt alone fills max_seq_len: no answer token left to learn from
    target_tokens: int = 0

    def __str__(self) -> str:
        return (
            f"{self.examples} examples, {self.target_tokens} target tokens, "
            f"{self.truncated} truncated to max_seq_len, {self.dropped} dropped (prompt fills max_seq_len)"
        )


class InstructionDataset:
    """Tokenized examples: item i is (tokens, prompt_len) or (tokens, prompt_len, spans) (`encode_example`);
    `lengths` drives length-grouped batching. chat_format: see `encode_example`."""

    def __init__(self, examples: list[dict], tokenizer, max_seq_len: int, chat_format=None):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.items: list[tuple] = []
        self.stats = DataStats()
        features = []  # per item: the "image_features" that `multimodal.attach_image_features` put on examples
        for k, example in enumerate(examples):
            try:
                item = encode_example(tokenizer, example, chat_format)
            except ChatError as err:
                raise DataError(f"{getattr(example, 'where', f'example {k}')}: {err}") from None
            if len(item[0]) > max_seq_len:
                self.stats.truncated += 1
                item = truncate_item(item, max_seq_len)
            if not learned_spans(item):
                self.stats.dropped += 1
                continue
            self.items.append(item)
            features.append(example.get("image_features"))
            self.stats.target_tokens += self.target_tokens([len(self.items) - 1])
        self.stats.examples = len(self.items)
        self.lengths = [len(item[0]) for item in self.items]
        if any(f is not None for f in features) and any(f is None for f in features):
            raise DataError("some examples have image features and others not (attach_image_features gives all)")
        self.image_features = features if features and features[0] is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple:
        return self.items[i]

    def target_tokens(self, ids) -> int:
        """Loss-bearing tokens of the given examples (labels after the one-token shift)."""
        return sum(b - a for i in ids for a, b in learned_spans(self.items[i]))


def global_batches(lengths: list[int], global_batch_size: int, seed: int, epoch: int, group: int = 16):
    """One epoch's global batches (lists of example ids), the same on every rank.

    A seeded permutation is cut into mega-batches of `group` global batches, each sorted by length, so that
    neighbours (one micro-batch) have similar lengths; then the batch order is shuffled again. The last
    incomplete global batch is dropped (a different remainder each epoch).
    """
    n_batches = len(lengths) // global_batch_size
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()[: n_batches * global_batch_size]
    mega = global_batch_size * group
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j : j + global_batch_size] for j in range(0, len(chunk), global_batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def rank_micro_batches(batch: list[int], micro_batch_size: int, world_size: int = 1, rank: int = 0):
    """This rank's micro-batches of one global batch: micro-batch j goes to rank j % world_size."""
    per_step = micro_batch_size * world_size
    if len(batch) % per_step:
        raise ValueError(f"global batch {len(batch)} is not a multiple of micro_batch_size x world_size = {per_step}")
    micro = [batch[j : j + micro_batch_size] for j in range(0, len(batch), micro_batch_size)]
    return micro[rank::world_size]


def collate(items: list[tuple], pad_id: int, pack: bool = False) -> dict:
    """Right-pad to the longest item: {"tokens": (B, N) long, "labels": (B, N) long, IGNORE_INDEX on prompt/pad}.

    Right padding keeps every real token's causal context free of pads, so no attention mask is needed.
    pack=True concatenates the items into one row instead, no padding: {"tokens": (1, T), "labels": (1, T),
    "layout": Layout.packed(cu_seqlens (S+1,) int32, max_seqlen)} for `LLaMA.forward(tokens, layout=)` (checked
    here, on the CPU, at no device sync).
    Each item's first label is IGNORE_INDEX, so no token learns to predict across a boundary.
    """
    if pack:
        return _pack(items)
    width = max(len(item[0]) for item in items)
    pad = pad_id if pad_id >= 0 else 0  # sentencepiece models without a pad piece report -1
    tokens = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        tokens[row, : len(item[0])] = torch.tensor(item[0], dtype=torch.long)
        for a, b in learned_spans(item):
            labels[row, a:b] = tokens[row, a:b]
    return {"tokens": tokens, "labels": labels}


def _pack(items):
    lengths = [len(item[0]) for item in items]
    cu_seqlens = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    tokens = torch.tensor([t for item in items for t in item[0]], dtype=torch.long)[None]  # (1, T)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    for start, item in zip(cu_seqlens.tolist(), items):
        for a, b in learned_spans(item):
            a = max(a, 1)  # a sequence's first token has nothing in it to predict it from
            labels[0, start + a : start + b] = tokens[0, start + a : start + b]
    return {"tokens": tokens, "labels": labels, "layout": Layout.packed(cu_seqlens, max(lengths))}


def image_inputs(dataset: InstructionDataset, ids, device) -> dict:
    """The model's extra inputs for examples `ids`: {"image_features": (B, F)} with image features, else {}."""
    if getattr(dataset, "image_features", None) is None:
        return {}
    return {"image_features": torch.stack([dataset.image_features[i] for i in ids]).to(device)}


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Fraction of a padded batch's tokens that are padding (for reports and tests)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 0.0 if padded == 0 else 1.0 - real / padded


__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataStats",
    "InstructionDataset",
    "collate",
    "encode_example",
    "global_batches",
    "image_inputs",
    "item_from_mask",
    "learned_spans",
    "load_examples",
    "padding_waste",
    "rank_micro_batches",
    "split_examples",
]
