"""Write a corpus of report rows + images into deterministic, resumable Parquet shards.

The shard stage turns the report tables of one or more datasets into
``{split}-{NNNNN}.parquet`` files (``schema.SHARD_SCHEMA``: the report columns plus the
decoded, resized and re-encoded ``image``, its ``height``/``width`` and an optional ``mask``),
an ``index.json`` and a ``rejects.parquet``.

Why it is built the way it is:

* **Deterministic.** Rows of each split are sorted by ``image_id`` and then put in a seeded
  permutation; shard boundaries are row counts planned *before* any shard is written (from a
  deterministic bytes-per-row estimate over the first rows of the permutation), so neither
  timing nor the worker count changes the output. Encoding settings are fixed, so reruns give
  byte-identical files.
* **Resumable.** Each shard is completed in ``work_dir`` (outside the Snakemake output) with a
  ``.done.json`` recording its input fingerprint (rows, settings, and the source of this module
  and the decoding code it imports) and sha256. A rerun after a kill reuses every finished shard
  whose fingerprint and hash still match and rebuilds the rest; the final output folder is then
  published atomically. A killed run + rerun equals an uninterrupted run.
* **Streaming, bounded memory, parallel.** Rows flow through a process pool in small ordered
  chunks with a bounded number in flight; the parent only ever holds the current row group. A
  worker that dies (a decoder crash, the OOM killer) restarts the pool; the rows it may have
  held are re-run one per process, and the one that kills its process becomes a reject.
* **Nothing is dropped silently.** Rows whose image (or mask) cannot be decoded, masks that
  cannot line up with their image, nulls in required columns, duplicated ``image_id`` values
  and unknown splits go to ``rejects.parquet`` with a reason, and
  ``rows_in == rows_written + rows_rejected`` is asserted and recorded in ``index.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from cxrfoundry import io as cio
from cxrfoundry.data import imaging
from cxrfoundry.schema import (
    REJECTS_SCHEMA,
    REPORTS_SCHEMA,
    SHARD_SCHEMA,
    SPLITS,
    conform,
    reject_row,
)

logger = logging.getLogger(__name__)

#: Bumped whenever the bytes a shard holds for the same inputs would change.
FORMAT_VERSION = 1
STAGE = "shard"
INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.parquet"
#: Rows of the permutation encoded up front to estimate bytes per row (and reused afterwards).
ESTIMATE_ROWS = 16
#: Columns holding already-compressed image bytes: no dictionary, no codec, no statistics.
BINARY_COLUMNS: tuple[str, ...] = ("image", "mask")
#: Test hook: SIGKILL this process after writing this many row groups (simulates a hard kill).
FAULT_ENV = "CXRFOUNDRY_SHARDS_KILL_AFTER_ROW_GROUPS"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ShardSource:
    """One dataset's report rows (``schema.REPORTS_SCHEMA``) and the folder its paths are under."""

    dataset: str
    table: pa.Table
    raw_root: Path


@dataclass(frozen=True)
class EncodeSettings:
    """How every image is turned into shard bytes (sent to worker processes)."""

    image_size: int
    resize_policy: str = "pad"
    equalize: bool = False
    bit_depth: int = 8
    image_format: str = "png"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize_policy not in imaging.RESIZE_POLICIES:
            raise ValueError(
                f"resize_policy must be one of {imaging.RESIZE_POLICIES}, "
                f"got {self.resize_policy!r}"
            )
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if self.image_format not in imaging.IMAGE_FORMATS:
            raise ValueError(
                f"image_format must be one of {imaging.IMAGE_FORMATS}, got {self.image_format!r}"
            )
        if self.image_format == "jpeg" and self.bit_depth != 8:
            raise ValueError("image_format 'jpeg' stores 8 bits only; use bit_depth 8 or png")


@dataclass(frozen=True)
class Encoded:
    """A worker's result for one row: either the encoded pixels or the reason it failed."""

    row: int
    image: bytes | None = None
    height: int = 0
    width: int = 0
    mask: bytes | None = None
    error: str | None = None


@dataclass
class _Shard:
    split: str
    number: int
    rows: np.ndarray  # global row ids, in output order
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:05d}.parquet"

    @property
    def stem(self) -> str:
        return self.name.removesuffix(".parquet")


