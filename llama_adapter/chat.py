"""Chat formats: how a conversation becomes token ids, for fine-tuning (with the assistant turns marked) and
for generation (ending with the cue for the assistant's answer).

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}: at most one system
message, first; then user and assistant alternate, starting with user.

- "alpaca": the Stanford Alpaca template (llama_adapter.prompts), one user turn and its answer.
- "llama2": LLaMA-2-chat, Meta's `chat_completion`: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]
  {answer} </s>` per exchange, the system text folded into the first user turn.
- "llama3": LLaMA-3 Instruct, Meta's ChatFormat: `<|begin_of_text|>`, then per message
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`; the cue is the assistant's header.
- "template": the checkpoint's own jinja chat template (tokenizer_config.json's `chat_template`), rendered the
  way transformers' `apply_chat_template` renders it (same sandboxed environment and variables).
- "auto": the template when the checkpoint has one, else llama3 when the vocabulary has LLaMA-3's header
  tokens, else alpaca.

The text formats are rendered to a string with the special tokens written out and tokenized once, as
transformers does. The assistant turns are found by rendering: the conversation up to an answer with the
generation cue must be a prefix of the conversation including that answer; the characters in between (the
answer and its end-of-turn token) are what the loss covers.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime

from llama_adapter.prompts import alpaca_prompt

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "alpaca", "llama2", "llama3", "template")


class ChatError(ValueError):
    """A conversation or chat template that cannot be formatted; the message says what is wrong."""


def check_messages(messages, *, ends_with: str | None = None, where: str = "messages") -> list[dict]:
    """{"role", "content"} dicts in a valid order (see the module doc); `ends_with` the last message's role."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError(f"{where} must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"{where}[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"{where}[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ChatError(f"{where}[{i}] ({role}): 'content' must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    first = 1 if out[0]["role"] == "system" else 0
    body = out[first:]
    for j, m in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            i = first + j
            raise ChatError(
                f"{where}[{i}]: expected a {expected} message, got {m['role']} (after an optional system message "
                "first, user and assistant messages must alternate, starting with user)"
            )
    if not body:
        raise ChatError(f"{where}: a system message alone is not a conversation (add a user message)")
    if ends_with is not None and out[-1]["role"] != ends_with:
        raise ChatError(f"{where}: the last message must be from the {ends_with}, got {out[-1]['role']}")
    return out


