"""Chat rendering with the tokenizer's own template and an assistant-only loss mask."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.bpe_tokenizers import byte_level_bpe
from transformers import AutoTokenizer

from mtkd_cache.errors import InputDataError
from mtkd_cache.precompute.chat import render_conversation, render_prompt_completion

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fox?"},
        {"role": "assistant", "content": "A quick brown animal."}, {"role": "user", "content": "And a dog?"},
        {"role": "assistant", "content": "A lazy one."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    t = byte_level_bpe()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    path = Path(tmp_path_factory.mktemp("chat")) / "tok"
    t.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _marked_text(tok, r) -> str:  # noqa: ANN001
    return tok.decode([int(i) for i, m in zip(r.ids, r.loss_mask) if m])


def test_only_assistant_replies_and_their_end_markers_are_marked(tok) -> None:  # noqa: ANN001
    r = render_conversation(tok, CONV, max_length=512)
    assert r.truncated == 0 and len(r.ids) == len(r.loss_mask)
    marked = _marked_text(tok, r)
    assert "A quick brown animal." in marked and "A lazy one." in marked
    assert "fox" not in marked and "Be brief" not in marked and "dog" not in marked
    assert marked.count("<|im_end|>") == 2
    full = tok.apply_chat_template(CONV, tokenize=False)
    assert tok.decode(r.ids.tolist()) == full  # the template's own rendering, unchanged


def test_train_on_all_marks_every_token(tok) -> None:  # noqa: ANN001
    r = render_conversation(tok, CONV, max_length=512, train_on="all")
    assert r.loss_mask.all()


def test_truncation_is_counted_and_an_empty_mask_is_refused_by_name(tok) -> None:  # noqa: ANN001
    full = render_conversation(tok, CONV, max_length=512)
    first_reply = int(full.loss_mask.argmax())
    r = render_conversation(tok, CONV, max_length=first_reply + 3)
    assert r.truncated == len(full.ids) - (first_reply + 3) and r.loss_mask.sum() == 3
    with pytest.raises(InputDataError, match="sample 7: no trainable token .* truncating"):
        render_conversation(tok, CONV, max_length=first_reply, name="sample 7")


def test_bad_conversations_are_one_line_errors(tok) -> None:  # noqa: ANN001
    with pytest.raises(InputDataError, match="no assistant turn"):
        render_conversation(tok, CONV[:2], max_length=64, name="sample 3")
    with pytest.raises(InputDataError, match="role, content"):
        render_conversation(tok, [{"text": "hi"}], max_length=64)
    plain = byte_level_bpe()
    with pytest.raises(InputDataError, match="no chat template"):
        render_conversation(plain, CONV, max_length=64)
    rewriting = AutoTokenizer.from_pretrained(tok.name_or_path)
    rewriting.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputDataError, match="--train-on all"):
        render_conversation(rewriting, CONV, max_length=64)


def test_prompt_completion_marks_the_completion(tok) -> None:  # noqa: ANN001
    r = render_prompt_completion(tok, "Q: what is a fox?\nA:", " A quick brown animal.", max_length=128)
    assert _marked_text(tok, r).strip() == "A quick brown animal."
    with pytest.raises(InputDataError, match="non-empty"):
        render_prompt_completion(tok, "Q", "", max_length=128)
