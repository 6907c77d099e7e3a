"""`prepare`'s instruction data: conversations or prompt/completion pairs -> samples with a loss mask.

Each source row becomes ONE sample (never windows, never joined): the rendering of
``chat.render_conversation`` / ``chat.render_prompt_completion``, with the per-token loss mask the
writer stores as ``inputs/loss_mask``. A rendering longer than ``max_length`` is truncated from
the end and counted (one warning at the end names how many samples and tokens); a sample left with
no trainable token is refused by name. Cost: the template is rendered once per assistant turn.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mtkd_cache.errors import InputDataError
from mtkd_cache.format.inputs import Sample
from mtkd_cache.precompute.chat import Rendered, render_conversation, render_prompt_completion
from mtkd_cache.precompute.sources import iter_source
from mtkd_cache.precompute.text_spans import prefix_text, special_bytes

__all__ = ["ChatColumns", "chat_columns", "chat_samples"]


@dataclass(frozen=True)
class ChatColumns:
    """Which instruction columns to read and what to train on.

    Attributes:
        messages: Column of conversations (lists of ``{role, content}``), or None.
        prompt / completion: Columns of a prompt/completion pair, or None.
        train_on: ``"assistant"`` (replies / completions only) or ``"all"`` tokens.
    """

    messages: str | None
    prompt: str | None
    completion: str | None
    train_on: Literal["assistant", "all"]

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.messages, self.prompt, self.completion) if c]

    def settings(self, tokenizer: Any) -> dict[str, Any]:
        """What makes these inputs what they are, beyond the tokenizer's vocabulary (its template too)."""
        template = getattr(tokenizer, "chat_template", None) if self.messages else None
        return {"messages_column": self.messages, "prompt_column": self.prompt,
                "completion_column": self.completion, "train_on": self.train_on,
                "chat_template": None if template is None else hashlib.sha256(str(template).encode()).hexdigest()[:32]}


def chat_columns(messages_column: str | None, prompt_column: str | None, completion_column: str | None,
                 train_on: str | None, *, pack: bool, label_column: str | None) -> ChatColumns | None:
    """Check the instruction options of `prepare`; None when none is given (plain text).

    Raises:
        InputDataError: half a prompt/completion pair, both kinds, a bad ``--train-on``, or an
            option that cannot go with instruction data.
    """
    if not (messages_column or prompt_column or completion_column):
        if train_on is not None:
            raise InputDataError("--train-on applies to --messages-column or --prompt-column/--completion-column; "
                                 "give one of them or drop --train-on")
        return None
    if bool(prompt_column) != bool(completion_column):
        raise InputDataError("--prompt-column and --completion-column go together; give both")
    if messages_column and prompt_column:
        raise InputDataError("give --messages-column or --prompt-column/--completion-column, not both")
    train_on = train_on or "assistant"
    if train_on not in ("assistant", "all"):
        raise InputDataError(f"--train-on must be 'assistant' or 'all', got {train_on!r}")
    if pack:
        raise InputDataError("--pack is not supported with instruction data (each conversation is one sample); "
                             "drop --pack")
    if label_column:
        raise InputDataError("--label-column does not apply to instruction data; drop it")
    return ChatColumns(messages_column, prompt_column, completion_column, train_on)  # type: ignore[arg-type]


def _render(tok: Any, spec: ChatColumns, row: dict[str, Any], max_length: int, name: str) -> Rendered:
    if spec.messages:
        messages = row[spec.messages]
        if isinstance(messages, str):  # a JSON-encoded list (csv, text columns)
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise InputDataError(f"{name}: --messages-column {spec.messages!r} is not a list of "
                                     f"{{role, content}} objects nor its JSON ({e.msg})") from e
        if not isinstance(messages, list):
            raise InputDataError(f"{name}: --messages-column {spec.messages!r} holds {type(messages).__name__}, "
                                 "not a list of {role, content} objects")
        return render_conversation(tok, messages, max_length=max_length, train_on=spec.train_on, name=name)
    return render_prompt_completion(tok, row[spec.prompt], row[spec.completion],  # type: ignore[index]
                                    max_length=max_length, train_on=spec.train_on, name=name)


def chat_samples(tok: Any, data: Any, spec: ChatColumns, *, split: str, max_length: int, batch_size: int,
                 domain_column: str | None, pieces: Sequence[bytes | None] | None = None) -> Iterator[Sample]:
    """One masked sample per source row (see the module docstring); warns once about truncation.

    With `pieces` (the bytes of each token id) each sample keeps its rendered text and byte ends,
    so teachers with another tokenizer can run on it (docs/CROSS_TOKENIZER.md).
    """
    specials = special_bytes(tok, pieces) if pieces is not None else {}
    columns = spec.columns + ([domain_column] if domain_column else [])
    row_no, cut_samples, cut_tokens = 0, 0, 0
    for batch in iter_source(data, split=split, columns=columns, batch_size=batch_size):
        for i in range(len(batch[columns[0]])):
            row = {c: batch[c][i] for c in columns}
            name = f"sample {row_no} (row {row_no} of --data {str(data)!r})"
            r = _render(tok, spec, row, max_length, name)
            cut_samples, cut_tokens = cut_samples + (r.truncated > 0), cut_tokens + r.truncated
            text = None if pieces is None else prefix_text(r.ids.tolist(), r.text, pieces, specials, whole=not r.truncated)
            yield Sample(row_no, (r.ids,), None, row.get(domain_column) if domain_column else None, None,
                         r.loss_mask, text=text)
            row_no += 1
    if cut_samples:
        warnings.warn(f"{cut_samples} samples were longer than --max-length {max_length} and were truncated "
                      f"({cut_tokens} tokens dropped from their ends); raise --max-length to keep them",
                      stacklevel=2)
