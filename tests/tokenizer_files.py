"""Tiny tokenizer files of each kind LLaMA checkpoints ship, built in-process for the tokenizer and chat tests.

- `write_llama3_ranks`: a LLaMA-3-style tiktoken `tokenizer.model`, the ranks of a byte-level BPE trained here
  with LLaMA-3's split pattern.
- `write_hf_llama3_dir`: the HF layout of the same tokenizer: tokenizer.json converted from those ranks by
  transformers' own converter (how HF's LLaMA-3 repos were made), with Meta's special tokens after the ranks,
  plus tokenizer_config.json / generation_config.json.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os

CORPUS = [
    "The quick brown llama jumps over the lazy alpaca, 12 times in 2023.",
    "Llamas are domesticated South American camelids; they've been used as pack animals for centuries.",
    "Café naïve façade — déjà vu! Ünïcödé text, emoji 🦙🦙 and CJK 骆驼 appear too.",
    "def add(a, b):\n    return a + b\n\n\n# numbers 1234567 and tabs\tend",
    "Instruction: Name three colors.\nResponse: Red, green and blue.",
    "I'm sure you'll see what we'd do: it's THE answer, isn't it?",
]

# Meta's LLaMA-3.1 special tokens at ids n_ranks + 0..10; the rest up to 256 are reserved tokens.
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(LLAMA3_SPECIAL) + 3)]


def llama3_pattern() -> str:
    """LLaMA-3's split regex as transformers' tiktoken converter states it (its default): an oracle of our own."""
    import inspect

    from transformers.convert_slow_tokenizer import TikTokenConverter

    return inspect.signature(TikTokenConverter).parameters["pattern"].default


@contextlib.contextmanager
def no_tiktoken_cache():
    """transformers reads tiktoken files through tiktoken's loader, which caches files by path in a shared temp
    dir: a later test's file at a recycled path could be served stale. An empty cache dir turns that off."""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE's printable stand-in character of each byte (GPT-2's table), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def write_llama3_ranks(path, vocab_size: int = 400) -> str:
    """A tiktoken ranks file: every byte, then the trained merges in order (rank = BPE merge priority)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(llama3_pattern()), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(CORPUS * 10, trainer)
    to_byte = _byte_level_alphabet()
    lines = [
        f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {rank}"
        for token, rank in sorted(tk.get_vocab().items(), key=lambda kv: kv[1])
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.fspath(path)


def write_hf_llama3_dir(directory, ranks_path, *, chat_template: str | None = None, eos_token="<|eot_id|>") -> str:
    """An HF LLaMA-3 tokenizer dir (no tokenizer.model): tokenizer.json, tokenizer_config.json, generation_config."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    os.makedirs(directory, exist_ok=True)
    with no_tiktoken_cache():
        converted = TikTokenConverter(
            vocab_file=os.fspath(ranks_path), pattern=llama3_pattern(), extra_special_tokens=LLAMA3_SPECIAL
        ).converted()
    converted.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": eos_token,
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    n = converted.get_vocab_size(with_added_tokens=False)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": n, "eos_token_id": [n + 1, n + 8, n + 9]}, f)
    return os.fspath(directory)


def train_llama2_sentencepiece(directory, vocab_size: int = 420) -> str:
    """A SentencePiece BPE with LLaMA-2's trainer settings (byte fallback, digits split, whitespace kept, identity
    normalisation; unk 0, bos 1, eos 2, no pad) as `directory`/tokenizer.model."""
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    return path
