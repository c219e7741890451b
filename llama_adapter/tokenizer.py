"""Tokenizers of LLaMA checkpoints: one interface (`Tokenizer`) over the three file kinds they ship (read in
`tokenizer_backends`: SentencePiece and tiktoken `tokenizer.model`, Hugging Face `tokenizer.json`).

Beside the file, an HF dir's tokenizer_config.json (bos/eos/pad tokens, chat_template), chat_template.jinja,
config.json and generation_config.json (bos/eos ids) override the file's own defaults, and every eos they name,
plus <|eot_id|> and <|eom_id|> where the vocabulary has them, is a stop id: LLaMA-3 Instruct ends its turns with
<|eot_id|>, not eos.
"""

from __future__ import annotations

import logging
import os
import re

from llama_adapter.files import CheckpointError, read_json_object
from llama_adapter.tokenizer_backends import BACKENDS, EOT_TOKENS, TokenizerError, detect_kind

__all__ = ["Tokenizer", "TokenizerError", "detect_kind"]

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"


def _read_json(path: str) -> dict:
    """An optional config file beside the tokenizer: {} when absent; TokenizerError naming it when unusable."""
    if not os.path.isfile(path):
        return {}
    try:
        return read_json_object(path)
    except CheckpointError as err:  # the one JSON reader's message, in the tokenizer's error class
        raise TokenizerError(str(err)) from None


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": string, ...} (an AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """`encode(s, bos, eos) -> ids`, `decode(ids) -> str` over any of the three kinds (`kind`).

    Attributes: `n_words`; `bos_id`, `eos_id`, `eot_id` (None when absent); `pad_id` (-1 when absent);
    `stop_ids` (every id that ends a generation); `special_tokens` {text: id}; `chat_template` (the dir's
    jinja template or None); `bos_token`, `eos_token` (their texts, what a chat template writes).
    """

    def __init__(self, model_path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        self.model_path = model_path
        self.kind = detect_kind(model_path)
        backend = BACKENDS[self.kind](model_path)
        self._backend = backend
        self.n_words: int = backend.n_words
        self.special_tokens: dict[str, int] = dict(backend.special)
        self.bos_id: int | None = backend.bos_id
        self.eos_id: int | None = backend.eos_id
        self.pad_id: int = backend.pad_id
        self.chat_template: str | None = None
        self._read_configs(os.fspath(config_dir) if config_dir is not None else os.path.dirname(model_path))
        self.eot_id: int | None = self.special_tokens.get("<|eot_id|>")
        ends = (self.eos_id, *self._config_eos, *(self.special_tokens.get(t) for t in EOT_TOKENS))
        self.stop_ids: frozenset[int] = frozenset(i for i in ends if i is not None)
        self._special_split = (
            re.compile("(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))) + ")")
            if self.special_tokens
            else None
        )
        log.info("tokenizer: %r", self)

    def _read_configs(self, directory: str) -> None:
        """tokenizer_config.json's tokens win over config.json's ids, which win over the file's own defaults."""
        tok_cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
        model_cfg = _read_json(os.path.join(directory, "config.json"))
        gen_cfg = _read_json(os.path.join(directory, "generation_config.json"))
        for entry in (tok_cfg.get("added_tokens_decoder") or {}).values():
            text = _token_text(entry)
            if text is None or not isinstance(entry, dict) or not entry.get("special"):
                continue
            token_id = self.token_id(text)
            if token_id is not None:
                self.special_tokens.setdefault(text, token_id)
        for cfg in (gen_cfg, model_cfg):
            ids = _id_list(cfg.get("bos_token_id"))
            if ids:
                self.bos_id = ids[0]
                break
        self._config_eos = [i for cfg in (gen_cfg, model_cfg) for i in _id_list(cfg.get("eos_token_id"))]
        if self._config_eos:
            self.eos_id = self._config_eos[0]
        for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("pad_id", "pad_token")):
            text = _token_text(tok_cfg.get(key))
            if text is None:
                continue
            token_id = self.token_id(text)
            if token_id is None:
                raise TokenizerError(f"{directory}/tokenizer_config.json: {key} {text!r} is not in the vocabulary")
            setattr(self, attr, token_id)
        for bad in [i for i in (self.bos_id, self.eos_id, *self._config_eos) if i is not None]:
            if not 0 <= bad < self.n_words:
                raise TokenizerError(f"{directory}: bos/eos id {bad} is outside the vocabulary [0, {self.n_words})")
        template_file = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                self.chat_template = f.read()
        else:
            self.chat_template = _pick_template(tok_cfg.get("chat_template"), directory)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a Meta or HF checkpoint dir: its tokenizer.model, else its tokenizer.json, else the
        parent's tokenizer.model (Meta's LLaMA-1/2 downloads keep it there). Configs are read from `path`."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        candidates = [
            os.path.join(path, TOKENIZER_FILE),
            os.path.join(path, HF_TOKENIZER_FILE),
            os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_FILE),
        ]
        for candidate in candidates:
            if os.path.isfile(candidate):
                return cls(candidate, config_dir=path)
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} or {HF_TOKENIZER_FILE} in {path}, nor {TOKENIZER_FILE} in its parent"
        )

    def token_id(self, token: str) -> int | None:
        """The id of a token's text (special or not), or None when it is not one token."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._backend.token_id(token)

    def encode_with_offsets(self, s: str, *, special: bool = False, plain_spans=()) -> tuple[list[int], list[int]]:
        """Ids of `s` and the character offset in `s` where each token starts (to map character spans to tokens).

        special=True turns the special tokens' texts in `s` (e.g. "<|eot_id|>", "<s>") into their ids, as a chat
        template's output needs; otherwise they are encoded as plain text. plain_spans: (start, end) character
        ranges of `s` (message contents in a chat format's output) where they stay plain text even then.
        """
        if not isinstance(s, str):
            raise TypeError(f"s must be a str, got {type(s).__name__}")
        if not special or self._special_split is None:
            return self._backend.encode_ordinary(s)
        found = [m.span() for m in self._special_split.finditer(s)]
        kept = [(a, b) for a, b in found if not any(a < end and start < b for start, end in plain_spans)]
        if len(kept) == len(found) and hasattr(self._backend, "encode_with_specials"):
            return self._backend.encode_with_specials(s)
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        for a, b in [*kept, (len(s), len(s))]:
            if a > pos:
                part_ids, part_starts = self._backend.encode_ordinary(s[pos:a])
                ids += part_ids
                starts += [pos + start for start in part_starts]
            if b > a:
                ids.append(self.special_tokens[s[a:b]])
                starts.append(a)
            pos = b
        return ids, starts

    def encode(self, s: str, bos: bool, eos: bool, *, special: bool = False) -> list[int]:
        ids = self.encode_with_offsets(s, special=special)[0]
        if bos and self.bos_id is not None:  # a vocabulary without bos (some HF tokenizers) starts bare
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{self.model_path} has no eos token (set eos_token in tokenizer_config.json)")
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids) -> str:
        """The text of `ids`; SentencePiece drops its control tokens, tiktoken and tokenizers write specials out."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"ids must lie in [0, {self.n_words}) (the tokenizer's vocabulary), got {bad[:5]}")
        return self._backend.decode(ids)

    def _token_text(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        return next((t for t, i in self.special_tokens.items() if i == token_id), None) or self.decode([token_id])

    @property
    def bos_token(self) -> str | None:
        return self._token_text(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_text(self.eos_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.model_path!r}, kind={self.kind}, n_words={self.n_words}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, stop_ids={sorted(self.stop_ids)})"
        )


def _pick_template(value, directory: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (the "default" one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(
        f"{directory}/tokenizer_config.json: chat_template must be a string or a list with a 'default' template"
    )