@dataclass
class _Corpus:
    table: pa.Table  # REPORTS_SCHEMA rows of every source, concatenated
    roots: list[Path]  # raw root per source
    source_of: np.ndarray  # source index per row
    source_row: np.ndarray  # row number inside its source table
    rejects: list[dict[str, Any]] = field(default_factory=list)
    usable: dict[str, np.ndarray] = field(default_factory=dict)  # split -> row ids
    image_paths: list[str] = field(default_factory=list)
    mask_paths: list[str | None] = field(default_factory=list)


def encode_file(
    image_path: Path, mask_path: Path | None, settings: EncodeSettings
) -> tuple[bytes, int, int, bytes | None]:
    """Decode, (equalise,) resize and encode one image and its optional mask.

    Returns ``(image bytes, height, width, mask PNG bytes or None)``. The mask is resized with
    nearest neighbour under the same policy, so it stays aligned with the image.
    """
    img = imaging.load_image(image_path)
    source_shape = img.shape
    if settings.equalize:
        # Before resizing: letterbox padding would otherwise distort the histogram.
        img = imaging.equalize(img)
    img = imaging.resize(img, settings.image_size, settings.resize_policy)
    if settings.bit_depth == 8:
        img = imaging.to_bit_depth(img, 8)
    data = imaging.encode_image(img, settings.image_format)
    mask_bytes = None
    if mask_path is not None:
        mask = imaging.load_mask(mask_path)
        if not _aligned(mask.shape, source_shape):
            raise imaging.ImageDecodeError(
                mask_path,
                f"mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
                f"{source_shape[0]}x{source_shape[1]} (height x width): the aspect ratios "
                "differ, so the resized mask would not line up with the image",
            )
        mask = imaging.resize(
            mask, settings.image_size, settings.resize_policy, interpolation="nearest"
        )
        mask_bytes = imaging.encode_image(mask, "png")
    return data, int(img.shape[0]), int(img.shape[1]), mask_bytes


#: Largest relative difference of the two axes' scale factors for a mask to count as aligned.
MASK_ASPECT_TOLERANCE = 0.01