def messages_from_record(instruction: str, input: str | None = None, output: str | None = None) -> list[dict]:
    """An Alpaca record as a conversation: the input follows the instruction in the user turn."""
    user = f"{instruction}\n\n{input}" if input else instruction
    messages = [{"role": "user", "content": user}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


class AlpacaFormat:
    """Alpaca: bos + template(instruction) + answer + eos, the prompt and the answer encoded separately (the
    model learns to continue the very ids `generate` feeds it)."""

    name = "alpaca"

    def encode_prompt_record(self, tokenizer, instruction: str, input: str | None = None) -> list[int]:
        return tokenizer.encode(alpaca_prompt(instruction, input), bos=True, eos=False)

    def encode_record(self, tokenizer, instruction: str, input: str | None, output: str) -> tuple[list[int], int]:
        prompt = self.encode_prompt_record(tokenizer, instruction, input)
        answer = tokenizer.encode(output, bos=False, eos=True)
        return prompt + answer, len(prompt)

    @staticmethod
    def _single_turn(messages) -> list[dict]:
        if messages[0]["role"] == "system":
            raise ChatError("the alpaca format has no system message (use --chat-format llama2 or llama3)")
        if len(messages) > 2:
            raise ChatError(f"the alpaca format holds one exchange, got {len(messages)} messages (use llama2/llama3)")
        return messages

    def encode_prompt(self, tokenizer, messages) -> list[int]:
        (user,) = self._single_turn(check_messages(messages, ends_with="user"))
        return self.encode_prompt_record(tokenizer, user["content"])

    def encode_dialog(self, tokenizer, messages) -> tuple[list[int], list[bool]]:
        user, answer = self._single_turn(check_messages(messages, ends_with="assistant"))
        tokens, prompt_len = self.encode_record(tokenizer, user["content"], None, answer["content"])
        return tokens, [i >= prompt_len for i in range(len(tokens))]


class TextChatFormat:
    """A format rendered to text with special tokens written out (`render`), then tokenized in one piece."""

    name = "text"

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
        raise NotImplementedError

    def encode_prompt(self, tokenizer, messages) -> list[int]:
        """The conversation (ending with a user message) and the cue for the assistant's answer."""
        messages = check_messages(messages, ends_with="user")
        return self._tokenize(tokenizer, messages, True, self.render(tokenizer, messages, True))[0]

    def encode_dialog(self, tokenizer, messages) -> tuple[list[int], list[bool]]:
        """Ids of the whole conversation (ending with an answer) and, per id, whether the loss covers it."""
        messages = check_messages(messages, ends_with="assistant")
        full = self.render(tokenizer, messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(tokenizer, messages[:i], True)
            after = self.render(tokenizer, messages[: i + 1], False)
            if not (after.startswith(before) and full.startswith(after)):
                raise ChatError(
                    f"the {self.name} chat format renders a conversation's beginning differently from the whole "
                    "conversation, so its assistant turns cannot be located for the loss"
                )
            spans.append((len(before), len(after)))
        ids, starts = self._tokenize(tokenizer, messages, False, full)
        return ids, [any(a <= s < b for a, b in spans) for s in starts]

    def _tokenize(self, tokenizer, messages, add_generation_prompt: bool, text: str):
        """`text` (the rendering of `messages`) as ids and offsets, special tokens read from the format's own text
        only. A special token's text inside a message content stays plain text, as Meta's ChatFormat encodes
        contents: otherwise a user's "<|eot_id|><|start_header_id|>..." would forge turns (transformers'
        apply_chat_template does read it), and an answer's "</s>" would teach the model to stop there."""
        specials = frozenset(tokenizer.special_tokens)
        if not specials or not any(_special_text(specials).search(m["content"]) for m in messages):
            return tokenizer.encode_with_offsets(text, special=True)
        spans = self._content_spans(tokenizer, messages, add_generation_prompt, text)
        return tokenizer.encode_with_offsets(text, special=True, plain_spans=spans)

    def _content_spans(self, tokenizer, messages, add_generation_prompt: bool, text: str) -> list[tuple[int, int]]:
        """Where the message contents lie in `text`: the format rendered with a marker in place of each content
        gives the text around them; each content may appear stripped of its outer whitespace (trim, strip)."""
        marked = self.render(
            tokenizer, [{**m, "content": _marker(i)} for i, m in enumerate(messages)], add_generation_prompt
        )
        pattern, pos = [], 0
        for found in _MARKER.finditer(marked):
            content = messages[int(found.group(1))]["content"]
            core = content.strip()
            lead, trail = content[: len(content) - len(content.lstrip())], content[len(content.rstrip()) :]
            pattern += [
                re.escape(marked[pos : found.start()]),
                f"(?:{re.escape(lead)})?({re.escape(core)})(?:{re.escape(trail)})?",
            ]
            pos = found.end()
        pattern.append(re.escape(marked[pos:]))
        match = re.fullmatch("".join(pattern), text, flags=re.DOTALL)
        if match is None:
            raise ChatError(
                f"a message contains the text of a special token (one of {sorted(tokenizer.special_tokens)[:4]}...), "
                f"which must stay plain text, but the {self.name} chat format changes message contents beyond "
                "stripping whitespace, so they cannot be located in its output"
            )
        return [match.span(g) for g in range(1, len(match.groups()) + 1)]


@functools.lru_cache(maxsize=8)
def _special_text(specials: frozenset):
    """One scan for any of a vocabulary's special token texts (LLaMA-3 has 256: one `in` each is 15x slower)."""
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))


_MARKER = re.compile("\ue000([0-9]+)\ue001")  # private-use characters: no template writes them


def _marker(i: int) -> str:
    return f"\ue000{i}\ue001"


