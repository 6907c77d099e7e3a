"""`CachedDistillDataset`: the streaming, resumable batch reader the training loop consumes.

The stream is the sample sequence of `SampleOrder` (epochs concatenated). Counting from the
position P0 the iteration starts at, global batch j holds stream positions
[P0 + j*B*R, P0 + (j+1)*B*R) for B samples per rank and R ranks. DataLoader worker w of W takes
global batches j with j % W == w; the DataLoader takes results from its workers round-robin, so
the batches come out in the same order for any W. Since the order depends only on the stream
position, a stream resumed at a position with another R or W yields exactly the samples the
uninterrupted one would have. A batch may hold the end of one epoch and the start of the next, so
every batch of an endless stream is full; only a finite stream (`epochs=k`) can end on a partial
batch, split as evenly as possible over ranks (or dropped with `drop_last`).

Which rank takes which samples of a global batch (rank-disjoint decoding): the order has `lanes`
L (default: the world size of the run that started the stream; a resume keeps the saved value).
When R divides L and L divides B*R, rank r owns lanes [r*L/R, (r+1)*L/R) and takes the batch's
positions in its lanes: exactly B in the round-robin part of an epoch, so it decodes only its own
lanes' chunks, disjoint from every other rank's. Positions in an epoch's short tail (the lanes'
leftovers, about one window per lane) fill the ranks up to B in rank order; only there can two
ranks decode the same chunk. Otherwise (e.g. a resume on a world size that does not divide L)
rank r takes the r-th contiguous slice of B: the same global batches, but every rank decodes
(nearly) every chunk of a window.

Each reading process (main or DataLoader worker) decodes whole chunks into a count-bounded LRU
and reads `prefetch` chunks of its own lanes ahead in a thread: memory is bounded by
(cache_chunks + prefetch + 1) decoded chunks, never the whole cache. Workers overlap decoding with
training but do not split it.

Resume state is owned by the consumer: the trainer calls `consumed(n)` for every batch it has
actually used (workers prefetching ahead do not move it), and `state_dict()` saves the global
position; `load_state_dict()` makes the next iteration start there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from mtkd_cache import CacheReader, ChunkData, open_cache
from mtkd_train.data._align import cross_teachers, read_chunk_aligned
from mtkd_train.data._chunks import ChunkCache, ChunkCacheStats
from mtkd_train.data._collate import BatchBuilder, BatchSpec
from mtkd_train.data._errors import StreamConfigError, StreamStateError
from mtkd_train.data._handover import Handover
from mtkd_train.data._order import SampleOrder
from mtkd_train.data._ranks import lane_share, rank_slice
from mtkd_train.data._validate import validate_teachers

__all__ = ["BatchStream", "CachedDistillDataset", "StreamState"]

Batch = dict[str, Any]


@dataclass(frozen=True)
class StreamState:
    """Where a stream is: `samples_consumed` global samples (all ranks) into epoch `epoch`."""

    epoch: int = 0
    samples_consumed: int = 0

    def position(self, num_samples: int) -> int:
        """Stream position `epoch * num_samples + samples_consumed`."""
        return self.epoch * num_samples + self.samples_consumed

    @classmethod
    def at(cls, position: int, num_samples: int) -> StreamState:
        """The state at stream `position`."""
        epoch, offset = divmod(position, num_samples)
        return cls(epoch, offset)

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StreamState:
        for key in ("epoch", "samples_consumed"):
            if not isinstance(d.get(key), int) or d[key] < 0:
                raise StreamStateError(
                    f"stream state field {key!r} is {d.get(key)!r}, expected an integer >= 0; the "
                    f"checkpoint is corrupt or not from CachedDistillDataset.state_dict()"
                )
        return cls(int(d["epoch"]), int(d["samples_consumed"]))


class CachedDistillDataset(IterableDataset):  # type: ignore[type-arg]
    """Batches of inputs and cached teacher targets, streamed chunk by chunk from a cache.

    Use with `DataLoader(ds, batch_size=None, num_workers=W)` (a worker hands each batch over as one
    shared buffer, `_handover`; it arrives as the same dict). Each batch is a dict:

    * `sample_ids` (B,) int64;
    * token inputs: `input_ids` (B, L) int64 right-padded, `attention_mask` (B, L) int64 and
      `position_mask` (B, L) bool (real positions); array inputs: each array (B, ...);
    * `labels` (B,) int64 (-100 = unlabelled) if the cache has labels; `domains` (B,) int64
      (codes into `reader.inputs.domains`, -1 = none) if it has domains;
    * `targets[teacher]`: top-k {"indices" (B, T, K) int64, "logp" (B, T, K) float32 (-inf on
      padding), "tail" (B, T) float32} or sampled {"indices" (B, T, n) int64, "counts" (B, T, n)
      int32}; T = L for per-token teachers, 1 for per-sample ones. Row t of a causal LM holds
      the teacher's distribution over token t + 1 (the trainer shifts the labels itself);
    * `features[teacher][name]`: (B, L, D) float32 per position or (B, D) pooled.

    Args:
        cache: An open `CacheReader`, or a cache path / fsspec URL.
        teachers: Teacher names (validated with `validate_teachers`); may be empty.
        features: Teacher -> hidden-state layers to read (HF indices, as cached).
        batch_size: Samples per rank per batch (B).
        seed: Seed of the order (>= 0).
        shuffle: Permute chunks and samples within windows; off reads 0..N-1.
        shuffle_chunks: Chunks per shuffle window (per lane).
        lanes: Lanes of the order (`SampleOrder.lanes`); default the world size, so each rank
            decodes only its own chunks. `load_state_dict` adopts the saved value, so a resume on
            another world size keeps the order; pick a multiple of every world size you may
            resume with to keep decoding disjoint there too.
        drop_last: Drop the final partial batch of a finite stream. Without it that batch is split
            as evenly as possible over ranks, so some ranks may get one batch less: under DDP use
            drop_last or an endless stream.
        epochs: Stream length in epochs counted from epoch 0; None streams forever.
        rank / world_size: This rank and the number of ranks; default from `torch.distributed`
            when it is initialised, else 0 / 1.
        prefetch: Chunks read ahead in a background thread (0 = none).
        cache_chunks: Most decoded chunks kept per reading process; default one shuffle window.
        pad_to_max_length: Pad token inputs to the cache's `max_length`, not the batch's longest.
        storage_options: fsspec options when `cache` is a URL.
        transform: Applied to every batch where it is made (in the DataLoader worker), e.g. the
            trainer's teacher merge (`mtkd_train.teacher_side`); picklable for spawned workers.

    Raises:
        StreamConfigError: an argument is out of range.
        TeacherNotFoundError, IncompleteTeacherError, TeacherMismatchError: see `validate_teachers`.
    """

    def __init__(
        self,
        cache: CacheReader | str | os.PathLike[str],
        teachers: Sequence[str] = (),
        *,
        features: Mapping[str, Sequence[int]] | None = None,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_chunks: int = 4,
        drop_last: bool = False,
        epochs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 2,
        cache_chunks: int | None = None,
        lanes: int | None = None,
        pad_to_max_length: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        transform: Callable[[Batch], Batch] | None = None,
    ):
        super().__init__()
        self.transform = transform
        if not isinstance(cache, CacheReader):
            cache = open_cache(cache, storage_options)
        self.reader = cache
        self.teachers = tuple(teachers)
        self.features = {t: tuple(layers) for t, layers in (features or {}).items()}
        if self.teachers or self.features:
            validate_teachers(self.reader, self.teachers, features=self.features)
        self.cross = cross_teachers(self.reader, self.teachers)  # teachers on their own tokenization
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        _check_positive(batch_size=batch_size, epochs=epochs, cache_chunks=cache_chunks)
        if prefetch < 0:
            raise StreamConfigError(f"prefetch must be >= 0, got {prefetch}")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epochs = epochs
        self.prefetch = prefetch
        self._cache_chunks = cache_chunks
        self._set_order(SampleOrder.from_grid(
            self.reader.inputs.grid, seed=seed, shuffle=shuffle, shuffle_chunks=shuffle_chunks,
            lanes=self.world_size if lanes is None else lanes,
        ))
        self.spec = self._batch_spec(pad_to_max_length)
        self._state = StreamState()

    def __repr__(self) -> str:
        return (
            f"CachedDistillDataset({self.reader.url!r}, teachers={list(self.teachers)}, "
            f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, state={self._state})"
        )

    def _set_order(self, order: SampleOrder) -> None:
        self.order = order
        own = self.own_lanes
        self.cache_chunks = self._cache_chunks or order.window_chunks * (len(own) if own else 1)

    @property
    def own_lanes(self) -> range | None:
        """The lanes this rank owns, or None when ranks split batches contiguously (see module)."""
        lanes, world = self.order.lanes, self.world_size
        if lanes % world or self.global_batch_size % lanes:
            return None
        per = lanes // world
        return range(self.rank * per, (self.rank + 1) * per)

    def _batch_spec(self, pad_to_max_length: bool) -> BatchSpec:
        inputs = self.reader.inputs
        tok = inputs.tokenizer
        metas = {t: self.reader.teacher(t).meta for t in self.teachers}
        feature_grids = {}
        for t, layers in self.features.items():
            tr = self.reader.teacher(t)
            feature_grids[t] = {tr.feature_spec(layer).name: tr.feature_grid(layer) for layer in layers}
        return BatchSpec(
            token_inputs=inputs.kind == "tokens",
            pad_id=tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0,
            target_grids={t: m.grid for t, m in metas.items()},
            feature_grids=feature_grids,
            pad_to=inputs.max_length if pad_to_max_length else None,
        )

    # -- resume state ----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    @property
    def global_batch_size(self) -> int:
        """Samples per step over all ranks (B * R)."""
        return self.batch_size * self.world_size

    @property
    def end(self) -> int | None:
        """Stream position where the stream ends (None = endless)."""
        return None if self.epochs is None else self.epochs * self.num_samples

    @property
    def state(self) -> StreamState:
        """Position after the batches reported by `consumed`."""
        return self._state

    def consumed(self, num_batches: int = 1) -> StreamState:
        """Record that the trainer used `num_batches` more batches (on every rank); returns the state."""
        if num_batches < 0:
            raise StreamConfigError(f"num_batches must be >= 0, got {num_batches}")
        pos = self._state.position(self.num_samples) + num_batches * self.global_batch_size
        self._state = StreamState.at(
            pos if self.end is None else min(pos, self.end), self.num_samples
        )
        return self._state

    advance = consumed

    def state_dict(self) -> dict[str, Any]:
        """Resume state: the global position and the settings the order depends on."""
        return {
            **self._state.to_dict(),
            **self._order_settings(),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next iteration start at the saved position (any batch size, ranks or workers).

        The saved `lanes` (1 for states saved before lanes existed) replaces this stream's.

        Raises:
            StreamStateError: the state comes from a stream with another order (seed, shuffle,
                shuffle_chunks) or other data, or is malformed.
        """
        lanes = state.get("lanes", 1)
        if not isinstance(lanes, int) or lanes < 1:
            raise StreamStateError(f"stream state field 'lanes' is {lanes!r}, expected an integer >= 1")
        for key, want in self._order_settings().items():
            if key == "lanes":
                continue
            if key in state and state[key] != want:
                raise StreamStateError(
                    f"the saved stream has {key}={state[key]!r} but this stream has {want!r}; resume "
                    f"with {key}={state[key]!r} to continue the same sample order, or start afresh"
                )
        new = StreamState.from_dict(state)
        if new.samples_consumed > self.num_samples:
            raise StreamStateError(
                f"samples_consumed={new.samples_consumed} exceeds this cache's "
                f"{self.num_samples} samples; the state is from another cache"
            )
        self._set_order(dataclasses.replace(self.order, lanes=lanes))
        self._state = StreamState.at(new.position(self.num_samples), self.num_samples)

    def _order_settings(self) -> dict[str, Any]:
        o = self.order
        return {
            "seed": o.seed,
            "shuffle": o.shuffle,
            "shuffle_chunks": o.shuffle_chunks,
            "lanes": o.lanes,
            "num_samples": o.num_samples,
            "dataset_fingerprint": self.reader.inputs.dataset_fingerprint,
        }

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> BatchStream:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return BatchStream(self, self._state.position(self.num_samples), worker, workers, in_worker=info is not None)

    def read_chunk(self, chunk: int) -> ChunkData:
        """One decoded chunk with this stream's teachers and features (`CacheReader.read_chunk`)."""
        return read_chunk_aligned(self.reader, chunk, self.teachers, self.features, self.cross)


