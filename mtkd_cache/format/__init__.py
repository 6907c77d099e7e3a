"""The cache format v1: the one place that knows how a cache is laid out, encoded, written and read.

meta (validated metadata dataclasses), codecs (value/index encodings and checksums), layout (chunk
row ranges and grid rules), store (fsspec/zarr access), fingerprint (content hashes), inputs (the
inputs writer), targets (the teacher writer) and reader. docs/FORMAT.md is the contract.
"""
