"""Chat-format training data: conversations checked, rendered with the chat template, and the
assistant turns found for the loss.

A conversation is ``[{"role": "system" | "user" | "assistant", "content": str}, ...]`` with at
least one assistant message (`check_messages`). `encode_conversation` renders it with the
tokenizer's chat template (as transformers' ``apply_chat_template`` renders it), tokenizes the
text once, and marks as loss targets only the tokens of each assistant message plus the
end-of-turn token that closes it (``<|im_end|>``, ``<|eot_id|>``: the first end-of-generation
token after the message, `jaxqlora.tokenizer.Tokenizer.eos_token_ids`); system and user
turns, the role headers and whatever the template writes after the end-of-turn token (the
newline of ChatML) are masked.

Finding the assistant turns needs no ``{% generation %}`` markers in the template: the
conversation is rendered prefix by prefix (``messages[:i]`` with the generation prompt, then
``messages[:i + 1]`` without), and the characters the assistant message adds are its span,
mapped to tokens through the tokenizer's character offsets (a token is a target if it
overlaps the span, as transformers' ``return_assistant_tokens_mask`` maps its
``{% generation %}`` spans). This holds for every template that renders a conversation's
prefix as a prefix of the whole rendering (ChatML / SmolLM2 / Qwen2.5, Llama-3, Mistral ...);
a template that does not (one that rewrites earlier turns once a later turn exists) is
refused with `ChatTemplateError` rather than given a wrong mask.

A conversation longer than ``max_seq_len`` is cut at the end of the last assistant turn that
fits (a turn boundary); only when not even the first assistant turn fits is it cut inside a
turn, at ``max_seq_len`` tokens.

Sources: transformers ``PreTrainedTokenizerBase.apply_chat_template(...,
return_assistant_tokens_mask=True)``; TRL ``SFTTrainer`` (``assistant_only_loss``,
``completion_only_loss``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

from jaxqlora.errors import JaxQLoRAError

ROLES = ("system", "user", "assistant")
"""The message roles a training conversation may use."""


class ChatDataError(JaxQLoRAError, ValueError):
    """A conversation is malformed: not a list, an entry without a known ``role`` or a string
    ``content``, no assistant message, or one the chat template refuses. The message names
    the file, the line and the message index."""


class ChatTemplateError(ChatDataError):
    """The chat template cannot give an assistant-only mask: it does not render a
    conversation's prefix as a prefix of the whole rendering."""


