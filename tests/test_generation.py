"""KV-cache generation: equal to full recompute, batch equal to alone, eos, sampling, errors, the CLI."""

import json
import re

import pytest
import torch

from llama_adapter import AdapterConfig, LLaMA, ModelArgs
from llama_adapter.generation import generate, generate_stream, sample
from llama_adapter.model import Attention

F64 = torch.float64
TINY = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=48)


def make_model(seed=0, adapter=AdapterConfig(adapter_len=3, adapter_layers=2), **overrides):
    torch.manual_seed(seed)
    model = LLaMA(ModelArgs(**{**TINY, **overrides}), adapter, dtype=F64)
    for p in model.adapter_parameters():
        if p.dim() == 1:  # open the gates so the adapter matters
            p.data.normal_()
    return model


def prompts_of(lengths, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in lengths]


def greedy_by_recompute(model, prompt, n):
    """No cache: the whole sequence again at every step."""
    seq, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([seq]))[0, -1]
            logits.append(last)
            seq.append(int(last.argmax()))
    return seq[len(prompt) :], torch.stack(logits)


def stream_logits(model, prompts, n, **kw):
    steps = list(generate_stream(model, prompts, n, **kw))
    return [s.tokens for s in steps], torch.stack([s.logits for s in steps], 1)  # (B, steps, vocab)


def test_cached_greedy_equals_full_recompute():
    model = make_model()
    prompt = prompts_of([6])[0]
    expected_tokens, expected_logits = greedy_by_recompute(model, prompt, 8)
    tokens, logits = stream_logits(model, [prompt], 8)
    assert [t[0] for t in tokens] == expected_tokens
    torch.testing.assert_close(logits[0], expected_logits, rtol=0, atol=1e-12)
    assert model.generate([prompt], 8) == [expected_tokens]


def test_batch_of_different_lengths_equals_each_alone():
    model = make_model()
    prompts = prompts_of([2, 9, 5])
    batch_tokens, batch_logits = stream_logits(model, prompts, 6)
    for b, p in enumerate(prompts):
        alone_tokens, alone_logits = stream_logits(model, [p], 6)
        assert [t[b] for t in batch_tokens] == [t[0] for t in alone_tokens]
        torch.testing.assert_close(batch_logits[b], alone_logits[0], rtol=0, atol=1e-12)


def test_batched_prompt_offsets_equal_each_alone():
    model = make_model()
    prompts = prompts_of([3, 7])
    offset = torch.randn(2, 1, TINY["dim"], dtype=F64)
    _, batch_logits = stream_logits(model, prompts, 4, prompt_offset=offset)
    _, plain_logits = stream_logits(model, prompts, 4)
    assert not torch.allclose(batch_logits, plain_logits)
    for b, p in enumerate(prompts):
        _, alone = stream_logits(model, [p], 4, prompt_offset=offset[b : b + 1])
        torch.testing.assert_close(batch_logits[b], alone[0], rtol=0, atol=1e-12)


def test_stops_at_eos_per_row():
    model = make_model()
    prompts = prompts_of([4, 6])
    free = generate(model, prompts, 10)
    eos = free[0][3]  # row 0 stops before its 4th token; row 1 only if (and where) it produces that token
    stopped = generate(model, prompts, 10, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos)]
    cut = free[1].index(eos) if eos in free[1] else len(free[1])
    assert stopped[1] == free[1][:cut]
    steps = list(generate_stream(model, [prompts[0]], 10, eos_id=eos))
    assert len(steps) == free[0].index(eos) + 1 and steps[-1].tokens == [None]


def test_prompt_kv_computed_once_per_call_and_never_reused(monkeypatch):
    model = make_model()
    calls = []
    original = Attention.prompt_kv
    monkeypatch.setattr(Attention, "prompt_kv", lambda self, off=None: calls.append(self) or original(self, off))
    prompt = prompts_of([5])
    _, first = stream_logits(model, prompt, 6)
    assert len(calls) == 2  # once per adapted layer, not per step
    with torch.no_grad():
        for layer in model.layers[1:]:
            layer.attention.adapter_prompt.mul_(-3.0)  # as a training step would change it
    _, second = stream_logits(model, prompt, 6)
    assert len(calls) == 4
    assert not torch.allclose(first, second)
    _, expected = greedy_by_recompute(model, prompt[0], 6)
    torch.testing.assert_close(second[0], expected, rtol=0, atol=1e-12)


