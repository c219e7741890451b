import json

import pytest
import torch
from train_helpers import CharTokenizer, make_examples

from llama_adapter.data import (
    IGNORE_INDEX,
    DataError,
    InstructionDataset,
    collate,
    encode_example,
    global_batches,
    load_examples,
    padding_waste,
    rank_micro_batches,
    split_examples,
)
from llama_adapter.prompts import alpaca_prompt

TOK = CharTokenizer()
OK = '{"instruction": "a", "output": "b"}'


@pytest.mark.parametrize(
    "record",
    [
        {"instruction": "Name a color.", "output": "Red"},
        {"instruction": "Add them.", "input": "2 and 3", "output": "5"},
    ],
)
def test_template_and_prompt_mask(record):
    tokens, prompt_len = encode_example(TOK, record)
    prompt = alpaca_prompt(record["instruction"], record.get("input"))
    assert tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id
    assert TOK.decode(tokens[1:prompt_len]) == prompt
    assert TOK.decode(tokens[prompt_len:-1]) == record["output"]
    assert ("### Input:" in prompt) == ("input" in record)
    assert prompt.endswith("### Response:")

    batch = collate([(tokens, prompt_len)], TOK.pad_id)
    labels = batch["labels"][0]
    assert (labels[:prompt_len] == IGNORE_INDEX).all()
    assert labels[prompt_len:].tolist() == tokens[prompt_len:]  # output + eos are learned


def test_collate_right_pads_and_masks_pads():
    items = [([1, 10, 11, 12, 2], 2), ([1, 20, 2], 1)]
    batch = collate(items, pad_id=-1)
    assert batch["tokens"].tolist() == [[1, 10, 11, 12, 2], [1, 20, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 11, 12, 2], [-100, 20, 2, -100, -100]]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_json_list_and_jsonl_load_the_same(tmp_path):
    records = [
        {"instruction": "a", "input": None, "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
        {"instruction": "f", "output": ""},
    ]
    from_list = load_examples(_write(tmp_path, "d.json", json.dumps(records, indent=2)))
    from_lines = load_examples(_write(tmp_path, "d.jsonl", "\n".join(map(json.dumps, records)) + "\n\n"))
    expected = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
        {"instruction": "f", "input": "", "output": ""},
    ]
    assert from_list == from_lines == expected


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.jsonl", OK + '\n{"instruction": "a", "output": \n', "bad.jsonl:2: invalid JSON"),
        ("miss.jsonl", OK + '\n\n{"instruction": "a"}\n', "miss.jsonl:3: missing field 'output'"),
        ("miss.json", "[\n " + OK + ',\n {"output": "b"}\n]', "miss.json:3: missing field 'instruction'"),
        ("bad.json", "[\n " + OK + "\n " + OK + "]", "bad.json:3: invalid JSON"),
        ("type.jsonl", '{"instruction": "a", "output": 5}\n', "type.jsonl:1: field 'output' must be a string"),
        ("list.jsonl", '["a", "b"]\n', "list.jsonl:1: expected a JSON object"),
        ("empty.jsonl", "\n\n", "empty.jsonl: the dataset is empty"),
        ("empty.json", "[ ]", "empty.json: the dataset is empty"),
        ("blank.jsonl", '{"instruction": "  ", "output": "b"}\n', "blank.jsonl:1: field 'instruction' is empty"),
    ],
)
def test_malformed_data_names_file_and_line(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        load_examples(_write(tmp_path, name, text))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.json")


def test_truncation_and_dropping_are_counted():
    records = [
        {"instruction": "x", "output": "y" * 500},  # truncated, keeps some answer
        {"instruction": "z" * 500, "output": "w"},  # prompt alone fills max_seq_len: dropped
        {"instruction": "q", "output": "ok"},
    ]
    ds = InstructionDataset(records, TOK, max_seq_len=200)
    assert (ds.stats.truncated, ds.stats.dropped, ds.stats.examples) == (2, 1, 2)
    assert max(ds.lengths) == 200
    short = encode_example(TOK, records[2])
    assert ds.stats.target_tokens == (200 - ds[0][1]) + (len(short[0]) - short[1])
    assert "2 truncated" in str(ds.stats) and "1 dropped" in str(ds.stats)


def test_validation_split_is_seeded_and_disjoint():
    examples = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(50)]
    train, val = split_examples(examples, 0.1, seed=3)
    assert len(val) == 5 and len(train) == 45
    assert sorted(e["instruction"] for e in train + val) == sorted(e["instruction"] for e in examples)
    assert split_examples(examples, 0.1, seed=3) == (train, val)
    assert split_examples(examples, 0.1, seed=4)[1] != val
    assert split_examples(examples, 0.0, seed=3) == (examples, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_examples(examples, 1.0, seed=0)


def test_global_batches_deterministic_grouped_and_complete():
    lengths = [int(x) for x in torch.randint(5, 300, (103,), generator=torch.Generator().manual_seed(0))]
    batches = global_batches(lengths, 8, seed=0, epoch=0)
    assert len(batches) == 103 // 8 and all(len(b) == 8 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)
    assert global_batches(lengths, 8, seed=0, epoch=0) == batches
    assert global_batches(lengths, 8, seed=0, epoch=1) != batches
    # micro-batches of 2 drawn from length-grouped batches waste far less on padding than random ones
    micro = [m for b in batches for m in rank_micro_batches(b, 2)]
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(1)).tolist()
    random_micro = [perm[j : j + 2] for j in range(0, 96, 2)]
    assert padding_waste(lengths, micro) < 0.5 * padding_waste(lengths, random_micro)


