"""PyTorch datasets over the Parquet shards written by :mod:`cxrfoundry.data.shards`.

* :class:`ShardDataset` — map-style, for evaluation and small corpora: shards are opened lazily,
  a row is found by (shard, row group) from the Parquet footers, and the last few decoded row
  groups are cached so neighbouring indices cost one read.
* :class:`ShardIterableDataset` — for training at scale: streams whole shards (or row groups),
  split across DataLoader workers *and* distributed ranks so every row is read exactly once per
  epoch; shard order and a bounded shuffle buffer are seeded by ``(seed, epoch)``
  (call :meth:`ShardIterableDataset.set_epoch` each epoch).

Both yield the same dict per row (see :class:`SampleDecoder`): ``image`` (float32 ``1×H×W`` in
[0, 1], the stored uint8/uint16 pixels with ``normalize=False``, or whatever ``transform``
returns for it), ``labels`` (14 float32, CheXpert order of
``schema.FINDING_COLUMNS``) with ``label_mask`` (False where the label policy says "ignore"),
``report``, ``image_id``, ``dataset``, ``split``, ``view``, demographics (``sex``, ``age``,
``race``; missing strings are ``""`` and a missing age ``nan`` so default collation works) and,
when asked, ``mask`` (uint8 ``1×H×W`` label bits) with ``has_mask``.

Fast path for training: ``ShardIterableDataset(..., batch_size=B, normalize=False)`` yields
whole batches from each worker — the same dict :func:`torch.utils.data.default_collate` would
build from B samples, but decoded straight into one preallocated (shared-memory) ``B×1×H×W``
uint8 tensor, with labels computed per row group in numpy. The DataLoader then moves one tensor
per batch (``DataLoader(ds, batch_size=None)``, or :meth:`ShardIterableDataset.loader`), at a
quarter of the float32 bytes; :func:`to_float` scales to [0, 1] after the transfer (on the GPU
when given a device).

Faster still, and the default of :meth:`ShardIterableDataset.loader`: ``decode_threads=N``
decodes each batch on a pool of N threads inside the reading process (Pillow releases the GIL
while it decodes PNG/JPEG), each thread writing its images straight into the preallocated batch
tensor by index, the next batches decoding while the current one is consumed. With
``num_workers=0`` nothing crosses a process boundary: no shared-memory segment per batch, no
pickling, and float images (``normalize=True``) cost no more to deliver than uint8. In this
process, a batch's memory is reused for a later batch once nothing refers to it any more (no
tensor, view or array over it), so a consumer that keeps batches never sees them change.
"""

from __future__ import annotations

import bisect
import io
import itertools
import logging
import math
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from cxrfoundry import io as cio
from cxrfoundry.data import imaging
from cxrfoundry.data.shards import INDEX_NAME
from cxrfoundry.schema import FINDING_COLUMNS

logger = logging.getLogger(__name__)

#: What an uncertain (-1) label becomes: U-Zeros, U-Ones, or excluded from the loss.
UNCERTAIN_POLICIES: tuple[str, ...] = ("negative", "positive", "ignore")
#: What an unmentioned (null) label becomes.
UNMENTIONED_POLICIES: tuple[str, ...] = ("negative", "ignore")
META_COLUMNS: tuple[str, ...] = (
    "image_id",
    "dataset",
    "split",
    "view",
    "sex",
    "age",
    "race",
    "report",
)

ShardSpec = str | Path | Sequence[str | Path]


def list_shards(
    directory: str | Path, split: str | None = None, *, verify: bool = False
) -> list[Path]:
    """Shard files of ``split`` (all splits if ``None``) in ``index.json`` order.

    Raises ``FileNotFoundError`` naming the index or a listed shard that is missing, and
    ``ValueError`` when ``verify`` is set and a shard's sha256 differs from the index.
    """
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: shard index not found")
    index = cio.read_json(index_path)
    paths = []
    for entry in index.get("shards", []):
        if split is not None and entry["split"] != split:
            continue
        path = directory / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {index_path} but missing")
        if verify and cio.sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path}: sha256 differs from {index_path}")
        paths.append(path)
    return paths


def _resolve(shards: ShardSpec, split: str | None) -> list[Path]:
    if isinstance(shards, str | Path):
        path = Path(shards)
        if path.is_dir():
            return list_shards(path, split)
        return [path]
    return [Path(p) for p in shards]