def _aligned(mask_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> bool:
    """Whether a mask lines up with its image once both are resized (same or scaled geometry).

    Masks at another resolution (JSRT/SCR-style half-size masks) are fine as long as both axes
    scale by the same factor; a transposed or cropped mask is not.
    """
    scale_y = image_shape[0] / mask_shape[0]
    scale_x = image_shape[1] / mask_shape[1]
    return abs(scale_y - scale_x) <= MASK_ASPECT_TOLERANCE * max(scale_y, scale_x)


def _encode_task(
    task: list[tuple[int, str, str | None, str, str | None]], settings: EncodeSettings
) -> list[Encoded]:
    """Worker entry point: encode a chunk of ``(row, image abs, mask abs, image rel, mask rel)``."""
    out = []
    for row, image_abs, mask_abs, image_rel, mask_rel in task:
        try:
            image, height, width, mask = encode_file(
                Path(image_abs), Path(mask_abs) if mask_abs else None, settings
            )
            out.append(Encoded(row, image, height, width, mask))
        except imaging.ImageDecodeError as exc:
            # Name the file by its dataset-relative path so rejects are machine-independent.
            what = "mask" if exc.path == mask_abs else "image"
            rel = mask_rel if what == "mask" else image_rel
            out.append(Encoded(row, error=f"{what} {rel}: {exc.problem}"))
        except Exception as exc:  # any other failure is still one bad row, not a dead run
            out.append(Encoded(row, error=f"image {image_rel}: {type(exc).__name__}: {exc}"))
    return out


class WorkerPool:
    """Decoding processes that survive one of them dying.

    ``multiprocessing.Pool`` silently replaces a worker killed by a signal (a segfault in a C
    decoder on a malformed file, the kernel's OOM killer) and never completes the task it held,
    so the job would wait forever. ``concurrent.futures`` reports it instead
    (``BrokenProcessPool``); :func:`ordered_parallel_map` then restarts the pool and hands the
    lost items to a recovery function.
    """

    def __init__(self, workers: int, ctx: Any | None = None) -> None:
        self.workers = workers
        self.ctx = ctx or multiprocessing.get_context()
        self.executor = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self.ctx, initializer=_exit_with_parent
        )

    def submit(self, fn: Callable[[T], R], item: T) -> Future:
        return self.executor.submit(fn, item)

    def restart(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.executor = self._new()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """Worker initializer: end this worker when the process that started it is gone.

    ``concurrent.futures`` workers block on their task queue and would outlive a parent killed
    by SIGKILL (a hard kill of the job) forever, holding its log pipes open.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def ordered_parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    pool: WorkerPool | None,
    window: int,
    *,
    recover: Callable[[T], R] | None = None,
) -> Iterator[R]:
    """``map(fn, items)`` over a process pool, in order, with at most ``window`` tasks in flight.

    ``Pool.imap`` would also keep order, but its feeder thread submits every task at once and
    finished results pile up without bound when the consumer is slower than the workers; the
    window here keeps memory proportional to ``window`` chunks whatever the corpus size.

    When a worker process dies, every item whose result was lost with the pool goes, in order,
    to ``recover(item)`` (which must produce the same result ``fn`` would, or a per-item error),
    and the map carries on with a fresh pool. Without ``recover`` the ``BrokenProcessPool``
    propagates.
    """
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque[tuple[T, Future]] = deque()
    source = iter(items)
    exhausted = False
    while True:
        while not exhausted and len(pending) < window:
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                break
            pending.append((item, pool.submit(fn, item)))
        if not pending:
            return
        item, future = pending.popleft()
        try:
            result = future.result()
        except BrokenProcessPool:
            if recover is None:
                raise
            lost = [(item, future), *pending]
            pending.clear()
            logger.warning(
                "a worker process died; re-running %d in-flight tasks one at a time", len(lost)
            )
            pool.restart()
            for lost_item, lost_future in lost:
                if lost_future.done() and lost_future.exception() is None:
                    yield lost_future.result()  # finished before the pool broke
                else:
                    yield recover(lost_item)
            continue
        yield result


def _child_main(fn: Callable[[T], R], item: T, conn: Any) -> None:
    conn.send(fn(item))
    conn.close()


def run_in_child(fn: Callable[[T], R], item: T, ctx: Any | None = None) -> tuple[R | None, str]:
    """Run ``fn(item)`` in a process of its own: ``(result, "")``, or ``(None, how it died)``."""
    ctx = ctx or multiprocessing.get_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(fn, item, send), daemon=True)
    proc.start()
    send.close()
    try:
        result = receive.recv()  # before join: a large result would block the child's send
    except EOFError:
        result = None
    finally:
        receive.close()
        proc.join()
    if result is not None:
        return result, ""
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            how = f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    return None, how


def _encode_isolated(
    task: list[tuple[int, str, str | None, str, str | None]],
    settings: EncodeSettings,
    ctx: Any | None = None,
) -> list[Encoded]:
    """Recovery for :func:`_encode_task` after a worker died: each row in a process of its own,
    so the row that kills its process becomes a reject and every other row is encoded as usual."""
    out = []
    for entry in task:
        result, how = run_in_child(partial(_encode_task, settings=settings), [entry], ctx)
        if result is not None:
            out.extend(result)
            continue
        row, _, _, image_rel, mask_rel = entry
        also = f" (with mask {mask_rel})" if mask_rel else ""
        out.append(Encoded(row, error=f"image {image_rel}{also}: decoding process died ({how})"))
    return out


def _gather(sources: Sequence[ShardSource]) -> _Corpus:
    """Concatenate the sources and reject rows that cannot enter any shard."""
    if not sources:
        raise ValueError("write_shards needs at least one source")
    tables, roots, source_of, source_row = [], [], [], []
    for index, source in enumerate(sources):
        try:
            table = conform(source.table, REPORTS_SCHEMA)
        except ValueError as exc:
            raise ValueError(f"source {source.dataset!r}: {exc}") from exc
        tables.append(table)
        roots.append(Path(source.raw_root))
        source_of.append(np.full(table.num_rows, index, dtype=np.int64))
        source_row.append(np.arange(table.num_rows, dtype=np.int64))
    corpus = _Corpus(
        table=pa.concat_tables(tables).combine_chunks(),
        roots=roots,
        source_of=np.concatenate(source_of),
        source_row=np.concatenate(source_row),
    )
    image_ids = corpus.table.column("image_id").to_pylist()
    splits = corpus.table.column("split").to_pylist()
    missing = _missing_required(corpus.table)
    first_seen: dict[str, int] = {}
    keep = np.ones(len(image_ids), dtype=bool)
    for row, (image_id, split) in enumerate(zip(image_ids, splits, strict=True)):
        reason = None
        if row in missing:
            # Checked first: a null image_id is no key for duplicates, and a null value in a
            # non-nullable column would otherwise fail the whole Parquet write.
            reason = f"missing value in required column {missing[row]!r}"
        elif image_id in first_seen:
            other = first_seen[image_id]
            reason = (
                f"duplicate image_id (first seen in {sources[corpus.source_of[other]].dataset} "
                f"row {corpus.source_row[other]})"
            )
        elif split not in SPLITS:
            reason = f"unknown split {split!r}; expected one of {SPLITS}"
        if row not in missing:
            first_seen.setdefault(image_id, row)
        if reason is not None:
            keep[row] = False
            corpus.rejects.append(_reject(corpus, sources, row, reason))
    split_col = np.asarray(splits, dtype=object)
    for split in SPLITS:
        rows = np.flatnonzero(keep & (split_col == split))
        if rows.size == 0:
            continue
        # Sort by image_id first so the permutation does not depend on source or row order.
        ids = pa.array([image_ids[r] for r in rows], pa.string())
        corpus.usable[split] = rows[np.asarray(pc.sort_indices(ids))]
    corpus.image_paths = corpus.table.column("image_path").to_pylist()
    corpus.mask_paths = corpus.table.column("mask_path").to_pylist()
    return corpus


def _missing_required(table: pa.Table) -> dict[int, str]:
    """Row -> first column (schema order) that is null but may not be, for the rows that have one.

    ``conform`` casts columns but does not check nullability, so report tables can carry nulls
    in columns the shard schema declares non-nullable.
    """
    missing: dict[int, str] = {}
    for schema_field in REPORTS_SCHEMA:
        if schema_field.nullable:
            continue
        column = table.column(schema_field.name)
        if column.null_count == 0:
            continue
        for row in np.flatnonzero(np.asarray(column.is_null())):
            missing.setdefault(int(row), schema_field.name)
    return missing


def _reject(corpus: _Corpus, sources: Sequence[ShardSource], row: int, reason: str) -> dict:
    record = corpus.table.slice(row, 1).to_pylist()[0]
    return reject_row(
        dataset=sources[corpus.source_of[row]].dataset,
        stage=STAGE,
        source_file=str(record.get("image_path") or ""),
        source_row=int(corpus.source_row[row]),
        image_id=record.get("image_id"),
        reason=reason,
        row=record,
    )


def _permute(corpus: _Corpus, seed: int) -> dict[str, np.ndarray]:
    """Seeded permutation of each split's rows (one independent stream per split)."""
    order = {}
    for split_index, split in enumerate(SPLITS):
        rows = corpus.usable.get(split)
        if rows is None:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_index]))
        order[split] = rows[rng.permutation(rows.size)]
    return order


