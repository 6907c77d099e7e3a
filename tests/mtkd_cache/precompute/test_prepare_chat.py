"""`prepare --messages-column / --prompt-column`: one masked sample per row, mask stored and hashed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.chat_data import conversations, save_chat_tokenizer, write_jsonl
from helpers.tiny_models import build_word_tokenizer
from transformers import AutoTokenizer

from mtkd_cache import open_cache
from mtkd_cache.cli import main
from mtkd_cache.errors import InputDataError
from mtkd_cache.ops.verify import verify_cache
from mtkd_cache.precompute.chat import render_conversation
from mtkd_cache.precompute.prepare import prepare


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("chatdata")
    tok = save_chat_tokenizer(root / "tok")
    data = write_jsonl(root / "chat.jsonl", [{"messages": c} for c in conversations(6)])
    return tok, data


def test_cli_stores_the_assistant_mask_and_verify_rehashes_it(chat, tmp_path) -> None:  # noqa: ANN001
    tok_dir, data = chat
    out = CliRunner().invoke(main, ["prepare", str(tmp_path / "c"), "--data", str(data), "--tokenizer", str(tok_dir),
                                    "--max-length", "64", "--messages-column", "messages", "--chunk-samples", "4"])
    assert out.exit_code == 0, out.output
    reader = open_cache(tmp_path / "c")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for i, conv in enumerate(conversations(6)):
        s = reader.sample(i)
        want = render_conversation(tok, conv, max_length=64)
        np.testing.assert_array_equal(s["token_ids"], want.ids)
        np.testing.assert_array_equal(s["loss_mask"], want.loss_mask)
        marked = tok.decode(s["token_ids"][s["loss_mask"]].tolist()).split()
        assert "user" not in marked and marked.count("</s>") == sum(m["role"] == "assistant" for m in conv)
    chunk = reader.read_chunk(1)
    assert chunk.inputs["loss_mask"].shape == chunk.inputs["token_ids"].shape
    assert verify_cache(tmp_path / "c").ok


def test_the_mask_is_part_of_the_content_hash(chat, tmp_path) -> None:  # noqa: ANN001
    tok_dir, data = chat
    a = prepare(tmp_path / "a", data, tokenizer=tok_dir, max_length=64, messages_column="messages", progress=False)
    b = prepare(tmp_path / "b", data, tokenizer=tok_dir, max_length=64, messages_column="messages", train_on="all",
                progress=False)
    ra, rb = open_cache(tmp_path / "a"), open_cache(tmp_path / "b")
    np.testing.assert_array_equal(ra.sample(0)["token_ids"], rb.sample(0)["token_ids"])  # same tokens
    assert rb.sample(0)["loss_mask"].all() and not ra.sample(0)["loss_mask"].all()
    ha, hb = (r.samples.column("content_hash").to_pylist() for r in (ra, rb))
    assert all(x != y for x, y in zip(ha, hb))
    assert a.dataset_fingerprint != b.dataset_fingerprint
    # a flipped mask byte is caught by verify (the hash covers the mask)
    arr = ra.store.open_group("inputs", mode="a")["loss_mask"]
    arr[3] = 1 - int(arr[3])
    report = verify_cache(tmp_path / "a")
    assert not report.ok and any("checksum" in p or "content hash" in p for p in report.problems)


def test_prompt_completion_pairs_mark_the_completion(tmp_path) -> None:  # noqa: ANN001
    tok_dir = save_chat_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "pc.jsonl", [{"q": "w1 w2 w3", "a": " w7 w8"}, {"q": "w4", "a": " w9 w10 w11"}])
    prepare(tmp_path / "c", data, tokenizer=tok_dir, max_length=16, prompt_column="q", completion_column="a",
            progress=False)
    r = open_cache(tmp_path / "c")
    assert r.sample(0)["loss_mask"].tolist() == [False, False, False, True, True]
    assert r.sample(1)["loss_mask"].tolist() == [False, True, True, True]


def test_truncation_is_counted(chat, tmp_path) -> None:  # noqa: ANN001
    tok_dir, data = chat
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(tmp_path / "c", data, tokenizer=tok_dir, max_length=12, messages_column="messages", progress=False)
    assert any("truncated" in str(w.message) and "tokens dropped" in str(w.message) for w in caught)
    assert max(open_cache(tmp_path / "c").sample_columns["num_positions"]) == 12  # type: ignore[arg-type]


def test_bad_instruction_inputs_are_one_line_errors_naming_the_sample(chat, tmp_path) -> None:  # noqa: ANN001
    tok_dir, _ = chat
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": conversations(1)[0]},
                                               {"messages": [{"role": "user", "content": "w1 w2"}]}])
    with pytest.raises(InputDataError, match=r"sample 1 .*no assistant turn"):
        prepare(tmp_path / "c1", bad, tokenizer=tok_dir, max_length=64, messages_column="messages", progress=False)
    plain = tmp_path / "plain"
    build_word_tokenizer(120).save_pretrained(plain)
    with pytest.raises(InputDataError, match="no chat template"):
        prepare(tmp_path / "c2", bad, tokenizer=plain, max_length=64, messages_column="messages", progress=False)
    with pytest.raises(InputDataError, match=r"sample 0 .*no trainable token.*truncating"):
        prepare(tmp_path / "c3", bad, tokenizer=tok_dir, max_length=4, messages_column="messages", progress=False)
    with pytest.raises(InputDataError, match="--pack"):
        prepare(tmp_path / "c4", bad, tokenizer=tok_dir, max_length=64, messages_column="messages", pack=True)
    with pytest.raises(InputDataError, match="go together"):
        prepare(tmp_path / "c5", bad, tokenizer=tok_dir, max_length=64, prompt_column="q")
    out = CliRunner().invoke(main, ["prepare", str(tmp_path / "c6"), "--data", str(bad), "--tokenizer", str(plain),
                                    "--max-length", "64", "--messages-column", "messages"])
    errors = [line for line in out.output.splitlines() if line.startswith("Error")]
    assert out.exit_code != 0 and "Traceback" not in out.output and len(errors) == 1 and "chat template" in errors[0]
    assert not (tmp_path / "c6" / "manifest.json").exists()


def test_the_documented_layout_reads_with_plain_zarr_and_rehashes(chat, tmp_path) -> None:  # noqa: ANN001
    """docs/FORMAT.md "Loss mask": zarr + pyarrow + hashlib alone recover the mask and each content hash."""
    import hashlib

    import pyarrow.parquet as pq
    import zarr

    tok_dir, data = chat
    prepare(tmp_path / "c", data, tokenizer=tok_dir, max_length=64, messages_column="messages", chunk_samples=4,
            progress=False)
    group = zarr.open_group(str(tmp_path / "c" / "inputs"), mode="r")
    ids, mask = np.asarray(group["token_ids"][:]), np.asarray(group["loss_mask"][:])
    assert mask.dtype == np.uint8 and group["loss_mask"].chunks == group["token_ids"].chunks
    table = pq.read_table(tmp_path / "c" / "inputs" / "samples.parquet").to_pylist()
    for row in table:
        span = slice(row["offset"], row["offset"] + row["num_positions"])
        h = hashlib.blake2b(digest_size=16)
        for a in (ids[span].astype("<i8"), mask[span]):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        assert h.hexdigest() == row["content_hash"]
    checksums = pq.read_table(tmp_path / "c" / "inputs" / "chunks.parquet").column("array").to_pylist()
    assert checksums.count("loss_mask") == checksums.count("token_ids") == 2