class BatchStream(Iterator[Batch]):
    """One process's iterator over its batches; `stats` counts its chunk reads and cache use."""

    def __init__(self, ds: CachedDistillDataset, start: int, worker: int, workers: int, *, in_worker: bool = False):
        self.ds, self.start, self.worker, self.workers = ds, start, worker, workers
        self.in_worker = in_worker  # a DataLoader worker hands each batch over as one buffer (`_handover`)
        self._j = worker
        order, own = ds.order, ds.own_lanes
        self._own = own
        self._cache = ChunkCache(
            ds.read_chunk,
            order.scheduled_chunk if own is None else self._own_scheduled_chunk,
            capacity=ds.cache_chunks,
            prefetch=ds.prefetch,
            lookahead=2 * order.window_chunks * order.lanes + ds.prefetch,
            end=None if ds.epochs is None else ds.epochs * order.num_chunks,
        )

    def _own_scheduled_chunk(self, index: int) -> int | None:
        order = self.ds.order
        return order.scheduled_chunk(index) if order.scheduled_lane(index) in self._own else None  # type: ignore[operator]

    @property
    def stats(self) -> ChunkCacheStats:
        return self._cache.stats

    @property
    def cache(self) -> ChunkCache:
        return self._cache

    def positions(self, j: int) -> np.ndarray | None:
        """This rank's stream positions in global batch `j` after the start, ascending (None: past the end)."""
        ds = self.ds
        g0, size = self.start + j * ds.global_batch_size, ds.global_batch_size
        end = ds.end
        if end is not None and g0 + size > end:
            size = end - g0
            if size <= 0 or ds.drop_last:
                return None
        if self._own is not None and size == ds.global_batch_size:
            mine = lane_share(ds.order.stream_lanes(g0, g0 + size), self._own, ds.batch_size, ds.rank)
            if mine is not None:
                return g0 + mine
        lo, hi = rank_slice(size, ds.batch_size, ds.world_size, ds.rank)
        return np.arange(g0 + lo, g0 + hi, dtype=np.int64) if hi > lo else None

    def __next__(self) -> Batch:
        pos = self.positions(self._j)
        if pos is None:
            self.close()
            raise StopIteration
        self._j += self.workers
        batch = self._assemble(pos)
        batch = batch if self.ds.transform is None else self.ds.transform(batch)
        return Handover(batch) if self.in_worker else batch  # type: ignore[return-value]  # unpickles as the batch

    def _assemble(self, pos: np.ndarray) -> Batch:
        ds, order = self.ds, self.ds.order
        a = int(pos[0])
        ids = order.stream_samples(a, int(pos[-1]) + 1)[pos - a]  # (n,)
        self._cache.release_before(order.schedule_index(a))
        chunk_of = ids // order.chunk_samples
        _, first = np.unique(chunk_of, return_index=True)
        lengths = ds.reader.samples.column("num_positions").take(pa.array(ids))  # no O(N) copy
        builder = BatchBuilder(ds.spec, len(ids), int(pc.max(lengths).as_py()))
        for c in chunk_of[np.sort(first)].tolist():
            slots = np.flatnonzero(chunk_of == c)
            builder.add(self._cache.get(c), ids[slots] - c * order.chunk_samples, slots)
        self._cache.fill()
        return builder.finish()

    def close(self) -> None:
        """Stop read-ahead and drop decoded chunks."""
        self._cache.close()

    def __del__(self) -> None:
        if hasattr(self, "_cache"):
            self.close()


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise StreamConfigError(
            f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size"
        )
    return rank, world_size


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise StreamConfigError(f"{name} must be >= 1, got {value}")
