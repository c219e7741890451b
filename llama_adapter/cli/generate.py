"""`llama-adapter generate`: answer one instruction with a (adapted) LLaMA checkpoint, tokens printed as they come."""

from __future__ import annotations

import sys
import time

import torch

from llama_adapter.attention import BACKENDS, set_attention_backend
from llama_adapter.chat import FORMATS
from llama_adapter.generation import TOP_P, Step, generate
from llama_adapter.quantize import QUANTIZATIONS
from llama_adapter.validation import ANY_INT, NON_NEGATIVE, POSITIVE_INT, require_device, require_triton_device

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="answer an instruction with a (adapted) LLaMA checkpoint")
    p.add_argument("--model", required=True, help="Meta or Hugging Face checkpoint directory (with its tokenizer)")
    p.add_argument("--adapter", help="adapter to load: our dir, a PEFT adaption-prompt dir or the official .pth")
    p.add_argument("--instruction", required=True)
    p.add_argument("--input", default=None, help="optional context for the instruction")
    p.add_argument(
        "--chat",
        action="store_true",
        help="an instruct model: the instruction is a user turn in its chat format (error if none is found)",
    )
    p.add_argument(
        "--chat-format",
        choices=FORMATS,
        default="auto",
        help="prompt format, as finetune's (auto: the checkpoint's chat template, else llama3 for a LLaMA-3 "
        "vocabulary, else alpaca); see llama_adapter.chat",
    )
    p.add_argument("--system", default=None, help="system message (chat formats)")
    p.add_argument(
        "--max-new-tokens",
        type=POSITIVE_INT,
        default=256,
        help="at most the room left in the model's context (clamped, with a note)",
    )
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=TOP_P, default=1.0)
    p.add_argument("--seed", type=ANY_INT, default=None)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="attention backend (default: auto)")
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=None,
        help="store the frozen block linears in 4-bit NF4 or int8 (needs torchao)",
    )
    p.set_defaults(func=run_generate)


def clamp_new_tokens(requested: int, prompt_len: int, max_seq_len: int, flag: str = "--max-new-tokens") -> int:
    """`requested`, or the room the model's context leaves after the prompt (with a note on stderr);
    ValueError if the prompt alone fills it."""
    room = max_seq_len - prompt_len
    if room < 1:
        raise ValueError(f"the prompt ({prompt_len} tokens) leaves no room in the model's {max_seq_len}-token context")
    if requested > room:
        print(
            f"note: {flag} {requested} > the {room} tokens left in the model's {max_seq_len}-token context "
            f"after the {prompt_len}-token prompt; generating at most {room}",
            file=sys.stderr,
        )
        return room
    return requested


def run_generate(args) -> int:
    from llama_adapter import LLaMA
    from llama_adapter.chat import AlpacaFormat, ChatError, get_chat_format, messages_from_record
    from llama_adapter.tokenizer import Tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    require_device(device, "--device")
    if args.backend == "triton":
        require_triton_device(device)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # the Triton kernels take fp16/bf16/fp32 only; "auto" would pick them for CUDA or under TRITON_INTERPRET
    set_attention_backend("reference" if args.backend == "auto" and dtype == torch.float64 else args.backend)
    tokenizer = Tokenizer.from_dir(args.model)
    chat_format = get_chat_format(args.chat_format, tokenizer, chat_only=args.chat)
    print(f"[{tokenizer.kind} tokenizer {tokenizer.model_path}; {chat_format.name} format]", file=sys.stderr)
    if isinstance(chat_format, AlpacaFormat):  # Alpaca's own template for an input, as fine-tuning writes it
        if args.system is not None:
            raise ChatError("--system needs a chat format, not alpaca (--chat-format llama2, llama3 or template)")
        prompt = chat_format.encode_prompt_record(tokenizer, args.instruction, args.input)
    else:
        messages = messages_from_record(args.instruction, args.input)
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = chat_format.encode_prompt(tokenizer, messages)  # format errors surface before the model loads
    model = LLaMA.from_pretrained(args.model, dtype=dtype, device=device, quantize=args.quantize)
    if args.adapter:
        model.load_adapter(args.adapter)
    max_new_tokens = clamp_new_tokens(args.max_new_tokens, len(prompt), model.params.max_seq_len)

    new_ids: list[int] = []
    printed = ""

    def show(step: Step) -> None:
        nonlocal printed
        if step.tokens[0] is None:
            return
        new_ids.append(step.tokens[0])
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(printed) :], end="", flush=True)
            printed = text

    start = time.perf_counter()
    generate(
        model,
        [prompt],
        max_new_tokens,
        args.temperature,
        args.top_p,
        seed=args.seed,
        callback=show,
        stop_ids=tokenizer.stop_ids,
    )
    seconds = time.perf_counter() - start
    print(tokenizer.decode(new_ids)[len(printed) :])
    rate = len(new_ids) / seconds if seconds > 0 else float("inf")
    print(f"[{len(new_ids)} tokens in {seconds:.2f} s: {rate:.1f} tokens/s]", file=sys.stderr)
    if not tokenizer.decode(new_ids).strip():
        print(empty_answer_hint(args, len(new_ids)), file=sys.stderr)
    return 0


def empty_answer_hint(args, n_tokens: int) -> str:
    """What to try when the model's first token already ended the answer (or it printed only blanks)."""
    said = "stopped at once (its first token was a stop token)" if n_tokens == 0 else "answered only blanks"
    tips = ["phrase the instruction as in the fine-tuning data"]
    if args.input:
        tips.append("try without --input (a model tuned on instructions alone may end at once after an input)")
    if args.temperature == 0:
        tips.append("sample (--temperature 0.7) to see other continuations")
    if not args.adapter:
        tips.append("a base model without --adapter is not instruction-tuned")
    return f"note: the model {said}; " + "; ".join(tips)