def test_rank_micro_batches_shard_the_global_batch():
    batch = list(range(100, 112))
    shards = [rank_micro_batches(batch, 2, world_size=3, rank=r) for r in range(3)]
    assert all(len(s) == 2 for s in shards)
    assert sorted(i for s in shards for m in s for i in m) == batch
    assert rank_micro_batches(batch, 4) == [batch[:4], batch[4:8], batch[8:]]
    with pytest.raises(ValueError, match="multiple of micro_batch_size x world_size"):
        rank_micro_batches(batch, 5)


def test_helper_examples_roundtrip():
    ds = InstructionDataset(make_examples(12), TOK, max_seq_len=256)
    assert len(ds) == 12 and ds.stats.truncated == 0


# ----------------------------------------------------------------------------- chat records
CHAT = {
    "messages": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
}


class HeaderTokenizer(CharTokenizer):
    """CharTokenizer plus LLaMA-3's header tokens (ids 130..) written out in text, as the llama3 format needs."""

    special_tokens = {
        "<|begin_of_text|>": 1,
        "<|end_of_text|>": 2,
        "<|start_header_id|>": 130,
        "<|end_header_id|>": 131,
        "<|eot_id|>": 132,
    }
    n_words, bos_token, eos_token = 133, "<|begin_of_text|>", "<|end_of_text|>"

    def token_id(self, token):
        return self.special_tokens.get(token)

    def encode_with_offsets(self, s, *, special=False):
        ids, starts, i = [], [], 0
        while i < len(s):
            name = next((t for t in self.special_tokens if special and s.startswith(t, i)), None)
            ids.append(self.special_tokens[name] if name else 3 + ord(s[i]) % 125)
            starts.append(i)
            i += len(name) if name else 1
        return ids, starts

    def encode(self, s, bos, eos, *, special=False):
        return [1] * bos + self.encode_with_offsets(s, special=special)[0] + [2] * eos

    def decode(self, ids):
        return super().decode([i for i in ids if i < 130])