def parse_messages(value: Any, where: str) -> list[dict]:
    """A conversation from a data row's ``messages`` value, checked (`check_messages`).

    Args:
      value: a list of message dicts, or (a CSV cell) its JSON text.
      where: ``"<file>: line <n>"`` for error messages.

    Returns:
      The messages as ``[{"role": str, "content": str}, ...]`` (other keys dropped).

    Raises:
      ChatDataError: not JSON, not a list, or a bad message (`check_messages`).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ChatDataError(f"{where}: 'messages' is not a JSON list of messages ({e})") from None
    return check_messages(value, where)


def check_messages(messages: Any, where: str) -> list[dict]:
    """Check one conversation and return it as plain ``{"role", "content"}`` dicts.

    Raises:
      ChatDataError: ``messages`` is not a non-empty list; an entry is not a dict, has a role
        outside `ROLES` or a non-string ``content``; the conversation starts with an
        assistant message (nothing to condition it on) or has no assistant message.
    """
    if not isinstance(messages, list):
        raise ChatDataError(f"{where}: 'messages' must be a list of {{role, content}} objects, "
                            f"got {type(messages).__name__}")
    if not messages:
        raise ChatDataError(f"{where}: 'messages' is an empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatDataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', "
                                f"got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatDataError(f"{where}: messages[{i}] has unknown role {role!r}; expected one of "
                                f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatDataError(f"{where}: messages[{i}] ({role}) needs a string 'content', "
                                f"got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatDataError(f"{where}: the conversation has no assistant message (nothing to train on)")
    if out[0]["role"] == "assistant":
        raise ChatDataError(f"{where}: the conversation starts with an assistant message; put a user (or "
                            "system) message before it")
    return out


@dataclasses.dataclass
class EncodedChat:
    """One conversation as tokens.

    Attributes:
      ids: token ids (after truncation).
      targets: uint8 ``[len(ids)]``, 1 where the token is a loss target (assistant
        content and its end-of-turn token).
      truncated: the rendering was longer than ``max_seq_len``.
      cut_inside_turn: it was cut inside a turn (no assistant turn fits whole).
    """

    ids: list[int]
    targets: np.ndarray
    truncated: bool = False
    cut_inside_turn: bool = False


def _render(tokenizer, messages, add_generation_prompt: bool, chat_template, where: str) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template)
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise ChatDataError(f"{where}: the chat template refused the conversation ({e})") from None


def assistant_char_spans(tokenizer, messages: Sequence[dict], *, chat_template: str | None = None,
                         where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant message, the characters it adds.

    Returns:
      ``(text, spans)``: ``text`` is the whole conversation rendered without a generation
      prompt; ``spans[k] = (start, end)`` for the k-th assistant message, from the end of the
      assistant header (``render(messages[:i], add_generation_prompt=True)``) to the end of
      ``render(messages[:i + 1])`` (content, end-of-turn token, the template's trailing text).

    Raises:
      ChatTemplateError: a prefix's rendering is not a prefix of the whole rendering.
      ChatDataError: the template raised (e.g. roles out of the order it accepts).
    """
    text = _render(tokenizer, messages, False, chat_template, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, chat_template, where)
        through = _render(tokenizer, messages[:i + 1], False, chat_template, where)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatTemplateError(
                f"{where}: the chat template renders messages[:{i + 1}] differently inside the whole "
                "conversation (it rewrites earlier turns), so the assistant tokens cannot be found by "
                "rendering prefixes; use a template without that rewriting")
        spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(tokenizer, messages: Sequence[dict], max_seq_len: int, *,
                        chat_template: str | None = None, where: str = "conversation") -> EncodedChat:
    """Token ids and assistant-only loss targets of one conversation.

    Args:
      tokenizer: a `jaxqlora.tokenizer.Tokenizer` with a chat template (or pass
        ``chat_template``).
      messages: a conversation checked by `check_messages`.
      max_seq_len: at most this many tokens are kept (see the module docstring).
      chat_template: a template to use instead of the tokenizer's.
      where: names the conversation in errors (``"file: line n"``).

    Returns:
      An `EncodedChat`: ``targets[j] = 1`` for the tokens from the first one overlapping an
      assistant span through the first end-of-generation token in it (through the span's
      last token if it has none).

    Raises:
      ChatDataError / ChatTemplateError: see `assistant_char_spans`.
    """
    text, spans = assistant_char_spans(tokenizer, messages, chat_template=chat_template, where=where)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    starts = np.array([s for s, _ in enc.offsets], np.int64)
    ends = np.array([e for _, e in enc.offsets], np.int64)
    eog = np.isin(np.asarray(ids, np.int64), np.fromiter(tokenizer.eos_token_ids, np.int64))
    targets = np.zeros(len(ids), np.uint8)
    turn_ends = []  # token index just after each assistant turn's last target (its end-of-turn token)
    for s, e in spans:
        inside = np.flatnonzero((ends > s) & (starts < e))  # tokens overlapping the span
        if not inside.size:
            continue
        first, last = int(inside[0]), int(inside[-1])
        stop = np.flatnonzero(eog[first:last + 1])
        if stop.size:
            last = first + int(stop[0])
        targets[first:last + 1] = 1
        turn_ends.append(last + 1)
    if len(ids) <= max_seq_len:
        return EncodedChat(ids, targets)
    fits = [b for b in turn_ends if b <= max_seq_len]
    cut = max(fits) if fits else max_seq_len
    return EncodedChat(ids[:cut], targets[:cut], truncated=True, cut_inside_turn=not fits)
