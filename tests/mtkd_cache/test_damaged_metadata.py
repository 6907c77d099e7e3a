"""A damaged zarr.json (invalid JSON, an unknown codec, a shape that does not fit) is a one-line error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mtkd_cache import open_cache
from mtkd_cache.errors import CacheCorruptError


@pytest.mark.parametrize(("key", "old", "new"), [
    ("teachers/lm/values/zarr.json", '"name": "crc32c"', '"name": "crc39c"'),
    ("teachers/lm/values/zarr.json", "{", "{{"),
    ("inputs/token_ids/zarr.json", '"name": "crc32c"', '"name": "crc39c"'),
])
def test_damaged_array_metadata_names_the_file_and_the_fix(
    copy_cache: Callable[..., Path], lm_template: Path, key: str, old: str, new: str
) -> None:
    cache = copy_cache(lm_template)
    path = cache / key
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    reader = open_cache(cache)
    with pytest.raises(CacheCorruptError) as info:
        reader.read_chunk(0, teachers=["lm"])
    message = str(info.value)
    assert key in message and "is damaged" in message and "\n" not in message
    assert ("run --overwrite" in message) if key.startswith("teachers") else ("prepare --overwrite" in message)