def _task_for(corpus: _Corpus, row: int) -> tuple[int, str, str | None, str, str | None]:
    root = corpus.roots[int(corpus.source_of[row])]
    image_rel = corpus.image_paths[row]
    mask_rel = corpus.mask_paths[row]
    mask_abs = str(root / mask_rel) if mask_rel else None
    return row, str(root / image_rel), mask_abs, image_rel, mask_rel


def _chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, rows.size, size):
        yield rows[start : start + size]


def _metadata_bytes(table: pa.Table, rows: np.ndarray) -> float:
    """Uncompressed Arrow size per row of the report columns (a deliberate overestimate)."""
    if rows.size == 0:
        return 0.0
    return table.take(pa.array(rows)).nbytes / rows.size


def _plan_rows_per_shard(
    est_bytes_per_row: float, target_shard_mb: float, row_group_size: int
) -> int:
    rows = max(1, math.floor(target_shard_mb * 1_000_000 / max(est_bytes_per_row, 1.0)))
    if rows >= row_group_size:
        # Whole row groups per shard: no tiny trailing group in every file.
        rows = (rows // row_group_size) * row_group_size
    return rows


def _code_version() -> str:
    """Hash of this module's source and every ``cxrfoundry`` module it imports (decoding included).

    The rule's ``code`` param makes Snakemake rerun the job when these change; the fingerprint
    must change too, or the rerun would reuse shards the old code left in ``work_dir``.
    """
    from cxrfoundry.provenance import code_hash

    try:
        return code_hash(__name__)
    except (OSError, ValueError) as exc:  # no sources installed: fall back to FORMAT_VERSION
        logger.warning("cannot hash the shard code (%s); work shards are keyed without it", exc)
        return ""


def _file_stamp(path: Path) -> list[int] | None:
    """(size, mtime in ns) of ``path``, or ``None`` when it cannot be stat'ed (a reject)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def _fingerprint(shard: _Shard, corpus: _Corpus, params: dict[str, Any], code: str = "") -> str:
    """Hash of everything that determines a shard's bytes: code version, settings, its rows,
    and the size and modification time of each row's image and mask file.

    The file stamps make a rerun rebuild a shard whose images were replaced under the same
    names (a re-download, a fixed file) instead of reusing the work shard of the old pixels;
    a stat per file costs far less than hashing the images.
    """
    digest = hashlib.sha256()
    digest.update(
        cio.dumps_json({"format": FORMAT_VERSION, "code": code, "params": params}).encode()
    )
    digest.update(shard.name.encode())
    rows = corpus.table.take(pa.array(shard.rows)).to_pylist()
    for row_id, record in zip(shard.rows, rows, strict=True):
        root = corpus.roots[int(corpus.source_of[row_id])]
        mask_rel = corpus.mask_paths[row_id]
        stamps = [
            _file_stamp(root / corpus.image_paths[row_id]),
            _file_stamp(root / mask_rel) if mask_rel else None,
        ]
        line = json.dumps([str(root), record, stamps], sort_keys=True, default=str)
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _done_path(work_dir: Path, shard: _Shard) -> Path:
    return work_dir / f"{shard.stem}.done.json"


def _rejects_path(work_dir: Path, shard: _Shard) -> Path:
    return work_dir / f"{shard.stem}.rejects.parquet"


def _reusable(work_dir: Path, shard: _Shard) -> dict[str, Any] | None:
    """The shard's done-record if the finished files in ``work_dir`` can be trusted."""
    done = _done_path(work_dir, shard)
    if not done.is_file():
        return None
    try:
        record = cio.read_json(done)
    except ValueError:
        return None
    if record.get("fingerprint") != shard.fingerprint:
        return None
    for path, key in (
        (work_dir / shard.name, "sha256"),
        (_rejects_path(work_dir, shard), "rejects_sha256"),
    ):
        if not path.is_file() or cio.sha256_file(path) != record.get(key):
            logger.warning("%s: content does not match its recorded sha256; rebuilding", path)
            return None
    return record


def _writer_options() -> dict[str, Any]:
    other = [f.name for f in SHARD_SCHEMA if f.name not in BINARY_COLUMNS]
    compression = {name: "zstd" for name in other}
    compression.update({name: "none" for name in BINARY_COLUMNS})
    return {
        "compression": compression,
        "use_dictionary": other,
        "write_statistics": other,
        "store_schema": True,
    }


class _ShardWriter:
    """Writes one shard (and its rejects) into ``work_dir`` atomically, a row group at a time."""

    def __init__(
        self,
        shard: _Shard,
        corpus: _Corpus,
        sources: Sequence[ShardSource],
        work_dir: Path,
        row_group_size: int,
        on_row_group: Callable[[], None],
    ) -> None:
        self.shard, self.corpus, self.sources = shard, corpus, sources
        self.work_dir, self.row_group_size = work_dir, row_group_size
        self.on_row_group = on_row_group
        self.stack = contextlib.ExitStack()
        tmp = self.stack.enter_context(cio.atomic_path(work_dir / shard.name))
        self.writer = pq.ParquetWriter(tmp, SHARD_SCHEMA, **_writer_options())
        self.buffer: list[Encoded] = []
        self.rejects: list[dict[str, Any]] = []
        self.seen = 0
        self.written = 0

    def add(self, results: Iterable[Encoded]) -> None:
        for result in results:
            self.seen += 1
            if result.error is not None:
                self.rejects.append(
                    _reject(self.corpus, self.sources, result.row, f"decode failed: {result.error}")
                )
                continue
            self.buffer.append(result)
            if len(self.buffer) >= self.row_group_size:
                self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        rows = pa.array([r.row for r in self.buffer], pa.int64())
        meta = self.corpus.table.take(rows)
        columns = {name: meta.column(name) for name in meta.column_names}
        columns["image"] = pa.array([r.image for r in self.buffer], pa.binary())
        columns["height"] = pa.array([r.height for r in self.buffer], pa.int32())
        columns["width"] = pa.array([r.width for r in self.buffer], pa.int32())
        columns["mask"] = pa.array([r.mask for r in self.buffer], pa.binary())
        table = pa.Table.from_pydict(columns, schema=SHARD_SCHEMA)
        self.writer.write_table(table, row_group_size=self.row_group_size)
        self.written += len(self.buffer)
        self.buffer = []
        self.on_row_group()

    def finish(self) -> dict[str, Any]:
        """Close the shard, publish it in ``work_dir`` and write its done-record (last)."""
        if self.seen != self.shard.rows.size:
            raise RuntimeError(f"{self.shard.name}: got {self.seen} of {self.shard.rows.size} rows")
        self._flush()
        self.writer.close()
        self.stack.close()  # fsync + rename the shard into place
        rejects_path = _rejects_path(self.work_dir, self.shard)
        cio.write_parquet(rejects_path, conform(self.rejects, REJECTS_SCHEMA))
        path = self.work_dir / self.shard.name
        record = {
            "fingerprint": self.shard.fingerprint,
            "file": self.shard.name,
            "split": self.shard.split,
            "rows_in": int(self.shard.rows.size),
            "rows": self.written,
            "rejected": len(self.rejects),
            "bytes": path.stat().st_size,
            "sha256": cio.sha256_file(path),
            "rejects_sha256": cio.sha256_file(rejects_path),
        }
        # Written last: its presence is what marks the shard as finished.
        cio.write_json(_done_path(self.work_dir, self.shard), record)
        return record

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        self.stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def _fault_hook() -> Callable[[], None]:
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return lambda: None
    state = {"left": int(limit)}

    def hook() -> None:
        state["left"] -= 1
        if state["left"] <= 0:
            logger.warning("%s reached: killing this process to simulate a crash", FAULT_ENV)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _publish_file(src: Path, dst: Path) -> None:
    """Hard-link (no copy, same inode: work files are never modified in place) or copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_shards(
    sources: Sequence[ShardSource],
    out_dir: Path,
    *,
    corpus: str,
    image_size: int,
    resize_policy: str = "pad",
    equalize: bool = False,
    bit_depth: int = 8,
    image_format: str = "png",
    target_shard_mb: float,
    row_group_size: int,
    seed: int,
    workers: int,
    work_dir: Path | None = None,
    chunk_size: int = 8,
) -> dict[str, Any]:
    """Write ``sources`` into Parquet shards under ``out_dir``; return the ``index.json`` content.

    Args:
        sources: one :class:`ShardSource` per dataset (rows with ``REPORTS_SCHEMA`` columns;
            ``image_path``/``mask_path`` relative to ``raw_root``).
        out_dir: the published folder: ``{split}-{NNNNN}.parquet``, ``index.json``,
            ``rejects.parquet``. Replaced atomically as a whole.
        corpus: corpus name recorded in the index.
        image_size, resize_policy, equalize: output geometry (``pad``/``crop``/``stretch``) and
            optional histogram equalisation (see :mod:`cxrfoundry.data.imaging`).
        bit_depth: 8 stores every image as 8-bit; 16 keeps 16-bit sources at 16 bits (8-bit
            sources stay 8-bit).
        image_format: ``png`` or ``jpeg`` (8-bit only).
        target_shard_mb: target shard size; rows per shard are planned from an estimate.
        row_group_size: rows per Parquet row group.
        seed: seeds the per-split permutation.
        workers: decoding processes. Even one is a process apart, so a decoder that crashes
            (or the OOM killer) costs a reject, not the job; ``0`` decodes in this process
            instead (profiling, debugging), where such a crash takes the job down. Does not
            change output.
        work_dir: scratch folder for finished shards (reused on rerun); defaults to
            ``out_dir.parent / ".work" / out_dir.name``.
        chunk_size: rows per task sent to a worker.

    Raises:
        ValueError: invalid settings or a source missing a required column.
    """
    settings = EncodeSettings(image_size, resize_policy, equalize, bit_depth, image_format)
    settings.validate()
    if target_shard_mb <= 0:
        raise ValueError(f"target_shard_mb must be positive, got {target_shard_mb}")
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be positive, got {row_group_size}")
    workers = int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 decodes in this process), got {workers}")
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir.parent / ".work" / out_dir.name
    work_dir.mkdir(parents=True, exist_ok=True)

    data = _gather(sources)
    order = _permute(data, seed)
    plan_order = np.concatenate([order[s] for s in SPLITS if s in order] or [np.empty(0, int)])
    rows_in = data.table.num_rows

    pool = WorkerPool(workers) if workers else None
    encode = partial(_encode_task, settings=settings)
    recover = partial(_encode_isolated, settings=settings, ctx=pool.ctx if pool else None)
    window = 4 * max(1, workers)
    try:
        # 1. Estimate bytes per row from the first rows of the permutation (deterministic).
        head = plan_order[:ESTIMATE_ROWS]
        cache: dict[int, Encoded] = {}
        head_tasks = ([_task_for(data, int(r)) for r in c] for c in _chunks(head, 2))
        for results in ordered_parallel_map(encode, head_tasks, pool, window, recover=recover):
            cache.update({r.row: r for r in results})
        sizes = [len(r.image) + len(r.mask or b"") for r in cache.values() if r.error is None]
        bytes_per_pixel = 2 if bit_depth == 16 else 1
        image_est = float(np.mean(sizes)) if sizes else float(image_size**2 * bytes_per_pixel)
        est = image_est + _metadata_bytes(data.table, head)
        rows_per_shard = _plan_rows_per_shard(est, target_shard_mb, row_group_size)
        params = {
            **asdict(settings),
            "target_shard_mb": target_shard_mb,
            "row_group_size": row_group_size,
            "seed": seed,
            "rows_per_shard": rows_per_shard,
            "bytes_per_row_estimate": round(est, 3),
        }

        # 2. The shard plan: fixed row ranges of each split's permutation.
        shards = [
            _Shard(split, number, rows)
            for split in SPLITS
            if split in order
            for number, rows in enumerate(_chunks(order[split], rows_per_shard))
        ]
        code = _code_version()
        for shard in shards:
            shard.fingerprint = _fingerprint(shard, data, params, code)
        done: dict[str, dict[str, Any]] = {}
        for shard in shards:
            record = _reusable(work_dir, shard)
            if record is not None:
                done[shard.name] = record
        todo = [s for s in shards if s.name not in done]
        logger.info(
            "corpus %s: %d rows in, %d shards of %d rows (%.0f B/row est.), %d reused, %d to build",
            corpus, rows_in, len(shards), rows_per_shard, est, len(done), len(todo),
        )  # fmt: skip

        # 3. Build missing shards: ordered chunks through the pool, one writer open at a time.
        def tasks() -> Iterator[list[tuple[int, str, str | None, str, str | None]]]:
            for shard in todo:
                for chunk in _chunks(shard.rows, chunk_size):
                    yield [_task_for(data, int(r)) for r in chunk if int(r) not in cache]

        chunk_shard = [(s, c) for s in todo for c in _chunks(s.rows, chunk_size)]
        on_row_group = _fault_hook()
        writer: _ShardWriter | None = None
        progress = tqdm(
            total=sum(s.rows.size for s in todo), desc=f"shards {corpus}", unit="img",
            mininterval=2.0,
        )  # fmt: skip
        try:
            results_iter = ordered_parallel_map(encode, tasks(), pool, window, recover=recover)
            for (shard, chunk), results in zip(chunk_shard, results_iter, strict=True):
                if writer is None or writer.shard is not shard:
                    writer = _ShardWriter(
                        shard, data, sources, work_dir, row_group_size, on_row_group
                    )
                by_row = {r.row: r for r in results}
                writer.add(by_row.get(int(r)) or cache.pop(int(r)) for r in chunk)
                progress.update(chunk.size)
                if writer.seen == shard.rows.size:
                    done[shard.name] = writer.finish()
                    writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            progress.close()
    finally:
        if pool is not None:
            pool.close()

    # 4. Publish: shards + rejects + index into out_dir, atomically as one folder.
    rejects = list(data.rejects)
    for shard in shards:
        rejects.extend(pq.read_table(_rejects_path(work_dir, shard)).to_pylist())
    index = _index(corpus, params, sources, data, shards, done, rows_in, len(rejects))
    # A run killed while publishing left its half-filled folder (hard links to work shards).
    cio.remove_stale_temps(out_dir)
    with cio.atomic_dir(out_dir) as tmp:
        for shard in shards:
            _publish_file(work_dir / shard.name, tmp / shard.name)
        cio.write_parquet(tmp / REJECTS_NAME, conform(rejects, REJECTS_SCHEMA))
        cio.write_json(tmp / INDEX_NAME, index)
    _clean_work_dir(work_dir, shards)
    logger.info(
        "corpus %s: wrote %d rows in %d shards to %s (%d rejected)",
        corpus, index["counts"]["rows_written"], len(shards), out_dir,
        index["counts"]["rows_rejected"],
    )  # fmt: skip
    return index


def _index(
    corpus: str,
    params: dict[str, Any],
    sources: Sequence[ShardSource],
    data: _Corpus,
    shards: list[_Shard],
    done: dict[str, dict[str, Any]],
    rows_in: int,
    rows_rejected: int,
) -> dict[str, Any]:
    entries = []
    splits: dict[str, dict[str, int]] = {}
    for shard in shards:
        record = done[shard.name]
        entries.append({k: record[k] for k in ("file", "split", "rows", "bytes", "sha256")})
        total = splits.setdefault(shard.split, {"shards": 0, "rows": 0, "bytes": 0})
        total["shards"] += 1
        total["rows"] += record["rows"]
        total["bytes"] += record["bytes"]
    rows_written = sum(e["rows"] for e in entries)
    if rows_in != rows_written + rows_rejected:
        raise AssertionError(
            f"corpus {corpus}: rows_in {rows_in} != rows_written {rows_written} "
            f"+ rows_rejected {rows_rejected}"
        )
    return {
        "corpus": corpus,
        "format_version": FORMAT_VERSION,
        "params": params,
        "sources": [
            {"dataset": s.dataset, "rows": int((data.source_of == i).sum())}
            for i, s in enumerate(sources)
        ],
        "datasets": [s.dataset for s in sources],
        "shards": entries,
        "splits": splits,
        "counts": {
            "rows_in": rows_in,
            "rows_written": rows_written,
            "rows_rejected": rows_rejected,
        },
        "rejects": REJECTS_NAME,
    }


def _clean_work_dir(work_dir: Path, shards: list[_Shard]) -> None:
    """Remove leftovers of older plans (other params, other row counts) from ``work_dir``."""
    keep = set()
    for shard in shards:
        keep |= {shard.name, _done_path(work_dir, shard).name, _rejects_path(work_dir, shard).name}
    for path in work_dir.iterdir():
        if path.is_file() and path.name not in keep and path.name.split("-")[0] in SPLITS:
            path.unlink()
        elif path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink()  # partial files of a killed run


#: Keys of the config ``shards`` section that :func:`shard_corpus` passes to :func:`write_shards`.
SETTINGS_KEYS: frozenset[str] = frozenset(
    {
        "image_size",
        "resize_policy",
        "equalize",
        "bit_depth",
        "image_format",
        "target_shard_mb",
        "row_group_size",
        "workers",
        "chunk_size",
    }
)


def shard_corpus(
    *,
    corpus: str,
    datasets: Sequence[str],
    report_paths: Sequence[Path],
    raw_roots: Sequence[Path],
    out_dir: Path,
    settings: Mapping[str, Any],
    seed: int,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Shard a corpus from its datasets' report Parquet files (the ``shard`` rule's entry point).

    ``datasets``, ``report_paths`` and ``raw_roots`` are aligned lists; ``settings`` is the
    config ``shards`` section (keys :data:`SETTINGS_KEYS`; ``workers`` usually set from the
    rule's threads). Returns the ``index.json`` content (see :func:`write_shards`).
    """
    unknown = set(settings) - SETTINGS_KEYS
    if unknown:
        raise ValueError(f"shards settings: unknown keys {sorted(unknown)}")
    if not len(datasets) == len(report_paths) == len(raw_roots):
        raise ValueError(
            f"corpus {corpus}: {len(datasets)} datasets, {len(report_paths)} report files and "
            f"{len(raw_roots)} raw roots must align"
        )
    sources = []
    for dataset, path, root in zip(datasets, report_paths, raw_roots, strict=True):
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ValueError(f"{path}: cannot read reports of {dataset} ({exc})") from exc
        sources.append(ShardSource(dataset, table, Path(root)))
    options = dict(settings)
    options.setdefault("workers", 1)
    return write_shards(
        sources, Path(out_dir), corpus=corpus, seed=seed, work_dir=work_dir, **options
    )


def read_index(out_dir: Path) -> dict[str, Any]:
    """Read a shard folder's ``index.json`` (error names the file if missing or invalid)."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard index not found")
    return cio.read_json(path)