def test_sampling_is_seeded_and_top_p_limits_the_choice():
    model = make_model()
    prompt = prompts_of([4])
    a = generate(model, prompt, 8, temperature=1.5, seed=7)
    assert a == generate(model, prompt, 8, temperature=1.5, seed=7)
    draws = {tuple(generate(model, prompt, 8, temperature=1.5, seed=s)[0]) for s in range(4)}
    assert len(draws) > 1
    assert generate(model, prompt, 8, temperature=1.0, top_p=1e-9, seed=3) == generate(model, prompt, 8)

    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=F64)).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    picks = sample(logits, temperature=1.0, top_p=0.7, generator=gen)
    counts = torch.bincount(picks, minlength=4)
    # cumulative probability before token 3 is 0.5 < 0.7, before token 2 it is 0.8: only tokens 1 and 3 remain
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() / 4000 - 0.5 / 0.8) < 0.03


def test_request_errors():
    model = make_model()
    ok = prompts_of([3])
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompts_of([40]), 9)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ok, 0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ok, 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ok, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[1, TINY["vocab_size"]]], 2)
    with pytest.raises(TypeError, match="prompts"):
        generate(model, [], 2)
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        generate(model, [[1, 2], []], 2)
    with pytest.raises(ValueError, match="prompt_offset"):
        generate(model, ok, 2, prompt_offset=torch.zeros(2, 1, TINY["dim"], dtype=F64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 1, got 2.0"),
        (dict(max_new_tokens=True), "max_new_tokens must be an int >= 1, got True"),
        (dict(temperature="0.5"), "temperature must be a number >= 0, got '0.5' (str)"),
        (dict(temperature=float("nan")), "temperature must be a number >= 0, got nan"),
        (dict(temperature=1.0, top_p=1.5), "top_p must be a number in (0, 1], got 1.5"),
        (dict(temperature=1.0, top_p="0.9"), "top_p must be a number in (0, 1], got '0.9'"),
        (dict(eos_id=TINY["vocab_size"]), f"eos_id must be an int in [0, {TINY['vocab_size'] - 1}] or None"),
        (dict(eos_id=-1), "eos_id must be an int in"),
        (dict(eos_id="2"), "eos_id must be an int in"),
        (dict(seed="0"), "seed must be an int or None, got '0'"),
        (dict(stop_ids=[2, TINY["vocab_size"] + 5]), f"stop_ids [{TINY['vocab_size'] + 5}] are outside the vocabulary"),
    ],
)
def test_bad_arguments_are_errors_naming_the_argument(kwargs, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(make_model(), prompts_of([3]), **kwargs)


def test_cli_generate_prints_what_generate_returns(tmp_path, capsys):
    spm = pytest.importorskip("sentencepiece")
    from llama_adapter.cli import main
    from llama_adapter.prompts import alpaca_prompt
    from llama_adapter.tokenizer import Tokenizer

    text = [alpaca_prompt(f"Name {i} colours of the rainbow.", f"list {i}") for i in range(40)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=80,
        model_type="bpe",
        minloglevel=2,
    )
    tok = Tokenizer(tmp_path / "tokenizer.model")
    model = make_model(adapter=None, vocab_size=tok.n_words, max_seq_len=2048)
    with torch.no_grad():
        model.output.weight[tok.eos_id] = 0.0  # eos logit 0 < the max of the others: both runs print 12 tokens
    params = {k: v for k, v in vars(model.params).items() if k not in ("head_dim", "hidden_dim", "max_seq_len")}
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save(model.state_dict(), tmp_path / "consolidated.00.pth")

    prompt = tok.encode(alpaca_prompt("Name the colours."), bos=True, eos=False)
    args = ["generate", "--model", str(tmp_path), "--instruction", "Name the colours.", "--max-new-tokens", "12"]
    args += ["--dtype", "float64", "--device", "cpu"]
    expected = tok.decode(generate(model, [prompt], 12, eos_id=tok.eos_id)[0])
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n" and "tokens/s" in err

    model.attach_adapter(AdapterConfig(adapter_len=4, adapter_layers=2))
    for p in model.adapter_parameters():
        p.data.normal_()
    model.save_adapter(tmp_path / "adapter")
    adapted = tok.decode(generate(model, [prompt], 12, eos_id=tok.eos_id)[0])
    assert main([*args, "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out == adapted + "\n" != expected + "\n"


def test_stops_at_any_stop_id():
    model = make_model()
    prompts = prompts_of([4, 6])
    free = generate(model, prompts, 10)
    a, b = free[0][2], free[1][4]  # e.g. eos and eot: a row stops at whichever comes first
    stopped = generate(model, prompts, 10, stop_ids={a, b})

    def cut(row):
        return row[: min([row.index(t) for t in (a, b) if t in row], default=len(row))]

    assert stopped == [cut(free[0]), cut(free[1])] and len(stopped[0]) <= 2 and len(stopped[1]) <= 4
    assert generate(model, prompts, 10, eos_id=a, stop_ids=[b]) == stopped  # eos_id= joins the set
    with pytest.raises(TypeError, match="stop_ids must be ints"):
        generate(model, prompts, 2, stop_ids=["</s>"])
    with pytest.raises(TypeError, match="stop_ids must be a list or set of token ids, got int"):
        generate(model, prompts, 2, stop_ids=a)


def test_cli_generate_chat_with_a_llama3_tokenizer(tmp_path, capsys):
    """`generate --chat` on a Meta LLaMA-3 dir (tiktoken tokenizer.model): the llama3 format, and the row stops at
    <|eot_id|> (a stop id that is not eos)."""
    from tokenizer_files import write_llama3_ranks

    from llama_adapter.chat import get_chat_format
    from llama_adapter.cli import main
    from llama_adapter.tokenizer import Tokenizer

    tok = Tokenizer(write_llama3_ranks(tmp_path / "tokenizer.model", vocab_size=300))
    model = make_model(adapter=None, vocab_size=tok.n_words, max_seq_len=256)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = get_chat_format("llama3", tok).encode_prompt(tok, messages)
    free = generate(model, [prompt], 8)[0]
    with torch.no_grad():  # make <|eot_id|> the 4th greedy token: same logits as the 4th token had, raised
        hidden = {}
        handle = model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
        model(torch.tensor([prompt + free[:3]]))
        handle.remove()
        h = hidden["h"][0, -1]
        model.output.weight[tok.eot_id] = model.output.weight[free[3]] + 0.5 * h / h.norm() ** 2
    expected = generate(model, [prompt], 8, stop_ids=tok.stop_ids)[0]
    assert expected == free[:3]
    params = {k: v for k, v in vars(model.params).items() if k not in ("head_dim", "hidden_dim", "max_seq_len")}
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save(model.state_dict(), tmp_path / "consolidated.00.pth")
    args = ["generate", "--model", str(tmp_path), "--chat", "--system", "Be brief.", "--instruction", "Name a colour."]
    assert main([*args, "--max-new-tokens", "8", "--dtype", "float64", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out == tok.decode(expected) + "\n"
    assert "tiktoken tokenizer" in err and "llama3 format" in err and "[3 tokens" in err


def test_compile_says_it_is_compiling_once(monkeypatch, capsys):
    """generate(compile=True) announces the (long, silent) first compiled step on stderr, once, and gives the same
    tokens as eager. torch.compile is replaced by the identity: the note, not the compiler, is under test here
    (a real compile on the CPU takes minutes; test_compile.py covers it)."""
    from llama_adapter import generation

    monkeypatch.setattr(generation, "_COMPILED_STEPS", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    model, prompts = make_model(), prompts_of([4, 6])
    eager = generate(model, prompts, 3)
    assert generate(model, prompts, 3, compile=True) == eager
    err = capsys.readouterr().err
    assert err.count("generate: compiling the decode step") == 1 and "decode step compiled in" in err
    assert generate(model, prompts, 3, compile=True) == eager
    assert "compiling" not in capsys.readouterr().err
