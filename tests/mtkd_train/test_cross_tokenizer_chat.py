"""A teacher with another tokenizer on conversation caches (`--messages-column`, prompt/completion).

The student's tokenizer is a byte-level BPE with a ChatML template whose markers are special
tokens; the teacher's is SentencePiece-style, for which the markers are plain text. `prepare`
stores each rendered conversation and its byte ends, so the teacher re-tokenizes exactly that text
and its rows align by byte with the student's, the response mask staying the student's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mtkd_cache import RunConfig, open_cache, prepare, run_teacher, verify_cache
from mtkd_cache.format.text import read_byte_ends, read_texts
from mtkd_cache.format.tokenization import TokenizationReader
from mtkd_train.cli import main
from mtkd_train.data import CachedDistillDataset
from tests.helpers.bpe_tokenizers import CORPUS, byte_level_bpe, sentencepiece_bpe
from tests.mtkd_train._train_target import step_losses
from tests.mtkd_train.test_cross_tokenizer import _lm_with

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat_tokenizer():  # noqa: ANN202
    tok = byte_level_bpe(300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _conversations() -> list[dict]:
    rows = []
    for i in range(6):
        turns = [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": CORPUS[(i + 2) % 5]}]
        if i % 2:
            turns += [{"role": "user", "content": f"and {i}?"}, {"role": "assistant", "content": CORPUS[(i + 1) % 5]}]
        rows.append({"messages": turns})
    return rows


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("xchat")
    tok = _chat_tokenizer()
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _conversations()))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q: {t}\n", "completion": f"A: {CORPUS[(i + 1) % 5]}"}) + "\n"
                             for i, t in enumerate(CORPUS[:5])))
    student = _lm_with(root / "student", tok, seed=1)
    other = _lm_with(root / "other", sentencepiece_bpe(500), seed=3)
    prepare(root / "conv", data, tokenizer=student, max_length=256, chunk_samples=4, messages_column="messages",
            progress=False)
    with pytest.warns(UserWarning, match="truncated"):  # truncated renderings
        prepare(root / "short", data, tokenizer=student, max_length=24, chunk_samples=4, messages_column="messages",
                progress=False)
    prepare(root / "pairs", pairs, tokenizer=student, max_length=128, chunk_samples=4, prompt_column="prompt",
            completion_column="completion", progress=False)
    for cache in ("conv", "short", "pairs"):
        run_teacher(root / cache, RunConfig(teacher="other", model=str(other), top_k=6), progress=False)
    return {"root": root, "student": student}


def test_conversation_caches_store_the_rendered_text_and_byte_ends(chat: dict[str, Path]) -> None:
    tok = _chat_tokenizer()
    reader = open_cache(chat["root"] / "conv")
    texts = [t for c in range(reader.num_chunks) for t in read_texts(reader, c)]
    assert texts == [tok.apply_chat_template(r["messages"], tokenize=False) for r in _conversations()]
    data = reader.read_chunk(0)
    ends = read_byte_ends(reader, 0, int(data.offsets[-1] + data.lengths[-1]))
    for i, text in enumerate(read_texts(reader, 0)):
        o, n = int(data.offsets[i]), int(data.lengths[i])
        ids = data.inputs["token_ids"][o : o + n]
        e = ends[o : o + n]
        assert e[-1] == len(text.encode())
        # each token ends where its decoding (markers included) ends in the text
        for j in (0, 1, n // 2, n - 1):
            assert text.encode()[: e[j]] == tok.decode(ids[: j + 1]).encode()


def test_truncated_renderings_keep_the_text_their_tokens_cover(chat: dict[str, Path]) -> None:
    tok = _chat_tokenizer()
    reader = open_cache(chat["root"] / "short")
    data = reader.read_chunk(0)
    ends = read_byte_ends(reader, 0, int(data.offsets[-1] + data.lengths[-1]))
    for i, text in enumerate(read_texts(reader, 0)):
        o, n = int(data.offsets[i]), int(data.lengths[i])
        assert n == 24 and ends[o + n - 1] == len(text.encode())
        assert text == tok.decode(data.inputs["token_ids"][o : o + n])


@pytest.mark.parametrize("cache", ["conv", "short", "pairs"])
def test_a_cross_teacher_runs_on_conversations_and_aligns_in_the_replies(chat: dict[str, Path], cache: str) -> None:
    reader = open_cache(chat["root"] / cache)
    tok = TokenizationReader(reader, reader.teacher("other").meta.tokenization or "")
    assert tok.meta.lost == 0.0 and tok.meta.alignment_rate > 0.3
    assert verify_cache(chat["root"] / cache, progress=False).ok
    batch = next(iter(CachedDistillDataset(chat["root"] / cache, ["other"], batch_size=4, shuffle=False,
                                           epochs=1, prefetch=0)))
    present, mask = batch["targets"]["other"]["present"], batch["loss_mask"]
    trained = torch.zeros_like(mask)
    trained[:, :-1] = mask[:, 1:]  # row j learns token j + 1 where it is marked
    assert bool((present & trained).any()) and bool((trained & ~present).any() or present.all())
    assert int(batch["targets"]["other"]["indices"].max()) < len(_chat_tokenizer())


def test_a_cross_teacher_trains_on_a_conversation_cache(chat: dict[str, Path], tmp_path: Path) -> None:
    args = [str(chat["root"] / "conv"), "--teachers", "other", "--student", str(chat["student"]), "--out",
            str(tmp_path / "run"), "--aggregate", "mean", "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3",
            "--no-progress", "--min-alignment", "0.3"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert all(np.isfinite(v) for v in step_losses(tmp_path / "run").values())
