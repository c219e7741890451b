"""The three file kinds a LLaMA checkpoint ships its tokenizer as, each read by its own library behind one small
interface (`n_words`, `special`, `bos_id`, `eos_id`, `pad_id`, `token_id`, `encode_ordinary`, `decode`), which
`tokenizer.Tokenizer` wraps:

- SentencePiece `tokenizer.model` (LLaMA-1/2, Meta's and HF's dirs): a protobuf, read by `sentencepiece`.
- tiktoken `tokenizer.model` (LLaMA-3.x, Meta's dirs and HF's `original/`): text lines "base64(token) rank",
  read by `tiktoken` with LLaMA-3's split pattern; Meta appends 256 special tokens after the ranks (ids
  128000.. for the released vocabulary), which the file does not list, so their names are given here.
- Hugging Face `tokenizer.json` (how HF LLaMA-3 repos ship it), read by `tokenizers`.

The kind is told from the file's content, not its name (`detect_kind`).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

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
            name=os.path.basename(path),
            pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special,
        )
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


BACKENDS = {"sentencepiece": _SentencePiece, "tiktoken": _Tiktoken, "huggingface": _HFTokenizers}
