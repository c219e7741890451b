import base64
import os

import pytest
from helpers import train_sentencepiece

from llama_adapter.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"), vocab_size=100)


def test_ids_and_special_tokens(model_path):
    tok = Tokenizer(model_path)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (100, 1, 2, -1)
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
    with pytest.raises(FileNotFoundError, match="no tokenizer.model in"):
        Tokenizer.from_dir(empty)
    (empty / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="LLaMA-3.*not supported"):
        Tokenizer.from_dir(empty)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01not a sentencepiece model")
    with pytest.raises(ValueError, match="garbage.model is not a valid SentencePiece model"):
        Tokenizer(garbage)


def test_llama3_tiktoken_file_is_named(tmp_path):
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for rank, tok in enumerate([b"!", b"hello", b" the"])]
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="tiktoken BPE file .LLaMA-3's tokenizer., which is not supported"):
        Tokenizer.from_dir(tmp_path)
