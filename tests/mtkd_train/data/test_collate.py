"""BatchBuilder: scatter chunk rows into padded (B, L, ...) batches (synthetic chunks, no cache)."""

from __future__ import annotations

import numpy as np
import torch

from mtkd_cache import ChunkData, SampledBlock, TopkBlock
from mtkd_train.data import BatchBuilder, BatchSpec


def _token_chunk(chunk: int, lengths: list[int], k: int = 2) -> ChunkData:
    """Positions are numbered 100*chunk + row so every copied value shows where it came from."""
    lengths_a = np.array(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_a)[:-1]]).astype(np.int64)
    rows = int(lengths_a.sum())
    pos = 100 * chunk + np.arange(rows)
    n = len(lengths)
    return ChunkData(
        chunk=chunk,
        sample_ids=10 * chunk + np.arange(n),
        offsets=offsets,
        lengths=lengths_a,
        inputs={"token_ids": pos.astype(np.int64)},
        labels=None,
        domains=np.arange(n) % 2,
        targets={
            "t": TopkBlock(
                np.stack([pos, pos + 1], 1),
                -np.ones((rows, k), np.float32) * pos[:, None],
                pos.astype(np.float32),
            ),
            "s": SampledBlock(np.stack([pos, pos], 1), np.ones((rows, 2), np.int32)),
            "c": TopkBlock(
                np.arange(n)[:, None].repeat(k, 1),
                np.zeros((n, k), np.float32),
                np.zeros(n, np.float32),
            ),
        },
        features={"t": {"layer_1": np.repeat(pos[:, None], 3, 1).astype(np.float32)}},
    )


def test_rows_from_two_chunks_land_in_their_slots_with_padding() -> None:
    spec = BatchSpec(
        token_inputs=True,
        pad_id=7,
        target_grids={"t": "token", "s": "token", "c": "sample"},
        feature_grids={"t": {"layer_1": "token"}},
    )
    c0, c1 = _token_chunk(0, [3, 1, 2]), _token_chunk(1, [4, 2])
    b = BatchBuilder(spec, size=3, length=4)
    b.add(c1, rows=np.array([0]), slots=np.array([1]))
    b.add(c0, rows=np.array([2, 0]), slots=np.array([0, 2]))
    out = b.finish()
    assert out["sample_ids"].tolist() == [2, 10, 0]
    assert out["input_ids"].tolist() == [[4, 5, 7, 7], [100, 101, 102, 103], [0, 1, 2, 7]]
    assert out["position_mask"].sum(1).tolist() == [2, 4, 3]
    assert torch.equal(out["attention_mask"], out["position_mask"].long())
    t = out["targets"]["t"]
    assert t["indices"][0, :, 0].tolist() == [4, 5, 0, 0]
    assert t["logp"][0, 1].tolist() == [-5.0, -5.0] and torch.isinf(t["logp"][0, 2:]).all()
    assert t["tail"][0].tolist() == [4.0, 5.0, 1.0, 1.0]  # padding rows: tail 1 = no mass kept
    assert out["targets"]["s"]["counts"][2].sum().item() == 6  # 3 real rows x 2 draws
    assert out["targets"]["s"]["counts"].dtype == torch.int32
    assert out["targets"]["c"]["indices"].shape == (3, 1, 2)
    assert out["targets"]["c"]["indices"][:, 0, 0].tolist() == [2, 0, 0]
    assert out["features"]["t"]["layer_1"][1, :, 0].tolist() == [100.0, 101.0, 102.0, 103.0]
    assert out["domains"].tolist() == [0, 0, 0]
    assert "labels" not in out


def test_array_inputs_keep_their_shape_and_fixed_padding_length_is_ignored() -> None:
    pixels = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2)
    chunk = ChunkData(
        chunk=0,
        sample_ids=np.arange(4),
        offsets=np.arange(4),
        lengths=np.ones(4, np.int64),
        inputs={"pixel_values": pixels},
        labels=np.array([1, -100, 0, 2]),
        domains=None,
        targets={
            "v": TopkBlock(
                np.zeros((4, 3), np.int64), np.zeros((4, 3), np.float32), np.zeros(4, np.float32)
            )
        },
        features={"v": {"layer_m1": np.arange(8, dtype=np.float32).reshape(4, 2)}},
    )
    spec = BatchSpec(
        token_inputs=False,
        target_grids={"v": "sample"},
        feature_grids={"v": {"layer_m1": "sample"}},
        pad_to=16,
    )
    b = BatchBuilder(spec, size=2, length=1)
    b.add(chunk, rows=np.array([3, 1]), slots=np.array([0, 1]))
    out = b.finish()
    assert torch.equal(out["pixel_values"], torch.from_numpy(pixels[[3, 1]]))
    assert out["labels"].tolist() == [2, -100]
    assert out["targets"]["v"]["logp"].shape == (2, 1, 3)
    assert out["features"]["v"]["layer_m1"].tolist() == [[6.0, 7.0], [2.0, 3.0]]
    assert "input_ids" not in out and "domains" not in out


