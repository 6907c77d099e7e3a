"""Cross-tokenizer alignment on two real BPE tokenizers (byte-level and SentencePiece style)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.bpe_tokenizers import CORPUS, byte_level_bpe, sentencepiece_bpe
from transformers import AutoTokenizer

from mtkd_cache.align import (
    align_rows,
    alignment_rate,
    build_vocab_map,
    byte_ends,
    mapped_mass,
    project_topk,
    token_bytes,
)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld — déjà vu!", "def add(x, y):\n    return x"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("tok")
    out = []
    for name, tok in (("bl", byte_level_bpe()), ("sp", sentencepiece_bpe())):
        tok.save_pretrained(root / name)  # through the real loading path
        out.append(AutoTokenizer.from_pretrained(root / name))
    return out


@pytest.mark.parametrize("which", [0, 1])
def test_token_bytes_spell_the_text_exactly(pair, which: int) -> None:  # noqa: ANN001
    tok = pair[which]
    table = token_bytes(tok)
    assert len(table) == len(tok)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ends, lost = byte_ends([table[i] for i in ids], text.encode())
        assert lost == 0.0
        assert ends[-1] == len(text.encode()) and np.all(np.diff(ends) >= 0)
        # every end is where the decoded prefix ends
        for j in range(len(ids)):
            prefix = b"".join(table[i] for i in ids[: j + 1])
            assert text.encode().startswith(prefix.lstrip(b" ") if which == 1 else prefix)


def test_special_tokens_have_no_bytes_and_byte_fallback_is_one_byte(pair) -> None:  # noqa: ANN001
    bl, sp = pair
    assert token_bytes(bl)[bl.convert_tokens_to_ids("<|endoftext|>")] is None
    sp_table = token_bytes(sp)
    assert sp_table[sp.convert_tokens_to_ids("<s>")] is None
    assert sp_table[sp.convert_tokens_to_ids("<0x41>")] == b"A"
    assert token_bytes(bl)[bl.convert_tokens_to_ids("Ġ")] == b" "


def test_vocab_map_maps_to_the_longest_student_prefix(pair) -> None:  # noqa: ANN001
    bl, sp = pair
    t_bytes, s_bytes = token_bytes(sp), token_bytes(bl)
    vmap = build_vocab_map(t_bytes, s_bytes)
    assert vmap.shape == (len(sp),) and vmap.dtype == np.int32
    for tid, b in enumerate(t_bytes):
        if b is None:
            assert vmap[tid] == -1
            continue
        sid = int(vmap[tid])
        assert sid >= 0, (tid, b)  # every byte has a byte-level token: nothing unmapped
        sb = s_bytes[sid]
        assert sb is not None and b.startswith(sb)
        longer = [x for x in s_bytes if x and b.startswith(x) and len(x) > len(sb)]
        assert not longer
    # the same tokenizer maps every token to itself
    same = build_vocab_map(s_bytes, s_bytes)
    ok = [i for i, b in enumerate(s_bytes) if b is not None]
    assert np.array_equal(same[ok], np.asarray(ok))


def test_rows_align_where_contexts_end_at_the_same_byte(pair) -> None:  # noqa: ANN001
    bl, sp = pair
    tb, sb = token_bytes(bl), token_bytes(sp)
    for text in TEXTS:
        raw = text.encode()
        s_ids = bl(text, add_special_tokens=False)["input_ids"]
        t_ids = sp(text, add_special_tokens=False)["input_ids"]
        s_ends, _ = byte_ends([tb[i] for i in s_ids], raw)
        t_ends, _ = byte_ends([sb[i] for i in t_ids], raw)
        rows = align_rows(s_ends, t_ends)
        for j, i in enumerate(rows):
            if i >= 0:
                assert t_ends[i] == s_ends[j]
                assert i == len(t_ends) - 1 or t_ends[i + 1] > t_ends[i]  # the last teacher row ending there
            else:
                assert s_ends[j] not in set(t_ends.tolist())
        assert 0.3 < alignment_rate(rows) <= 1.0
    same, _ = byte_ends([tb[i] for i in bl(TEXTS[0], add_special_tokens=False)["input_ids"]], TEXTS[0].encode())
    assert np.array_equal(align_rows(same, same), np.arange(len(same)))  # identical tokenizers: identity


def test_lossy_tokenizer_reports_the_lost_fraction() -> None:
    pieces = [b"hello", b" world"]
    ends, lost = byte_ends(pieces, b"Hello, world")  # a lower-casing, punctuation-dropping tokenizer
    assert lost == pytest.approx(2 / 12)  # 'H' and ',' are not reproduced
    assert np.all(np.diff(ends) >= 0) and ends[-1] == 12


def test_project_topk_merges_duplicates_and_moves_unmapped_mass_to_the_tail() -> None:
    vmap = np.array([0, 0, 2, -1, 1], dtype=np.int32)  # teacher ids 0 and 1 -> student 0; 3 -> none
    p = np.array([[0.4, 0.2, 0.1, 0.15], [0.5, 0.3, 0.0, 0.0]])
    idx = np.array([[0, 1, 3, 2], [4, 2, 0, 0]])
    logp = np.where(p > 0, np.log(np.maximum(p, 1e-30)), -np.inf).astype(np.float32)
    tail = (1 - p.sum(1)).astype(np.float32)
    out_i, out_lp, out_t = project_topk(idx, logp, tail, vmap)
    dense = np.zeros((2, 3))
    np.add.at(dense, (np.repeat([0, 1], 4), out_i.ravel()), np.exp(out_lp.astype(np.float64)).ravel())
    np.testing.assert_allclose(dense, [[0.6, 0.0, 0.15], [0.0, 0.5, 0.3]], atol=1e-6)
    np.testing.assert_allclose(out_t, [0.15 + 0.1, 0.2], atol=1e-6)
    np.testing.assert_allclose(dense.sum(1) + out_t, 1.0, atol=1e-6)  # mass is conserved
    for row_i, row_lp in zip(out_i, out_lp):  # distinct live ids, sorted
        live = row_i[np.isfinite(row_lp)]
        assert np.array_equal(live, np.unique(live))
    np.testing.assert_allclose(mapped_mass(logp, idx, vmap), [0.75 / 0.85, 1.0], atol=1e-6)


def test_project_topk_with_an_identity_map_is_a_sorted_copy() -> None:
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(50)[:8] for _ in range(6)])
    logp = np.log(rng.dirichlet(np.ones(8), size=6) * 0.9).astype(np.float32)
    tail = np.full(6, 0.1, np.float32)
    out_i, out_lp, out_t = project_topk(idx, logp, tail, np.arange(50, dtype=np.int32))
    order = np.argsort(idx, axis=1)
    np.testing.assert_array_equal(out_i, np.take_along_axis(idx, order, 1))
    np.testing.assert_allclose(out_lp, np.take_along_axis(logp, order, 1), atol=1e-6)
    np.testing.assert_array_equal(out_t, tail)


def test_corpus_is_reproduced_by_both_tokenizers(pair) -> None:  # noqa: ANN001
    for tok in pair:
        table = token_bytes(tok)
        for text in set(CORPUS):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert byte_ends([table[i] for i in ids], text.encode())[1] == 0.0
