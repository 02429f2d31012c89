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
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

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

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """Decode ``row``; raises :class:`imaging.ImageDecodeError` naming the image_id."""
        image_id = row["image_id"]
        pixels = imaging.decode_image(row["image"], name=image_id)
        if pixels.shape != (row["height"], row["width"]):
            raise imaging.ImageDecodeError(
                image_id, f"decoded {pixels.shape}, shard says {(row['height'], row['width'])}"
            )
        if self.normalize:
            scale = np.float32(1.0 / np.iinfo(pixels.dtype).max)
            image = torch.from_numpy(np.multiply(pixels, scale, dtype=np.float32)).unsqueeze(0)
        else:
            # Stored integers (uint8/uint16): 4x less to copy between processes; scale on device.
            image = torch.from_numpy(pixels).unsqueeze(0)
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


def _rows(table_dict: dict[str, list[Any]], n: int) -> Iterator[dict[str, Any]]:
    keys = list(table_dict)
    for i in range(n):
        yield {k: table_dict[k][i] for k in keys}


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
    ``(seed, epoch, rank, worker)``; images are decoded as they leave the buffer.

    Rank and world size come from ``torch.distributed`` when it is initialised, else from the
    arguments (default 0 / 1). Ranks may receive different row counts when units do not divide
    evenly; DDP training should bound steps per epoch (e.g. by the smallest rank's count).
    ``set_epoch`` reaches workers only when they are recreated each epoch (the DataLoader
    default ``persistent_workers=False``).
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
    ) -> None:
        if split_by not in ("shard", "row_group"):
            raise ValueError(f"split_by must be 'shard' or 'row_group', got {split_by!r}")
        self.paths = _resolve(shards, split)
        self.shuffle, self.seed, self.buffer_size = shuffle, int(seed), max(1, buffer_size)
        self.split_by, self.rank, self.world_size = split_by, rank, world_size
        self.decoder = SampleDecoder(
            transform=transform,
            uncertain=uncertain,
            unmentioned=unmentioned,
            include_mask=include_mask,
            normalize=normalize,
        )
        self.epoch = 0
        metas = [pq.read_metadata(p) for p in self.paths]
        self.num_rows = sum(m.num_rows for m in metas)
        self._group_rows = [
            [m.row_group(g).num_rows for g in range(m.num_row_groups)] for m in metas
        ]

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard order and the shuffle buffer for ``epoch``."""
        self.epoch = int(epoch)

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

    def _read_units(self, units: list[tuple[int, int | None]]) -> Iterator[dict[str, Any]]:
        columns = self.decoder.columns
        for file_index, group in units:
            with pq.ParquetFile(self.paths[file_index]) as handle:
                groups = range(handle.num_row_groups) if group is None else [group]
                for g in groups:
                    table = handle.read_row_group(g, columns=columns)
                    yield from _rows(table.to_pydict(), table.num_rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = self._dist()
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rows = self._read_units(self.assigned_units())
        if not self.shuffle:
            for row in rows:
                yield self.decoder(row)
            return
        seq = np.random.SeedSequence([self.seed, self.epoch, rank, world, worker])
        rng = np.random.default_rng(seq)
        buffer: list[dict[str, Any]] = []
        for row in rows:
            if len(buffer) < self.buffer_size:
                buffer.append(row)
                continue
            # Swap-out: yield a random buffered row and keep the new one in its place.
            pick = int(rng.integers(len(buffer)))
            out, buffer[pick] = buffer[pick], row
            yield self.decoder(out)
        for pick in rng.permutation(len(buffer)):
            yield self.decoder(buffer[int(pick)])

    def __len__(self) -> int:
        """Rows this consumer yields per epoch (the whole rank's share in the main process)."""
        total = 0
        for file_index, group in self.assigned_units():
            groups = self._group_rows[file_index]
            total += sum(groups) if group is None else groups[group]
        return total
