"""The cache format (version 2): the one place that knows how a cache is laid out, encoded, written and read.

meta (metadata dataclasses, validated at construction), codecs (value codecs, compressors,
checksums), kinds (the registry of target kinds and feature encodings: arrays, encode, decode,
check), layout (chunk grid, row ranges, token/sample grid rule, shard keys), store (fsspec/zarr
access; read-only stores raise on absent chunks), fingerprint (content hashes), inputs (the
inputs writer), targets (the teacher writer), checks (read-time integrity) and reader.
docs/FORMAT.md is the contract.
"""