def _require_tokens(tokenizer, fmt: str, *tokens: str) -> None:
    missing = [t for t in tokens if t is None or tokenizer.token_id(t) is None]
    if missing:
        raise ChatError(f"the {fmt} chat format needs tokens the tokenizer does not have: {missing}")


class Llama2Format(TextChatFormat):
    name = "llama2"

    def render(self, tokenizer, messages, add_generation_prompt):
        bos, eos = tokenizer.bos_token, tokenizer.eos_token
        _require_tokens(tokenizer, self.name, bos, eos)
        if messages[0]["role"] == "system":
            first = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{messages[1]['content']}"
            messages = [{"role": "user", "content": first}, *messages[2:]]
        parts = []
        for i in range(0, len(messages), 2):
            text = f"{bos}[INST] {messages[i]['content'].strip()} [/INST]"
            if i + 1 < len(messages):
                text += f" {messages[i + 1]['content'].strip()} {eos}"
            parts.append(text)
        return "".join(parts)


class Llama3Format(TextChatFormat):
    name = "llama3"
    HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def render(self, tokenizer, messages, add_generation_prompt):
        _require_tokens(tokenizer, self.name, tokenizer.bos_token, *self.HEADER_TOKENS)
        text = tokenizer.bos_token
        for m in messages:
            text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        if add_generation_prompt:
            text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return text


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    """transformers' chat-template environment: sandboxed, trim_blocks + lstrip_blocks, loop controls, and the
    globals/filters templates use (raise_exception, strftime_now, a tojson that keeps non-ASCII)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ChatError(f"the chat template cannot be compiled: {err.message} (template line {err.lineno})") from None


class TemplateFormat(TextChatFormat):
    name = "template"

    def __init__(self, source: str):
        if not isinstance(source, str) or not source.strip():
            raise ChatError("the chat template is empty")
        self.source = source
        _compile_template(source)  # a syntax error surfaces now, not at the first example

    def render(self, tokenizer, messages, add_generation_prompt):
        import jinja2

        special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
        if tokenizer.pad_id >= 0:
            special["pad_token"] = tokenizer._token_text(tokenizer.pad_id)
        try:
            return _compile_template(self.source).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **{k: v for k, v in special.items() if v is not None},
            )
        except jinja2.exceptions.TemplateError as err:
            raise ChatError(f"the chat template cannot be rendered: {err}") from None


_BUILTIN = {"alpaca": AlpacaFormat, "llama2": Llama2Format, "llama3": Llama3Format}


def get_chat_format(name: str, tokenizer, *, chat_only: bool = False):
    """The format called `name` (one of FORMATS) for this tokenizer; "auto" as the module doc says. chat_only: an
    instruct model's format is wanted, so resolving to alpaca is an error."""
    fmt = _resolve(name, tokenizer)
    if chat_only and isinstance(fmt, AlpacaFormat):
        where = getattr(tokenizer, "model_path", "the tokenizer")
        why = "" if name == "alpaca" else f" ({where} has no chat template and no LLaMA-3 header tokens)"
        raise ChatError(f"a chat format is needed, not alpaca{why}: name one, e.g. llama2 for LLaMA-2-chat")
    return fmt


def _resolve(name: str, tokenizer):
    if name not in FORMATS:
        raise ValueError(f"chat_format must be one of {', '.join(FORMATS)}, got {name!r}")
    template = getattr(tokenizer, "chat_template", None)
    if name == "template":
        if template is None:
            raise ChatError(f"{getattr(tokenizer, 'model_path', 'the tokenizer')} has no chat template")
        return TemplateFormat(template)
    if name == "auto":
        if template is not None:
            return TemplateFormat(template)
        has = getattr(tokenizer, "token_id", lambda t: None)
        name = "llama3" if all(has(t) is not None for t in Llama3Format.HEADER_TOKENS) else "alpaca"
    return _BUILTIN[name]()


__all__ = [
    "FORMATS",
    "ROLES",
    "AlpacaFormat",
    "ChatError",
    "Llama2Format",
    "Llama3Format",
    "TemplateFormat",
    "check_messages",
    "get_chat_format",
    "messages_from_record",
]
