"""Tokenizers of LLaMA checkpoints: one interface over the three file kinds they ship.

- SentencePiece `tokenizer.model` (LLaMA-1/2, Meta's and HF's dirs): a protobuf, read by `sentencepiece`.
- tiktoken `tokenizer.model` (LLaMA-3.x, Meta's dirs and HF's `original/`): text lines "base64(token) rank",
  read by `tiktoken` with LLaMA-3's split pattern; Meta appends 256 special tokens after the ranks (ids
  128000.. for the released vocabulary), which the file does not list, so their names are given here.
- Hugging Face `tokenizer.json` (how HF LLaMA-3 repos ship it), read by `tokenizers`.

The kind is told from the file's content, not its name. Beside the file, an HF dir's tokenizer_config.json
(bos/eos/pad tokens, chat_template), chat_template.jinja, config.json and generation_config.json
(bos/eos ids) override the file's own defaults, and every eos they name, plus <|eot_id|> and <|eom_id|>
where the vocabulary has them, is a stop id: LLaMA-3 Instruct ends its turns with <|eot_id|>, not eos.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
KINDS = ("sentencepiece", "tiktoken", "huggingface")

# Meta's LLaMA-3 pre-tokenizer regex (llama3/tokenizer.py), the same in 3.1 and 3.2.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
# The named special tokens of LLaMA-3.1/3.2 at ids n_ranks + 0..10 (LLaMA-3.0 calls 4, 5, 8, 10 reserved; the ids of
# the ones that matter, bos 128000, eos 128001, headers 128006/7, eom 128008, eot 128009, are the same throughout).
LLAMA3_NAMED_SPECIAL = (
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
)
EOT_TOKENS = ("<|eot_id|>", "<|eom_id|>")  # end of turn / of message (a tool call): generation stops there too
_DEFAULT_BOS = ("<|begin_of_text|>", "<s>")
_DEFAULT_EOS = ("<|end_of_text|>", "</s>")

# Meta's LLaMA-3 tokenizer encodes at most 400k characters per tiktoken call and cuts runs of whitespace or of
# non-whitespace every 25k characters: tiktoken is very slow on such runs, and ids must match Meta's on any text.
TIKTOKEN_MAX_CHARS = 400_000
TIKTOKEN_MAX_RUN = 25_000
_LONG_RUN = re.compile(rf"\s{{{TIKTOKEN_MAX_RUN + 1},}}|\S{{{TIKTOKEN_MAX_RUN + 1},}}")
# One line of a tiktoken ranks file: a base64 token, a space, its rank.
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


class TokenizerError(ValueError):
    """A tokenizer file (or its config) that cannot be used; the message names the file."""


def llama3_special_tokens(n_ranks: int, num_special: int = LLAMA3_NUM_SPECIAL) -> dict[str, int]:
    """Meta's LLaMA-3 special tokens, numbered from the end of the ranks; the unnamed ones are reserved tokens."""
    names = list(LLAMA3_NAMED_SPECIAL)
    names += [f"<|reserved_special_token_{3 + i}|>" for i in range(num_special - len(names))]
    return {name: n_ranks + i for i, name in enumerate(names[:num_special])}


def detect_kind(path: str) -> str:
    """ "sentencepiece", "tiktoken" or "huggingface", from the file's first bytes; TokenizerError otherwise."""
    with open(path, "rb") as f:
        head = f.read(4096)
    first_line = head.split(b"\n", 1)[0].strip()
    if _TIKTOKEN_LINE.match(first_line):
        return "tiktoken"
    if head.lstrip().startswith(b"{"):
        return "huggingface"
    # A SentencePiece ModelProto starts with field 1 (pieces), length-delimited: tag byte 0x0a.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise TokenizerError(
        f"{path} is not a tokenizer file this package reads: expected a SentencePiece model (protobuf), a tiktoken "
        f"BPE ranks file (LLaMA-3's tokenizer.model: 'base64token rank' lines) or a Hugging Face tokenizer.json"
    )


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


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


def read_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken ranks file as {token bytes: rank}; TokenizerError naming the line on a malformed one."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split(b" ")
                token = base64.b64decode(token, validate=True)
                rank = int(rank)
            except (ValueError, binascii.Error):
                raise TokenizerError(f"{path}:{lineno}: not a 'base64token rank' line of a tiktoken file") from None
            if token in ranks:  # the dict would keep the last rank and the error below would blame the numbering
                raise TokenizerError(f"{path}:{lineno}: token {token!r} is listed twice (ranks {ranks[token]}, {rank})")
            ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: the tiktoken ranks file is empty")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


