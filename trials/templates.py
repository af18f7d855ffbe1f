"""How a data row becomes tokens, and which of them the loss covers.

`data.template` picks the prompt format:

- `plain`: the prompt as written (with the tokenizer's own specials, e.g. BOS), then the
  response and EOS;
- a format string holding `{prompt}` (`"### Question: {prompt}\\n### Answer: "`): the
  prompt put into it, then the response and EOS;
- `chat`: the tokenizer's chat template, the prompt as the user turn (after `data.system`,
  when given) and the response as the assistant turn.

With `data.messages_field` a row holds a whole chat (a list of `{role, content}`), rendered
by the chat template and trained on every assistant turn.

A chat is cut into spans by rendering it turn by turn: what the template adds for the
conversation up to an assistant turn (with the generation prompt) is context, what it adds
for that turn itself (its content and the end-of-turn marks) is learned. Each span is
tokenized on its own, so a label never straddles a turn boundary; the last assistant turn
is what evaluation generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trials.errors import TrialError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
PLAIN, CHAT = "plain", "chat"
PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Row:
    """One example as read: a prompt and its response, or (messages rows) a chat whose last
    assistant turn is the response."""

    prompt: str
    response: str
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) per turn


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    trained: list[bool]  # per token: does the loss cover it
    n_prompt: int  # tokens before the last response: what generation starts from


def template_problem(template: str) -> str | None:
    """Why `data.template` cannot be used, or None (the config's validator and the plan)."""
    if template in (PLAIN, CHAT):
        return None
    if PLACEHOLDER not in template:
        return (f"{template!r} is neither 'plain', 'chat' nor a format string with {PLACEHOLDER} "
                "(e.g. '### Question: {prompt}\\n### Answer: ')")
    return None


def needs_chat_template(template: str, messages_field: str | None) -> bool:
    return template == CHAT or messages_field is not None


def chat_template_problem(tokenizer: PreTrainedTokenizerBase, source: str,
                          messages_field: str | None = None) -> str | None:
    """Why the tokenizer cannot render chats (it has no chat template), or None."""
    if getattr(tokenizer, "chat_template", None):
        return None
    if messages_field is not None:
        return (f"data.messages_field: chat rows are rendered by the tokenizer's chat template, and the tokenizer of "
                f"{source} has none; use a model whose tokenizer has one, or prompt/response rows")
    return (f"data.template: chat needs the tokenizer's chat template, and the tokenizer of {source} has none; use "
            "data.template: plain, or a format string such as '### Question: {prompt}\\n### Answer: '")


def read_messages(value: Any, where: str, field: str) -> tuple[tuple[str, str], ...]:
    """A messages row's chat as (role, content) turns; every problem names the row and field."""
    if not isinstance(value, (list, tuple)) or not value:
        raise TrialError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(
                turn.get("content"), str):
            raise TrialError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise TrialError(f"{where}: {field}[{i}] has role {turn['role']!r}; the roles are {', '.join(ROLES)}")
        turns.append((turn["role"], turn["content"]))
    answers = [c for r, c in turns if r == "assistant"]
    if not answers:
        raise TrialError(f"{where}: field {field!r} has no assistant turn; there is nothing to learn")
    if not answers[-1].strip():
        raise TrialError(f"{where}: the last assistant turn of {field!r} is empty; every example needs a response")
    return tuple(turns)


def chat_of(row: Row, system: str | None) -> list[dict[str, str]]:
    turns = row.messages if row.messages is not None else (("user", row.prompt), ("assistant", row.response))
    chat = [{"role": r, "content": c} for r, c in turns]
    if system is not None and chat[0]["role"] != "system":
        chat.insert(0, {"role": "system", "content": system})
    return chat


def _render(tokenizer, chat: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2's TemplateError: templates raise on role orders they refuse
        raise TrialError(f"the tokenizer's chat template refuses this chat: {str(err).splitlines()[0]}") from None


def chat_spans(tokenizer, chat: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """(text, learned) spans of a rendered chat, up to its last assistant turn."""
    spans: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(chat):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, chat[:i], True)
        through = _render(tokenizer, chat[:i + 1], False)
        if not before.startswith(done) or not through.startswith(before):
            raise TrialError("the tokenizer's chat template renders earlier turns differently as the chat grows, so "
                             "the assistant turns cannot be told apart; use data.template with a format string")
        spans += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return [(text, learned) for text, learned in spans if text]


def encode(rows: list[Row], tokenizer: PreTrainedTokenizerBase, template: str, system: str | None) -> list[Encoded]:
    """Every row's tokens (untruncated) and which of them are learned."""
    if template != CHAT and all(r.messages is None for r in rows):
        prompts = [r.prompt if template == PLAIN else template.replace(PLACEHOLDER, r.prompt) for r in rows]
        heads = tokenizer(prompts)["input_ids"]
        tails = tokenizer([r.response for r in rows], add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        return [Encoded(list(h) + list(t) + [eos], [False] * len(h) + [True] * (len(t) + 1), len(h))
                for h, t in zip(heads, tails)]
    out = []
    for row in rows:
        ids: list[int] = []
        trained: list[bool] = []
        n_prompt = 0
        for text, learned in chat_spans(tokenizer, chat_of(row, system)):
            if learned:
                n_prompt = len(ids)
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            trained += [learned] * len(piece)
        out.append(Encoded(ids, trained, n_prompt))
    return out


def turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens that close an assistant turn in the chat template (`<|im_end|>`,
    `<|eot_id|>`): generation stops there as it does at EOS."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "\x00answer\x00"
    try:
        spans = chat_spans(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}])
    except TrialError:
        return []
    learned = "".join(text for text, is_learned in spans if is_learned)
    after = learned.split(marker, 1)[-1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [ids[0]] if ids and ids[0] in special else []
