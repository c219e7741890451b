import base64
import json
import os
import shutil

import pytest
from helpers import train_sentencepiece
from tokenizer_files import (
    CORPUS,
    LLAMA3_SPECIAL,
    llama3_pattern,
    no_tiktoken_cache,
    train_llama2_sentencepiece,
    write_hf_llama3_dir,
    write_llama3_ranks,
)
from transformers import AutoTokenizer

from llama_adapter.tokenizer import Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"), vocab_size=100)


def test_ids_and_special_tokens(model_path):
    tok = Tokenizer(model_path)
    assert (tok.kind, tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == ("sentencepiece", 100, 1, 2, -1)
    assert (tok.eot_id, tok.stop_ids, tok.chat_template) == (None, {2}, None)
    text = "Tell me about alpacas."
    plain = tok.encode(text, bos=False, eos=False)
    assert plain and all(3 <= i < 100 for i in plain)
    assert tok.encode(text, bos=True, eos=False) == [1, *plain]
    assert tok.encode(text, bos=True, eos=True) == [1, *plain, 2]
    assert tok.encode(text, bos=False, eos=True) == [*plain, 2]
    assert tok.decode(plain) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # sentencepiece drops control tokens
    assert tok.encode("", bos=True, eos=False) == [1]


def test_sentencepiece_agrees(model_path):
    """The ids are sentencepiece's own (what Meta's tokenizer gives), not a re-tokenisation."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    text = "The quick brown llama, 12 times."
    assert Tokenizer(model_path).encode(text, bos=False, eos=False) == sp.encode(text)


def test_from_dir_finds_it_here_or_in_the_parent(model_path, tmp_path):
    assert Tokenizer.from_dir(os.path.dirname(model_path)).model_path == model_path
    parent = train_sentencepiece(tmp_path)  # Meta's downloads: tokenizer.model beside the llama-2-7b/ folder
    (tmp_path / "llama-2-7b").mkdir()
    assert Tokenizer.from_dir(tmp_path / "llama-2-7b").model_path == parent


def test_bad_inputs(model_path, tmp_path):
    tok = Tokenizer(model_path)
    with pytest.raises(TypeError, match="s must be a str"):
        tok.encode([1, 2], bos=True, eos=False)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        tok.decode([5, 100])
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        tok.decode([-1])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        Tokenizer.from_dir(tmp_path / "absent")
    empty = tmp_path / "empty" / "model"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json in"):
        Tokenizer.from_dir(empty)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01not a sentencepiece model")
    with pytest.raises(TokenizerError, match="garbage.model is not a tokenizer file this package reads"):
        Tokenizer(garbage)
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"\x0a\x05trunc")  # starts like a SentencePiece protobuf, is not one
    with pytest.raises(TokenizerError, match="broken.model is not a valid SentencePiece model"):
        Tokenizer(broken)
    (empty / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="tokenizer.json is not a valid Hugging Face tokenizer.json"):
        Tokenizer.from_dir(empty)


def test_config_json_that_is_not_an_object_names_the_file(tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\naGVsbG8= 1\n")
    config = tmp_path / "tokenizer_config.json"
    config.write_text('["<s>"]')
    with pytest.raises(TokenizerError, match="tokenizer_config.json holds a JSON list, expected an object"):
        Tokenizer.from_dir(tmp_path)
    config.write_text('{"bos_token": "<|begin_of_text|>"}')
    assert Tokenizer.from_dir(tmp_path).bos_id == 2  # the first special id after the two ranks


def test_malformed_tiktoken_file_names_the_line(tmp_path):
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(3)] + ["aGVsbG8= x"]
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TokenizerError, match="tokenizer.model:4: not a 'base64token rank' line"):
        Tokenizer.from_dir(tmp_path)
    path.write_text("IQ== 0\naGVsbG8= 5\n")
    with pytest.raises(TokenizerError, match="ranks must be 0..1, each once"):
        Tokenizer(path)
    path.write_text("IQ== 0\naGVsbG8= 1\nIQ== 2\n")
    with pytest.raises(TokenizerError, match=r"tokenizer.model:3: token b'!' is listed twice \(ranks 0, 2\)"):
        Tokenizer(path)


# ----------------------------------------------------------------------------- LLaMA-3 and Hugging Face files
TEXTS = [*CORPUS, "  leading spaces,\ttabs\r\n and 🦙 emoji", "numbers 1234567890 and 'quotes' it's", ""]


@pytest.fixture(scope="module")
def llama3_files(tmp_path_factory):
    """Meta's layout (tokenizer.model = ranks), HF's (tokenizer.json + configs) and a dir AutoTokenizer reads the
    ranks file from (transformers converts tiktoken files when tokenizer_config lists the special tokens)."""
    root = tmp_path_factory.mktemp("llama3")
    ranks = write_llama3_ranks(root / "meta" / "tokenizer.model")
    hf_dir = write_hf_llama3_dir(root / "hf", ranks)
    (root / "meta_auto").mkdir()
    shutil.copy(ranks, root / "meta_auto" / "tokenizer.model")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "extra_special_tokens": LLAMA3_SPECIAL,
    }
    (root / "meta_auto" / "tokenizer_config.json").write_text(json.dumps(config))
    return {"meta": root / "meta", "hf": root / "hf", "meta_auto": root / "meta_auto", "ranks": ranks, "hf_dir": hf_dir}


def test_llama3_tiktoken_file(llama3_files):
    import tiktoken

    tok = Tokenizer.from_dir(llama3_files["meta"])
    n = sum(1 for line in open(llama3_files["ranks"]) if line.strip())
    assert (tok.kind, tok.n_words) == ("tiktoken", n + 256)
    # Meta's ids, counted from the end of the ranks
    special = tok.special_tokens
    assert (special["<|begin_of_text|>"], special["<|end_of_text|>"]) == (n, n + 1) == (tok.bos_id, tok.eos_id)
    assert (special["<|start_header_id|>"], special["<|end_header_id|>"]) == (n + 6, n + 7)
    assert (special["<|eom_id|>"], special["<|eot_id|>"], special["<|python_tag|>"]) == (n + 8, n + 9, n + 10)
    assert special["<|reserved_special_token_247|>"] == n + 255 and len(special) == 256
    assert tok.eot_id == n + 9 and tok.stop_ids == {n + 1, n + 8, n + 9}

    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in open(llama3_files["ranks"]))}
    enc = tiktoken.Encoding("ref", pat_str=llama3_pattern(), mergeable_ranks=ranks, special_tokens=special)
    with no_tiktoken_cache():
        auto = AutoTokenizer.from_pretrained(llama3_files["meta_auto"])
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == enc.encode_ordinary(text) == auto(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=True, eos=True) == [n, *ids, n + 1]
    chat = "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    assert tok.encode(chat, bos=False, eos=False, special=True) == enc.encode(chat, allowed_special="all")
    assert tok.encode(chat, bos=False, eos=False, special=True) == auto(chat, add_special_tokens=False).input_ids
    # without special=True a special token's text is plain text (user content cannot forge a turn)
    assert tok.encode(chat, bos=False, eos=False) == enc.encode_ordinary(chat)
    assert n + 9 not in tok.encode(chat, bos=False, eos=False)


def test_hf_tokenizer_json(llama3_files):
    from tokenizers import Tokenizer as HFTokenizer

    meta = Tokenizer.from_dir(llama3_files["meta"])
    tok = Tokenizer.from_dir(llama3_files["hf"])
    n = meta.bos_id
    assert tok.kind == "huggingface" and tok.model_path.endswith("tokenizer.json")
    assert (tok.n_words, tok.bos_id) == (meta.n_words, n)
    assert tok.eos_id == n + 9  # tokenizer_config's eos_token (<|eot_id|>, as LLaMA-3 Instruct repos set it)
    assert tok.stop_ids == {n + 1, n + 8, n + 9}  # + generation_config.json's eos_token_id list
    library = HFTokenizer.from_file(str(llama3_files["hf"] / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(llama3_files["hf"])
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == meta.encode(text, bos=False, eos=False), text  # the same ranks, read two ways
        assert ids == library.encode(text, add_special_tokens=False).ids
        assert ids == auto(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    chat = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert tok.encode(chat, bos=False, eos=False, special=True) == auto(chat, add_special_tokens=False).input_ids
    assert tok.encode(chat, bos=False, eos=False, special=True) == meta.encode(chat, bos=False, eos=False, special=True)


def test_from_dir_prefers_tokenizer_model_then_json(llama3_files, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(llama3_files["hf"], both)
    shutil.copy(llama3_files["ranks"], both / "tokenizer.model")
    tok = Tokenizer.from_dir(both)
    assert tok.kind == "tiktoken" and tok.eos_id == tok.special_tokens["<|eot_id|>"]  # the dir's configs still apply
    assert "kind=tiktoken" in repr(tok)


def test_sentencepiece_agrees_with_auto_tokenizer(tmp_path):
    import sentencepiece

    path = train_llama2_sentencepiece(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    tok = Tokenizer.from_dir(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == sp.encode(text) == auto(text, add_special_tokens=False).input_ids
    # a special token's text is split out and each piece gets SentencePiece's dummy prefix, as Meta's LLaMA-2
    # chat code (bos + sp.encode("[INST] ...")) writes it; transformers' non-legacy tokenizer omits that "▁".
    text = "<s>[INST] Hi [/INST] Hello </s>"
    assert tok.encode(text, bos=False, eos=False, special=True) == [1, *sp.encode("[INST] Hi [/INST] Hello "), 2]

    # transformers' own tokenizer.json of it (Metaspace, the HF LLaMA-2 layout): read by tokenizers, the same ids
    # as AutoTokenizer, special tokens included
    auto.save_pretrained(tmp_path / "hf")
    hf = Tokenizer.from_dir(tmp_path / "hf")
    assert (hf.kind, hf.bos_id, hf.eos_id, hf.stop_ids) == ("huggingface", 1, 2, {2})
    for text in [*CORPUS, "<s>[INST] Hi [/INST] Hello </s><s>[INST] Again [/INST]"]:
        assert hf.encode(text, bos=False, eos=False, special=True) == auto(text, add_special_tokens=False).input_ids


def test_config_errors(llama3_files, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama3_files["hf"], bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not in the vocabulary"):
        Tokenizer.from_dir(bad)
    (bad / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(TokenizerError, match="chat_template must be a string"):
        Tokenizer.from_dir(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": "x"}]}))
    assert Tokenizer.from_dir(bad).chat_template == "x"
    (bad / "chat_template.jinja").write_text("{{ bos_token }}")
    assert Tokenizer.from_dir(bad).chat_template == "{{ bos_token }}"
    (bad / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(TokenizerError, match="id 1000000 is outside the vocabulary"):
        Tokenizer.from_dir(bad)


def test_long_runs_are_cut_as_metas_tokenizer_cuts_them(llama3_files):
    """Meta's LLaMA-3 tokenizer cuts runs of whitespace / non-whitespace every 25,000 characters (tiktoken is slow on
    them) and encodes 400,000 characters per call: the same ids here."""
    import tiktoken

    tok = Tokenizer.from_dir(llama3_files["meta"])
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in open(llama3_files["ranks"]))}
    enc = tiktoken.Encoding("ref", pat_str=llama3_pattern(), mergeable_ranks=ranks, special_tokens={})
    run = "l" + "llama" * 10_440  # 52,201 non-space characters, cut 25,000 and 50,000 characters in: mid-"llama"
    text = "x " + run + " " * 30_000 + "end"
    spaces = 2 + len(run)
    cuts = [0, 2 + 25_000, 2 + 50_000, spaces, spaces + 25_000, len(text)]
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    ids = tok.encode(text, bos=False, eos=False)
    assert ids == [i for piece in pieces for i in enc.encode_ordinary(piece)]
    assert ids != enc.encode_ordinary(text) and tok.decode(ids) == text
    ids, starts = tok.encode_with_offsets(text)
    assert starts == sorted(starts) and [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])] == [
        tok.decode([i]) for i in ids
    ]
    long = "word " * 90_000  # 450,000 characters: two tiktoken calls
    assert tok.encode(long, bos=False, eos=False) == enc.encode_ordinary(long[:400_000]) + enc.encode_ordinary(
        long[400_000:]
    )