def test_chat_records_load_and_mask_assistant_turns_only(tmp_path):
    from llama_adapter.chat import Llama3Format

    path = _write(tmp_path, "chat.jsonl", json.dumps(CHAT) + "\n" + OK + "\n")
    examples = load_examples(path)
    assert examples[0] == {"messages": CHAT["messages"]} and examples[1]["instruction"] == "a"
    tok = HeaderTokenizer()
    ds = InstructionDataset(examples, tok, max_seq_len=400, chat_format=Llama3Format())
    tokens, prompt_len, spans = ds[0]
    labels = collate([ds[0]], tok.pad_id)["labels"][0].tolist()
    learned = [t for t, label in zip(tokens, labels) if label != IGNORE_INDEX]
    assert learned == [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(learned) == "Hello" + "Ciao" and learned.count(132) == 2  # each answer and its <|eot_id|>
    assert len(spans) == 2 and prompt_len == spans[0][0] and tokens[prompt_len - 1] == ord("\n") % 125 + 3
    assert ds.stats.target_tokens == ds.target_tokens([0, 1]) == len(learned) + len("b") + 1
    # an Alpaca record in a chat format is one user turn: its answer and <|eot_id|> are learned
    tokens, prompt_len = ds[1]
    assert tokens[prompt_len:] == [*tok.encode("b", False, False), 132]
    # packed rows mask the same tokens
    packed = collate([ds[0], ds[1]], tok.pad_id, pack=True)["labels"][0].tolist()
    assert packed[: len(labels)] == labels and packed[len(labels) :] == collate([ds[1]], -1)["labels"][0].tolist()


def test_chat_truncation_keeps_earlier_turns():
    from llama_adapter.chat import Llama3Format

    tok = HeaderTokenizer()
    full = InstructionDataset([CHAT], tok, max_seq_len=400, chat_format=Llama3Format())[0]
    cut = full[2][1][0] + 2  # two tokens into the second answer
    ds = InstructionDataset([CHAT], tok, max_seq_len=cut, chat_format=Llama3Format())
    assert ds.stats.truncated == 1 and ds[0][2] == (full[2][0], (full[2][1][0], cut))
    ds = InstructionDataset([CHAT], tok, max_seq_len=full[2][0][1], chat_format=Llama3Format())
    assert ds[0] == (full[0][: full[2][0][1]], full[1])  # only the first answer left: a plain (tokens, prompt_len)
    assert len(InstructionDataset([CHAT], tok, max_seq_len=full[1], chat_format=Llama3Format())) == 0


@pytest.mark.parametrize(
    "messages, message",
    [
        ('[{"role": "user", "content": "a"}]', "chat.jsonl:1: messages: the last message must be from the assistant"),
        ('[{"role": "robot", "content": "a"}]', r"chat.jsonl:1: messages\[0\]: unknown role 'robot'"),
        ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', r"messages\[1\]: expected a assist"),
        ('"hi"', "chat.jsonl:1: messages must be a non-empty list"),
    ],
)
def test_bad_chat_records_name_file_and_line(tmp_path, messages, message):
    with pytest.raises(DataError, match=message):
        load_examples(_write(tmp_path, "chat.jsonl", '{"messages": ' + messages + "}\n"))


def test_chat_record_the_format_cannot_hold_is_named(tmp_path):
    with pytest.raises(DataError, match="example 1: the alpaca format has no system message"):
        InstructionDataset([{"instruction": "a", "output": "b"}, CHAT], TOK, max_seq_len=400)
    # loaded from a file: the error names the record's line, whichever side of the train/val split it lands on
    lines = [OK] * 5 + [json.dumps(CHAT)] + [OK] * 3
    examples = load_examples(_write(tmp_path, "mixed.jsonl", "\n".join(lines) + "\n"))
    for part in split_examples(examples, 0.3, seed=0):
        if CHAT["messages"] in [ex.get("messages") for ex in part]:
            with pytest.raises(DataError, match="mixed.jsonl:6: the alpaca format has no system message"):
                InstructionDataset(part, TOK, max_seq_len=400)