def decode_pixels(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode a shard's PNG/JPEG bytes to a 2-D uint8/uint16 array, with one copy.

    Same result as :func:`imaging.decode_image`: grayscale PNGs (what shards store) by
    :func:`imaging.decode_gray_png`, JPEG in Pillow's ``L`` mode straight from Pillow's buffer
    (the array may be read-only), other modes through :func:`imaging.decode_image`. Raises
    :class:`imaging.ImageDecodeError` naming ``name``.
    """
    pixels = imaging.decode_gray_png(data, name=name)
    if pixels is not None:
        return pixels
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode == "L":
                return np.asarray(img)
            if img.mode in ("I;16", "I;16L", "I;16B"):
                return np.asarray(img).astype(np.uint16, copy=False)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise imaging.ImageDecodeError(name, f"cannot decode image bytes ({exc})") from exc
    return imaging.decode_image(data, name=name)


def _scale(dtype: np.dtype) -> np.float32:
    return np.float32(1.0 / np.iinfo(dtype).max)


class SampleDecoder:
    """Turns one shard row (a dict of column values) into the sample dict both datasets yield."""

    def __init__(
        self,
        *,
        transform: Callable[[torch.Tensor], Any] | None = None,
        uncertain: str = "negative",
        unmentioned: str = "negative",
        include_mask: bool = False,
        normalize: bool = True,
    ) -> None:
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
        if unmentioned not in UNMENTIONED_POLICIES:
            raise ValueError(
                f"unmentioned must be one of {UNMENTIONED_POLICIES}, got {unmentioned!r}"
            )
        self.transform = transform
        self.uncertain = uncertain
        self.unmentioned = unmentioned
        self.include_mask = include_mask
        self.normalize = normalize

    @property
    def columns(self) -> list[str]:
        """Shard columns this decoder needs (a projection: other columns are never read)."""
        cols = [*META_COLUMNS, *FINDING_COLUMNS, "image", "height", "width"]
        return [*cols, "mask"] if self.include_mask else cols

    def labels(self, row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels float32[14], label_mask bool[14]) under the configured policies."""
        values = np.zeros(len(FINDING_COLUMNS), dtype=np.float32)
        mask = np.ones(len(FINDING_COLUMNS), dtype=bool)
        for i, col in enumerate(FINDING_COLUMNS):
            value = row[col]
            if value is None:
                mask[i] = self.unmentioned != "ignore"
            elif value == -1:
                values[i] = 1.0 if self.uncertain == "positive" else 0.0
                mask[i] = self.uncertain != "ignore"
            else:
                values[i] = float(value)
        return torch.from_numpy(values), torch.from_numpy(mask)

    def label_arrays(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`labels` for every row of ``table`` at once: (float32[n, 14], bool[n, 14])."""
        # Through Python lists (None -> NaN): for nullable int8 columns that is ~30x cheaper
        # than Arrow's own to_numpy / is_null / fill_null, which cost ~40 µs per row here.
        raw = (
            np.array([table.column(col).to_pylist() for col in FINDING_COLUMNS], dtype=np.float32)
            .reshape(len(FINDING_COLUMNS), table.num_rows)
            .T
        )
        null, uncertain = np.isnan(raw), raw == -1
        uncertain_value = 1.0 if self.uncertain == "positive" else 0.0
        values = np.where(null, 0.0, np.where(uncertain, uncertain_value, raw)).astype(np.float32)
        mask = np.ones(raw.shape, dtype=bool)
        mask[null] = self.unmentioned != "ignore"
        mask[uncertain] = self.uncertain != "ignore"
        return values, mask

    def pixels(self, row: dict[str, Any]) -> np.ndarray:
        """The decoded 2-D stored pixels of ``row`` (possibly read-only), size-checked."""
        image_id = row["image_id"]
        pixels = decode_pixels(row["image"], name=image_id)
        if pixels.shape != (row["height"], row["width"]):
            raise imaging.ImageDecodeError(
                image_id, f"decoded {pixels.shape}, shard says {(row['height'], row['width'])}"
            )
        return pixels

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """Decode ``row``; raises :class:`imaging.ImageDecodeError` naming the image_id."""
        image_id = row["image_id"]
        pixels = self.pixels(row)
        if self.normalize:
            image = torch.from_numpy(np.multiply(pixels, _scale(pixels.dtype), dtype=np.float32))
            image = image.unsqueeze(0)
        else:
            # Stored integers (uint8/uint16): 4x less to copy between processes; scale on device.
            image = torch.from_numpy(np.array(pixels)).unsqueeze(0)
        labels, label_mask = self.labels(row)
        age = row["age"]
        sample: dict[str, Any] = {
            "image": self.transform(image) if self.transform is not None else image,
            "labels": labels,
            "label_mask": label_mask,
            "report": row["report"] or "",
            "image_id": image_id,
            "dataset": row["dataset"],
            "split": row["split"],
            "view": row["view"],
            "sex": row["sex"] or "",
            "age": float("nan") if age is None else float(age),
            "race": row["race"] or "",
        }
        if self.include_mask:
            data = row.get("mask")
            if data is not None:
                mask = torch.from_numpy(imaging.decode_image(data, name=f"{image_id} mask"))
                sample["mask"] = mask.unsqueeze(0)
                sample["has_mask"] = True
            else:
                # Zeros keep batches collatable when only some rows have ground truth.
                sample["mask"] = torch.zeros((1, *pixels.shape), dtype=torch.uint8)
                sample["has_mask"] = False
        return sample


class ShardDataset(Dataset):
    """Map-style dataset over shards with lazy opening and a small row-group cache.

    Args:
        shards: a shard folder (read through ``index.json``), one file, or a list of files.
        split: which split to list from a folder (``None`` = all).
        transform: applied to the float ``1×H×W`` image tensor.
        uncertain, unmentioned: label policies (see :class:`SampleDecoder`).
        include_mask: also decode the ``mask`` column.
        normalize: ``False`` yields the stored integer pixels (uint8/uint16 ``1×H×W``) instead
            of floats in [0, 1]; cheaper to move out of DataLoader workers (scale on the GPU).
        cache_row_groups: decoded row groups kept per process (random access over a whole
            corpus re-reads row groups; use :class:`ShardIterableDataset` for training).
    """

    def __init__(
        self,
        shards: ShardSpec,
        split: str | None = None,
        *,
        transform: Callable[[torch.Tensor], Any] | None = None,
        uncertain: str = "negative",
        unmentioned: str = "negative",
        include_mask: bool = False,
        normalize: bool = True,
        cache_row_groups: int = 4,
    ) -> None:
        self.paths = _resolve(shards, split)
        self.decoder = SampleDecoder(
            transform=transform,
            uncertain=uncertain,
            unmentioned=unmentioned,
            include_mask=include_mask,
            normalize=normalize,
        )
        self.cache_row_groups = max(1, cache_row_groups)
        # Row counts and row-group boundaries from the footers only (no pixel data is read).
        self._group_starts: list[list[int]] = []
        counts = []
        for path in self.paths:
            meta = pq.read_metadata(path)
            starts, total = [], 0
            for g in range(meta.num_row_groups):
                starts.append(total)
                total += meta.row_group(g).num_rows
            self._group_starts.append(starts)
            counts.append(total)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._cache: OrderedDict[tuple[int, int], dict[str, list[Any]]] = OrderedDict()

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles and cached pixels stay in the process that made them.
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        state["_cache"] = OrderedDict()
        return state

    def _file(self, index: int) -> pq.ParquetFile:
        if index in self._files:
            self._files.move_to_end(index)
            return self._files[index]
        handle = pq.ParquetFile(self.paths[index])
        self._files[index] = handle
        while len(self._files) > 8:
            self._files.popitem(last=False)[1].close()
        return handle

    def _row_group(self, file_index: int, group: int) -> dict[str, list[Any]]:
        key = (file_index, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = self._file(file_index).read_row_group(group, columns=self.decoder.columns)
        data = table.to_pydict()
        self._cache[key] = data
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return data

    def row(self, index: int) -> dict[str, Any]:
        """The raw column values of row ``index`` (image still encoded)."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        file_index = bisect.bisect_right(self._offsets, index) - 1
        local = index - self._offsets[file_index]
        starts = self._group_starts[file_index]
        group = bisect.bisect_right(starts, local) - 1
        data = self._row_group(file_index, group)
        offset = local - starts[group]
        return {k: v[offset] for k, v in data.items()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.decoder(self.row(index))


class ShardIterableDataset(IterableDataset):
    """Streams shards, split across DataLoader workers and distributed ranks.

    The work units (whole shards, or row groups with ``split_by="row_group"`` when there are
    fewer shards than ``world_size × num_workers``) are shuffled with ``(seed, epoch)``, dealt
    round-robin to ranks and then to each rank's DataLoader workers, so each row is read exactly
    once per epoch. Rows pass through a shuffle buffer of ``buffer_size`` encoded rows seeded by
    ``(seed, epoch, rank, worker)``; images are decoded as they leave the buffer. Encoded images
    are views of their row group's Arrow memory, not copies, so the buffer keeps row groups
    alive: up to ``buffer_size`` + one row group's rows of them, plus the rows it copied out of
    older groups to stay within that (see :class:`_PinnedGroups`). At most that is the encoded
    bytes of ``2 × buffer_size`` + one row group's rows (plus the row groups read ahead and
    the batches being decoded); measured, peak RSS was 20–25 % above copying every row out.

    With ``batch_size`` set, each worker yields batches of that many consecutive rows of its
    stream (the last one smaller unless ``drop_last``) instead of single samples: the dict
    ``default_collate`` would make of them, built without per-sample tensors — images are
    decoded straight into one ``B×1×H×W`` tensor (allocated in shared memory inside a worker,
    so handing it to the main process copies nothing). Use it with ``DataLoader(ds,
    batch_size=None)`` (see :meth:`loader`). With ``normalize=False`` the batch holds the stored
    integers: uint8, or uint16 as soon as one image in the batch is 16-bit (8-bit images are
    then multiplied by 257, so every image is full-range for the batch dtype and
    :func:`to_float` scales the whole batch exactly). All images of a batch must have the same
    size (shards always do: every resize policy outputs ``image_size²``).

    ``decode_threads=N`` (batched mode only) decodes each batch on N threads of the consuming
    process instead of in the calling thread, up to ``2`` batches ahead of the consumer, and
    reads the next row group on them while the current one is handed on (at the start of an
    epoch, the first two at once: the threads would otherwise wait for the buffer to fill);
    results are placed by index, so the batches are bit-identical to ``decode_threads=0``
    whatever the thread count or timing. A ``transform`` still runs in the calling thread, in
    row order (random augmentations stay reproducible). Each process (each DataLoader worker,
    if any) starts its own pool on first use. Read in this process, batch memory the consumer
    has let go of is reused, also in later epochs: up to 4 batches' worth stays allocated while
    the dataset lives. Integer batches decode grayscale PNGs straight into their slots.

    Rank and world size come from ``torch.distributed`` when it is initialised, else from the
    arguments (default 0 / 1). Ranks may receive different row counts when units do not divide
    evenly; DDP training should bound steps per epoch (e.g. by the smallest rank's
    :meth:`num_batches`). ``set_epoch`` reaches workers only when they are recreated each epoch
    (the DataLoader default ``persistent_workers=False``).
    """

    def __init__(
        self,
        shards: ShardSpec,
        split: str | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_size: int = 1000,
        split_by: str = "shard",
        rank: int | None = None,
        world_size: int | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        uncertain: str = "negative",
        unmentioned: str = "negative",
        include_mask: bool = False,
        normalize: bool = True,
        batch_size: int | None = None,
        drop_last: bool = False,
        decode_threads: int = 0,
    ) -> None:
        if split_by not in ("shard", "row_group"):
            raise ValueError(f"split_by must be 'shard' or 'row_group', got {split_by!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        self.batch_size = batch_size
        self.decode_threads = 0
        self._set_decode_threads(decode_threads)
        self.paths = _resolve(shards, split)
        self.shuffle, self.seed, self.buffer_size = shuffle, int(seed), max(1, buffer_size)
        self.split_by, self.rank, self.world_size = split_by, rank, world_size
        self.batch_size, self.drop_last = batch_size, bool(drop_last)
        self.decoder = SampleDecoder(
            transform=transform,
            uncertain=uncertain,
            unmentioned=unmentioned,
            include_mask=include_mask,
            normalize=normalize,
        )
        self.epoch = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pool_key: tuple[int, int] | None = None  # (pid, threads) the pool was made for
        self._buffers: _BufferPool | None = None
        self._buffers_pid: int | None = None
        self._metas = [pq.read_metadata(p) for p in self.paths]
        self.num_rows = sum(m.num_rows for m in self._metas)
        self._group_rows = [
            [m.row_group(g).num_rows for g in range(m.num_row_groups)] for m in self._metas
        ]

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard order and the shuffle buffer for ``epoch``."""
        self.epoch = int(epoch)

    def _set_decode_threads(self, threads: int) -> None:
        threads = int(threads)
        if threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {threads}")
        if threads and self.batch_size is None:
            raise ValueError("decode_threads needs batch_size (threads decode whole batches)")
        self.decode_threads = threads

    def __getstate__(self) -> dict[str, Any]:
        # Threads do not survive pickling (spawned DataLoader workers): each process makes its own.
        state = self.__dict__.copy()
        state["_pool"], state["_pool_key"] = None, None
        state["_buffers"], state["_buffers_pid"] = None, None
        return state

    def _executor(self) -> ThreadPoolExecutor | None:
        """This process's decode pool (``None`` without ``decode_threads``).

        Keyed by pid: a forked DataLoader worker inherits the parent's executor object but
        none of its threads, so it must start its own.
        """
        if not self.decode_threads:
            return None
        key = (os.getpid(), self.decode_threads)
        if self._pool is None or self._pool_key != key:
            if self._pool is not None and self._pool_key and self._pool_key[0] == key[0]:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="shard-decode")
            self._pool_key = key
        return self._pool

    def _buffer_pool(self) -> _BufferPool:
        """This process's batch memory, kept from one epoch to the next: memory fresh each
        epoch costs its page faults again (a few % of a short epoch). Buffers a consumer still
        holds are never handed out (see :class:`_BufferPool`)."""
        pid = os.getpid()
        if self._buffers is None or self._buffers_pid != pid:
            self._buffers, self._buffers_pid = _BufferPool(_THREAD_PREFETCH + 2), pid
        return self._buffers

    def _dist(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            rank, world = int(self.rank or 0), int(self.world_size or 1)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        return rank, world

    def units(self) -> list[tuple[int, int | None]]:
        """Work units in this epoch's order: ``(file index, row group or None = whole file)``."""
        if self.split_by == "shard":
            units: list[tuple[int, int | None]] = [(i, None) for i in range(len(self.paths))]
        else:
            units = [(i, g) for i, rows in enumerate(self._group_rows) for g in range(len(rows))]
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
            units = [units[i] for i in rng.permutation(len(units))]
        return units

    def assigned_units(self) -> list[tuple[int, int | None]]:
        """This consumer's units: the rank's share (``units[rank::world]``), then the worker's.

        Splitting by rank first keeps each rank's rows independent of its worker count.
        """
        rank, world = self._dist()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank_units = self.units()[rank::world]
        if len(rank_units) < workers and worker == 0:
            logger.warning(
                "rank %d has %d work units for %d workers: some read nothing "
                "(split_by='row_group' helps)",
                rank,
                len(rank_units),
                workers,
            )
        return rank_units[worker::workers]

    def _unit_rows(self, units: list[tuple[int, int | None]]) -> int:
        total = 0
        for file_index, group in units:
            groups = self._group_rows[file_index]
            total += sum(groups) if group is None else groups[group]
        return total

    def _read_units(
        self, units: list[tuple[int, int | None]], pool: ThreadPoolExecutor | None = None
    ) -> Iterator[_Row]:
        """The rows of ``units``, in order. With ``pool`` (the decode threads), the next row
        group is read on it while this one is handed on: the first two at once, so the
        decode threads, idle until the shuffle buffer first fills, share that reading."""
        columns = self.decoder.columns
        batched = self.batch_size is not None
        groups = iter(
            [
                (file_index, g)
                for file_index, group in units
                for g in (range(len(self._group_rows[file_index])) if group is None else [group])
            ]
        )
        reads: deque[Future] = deque()

        def read_ahead() -> None:
            while len(reads) < (2 if pool is not None else 1):
                unit = next(groups, None)
                if unit is None:
                    return
                reads.append(_submit(pool, self._read_group, *unit))

        try:
            read_ahead()
            while reads:
                table = reads.popleft().result()
                read_ahead()
                # Pixels are views of the row group's Arrow memory (no per-row copy); the
                # shuffle buffer copies out the rows of groups it would otherwise keep alive
                # too long (see _PinnedGroups). The small columns are shared by reference.
                images = _binary_views(table.column("image"))
                masks = _binary_views(table.column("mask")) if "mask" in columns else None
                small = table.drop_columns([c for c in ("image", "mask") if c in columns])
                meta = _Group(small, self.decoder if batched else None)
                del table
                for i, image in enumerate(images):
                    yield (meta, i, image, None if masks is None else masks[i])
        finally:
            for read in reads:  # stopped early: drop reads not started yet
                read.cancel()

    def _read_group(self, file_index: int, group: int) -> pa.Table:
        """One row group's columns; thread-safe (each call opens its own reader)."""
        # Memory-mapped, no pre-buffering: a row group is read once, front to back, and
        # pre-buffering only adds a copy (~15 % of the read time of a 64-row group). The
        # footer parsed at construction is reused, so opening costs no footer read.
        with pq.ParquetFile(
            self.paths[file_index],
            memory_map=True,
            pre_buffer=False,
            metadata=self._metas[file_index],
        ) as handle:
            # No Arrow thread pool: a DataLoader worker is one core's worth of work
            # already, and the pool's hand-offs cost more CPU than they save here.
            return handle.read_row_group(group, columns=self.decoder.columns, use_threads=False)

    def _stream(self, pool: ThreadPoolExecutor | None = None) -> Iterator[_Row]:
        """This consumer's rows, in the (seeded, buffered) shuffle order, still encoded
        (row groups read ahead on ``pool`` when given)."""
        rank, world = self._dist()
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rows = self._read_units(self.assigned_units(), pool)
        if not self.shuffle:
            yield from rows
            return
        seq = np.random.SeedSequence([self.seed, self.epoch, rank, world, worker])
        rng = np.random.default_rng(seq)
        buffer: list[_Row] = []
        largest_group = max((n for counts in self._group_rows for n in counts), default=0)
        pinned = _PinnedGroups(self.buffer_size + largest_group)
        for row in rows:
            if len(buffer) < self.buffer_size:
                pinned.enter(row[0], len(buffer))
                buffer.append(row)
            else:
                # Swap-out: yield a random buffered row and keep the new one in its place.
                pick = int(rng.integers(len(buffer)))
                out, buffer[pick] = buffer[pick], row
                pinned.leave(out[0], pick)
                pinned.enter(row[0], pick)
                yield out
            pinned.release(buffer)
        for pick in rng.permutation(len(buffer)):
            yield buffer[int(pick)]

    def _row_batches(self, pool: ThreadPoolExecutor | None = None) -> Iterator[list[_Row]]:
        """This consumer's stream cut into batches of ``batch_size`` encoded rows."""
        assert self.batch_size is not None
        batch: list[_Row] = []
        for row in self._stream(pool):
            batch.append(row)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch_size is None:
            for row in self._stream():
                yield self.decoder(_row_dict(row))
            return
        pool = self._executor()
        # In this process, batch memory the consumer has let go of is reused (in a worker
        # the batches go to shared memory and the main process owns them).
        buffers = self._buffer_pool() if get_worker_info() is None else None
        if pool is None:
            for rows in self._row_batches():
                yield self._start_batch(rows, None, buffers).result()
            return
        # Reading, shuffling and batch bookkeeping stay in this thread and overlap with the
        # pool decoding the batches ahead; batches come out in submission order.
        pending: deque[_PendingBatch] = deque()
        try:
            for rows in self._row_batches(pool):
                pending.append(self._start_batch(rows, pool, buffers))
                if len(pending) > _THREAD_PREFETCH:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for batch in pending:  # consumer stopped early, or a decode failed
                batch.cancel()

    def collate(self, rows: list[_Row]) -> dict[str, Any]:
        """One batch dict from encoded rows (what ``default_collate`` makes of their samples),
        decoded in the calling thread."""
        return self._start_batch(rows, None).result()

    def _start_batch(
        self,
        rows: list[_Row],
        pool: ThreadPoolExecutor | None,
        buffers: _BufferPool | None = None,
    ) -> _PendingBatch:
        """Start decoding ``rows`` (on ``pool``, or right here when it is ``None``), into
        memory from ``buffers`` when given."""
        decoder = self.decoder
        if decoder.transform is not None:
            # A transform works on one float (or integer) image at a time: decode in the
            # pool, transform here in row order so random augmentations stay reproducible.
            plain = _plain(decoder)
            tasks = [_submit(pool, plain, _row_dict(row)) for row in rows]

            def finish_transformed(results: list[Any]) -> dict[str, Any]:
                for sample in results:
                    sample["image"] = decoder.transform(sample["image"])  # type: ignore[misc]
                return default_collate(results)

            return _PendingBatch(tasks, finish_transformed)

        n = len(rows)
        shape = _batch_shape(rows)
        if decoder.normalize:
            dtype = torch.float32
        else:
            # The stored depth from the PNG header, so threads can write in place; a wrong
            # guess (another format) is corrected after decoding.
            wide = any(_is_16bit_png(data) for _, _, data, _ in rows)
            dtype = torch.uint16 if wide else torch.uint8
        if buffers is not None:
            image = buffers.tensor((n, 1, *shape), dtype)
        else:
            image = _batch_tensor((n, 1, *shape), dtype)
        mask = has_mask = None
        if decoder.include_mask:
            mask = torch.zeros((n, 1, *shape), dtype=torch.uint8)
            has_mask = torch.tensor([data is not None for _, _, _, data in rows], dtype=torch.bool)
        # One task per decode thread, each a contiguous slice of the batch: a task per image
        # costs ~100 µs of CPU per image in wake-ups and hand-offs (measured on 2 cores).
        chunks = max(1, min(n, self.decode_threads)) if pool is not None else 1
        bounds = [round(n * c / chunks) for c in range(chunks + 1)]
        tasks = [
            _submit(pool, _decode_slice, rows, range(lo, hi), image, mask)
            for lo, hi in itertools.pairwise(bounds)
        ]
        batch = self._batch_meta(rows)  # overlaps with the decoding

        def finish(parts: list[list[tuple[np.dtype, np.ndarray | None]]]) -> dict[str, Any]:
            results = [result for part in parts for result in part]
            batch["image"] = image if decoder.normalize else _fix_depth(image, results)
            if mask is not None:
                batch["mask"], batch["has_mask"] = mask, has_mask
            return batch

        return _PendingBatch(tasks, finish)

    def _batch_meta(self, rows: list[_Row]) -> dict[str, Any]:
        """Every entry of the batch dict but the pixels, in ``default_collate``'s layout."""
        metas = [(meta, i) for meta, i, _, _ in rows]
        labels = np.stack([meta.labels[i] for meta, i in metas])
        label_mask = np.stack([meta.label_mask[i] for meta, i in metas])
        ages = [meta.columns["age"][i] for meta, i in metas]

        def strings(col: str) -> list[str]:
            return [meta.columns[col][i] or "" for meta, i in metas]

        return {
            "image": None,  # placeholder: keeps default_collate's key order
            "labels": torch.from_numpy(labels),
            "label_mask": torch.from_numpy(label_mask),
            "report": strings("report"),
            "image_id": [meta.columns["image_id"][i] for meta, i in metas],
            "dataset": [meta.columns["dataset"][i] for meta, i in metas],
            "split": [meta.columns["split"][i] for meta, i in metas],
            "view": [meta.columns["view"][i] for meta, i in metas],
            "sex": strings("sex"),
            "age": torch.tensor(
                [float("nan") if a is None else float(a) for a in ages], dtype=torch.float64
            ),
            "race": strings("race"),
        }

    def __len__(self) -> int:
        """Rows (not batches) this consumer yields per epoch (the rank's share in the main
        process); see :meth:`num_batches` for batches."""
        return self._unit_rows(self.assigned_units())

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches this rank yields per epoch through a DataLoader with ``num_workers``.

        Each worker batches its own rows, so up to one short batch per worker
        (``drop_last`` drops them). Equals ``len(self)`` rows when ``batch_size`` is None.
        """
        rank, world = self._dist()
        rank_units = self.units()[rank::world]
        workers = max(1, num_workers)
        total = 0
        for w in range(workers):
            rows = self._unit_rows(rank_units[w::workers])
            if self.batch_size is None:
                total += rows
            elif self.drop_last:
                total += rows // self.batch_size
            else:
                total += math.ceil(rows / self.batch_size)
        return total

    def loader(
        self,
        num_workers: int | None = None,
        *,
        decode_threads: int | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        **kwargs: Any,
    ) -> DataLoader:
        """A DataLoader that passes this dataset's items through as they are
        (``batch_size=None``: batching happens in the dataset when ``batch_size`` is set).

        Defaults: a batched dataset is read in this process (``num_workers=0``) with one decode
        thread per available core (:func:`available_cores`) — no inter-process transfer at
        all; a per-sample dataset gets that many worker processes instead. ``decode_threads``
        sets this dataset's :attr:`decode_threads` (it changes the dataset, not only this
        loader); left as ``None`` it is only filled in when reading in-process and unset.
        With worker processes, threads are per worker (``num_workers × decode_threads``).

        ``pin_memory`` pins each batch in the main process for asynchronous host-to-GPU
        copies (``to_float(batch, "cuda", non_blocking=True)``); ``persistent_workers``
        keeps workers between epochs, which also keeps their epoch (see :meth:`set_epoch`).
        Other keyword arguments go to :class:`~torch.utils.data.DataLoader`.
        """
        batched = self.batch_size is not None
        if num_workers is None:
            num_workers = 0 if batched else available_cores()
        if decode_threads is not None:
            self._set_decode_threads(decode_threads)
        elif batched and num_workers == 0 and self.decode_threads == 0:
            self._set_decode_threads(available_cores())
        if num_workers > 0 and prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        if batched:
            # Items are finished batches of tensors and lists already: the default
            # (default_convert) only walks every string of every batch, ~30 µs per image.
            kwargs.setdefault("collate_fn", _as_is)
        return DataLoader(
            self,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            **kwargs,
        )


def _as_is(item: Any) -> Any:
    """The identity, as a module-level function so DataLoader workers can pickle it."""
    return item


def available_cores() -> int:
    """Cores this process may use, shared out among the local ranks of a distributed job
    (``LOCAL_WORLD_SIZE``, set by torchrun); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local)


#: An encoded row in flight: (its row group's small columns, index, image bytes, mask bytes).
_Row = tuple["_Group", int, memoryview | bytes, memoryview | bytes | None]

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16}


class _Group:
    """The non-pixel columns of one row group, as Python lists, plus (when batching) the
    label arrays of every row computed at once; ``slots``: where the shuffle buffer holds
    its rows (``None`` once they no longer view the group's Arrow memory)."""

    __slots__ = ("columns", "label_mask", "labels", "num_rows", "slots")

    def __init__(self, table: pa.Table, decoder: SampleDecoder | None) -> None:
        self.columns: dict[str, list[Any]] = table.to_pydict()
        self.num_rows = table.num_rows
        self.slots: set[int] | None = set()
        if decoder is not None:
            self.labels, self.label_mask = decoder.label_arrays(table)


def _binary_views(column: pa.ChunkedArray) -> list[memoryview | None]:
    """A binary column's values as views of its Arrow buffers (``None`` for nulls): no copy
    per row, where ``to_pylist`` copies every image once more (about as long as reading the
    row group). A view keeps its whole buffer alive; decoders take any bytes-like object."""
    values: list[memoryview | None] = []
    for chunk in column.chunks:
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            values.extend(chunk.to_pylist())
            continue
        _, offsets, data = chunk.buffers()
        width = np.dtype(np.int64 if pa.types.is_large_binary(chunk.type) else np.int32)
        bounds = np.frombuffer(
            offsets, dtype=width, count=len(chunk) + 1, offset=chunk.offset * width.itemsize
        ).tolist()
        base = memoryview(data if data is not None else b"").cast("B")
        views: list[memoryview | None] = [base[a:b] for a, b in itertools.pairwise(bounds)]
        if chunk.null_count:
            nulls = chunk.is_null().to_pylist()
            views = [None if null else view for view, null in zip(views, nulls, strict=True)]
        values.extend(views)
    return values


class _PinnedGroups:
    """Bounds the row-group memory the shuffle buffer keeps alive through its rows' views.

    A buffered row viewing its group's Arrow memory keeps the whole group alive, and with
    uniform swap-out a few rows of a group linger for long: left alone, a buffer of B rows
    would pin about ``B/G × ln G`` groups of G rows (6× the rows it holds, for B = 1000,
    G = 256). So once the groups the buffer views add up to more than ``budget`` rows, the
    oldest group's remaining rows (about 30 % of them, with the budget of ``B + G`` rows
    used) are copied out to ``bytes`` and the group is let go. The buffer then keeps at most
    ``budget`` rows' worth of groups alive plus the rows it copied out, against ``B`` rows
    plus the group being copied with one copy per row; most copies are saved. The newest
    group is never copied out (its later rows are still arriving as views).
    """

    __slots__ = ("budget", "groups", "rows")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.groups: deque[_Group] = deque()  # groups with views in the buffer, oldest first
        self.rows = 0  # rows of those groups

    def enter(self, group: _Group, slot: int) -> None:
        """A row of ``group`` is now at ``slot`` of the buffer."""
        if group.slots is None:
            return
        if not group.slots and (not self.groups or self.groups[-1] is not group):
            self.groups.append(group)
            self.rows += group.num_rows
        group.slots.add(slot)

    def leave(self, group: _Group, slot: int) -> None:
        """The row at ``slot`` (of ``group``) has left the buffer."""
        if group.slots is not None:
            group.slots.discard(slot)

    def release(self, buffer: list[_Row]) -> None:
        """Let go of the oldest groups while over budget (copying out their buffered rows),
        and of any older group none of whose rows is buffered any more."""
        while len(self.groups) > 1:
            oldest = self.groups[0]
            if oldest.slots and self.rows <= self.budget:
                return
            for slot in oldest.slots or ():
                meta, i, image, mask = buffer[slot]
                buffer[slot] = (meta, i, bytes(image), None if mask is None else bytes(mask))
            oldest.slots = None
            self.groups.popleft()
            self.rows -= oldest.num_rows


def _row_dict(row: _Row) -> dict[str, Any]:
    meta, i, image, mask = row
    out = {k: v[i] for k, v in meta.columns.items()}
    out["image"] = image
    if mask is not None or "mask" in out:
        out["mask"] = mask
    return out


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory from the start so
    sending it to the main process is a handle, not a copy (as ``default_collate`` does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(shape)


class _BufferPool:
    """Batch tensors whose memory is reused once nothing refers to it any more.

    Fresh memory for every batch costs a page fault per 4 KiB when it is first written (about
    60 µs per 256² float image, ~6 % of its decode). The pool owns each buffer as a numpy
    array and hands out tensors over it (``torch.from_numpy``): every tensor, view or array
    made from one keeps a reference to that array, so a buffer whose array has no referrer
    but the pool belongs to nobody and can be handed out again. Batches a consumer keeps are
    never overwritten: when every buffer is held, new batches get fresh memory. Up to ``keep``
    buffers are kept (released with the pool, at the end of the iteration).
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.arrays: list[np.ndarray] = []

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype``, over reused memory if free."""
        np_dtype = _NUMPY_DTYPES[dtype]
        free = [i for i in range(len(self.arrays)) if self._unreferenced(i)]
        for i in free:
            if self.arrays[i].shape == shape and self.arrays[i].dtype == np_dtype:
                return torch.from_numpy(self.arrays[i])
        array = np.empty(shape, dtype=np_dtype)
        if len(self.arrays) >= self.keep:  # make room: drop a buffer nobody holds, if any
            if not free:
                return torch.from_numpy(array)
            del self.arrays[free[0]]
        self.arrays.append(array)
        return torch.from_numpy(array)

    def _unreferenced(self, i: int) -> bool:
        # Referrers of a free buffer: the pool's list and getrefcount's own argument.
        return sys.getrefcount(self.arrays[i]) == 2


_NUMPY_DTYPES = {
    torch.float32: np.dtype(np.float32),
    torch.uint8: np.dtype(np.uint8),
    torch.uint16: np.dtype(np.uint16),
}

#: Batches decoding ahead of the one being consumed, per threaded reader.
_THREAD_PREFETCH = 2


class _PendingBatch:
    """A batch being decoded: per-row tasks, then ``finish`` on their results (in row order)."""

    __slots__ = ("finish", "tasks")

    def __init__(self, tasks: list[Future], finish: Callable[[list[Any]], dict[str, Any]]):
        self.tasks, self.finish = tasks, finish

    def result(self) -> dict[str, Any]:
        """Wait for every row; re-raises the first failed row's error (by index)."""
        try:
            return self.finish([task.result() for task in self.tasks])
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Drop the rows not started yet (started ones finish into a batch nobody reads)."""
        for task in self.tasks:
            task.cancel()


def _submit(pool: ThreadPoolExecutor | None, fn: Callable[..., Any], *args: Any) -> Future:
    """``pool.submit``, or run now in this thread when there is no pool."""
    if pool is not None:
        return pool.submit(fn, *args)
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except Exception as exc:  # surfaces from result(), as with a pool
        done.set_exception(exc)
    return done


def _plain(decoder: SampleDecoder) -> SampleDecoder:
    """``decoder`` without its transform (for decoding off the calling thread)."""
    plain = SampleDecoder.__new__(SampleDecoder)
    plain.__dict__.update(decoder.__dict__)
    plain.transform = None
    return plain


def _batch_shape(rows: list[_Row]) -> tuple[int, int]:
    """The stored (height, width) every row of the batch must share."""
    meta, i, _, _ = rows[0]
    shape = (meta.columns["height"][i], meta.columns["width"][i])
    for meta, i, _, _ in rows:
        size = (meta.columns["height"][i], meta.columns["width"][i])
        if size != shape:
            raise imaging.ImageDecodeError(
                meta.columns["image_id"][i],
                f"size {size} differs from the batch's {shape}; "
                "use batch_size=None to read shards of mixed image sizes",
            )
    return shape


def _is_16bit_png(data: bytes) -> bool:
    header = imaging.png_header(data)
    return header is not None and header[0] > 8


def _decode_slice(
    rows: list[_Row], ks: range, image: torch.Tensor, mask: torch.Tensor | None
) -> list[tuple[np.dtype, np.ndarray | None]]:
    """:func:`_decode_into` for ``rows[k]`` into slot ``k``, for each ``k`` in ``ks``."""
    return [_decode_into(rows[k], k, image, mask) for k in ks]


def _decode_into(
    row: _Row, k: int, image: torch.Tensor, mask: torch.Tensor | None
) -> tuple[np.dtype, np.ndarray | None]:
    """Decode ``row`` into ``image[k, 0]`` (and its mask into ``mask[k, 0]``); thread-safe, as
    each call writes only its own slot. Returns the decoded dtype, plus the pixels when they
    did not fit the batch dtype (a 16-bit image in a uint8 batch: widened by the caller)."""
    meta, i, data, mask_data = row
    image_id = meta.columns["image_id"][i]
    stored = (meta.columns["height"][i], meta.columns["width"][i])
    slot = image[k, 0].numpy()
    if not image.is_floating_point() and imaging.decode_gray_png_into(data, slot):
        result: tuple[np.dtype, np.ndarray | None] = (slot.dtype, None)
    else:
        result = _decode_to_slot(data, image_id, stored, slot)
    if mask is not None and mask_data is not None:
        mask[k, 0].numpy()[...] = decode_pixels(mask_data, name=f"{image_id} mask")
    return result


def _decode_to_slot(
    data: bytes | memoryview, image_id: str, stored: tuple[int, int], slot: np.ndarray
) -> tuple[np.dtype, np.ndarray | None]:
    """The general path of :func:`_decode_into`: decode, check the size, convert into ``slot``."""
    pixels = decode_pixels(data, name=image_id)
    if pixels.shape != stored:
        raise imaging.ImageDecodeError(image_id, f"decoded {pixels.shape}, shard says {stored}")
    spill = None
    if slot.dtype == np.float32:
        np.multiply(pixels, _scale(pixels.dtype), out=slot)
    elif slot.dtype == pixels.dtype:
        slot[...] = pixels
    elif slot.dtype == np.uint16:  # an 8-bit image in a 16-bit batch: exactly x * 65535 / 255
        np.multiply(pixels, np.uint16(257), out=slot, dtype=np.uint16)
    else:
        spill = np.array(pixels)
    return pixels.dtype, spill


def _fix_depth(
    image: torch.Tensor, results: list[tuple[np.dtype, np.ndarray | None]]
) -> torch.Tensor:
    """The integer batch in the dtype the decoded images call for: uint16 as soon as one is
    16-bit (8-bit ones multiplied by 257, full range), else uint8."""
    any_wide = any(dtype == np.uint16 for dtype, _ in results)
    if image.dtype == torch.uint8 and any_wide:
        wide = _batch_tensor(tuple(image.shape), torch.uint16)
        for k, (_, spill) in enumerate(results):
            slot = wide[k, 0].numpy()
            if spill is not None:
                slot[...] = spill
            else:
                np.multiply(image[k, 0].numpy(), np.uint16(257), out=slot, dtype=np.uint16)
        return wide
    if image.dtype == torch.uint16 and not any_wide:  # the header guess was wrong: all 8-bit
        narrow = _batch_tensor(tuple(image.shape), torch.uint8)
        np.floor_divide(image.numpy(), np.uint16(257), out=narrow.numpy(), casting="unsafe")
        return narrow
    return image


def to_float(
    batch: dict[str, Any],
    device: torch.device | str | None = None,
    *,
    non_blocking: bool = False,
) -> dict[str, Any]:
    """The batch with its tensors on ``device`` and an integer ``image`` scaled to float32
    [0, 1] (by the dtype's maximum: /255 for uint8, /65535 for uint16).

    Moves first, then converts, so only the integer pixels cross to the GPU. Float images and
    the other entries are only moved; ``mask`` keeps its label bits. Returns a new dict.
    """
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and device is not None:
            value = value.to(device, non_blocking=non_blocking)
        out[key] = value
    image = out.get("image")
    if isinstance(image, torch.Tensor) and not image.is_floating_point():
        if image.dtype == torch.uint16:
            # uint16 arithmetic is limited on some backends; int32 holds it exactly.
            image, top = image.to(torch.int32), 65535.0
        else:
            top = float(torch.iinfo(image.dtype).max)
        # One pass: integer * float scalar promotes to float32 (the same product as the
        # in-worker ``pixels * float32(1 / top)``).
        out["image"] = torch.mul(image, 1.0 / top)
    return out