class _SentencePiece:
    def __init__(self, path: str):
        from sentencepiece import SentencePieceProcessor

        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{path} is not a valid SentencePiece model: {err}") from err
        self.n_words = self.sp.vocab_size()
        sp = self.sp
        self.special = {sp.id_to_piece(i): i for i in range(self.n_words) if sp.is_control(i) or sp.is_unknown(i)}
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_id = sp.pad_id()

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def encode_ordinary(self, s: str) -> tuple[list[int], list[int]]:
        """Ids and the character offset where each token's text starts (the dummy-prefix space: its word's)."""
        try:
            proto = self.sp.encode(s, out_type="immutable_proto")
        except ValueError:  # sentencepiece >= 0.2.1 dropped it for the protobuf-backed "proto"
            proto = self.sp.encode(s, return_type="proto")
        byte_to_char = [i for i, ch in enumerate(s) for _ in range(len(ch.encode("utf-8")))] + [len(s)]
        return [p.id for p in proto.pieces], [byte_to_char[min(p.begin, len(byte_to_char) - 1)] for p in proto.pieces]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class _Tiktoken:
    def __init__(self, path: str):
        import tiktoken

        ranks = read_ranks(path)
        self.special = llama3_special_tokens(len(ranks))
        self.enc = tiktoken.Encoding(
            name=os.path.basename(path), pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks,
            special_tokens=self.special,
        )  # fmt: skip
        self.n_words = self.enc.n_vocab
        self.bos_id, self.eos_id, self.pad_id = self.special["<|begin_of_text|>"], self.special["<|end_of_text|>"], -1

    def token_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        ids = self.enc.encode_ordinary(token)
        return ids[0] if len(ids) == 1 else None

    def encode_ordinary(self, s: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        starts: list[int] = []
        for start, piece in _meta_pieces(s):
            piece_ids = self.enc.encode_ordinary(piece)
            ids += piece_ids
            starts += [start + offset for offset in self.enc.decode_with_offsets(piece_ids)[1]]
        return ids, starts

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


def _meta_pieces(s: str):
    """(offset, piece) as Meta's LLaMA-3 tokenizer cuts a text before tiktoken sees it (see TIKTOKEN_MAX_RUN)."""
    for chunk_start in range(0, len(s), TIKTOKEN_MAX_CHARS):
        chunk = s[chunk_start : chunk_start + TIKTOKEN_MAX_CHARS]
        cuts = [0]
        for run in _LONG_RUN.finditer(chunk):
            cuts += range(run.start() + TIKTOKEN_MAX_RUN, run.end(), TIKTOKEN_MAX_RUN)
        cuts.append(len(chunk))
        for a, b in zip(cuts, cuts[1:]):
            yield chunk_start + a, chunk[a:b]


class _HFTokenizers:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tk = HFTokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise TokenizerError(f"{path} is not a valid Hugging Face tokenizer.json: {err}") from None
        # Special tokens in plain text stay text (the caller asks for them with special=True).
        self.tk.encode_special_tokens = True
        self.n_words = self.tk.get_vocab_size(with_added_tokens=True)
        self.special = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        self.bos_id = next((self.special[t] for t in _DEFAULT_BOS if t in self.special), None)
        self.eos_id = next((self.special[t] for t in _DEFAULT_EOS if t in self.special), None)
        self.pad_id = -1

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode_ordinary(self, s: str) -> tuple[list[int], list[int]]:
        enc = self.tk.encode(s, add_special_tokens=False)
        return enc.ids, [start for start, _ in enc.offsets]

    def encode_with_specials(self, s: str) -> tuple[list[int], list[int]]:
        """The library splits out its added tokens itself: pieces between them are encoded as transformers encodes
        them (a Metaspace pre-tokenizer, say, prefixes only the text's first piece)."""
        self.tk.encode_special_tokens = False
        try:
            return self.encode_ordinary(s)
        finally:
            self.tk.encode_special_tokens = True

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)


_BACKENDS = {"sentencepiece": _SentencePiece, "tiktoken": _Tiktoken, "huggingface": _HFTokenizers}


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
        backend = _BACKENDS[self.kind](model_path)
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
