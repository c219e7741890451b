"""SentencePiece tokenizer of LLaMA-1/2 checkpoints (Meta's `tokenizer.model`, also shipped in HF dirs).

LLaMA-3 ships a tiktoken BPE file under the same name (and HF LLaMA-3 dirs only `tokenizer.json`);
neither is supported, and both are recognised so the error says so.
"""

from __future__ import annotations

import os
import re

from sentencepiece import SentencePieceProcessor

TOKENIZER_FILE = "tokenizer.model"
# One line of a tiktoken BPE file: a base64 token, a space, its rank.
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


def _looks_like_tiktoken(path: str) -> bool:
    with open(path, "rb") as f:
        first = f.readline().strip()
    return bool(_TIKTOKEN_LINE.match(first))


class Tokenizer:
    """`encode(s, bos, eos) -> ids`, `decode(ids) -> str`; `bos_id`, `eos_id`, `pad_id` (-1 when absent), `n_words`."""

    def __init__(self, model_path: str | os.PathLike):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        if _looks_like_tiktoken(model_path):
            raise ValueError(
                f"{model_path} is a tiktoken BPE file (LLaMA-3's tokenizer), which is not supported: "
                "only SentencePiece tokenizer.model files (LLaMA-1/2) are"
            )
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path} is not a valid SentencePiece model: {e}") from e
        self.model_path = model_path
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer.model of a Meta or HF checkpoint dir, or of its parent (Meta's downloads keep it there)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        candidates = [
            os.path.join(path, TOKENIZER_FILE),
            os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_FILE),
        ]
        for candidate in candidates:
            if os.path.isfile(candidate):
                return cls(candidate)
        hint = ""
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            hint = (
                " (the directory has only tokenizer.json: a fast tokenizer such as LLaMA-3's, which is not "
                "supported; only SentencePiece tokenizer.model files are)"
            )
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path} or its parent{hint}")

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"s must be a str, got {type(s).__name__}")
        ids = self.sp_model.encode(s)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"ids must lie in [0, {self.n_words}) (the tokenizer's vocabulary), got {bad[:5]}")
        return self.sp_model.decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, n_words={self.n_words}, bos_id={self.bos_id}, eos_id={self.eos_id})"
