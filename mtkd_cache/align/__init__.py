"""Cross-tokenizer alignment: the pure algorithms that let a teacher with another tokenizer teach.

A teacher and the student tokenize the same stored text differently. Three steps put the
teacher's cached targets on the student's rows and vocabulary (method: docs/CROSS_TOKENIZER.md):

1. :func:`token_bytes` - the exact UTF-8 bytes each token id stands for (byte-level BPE's ``Ġ``,
   SentencePiece's ``▁`` and ``<0xNN>`` byte fallback decoded; special tokens have none).
2. :func:`byte_ends` / :func:`align_rows` - where each token's text ends in the text's bytes; a
   student row (context ending at byte ``b``) takes the teacher row whose context ends at ``b``.
3. :func:`build_vocab_map` / :func:`project_topk` - each teacher token maps to the student token its
   bytes start with (longest prefix); mass that maps nowhere joins the tail.

No I/O; numpy in, numpy out.
"""

from mtkd_cache.align.offsets import align_rows, alignment_rate, byte_ends
from mtkd_cache.align.token_bytes import token_bytes
from mtkd_cache.align.vocab import (
    build_vocab_map,
    exact_pairs,
    mapped_mass,
    project_samples,
    project_topk,
)

__all__ = [
    "align_rows",
    "alignment_rate",
    "build_vocab_map",
    "exact_pairs",
    "byte_ends",
    "mapped_mass",
    "project_samples",
    "project_topk",
    "token_bytes",
]
