"""Writes `v1_cache/`: a small cache in format version 1, for the migration tests.

Run with the mtkd that wrote format 1 (commit 223e22e) first on PYTHONPATH:
    PYTHONPATH=<checkout of 223e22e> python tests/mtkd_cache/data/make_v1_cache.py
Teacher `clf` is complete (top-3 on the sample grid, fp16 values, an int8 pooled feature);
teacher `half` was interrupted after 2 of its 3 chunks. The targets come from `synthetic()`,
which the tests call again to check that migration changed no value.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

NUM, VOCAB, K, DIM, CHUNK = 20, 10, 3, 4, 8


def synthetic(name: str) -> dict[str, np.ndarray]:
    """The targets of teacher `name`: indices (N, K) ascending, logp (N, K), tail (N,), feature (N, DIM)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    logits = rng.normal(size=(NUM, VOCAB))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    idx = np.sort(np.argsort(-logp, axis=-1)[:, :K], axis=-1)
    top = np.take_along_axis(logp, idx, -1)
    return {"indices": idx, "logp": top.astype(np.float32), "tail": (1 - np.exp(top).sum(-1)).astype(np.float32),
            "feature": rng.normal(size=(NUM, DIM)).astype(np.float32), "pixels": rng.normal(size=(NUM, 4)).astype(np.float32)}


def main(out: Path) -> None:
    from mtkd_cache import prepare_arrays
    from mtkd_cache.format.meta import FeatureSpec, TargetSpec, TeacherMeta, ValueEncoding
    from mtkd_cache.format.reader import CacheReader
    from mtkd_cache.format.store import CacheStore
    from mtkd_cache.format.targets import TeacherWriter

    shutil.rmtree(out, ignore_errors=True)
    prepare_arrays(out, {"pixels": synthetic("inputs")["pixels"]}, labels=np.arange(NUM) % 3, chunk_samples=CHUNK)
    store = CacheStore(out)
    reader = CacheReader(store)
    for name, chunks in (("clf", 3), ("half", 2)):
        t = synthetic(name)
        meta = TeacherMeta(name=name, model="synthetic", task="custom", weights_hash="0" * 64, dtype="float32",
                           vocab_size=VOCAB, padded_vocab_size=VOCAB, grid="sample", target=TargetSpec("topk", k=K),
                           values=ValueEncoding("fp16"), index_dtype="uint16", tail_dtype="float32",
                           compressor={"name": "zstd", "level": 3},
                           dataset_fingerprint=reader.inputs.dataset_fingerprint, tokenizer_fingerprint=None,
                           features=(FeatureSpec(-1, "mean", "int8", DIM),))
        writer = TeacherWriter(store, meta, reader.inputs)
        for c in range(chunks):
            s = slice(c * CHUNK, min((c + 1) * CHUNK, NUM))
            writer.write_chunk(c, indices=t["indices"][s], logp=t["logp"][s], tail=t["tail"][s],
                               features={-1: t["feature"][s]}, stats={"positions": float(s.stop - s.start)})
        if chunks == reader.inputs.grid.num_chunks:
            writer.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "v1_cache")