def _reference(spec: BatchSpec, size: int, length: int, adds: list[tuple[ChunkData, np.ndarray, np.ndarray]]) -> dict:
    """The batch by its definition, one position at a time (padding everywhere first)."""
    ref = {"sample_ids": np.full(size, -1), "input_ids": np.full((size, length), spec.pad_id),
           "position_mask": np.zeros((size, length), bool), "loss_mask": np.zeros((size, length), bool),
           "indices": np.zeros((size, length, 2)), "logp": np.full((size, length, 2), -np.inf),
           "tail": np.ones((size, length)), "layer_1": np.zeros((size, length, 3)), "c": np.zeros((size, 1, 2))}
    for data, rows, slots in adds:
        for row, slot in zip(rows, slots):
            ref["sample_ids"][slot] = data.sample_ids[row]
            ref["c"][slot, 0] = data.targets["c"].indices[row]
            for t in range(min(int(data.lengths[row]), length)):
                src = data.offsets[row] + t
                ref["input_ids"][slot, t] = data.inputs["token_ids"][src]
                ref["position_mask"][slot, t] = True
                if "loss_mask" in data.inputs:
                    ref["loss_mask"][slot, t] = data.inputs["loss_mask"][src]
                top = data.targets["t"]
                ref["indices"][slot, t], ref["logp"][slot, t], ref["tail"][slot, t] = top.indices[src], top.logp[src], top.tail[src]
                ref["layer_1"][slot, t] = data.features["t"]["layer_1"][src]
    return ref


def test_every_element_is_the_chunks_or_padding_never_left_uninitialised() -> None:
    """Arrays are allocated uninitialised: samples truncated by pad_to, slots from several chunks, a slot no chunk
    fills and an input only one chunk has (loss_mask) must all come out as the definition says."""
    rng = np.random.default_rng(0)
    np.full((1 << 20,), 12345.0).sum()  # leave garbage in the allocator's free memory
    spec = BatchSpec(token_inputs=True, pad_id=7, target_grids={"t": "token", "c": "sample"},
                     feature_grids={"t": {"layer_1": "token"}}, pad_to=5)
    c0, c1 = _token_chunk(0, [3, 7, 1, 5]), _token_chunk(1, [6, 2, 4])
    c1.inputs["loss_mask"] = rng.random(int(c1.lengths.sum())) < 0.5
    adds = [(c1, np.array([0, 2]), np.array([4, 1])), (c0, np.array([1, 2, 3]), np.array([0, 5, 2]))]  # slot 3: none
    b = BatchBuilder(spec, size=6, length=7)
    for data, rows, slots in adds:
        b.add(data, rows, slots)
    out = b.finish()
    ref = _reference(spec, 6, 5, adds)
    t, f = out["targets"]["t"], out["features"]["t"]["layer_1"]
    got = {"sample_ids": out["sample_ids"], "input_ids": out["input_ids"], "position_mask": out["position_mask"],
           "loss_mask": out["loss_mask"], "indices": t["indices"], "logp": t["logp"], "tail": t["tail"],
           "layer_1": f, "c": out["targets"]["c"]["indices"]}
    for key, want in ref.items():
        np.testing.assert_array_equal(got[key].numpy(), want, err_msg=key)
    assert out["sample_ids"][3] == -1 and not out["position_mask"][3].any() and torch.isinf(t["logp"][3]).all()


def test_array_inputs_have_one_position_per_sample_whatever_the_length_asked() -> None:
    chunk = ChunkData(chunk=0, sample_ids=np.arange(2), offsets=np.arange(2), lengths=np.ones(2, np.int64),
                      inputs={"pixel_values": np.zeros((2, 4), np.float32)}, labels=None, domains=None,
                      targets={"v": TopkBlock(np.ones((2, 3), np.int64), np.full((2, 3), -0.5, np.float32),
                                              np.full(2, 0.25, np.float32))},
                      features={"v": {"layer_1": np.ones((2, 5), np.float32)}})
    spec = BatchSpec(token_inputs=False, target_grids={"v": "token"}, feature_grids={"v": {"layer_1": "token"}})
    b = BatchBuilder(spec, size=2, length=3)  # a token grid over array inputs: never 3 positions
    b.add(chunk, rows=np.array([1, 0]), slots=np.array([0, 1]))
    out = b.finish()
    assert out["targets"]["v"]["logp"].tolist() == [[[-0.5] * 3]] * 2 and out["targets"]["v"]["tail"].tolist() == [[0.25]] * 2
    assert out["features"]["v"]["layer_1"].shape == (2, 1, 5)
