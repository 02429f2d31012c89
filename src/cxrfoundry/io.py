"""Atomic, deterministic file writes and hashing.

Every file a stage produces goes through here: it is written to a temporary name in the same
folder, flushed and fsynced, then renamed, so a killed job never leaves a file that looks
finished. JSON is written with sorted keys so reruns are byte-identical.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

PathLike = str | os.PathLike[str]


def _umask_mode(mode: int = 0o666) -> int:
    # mkstemp creates 0600 files; published outputs get the usual umask-derived mode so that
    # collaborators on a shared cluster can read them.
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for writers that want a filename; rename on exit."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on clean exit fsync and rename it to ``path``."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on clean exit replace ``path`` with it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(path: PathLike, suffixes: Sequence[str] = ("tmp",)) -> list[Path]:
    """Remove what killed atomic writes of ``path`` left beside it; returns what was removed.

    Only the exact names :func:`atomic_path` / :func:`atomic_dir` (``tempfile``) make for this
    name are touched: ``.{name}.XXXXXXXX.{suffix}``. A looser pattern such as ``.ds.*.tmp`` would
    also take ``.ds.v2.XXXXXXXX.tmp``, another output's write in progress. Call it only where no
    other process may be writing ``path`` at the same time (a Snakemake job's own output).
    """
    target = Path(path)
    if not target.parent.is_dir():
        return []
    ours = re.compile(
        rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.(?:{'|'.join(map(re.escape, suffixes))})"
    )
    removed = []
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if not ours.fullmatch(stale.name):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        removed.append(stale)
    return removed


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Serialise ``obj`` deterministically (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as deterministic JSON to ``path`` atomically."""
    write_text(path, dumps_json(obj))


def read_json(path: PathLike) -> Any:
    """Read a JSON file, naming the file in the error if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def write_parquet(
    path: PathLike, table: pa.Table, *, row_group_size: int | None = None, compression: str = "zstd"
) -> None:
    """Write ``table`` to ``path`` atomically with settings that make reruns byte-identical."""
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=row_group_size,
            compression=compression,
            write_statistics=True,
            store_schema=True,
        )


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


#: Files Snakemake adds to ``directory()`` outputs after the job ended (an mtime marker). They are
#: not content: a job hashing its own output folder never sees them, its consumers would.
SNAKEMAKE_MARKERS = frozenset({".snakemake_timestamp"})


def tree_files(root: PathLike) -> list[Path]:
    """The files of a folder, recursively and sorted, without Snakemake's marker files."""
    return sorted(
        p for p in Path(root).rglob("*") if p.is_file() and p.name not in SNAKEMAKE_MARKERS
    )


def walk_files(root: PathLike, suffixes: Iterable[str] | None = None) -> list[Path]:
    """Files under ``root`` (names ending in ``suffixes``, case-insensitive, when given).

    Symlinked folders are followed (a raw folder whose image folders are linked in from
    elsewhere is the common case); a folder reached twice through links is visited once, so
    link cycles cannot loop. Folders and files are taken in sorted order, so the result is the
    same on every run; paths keep their linked (not resolved) form below ``root``. Dangling
    links, sockets and FIFOs are left out.
    """
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            if wanted is not None and not name.lower().endswith(wanted):
                continue
            path = Path(dirpath, name)
            if path.is_file():
                found.append(path)
    return found


def sha256_tree(path: PathLike) -> str:
    """Hash of a file, or of a folder as the sorted (relative path, file hash) pairs inside it."""
    root = Path(path)
    if root.is_file():
        return sha256_file(root)
    digest = hashlib.sha256()
    for file in tree_files(root):
        digest.update(f"{file.relative_to(root).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()
