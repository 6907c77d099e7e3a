"""Instruction data for tests: a word-level tokenizer with a chat template the test writes itself.

The template is ChatML-like over the tiny word vocabulary: each turn renders as
``<s> ROLE CONTENT </s>`` (roles are unknown words), so a conversation of ``w``-words tokenizes
to obvious ids and works with the tiny Llama models of ``tiny_models``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.tiny_models import build_word_tokenizer

__all__ = ["WORD_CHAT_TEMPLATE", "conversations", "save_chat_tokenizer", "write_jsonl"]

WORD_CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                      "{% if add_generation_prompt %}<s> assistant {% endif %}")


def save_chat_tokenizer(path: Path, size: int = 120) -> Path:
    """Save the word tokenizer of ``size`` tokens with ``WORD_CHAT_TEMPLATE`` to ``path``."""
    tok = build_word_tokenizer(size)
    tok.chat_template = WORD_CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def conversations(n: int, seed: int = 0, words: int = 100) -> list[list[dict[str, str]]]:
    """``n`` deterministic two-to-four-turn conversations of ``w`` words."""
    def text(i: int, k: int, j: int) -> str:
        return " ".join(f"w{(seed * 31 + i * 7 + j * 3 + t * 5) % words}" for t in range(k))

    out = []
    for i in range(n):
        turns = [{"role": "user", "content": text(i, 3 + i % 3, 0)},
                 {"role": "assistant", "content": text(i, 4 + i % 4, 1)}]
        if i % 2:
            turns += [{"role": "user", "content": text(i, 2, 2)}, {"role": "assistant", "content": text(i, 3, 3)}]
        out.append(turns)
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
