"""export -> Parquet that `datasets` loads, with a dataset card; import -> the same cache, verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.remote_cache import build, read_arrays

from mtkd_cache import open_cache, verify_cache
from mtkd_cache.cli import main
from mtkd_cache.errors import CacheExistsError
from mtkd_cache.ops.export import export_cache, import_cache


def test_export_loads_in_datasets_and_imports_back_equal(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    cache, out, back = tmp_path / "cache", tmp_path / "out", tmp_path / "back"
    build(str(cache))
    res = CliRunner().invoke(main, ["export", str(cache), str(out), "--license", "apache-2.0"])
    assert res.exit_code == 0, res.output
    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    reader = open_cache(cache)
    assert ds.num_rows == reader.inputs.num_samples
    assert ds["sample_id"] == list(range(reader.inputs.num_samples))
    first = reader.read_chunk(0, teachers=["fac"])
    np.testing.assert_array_equal(np.array(ds[0]["inputs/arrays/input_ids"]), first.inputs["input_ids"][0])
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: \"apache-2.0\"" in card
    for field in ("weights_hash", "dataset_fingerprint", "temperature", "bytes_per_position", "format_version"):
        assert field in card
    res = CliRunner().invoke(main, ["import", str(out), str(back)])
    assert res.exit_code == 0, res.output
    assert verify_cache(back, progress=False).ok
    for got, want in zip(read_arrays(str(back)), read_arrays(str(cache)), strict=True):
        np.testing.assert_array_equal(got, want)
    assert open_cache(back).teacher("fac").meta == reader.teacher("fac").meta
    with pytest.raises(CacheExistsError):
        import_cache(out, back)
    with pytest.raises(CacheExistsError):
        export_cache(cache, out)


def test_a_token_cache_round_trips_through_export(lm_template: Path, tmp_path: Path) -> None:
    out, back = tmp_path / "out", tmp_path / "back"
    export_cache(lm_template, out, max_file_bytes=1)  # one Parquet file per cache chunk
    reader = open_cache(lm_template)
    assert len(list((out / "data").glob("*.parquet"))) == reader.num_chunks
    import_cache(out, back)
    assert verify_cache(back, progress=False).ok
    again = open_cache(back)
    for c in range(reader.num_chunks):
        want, got = reader.read_chunk(c, teachers=reader.teacher_names), again.read_chunk(c, teachers=reader.teacher_names)
        np.testing.assert_array_equal(got.inputs["token_ids"], want.inputs["token_ids"])
        for t in reader.teacher_names:
            np.testing.assert_array_equal(got.targets[t].indices, want.targets[t].indices)
            np.testing.assert_array_equal(got.targets[t].logp, want.targets[t].logp)
