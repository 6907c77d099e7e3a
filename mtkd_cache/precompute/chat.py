"""Conversations and prompt/completion pairs -> token ids plus a loss mask.

A conversation (a list of ``{"role", "content"}``) is rendered with the tokenizer's OWN chat
template. The assistant's tokens are found by rendering incrementally: for the ``i``-th message,
if it is the assistant's, its span in the rendered text runs from the end of
``template(messages[:i], add_generation_prompt=True)`` to the end of ``template(messages[:i+1])``
(so the end-of-turn marker the template writes after the reply is trained too). Tokens of the
full rendering whose character span overlaps an assistant span are marked. Templates that rewrite
earlier turns when later ones are added (the rendering of a prefix is not a prefix of the
rendering) are refused with ``--train-on all`` as the fix.

A prompt/completion pair is the plain concatenation ``prompt + completion``; the completion's
tokens are marked (a token straddling the boundary counts as completion).

The mask is per TOKEN: ``mask[t] = 1`` when token ``t`` is one to learn. Under the causal
convention row ``j`` predicts token ``j + 1``, so the trainer applies ``mask[j + 1]`` to row ``j``.
Samples longer than ``max_length`` are truncated (kept from the start) and counted; a sample left
with no trainable token is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mtkd_cache.errors import InputDataError

__all__ = ["Rendered", "render_conversation", "render_prompt_completion"]

TrainOn = Literal["assistant", "all"]


@dataclass(frozen=True)
class Rendered:
    """One sample: ``ids`` (L,) int64, ``loss_mask`` (L,) bool, ``truncated`` tokens dropped, and ``text``,
    the rendered string the ids tokenize (before truncation)."""

    ids: np.ndarray
    loss_mask: np.ndarray
    truncated: int
    text: str = ""


def _spans_to_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(offsets), dtype=bool)
    for t, (a, b) in enumerate(offsets):
        mask[t] = any(a < e and b > s for s, e in spans)
    return mask


def _finish(enc: Mapping[str, Any], spans: Sequence[tuple[int, int]] | None, max_length: int, name: str,
            text: str) -> Rendered:
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.ones(len(ids), dtype=bool) if spans is None else _spans_to_mask(enc["offset_mapping"], spans)
    cut = max(0, len(ids) - max_length)
    ids, mask = ids[:max_length], mask[:max_length]
    if not mask[1:].any():  # row j trains on token j + 1: token 0 is never a target
        raise InputDataError(f"{name}: no trainable token after rendering"
                             f"{f' and truncating {cut} tokens to --max-length {max_length}' if cut else ''}; "
                             "give it an assistant reply within the length, raise --max-length, or drop it")
    return Rendered(ids, mask, cut, text)


def render_conversation(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, max_length: int,
                        train_on: TrainOn = "assistant", name: str = "sample") -> Rendered:
    """Render one conversation with the tokenizer's chat template and mark what to learn.

    Args:
        tokenizer: A fast tokenizer with a ``chat_template``.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        max_length: Token budget; longer renderings are truncated from the end.
        train_on: ``"assistant"`` (the replies) or ``"all"`` tokens.
        name: How to name the sample in errors (e.g. ``"sample 17 (line 18 of chat.jsonl)"``).

    Raises:
        InputDataError: no chat template, malformed messages, no assistant turn, a template that
            does not render incrementally, or nothing left to train on.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputDataError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                             "use a chat model's tokenizer, set tokenizer.chat_template, or pass --text-column")
    if not messages or any(not isinstance(m, Mapping) or "role" not in m or "content" not in m for m in messages):
        raise InputDataError(f"{name}: a conversation must be a non-empty list of {{role, content}} objects")
    if train_on == "assistant" and not any(m["role"] == "assistant" for m in messages):
        raise InputDataError(f"{name}: the conversation has no assistant turn; add one or pass --train-on all")
    msgs = [dict(m) for m in messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans: list[tuple[int, int]] | None = None
    if train_on == "assistant":
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not (text.startswith(before) and text.startswith(upto) and len(upto) > len(before)):
                raise InputDataError(f"{name}: the chat template does not render a conversation's prefix as a "
                                     "prefix of the whole (it rewrites earlier turns), so assistant tokens cannot "
                                     "be located; pass --train-on all")
            spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _finish(enc, spans, max_length, name, text)


def render_prompt_completion(tokenizer: Any, prompt: str, completion: str, *, max_length: int,
                             train_on: TrainOn = "assistant", name: str = "sample") -> Rendered:
    """``prompt + completion`` with the completion's tokens marked (all tokens with ``"all"``)."""
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise InputDataError(f"{name}: prompt and completion must be strings and the completion non-empty")
    enc = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
    spans = None if train_on == "all" else [(len(prompt), len(prompt) + len(completion))]
    return _finish(enc, spans, max_length, name, prompt + completion)
