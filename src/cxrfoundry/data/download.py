"""Acquire stage: materialise one dataset's raw files and record what was fetched.

:func:`download` turns a ``source`` mapping from the dataset registry into a folder
``resources/raw/{dataset}/`` and a manifest ``resources/raw/{dataset}.manifest.json``::

    {"dataset": ..., "source": <the source, secrets redacted>,
     "files": [{"path": "a/b.png", "size": 123, "sha256": "..."}, ...],   # sorted by path
     "n_files": ..., "total_bytes": ...}

Source types (``source["type"]``):

``phantom``
    The built-in demo data: ``cxrfoundry.data.demo_sources.write_demo_source(kind, root, cfg,
    seed=seed)`` with keys ``kind``, ``seed`` (default 0) and ``phantom`` (generator config).

``local``
    ``path`` names an existing folder or file. A folder is either linked (``mode: link``, the
    default: the raw folder becomes a symlink to the resolved absolute source folder, so nothing
    is copied and every later stage sees the native layout under the usual path) or copied
    (``mode: copy``). Linking records the files' sizes and hashes as they are now; if the
    source folder changes later the manifest no longer matches it, and the next call notices
    and rewrites it. A file is extracted when ``extract: true`` (into ``extract_to``), else
    copied (or, for ``link``, symlinked inside a real raw folder). ``sha256`` (files only) is
    verified when given.

``http`` / ``https``
    ``files``: a list of URLs or mappings ``{url, sha256, path, extract, extract_to}``
    (``path``: where the file lands under the raw folder, default the URL's basename;
    ``extract``: unpack the archive into ``extract_to``, default the raw folder's root, instead
    of keeping it). ``base_url`` (optional) resolves relative URLs. ``sha256sums`` names a
    ``sha256sum``-format file (PhysioNet's ``SHA256SUMS.txt``, relative to ``base_url``) that
    supplies missing checksums; without ``files``, every entry of it matching ``include``
    (glob list, default all) is fetched. ``workers`` (default 1) downloads files in parallel.

    Transfers stream into a persistent cache beside the raw folder
    (``resources/raw/.{dataset}.cache/``: ``partial/<path>.part``, ``files/<path>``, ``meta/``)
    and resume with HTTP ``Range`` (guarded by ``If-Range`` with a strong ETag or Last-Modified),
    restarting when a server answers 200 instead of 206. With no validator and no ``sha256`` a
    part is fetched again whole, as nothing could catch a splice of two versions. Connection
    errors, timeouts, 408/425/429/5xx are retried with exponential backoff and jitter,
    honouring ``Retry-After``; 4xx errors and a TLS certificate
    that fails verification fail at once. A file leaves ``partial/`` only once complete and its
    sha256 matches, and is not fetched again while it still matches. Plain files are hard-linked
    from the cache into the raw folder (no extra disk), archives are extracted from it;
    ``keep_cache: false`` removes the cache after success. Type ``https`` refuses plain-http
    URLs. Tuning keys: ``retries`` (5), ``backoff`` (1.0 s), ``backoff_max`` (60 s), ``timeout``
    (60 s, connect and between bytes), ``retry_after_max`` (300 s).

    Credentials: ``auth: {username_env, password_env}`` (HTTP Basic, e.g. PhysioNet) or
    ``auth: {token_env}`` (Bearer) name environment variables; otherwise the netrc file
    (``$NETRC`` or ``~/.netrc``) is consulted for the host (``auth: {netrc: false}`` turns that
    off). Credentials sent over plain http to a host other than this machine are logged as a
    warning (host only). Secrets written into ``auth`` itself are refused, and so is a token
    with whitespace or control characters (a trailing newline); user-info in a URL is honoured
    but discouraged.
    Credentials never follow a redirect to another origin (scheme, host or port): there only
    that host's own netrc entry is used, and only when no ``*_env`` credentials are configured
    and netrc is on. Type ``https`` refuses a redirect to plain http. Secrets never reach logs,
    exceptions, the manifest or the returned dict: URLs are shown with user-info and
    secret-looking query values replaced by ``***``, and while a download runs a logging filter
    scrubs known secret values from ``urllib3``/``requests`` records, including those of
    redirect targets (a pre-signed URL is a credential too).

Archives (zip, tar, tar.gz/tgz, tar.bz2, tar.xz) are extracted only after every member has
been checked: absolute names, ``..`` components, device/FIFO members, links that leave the
extraction folder, members that lie inside a link, hard links through a symbolic link, and a
link sharing its name with another member are refused with an error naming the archive and the
member. Links are resolved component by component through the archive's other links and any
already on disk (chains count, whatever their order), without ``realpath``; an archive unpacked
into a folder that already has content is followed by a check that every link there still stays
inside. Tar extraction additionally uses ``filter="data"``, which alone is not enough on Python
< 3.11.13 (CVE-2025-4517). An archive whose files would expand past the free disk space under
the extraction folder, or past ``source.max_extract_gb`` (per archive, optional), is refused
before anything is written (a zip bomb): the sizes the archive declares bound what extraction
writes.

Atomicity: the old manifest is deleted first, the raw folder is built in a hidden temporary
sibling and renamed into place, and the manifest is written last (atomically). A failed run
therefore never leaves a manifest, and never a raw folder in a half-built state. Calling
:func:`download` again with the same source when the folder still matches its manifest
returns the existing manifest without fetching anything.
"""

from __future__ import annotations

import contextlib
import copy
import email.utils
import errno
import fnmatch
import json
import logging
import netrc
import os
import random
import re
import shutil
import ssl
import stat
import tarfile
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urljoin, urlsplit, urlunsplit

from tqdm.auto import tqdm

from cxrfoundry.io import (
    dumps_json,
    read_json,
    remove_stale_temps,
    sha256_file,
    walk_files,
    write_json,
)
from cxrfoundry.net import is_loopback

logger = logging.getLogger(__name__)

__all__ = [
    "DownloadError",
    "download",
    "extract_archive",
    "redact_source",
    "redact_url",
    "scan_tree",
]

#: Replaced ``time.sleep`` so tests can observe backoff delays without waiting.
_sleep = time.sleep

_SECRET_KEY = re.compile(
    r"(?i)^(password|passwd|pwd|token|access_token|refresh_token|id_token|secret|client_secret|"
    r"api_?key|apikey|key|access_?key|secret_?key|auth|authorization|cookie|session|sig|"
    r"signature|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|credential|credentials)$"
)
_REDACTED = "***"
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_HTTP_FILE_KEYS = frozenset({"url", "sha256", "path", "extract", "extract_to"})
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A dataset could not be acquired; the message names the file/URL and never a secret."""


# --------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """Return ``url`` with user-info and secret-looking query parameter values replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{_REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, _REDACTED if _SECRET_KEY.match(k) else v) for k, v in pairs], safe="*/:"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _url_secrets(url: str) -> set[str]:
    """The secret substrings of ``url`` (password/user-info and secret query values)."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
    except ValueError:
        return found
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found.add(userinfo)
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_KEY.match(key) and value:
            found.add(value)
    raw_query = parts.query
    # The raw (percent-encoded) spelling may appear in logs too.
    for piece in raw_query.split("&"):
        key, _, value = piece.partition("=")
        if _SECRET_KEY.match(unquote(key)) and value:
            found.add(value)
    return {s for s in found if s}


def redact_source(source: Mapping[str, Any]) -> dict[str, Any]:
    """Deep copy of ``source`` that is safe to log and record: URLs and secret values redacted.

    Keys ending in ``_env`` hold environment variable *names* and are kept for provenance.
    """

    def walk(value: Any, key: str | None = None) -> Any:
        if isinstance(value, Mapping):
            return {str(k): walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v, key) for v in value]
        if key is not None and _SECRET_KEY.match(key) and not isinstance(value, bool | None):
            return _REDACTED
        if isinstance(value, str) and "://" in value:
            return redact_url(value)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value

    return walk(copy.deepcopy(dict(source)))


class _Scrubber(logging.Filter):
    """Replaces known secret strings in text and in log records passing through a logger."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()  # download workers add secrets while others log
        self._secrets: tuple[str, ...] = ()

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._secrets

    def add(self, *values: str | None) -> None:
        # Very short values would redact innocent text everywhere; a 1-2 char secret is no
        # secret anyway, so they are left out of scrubbing (never out of redaction of fields).
        # Also as Python's repr would print it (a value with a line break shows up escaped in
        # exception messages) and without surrounding whitespace.
        variants = {f for v in values if v for f in (v, v.strip(), repr(v)[1:-1])}
        with self._lock:
            merged = set(self._secrets) | {v for v in variants if len(v) >= 3}
            # Longest first, so a secret containing another is replaced whole.
            self._secrets = tuple(sorted(merged, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                message = record.getMessage()
            except Exception:  # a broken record is not ours to fix; let logging report it
                return True
            cleaned = self(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


#: Loggers of the HTTP stack that may print request lines (URLs with query strings).
_HTTP_LOGGERS = (
    "urllib3",
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.response",
    "urllib3.util.retry",
    "requests",
    __name__,
)


@contextlib.contextmanager
def _scrubbing(scrubber: _Scrubber) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _HTTP_LOGGERS]
    for lg in loggers:
        lg.addFilter(scrubber)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(scrubber)


# --------------------------------------------------------------------------------------------
# Paths, manifest, atomic folder replacement
# --------------------------------------------------------------------------------------------


def _safe_relpath(value: Any, what: str) -> PurePosixPath:
    """Validate a config-given destination path: relative, no ``..``, no drive letters."""
    text = str(value).replace("\\", "/")
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", text):
        raise DownloadError(f"{what}: {value!r} must be a relative path without '..'")
    return PurePosixPath(*[p for p in path.parts if p not in ("", ".")]) if path.parts else path


def scan_tree(root: Path, *, desc: str = "hashing") -> list[dict[str, Any]]:
    """List the files under ``root`` as ``{"path", "size", "sha256"}`` dicts sorted by path.

    Symlinks are followed (a linked raw folder is the common case); a directory reached twice
    through links is visited once, so cyclic links cannot loop.
    """
    root = Path(root)
    found = [(full.relative_to(root).as_posix(), full) for full in walk_files(root)]
    found.sort(key=lambda item: item[0])
    files = []
    for rel, full in tqdm(found, desc=desc, unit="file", mininterval=1.0):
        files.append({"path": rel, "size": full.stat().st_size, "sha256": sha256_file(full)})
    return files


def _build_manifest(dataset: str, source: dict[str, Any], root: Path) -> dict[str, Any]:
    files = scan_tree(root, desc=f"hashing {dataset}")
    return {
        "dataset": dataset,
        "source": source,
        "files": files,
        "n_files": len(files),
        "total_bytes": sum(f["size"] for f in files),
    }


def _replace(new: Path, dest: Path) -> None:
    """Put ``new`` (a folder or a symlink) at ``dest``, replacing whatever is there."""
    if dest.is_dir() and not dest.is_symlink():
        # Move the old folder aside first so the swap itself is one rename.
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        trash.rmdir()
        os.replace(dest, trash)
        os.replace(new, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        if new.is_dir() and not new.is_symlink() and (dest.is_symlink() or dest.exists()):
            # rename(2) cannot put a folder over a symlink or file; drop the old one first.
            dest.unlink()
        os.replace(new, dest)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _building(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``dest``, on failure it goes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_dir(target: Path, dest: Path) -> None:
    """Make ``dest`` a symlink to ``target`` atomically (create beside it, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".lnk", dir=dest.parent))
    tmp.rmdir()
    try:
        os.symlink(target, tmp, target_is_directory=True)
        _replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------


def _is_archive_name(name: str) -> bool:
    return name.lower().endswith(_ARCHIVE_SUFFIXES)


def _is_root_dir(name: str, is_dir: bool) -> bool:
    """A folder member naming the extraction folder itself (``./``, as ``tar -C dir -c .``)."""
    return is_dir and not _literal_parts(name.replace("\\", "/"))


def _check_member_name(archive: Path, name: str) -> PurePosixPath:
    text = name.replace("\\", "/")
    parts = PurePosixPath(text).parts
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise DownloadError(f"{archive}: refusing member {name!r}: absolute path")
    if ".." in parts:
        raise DownloadError(f"{archive}: refusing member {name!r}: '..' path component")
    clean = [p for p in parts if p not in ("", ".")]
    if not clean:
        raise DownloadError(f"{archive}: refusing member {name!r}: empty path")
    return PurePosixPath(*clean)


#: As Linux's MAXSYMLINKS: more hops than this is a loop (or an attack), not an archive.
_MAX_LINK_HOPS = 40


class _LinkTree:
    """The extraction folder as it will be after one archive: its links over what is on disk.

    Paths are tuples of literal ``/``-separated components relative to the extraction folder.
    Link targets are resolved one component at a time, following the archive's own links (all
    of them, whatever their order in the archive) and links already on disk. Nothing here uses
    ``realpath``, which silently gives up beyond PATH_MAX; that is how tarfile's own
    ``filter="data"`` is bypassed on Python < 3.11.13/3.12.11 (CVE-2025-4517).
    """

    def __init__(self, archive: Path, root: Path, links: Mapping[tuple[str, ...], str]) -> None:
        self.archive = archive
        self.root = root
        self.links = links
        # A fresh folder has no links of its own: no need to ask the filesystem.
        self.on_disk = any(root.iterdir())

    def refuse(self, name: str, problem: str) -> DownloadError:
        return DownloadError(f"{self.archive}: refusing member {name!r}: {problem}")

    def link_at(self, parts: tuple[str, ...], name: str) -> str | None:
        """The target of the link at ``parts`` (the archive's, else the disk's), or None."""
        if parts in self.links:
            return self.links[parts]
        if not self.on_disk or not parts:
            return None
        try:
            return os.readlink(self.root.joinpath(*parts))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # there, but not a link
                return None
            raise self.refuse(name, f"cannot check {'/'.join(parts)!r} ({exc.strerror})") from None

    def resolve(
        self, start: tuple[str, ...], target: str, name: str, *, through_links: bool = True
    ) -> tuple[str, ...]:
        """Where ``target``, seen from folder ``start``, really is; refuse leaving the root.

        Backslashes count as separators and ``C:``-style targets as absolute, so a target
        that would escape when the folder is read on Windows is refused too.
        """
        text = target.replace("\\", "/")
        if not text or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
            raise self.refuse(name, f"link to absolute path {target!r}")
        stack = list(start)
        pending = text.split("/")[::-1]
        hops = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not stack:
                    raise self.refuse(name, f"link {target!r} points outside the extraction folder")
                stack.pop()
                continue
            stack.append(part)
            link = self.link_at(tuple(stack), name)
            if link is None:
                continue
            if not through_links:
                raise self.refuse(name, f"hard link {target!r} goes through a symbolic link")
            hops += 1
            if hops > _MAX_LINK_HOPS:
                raise self.refuse(name, f"link {target!r}: too many levels of links")
            link = link.replace("\\", "/")
            if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
                raise self.refuse(name, f"link {target!r} points outside the extraction folder")
            stack.pop()
            pending.extend(link.split("/")[::-1])
        return tuple(stack)

    def check(
        self, parts: tuple[str, ...], name: str, *, link: str | None = None, hard: bool = False
    ) -> None:
        """Refuse a member written through a link, or a link that leads out of the root."""
        for i in range(1, len(parts)):
            if self.link_at(parts[:i], name) is not None:
                raise self.refuse(name, f"it lies inside the link {'/'.join(parts[:i])!r}")
        if link is None:
            if self.link_at(parts, name) is not None:
                raise self.refuse(name, "it would be written through an existing link")
        elif hard:
            # tarfile turns a hard link to a symlink into a copy of that symlink, re-anchored
            # at the hard link's own folder: only plain files may be hard-linked.
            self.resolve((), link, name, through_links=False)
        else:
            self.resolve(parts[:-1], link, name)

    def check_disk(self, root_label: str) -> None:
        """After extracting into a folder that had content: every link still stays inside.

        An archive's new link can change where an older link (another archive's) leads.
        """
        disk = _LinkTree(self.archive, self.root, {})
        stack: list[tuple[str, ...]] = [()]
        while stack:
            rel = stack.pop()
            try:
                with os.scandir(self.root.joinpath(*rel)) as entries:
                    found = list(entries)
            except OSError as exc:
                raise DownloadError(
                    f"{self.archive}: cannot check {root_label} after extraction ({exc.strerror})"
                ) from None
            for entry in found:
                if entry.is_symlink():
                    label = "/".join((*rel, entry.name))
                    try:
                        disk.resolve(rel, os.readlink(entry.path), label)
                    except DownloadError:
                        os.unlink(entry.path)  # never leave an escaping link behind
                        raise
                elif entry.is_dir(follow_symlinks=False):
                    stack.append((*rel, entry.name))


def _literal_parts(name: str) -> tuple[str, ...]:
    """A member name as the components the extractor will create (``/`` only; no ``.``)."""
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _duplicate_links(
    archive: Path, names: list[tuple[tuple[str, ...], str]], links: Mapping[tuple[str, ...], str]
) -> None:
    counts = Counter(parts for parts, _ in names)
    for parts, name in names:
        if parts in links and counts[parts] > 1:
            raise DownloadError(
                f"{archive}: refusing member {name!r}: a link may not share its name with "
                "another member"
            )


def _check_expansion(archive: Path, root: Path, total: int, max_bytes: int | None) -> None:
    """Refuse an archive whose files would expand past ``max_bytes`` or the free disk space.

    Member sizes are what the archive declares, and they bound what extraction writes: zipfile
    stops each member at its declared size, tarfile copies exactly the header's size. So a
    zip bomb is refused before a byte is written, instead of filling the disk.
    """
    if max_bytes is not None and total > max_bytes:
        raise DownloadError(
            f"{archive}: refusing to extract: its files expand to {_gb(total)}, more than "
            f"source.max_extract_gb ({_gb(max_bytes)})"
        )
    free = shutil.disk_usage(root).free
    if total > free:
        raise DownloadError(
            f"{archive}: refusing to extract: its files expand to {_gb(total)}, but only "
            f"{_gb(free)} is free under {root}"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB ({n:,} bytes)"


def _extract_tar(archive: Path, root: Path, max_bytes: int | None) -> int:
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115 (entered just below)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DownloadError(f"{archive}: cannot open as a tar archive ({exc})") from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DownloadError(f"{archive}: corrupt tar archive ({exc})") from None
        # The root folder is ours; an archive's own entry for it carries nothing to extract.
        members = [m for m in members if not _is_root_dir(m.name, m.isdir())]
        for m in members:
            _check_member_name(archive, m.name)
            if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
                raise DownloadError(f"{archive}: refusing member {m.name!r}: device or FIFO")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise DownloadError(f"{archive}: refusing member {m.name!r}: special file")
        # Each link is fine on its own; now the links together, as tarfile will lay them out.
        names = [(_literal_parts(m.name), m.name) for m in members]
        links = {
            parts: m.linkname for (parts, _), m in zip(names, members, strict=True) if m.issym()
        }
        _duplicate_links(archive, names, links)
        tree = _LinkTree(archive, root, links)
        for (parts, name), m in zip(names, members, strict=True):
            is_link = m.issym() or m.islnk()
            tree.check(parts, name, link=m.linkname if is_link else None, hard=m.islnk())
        _check_expansion(archive, root, sum(m.size for m in members if m.isfile()), max_bytes)
        try:
            tf.extractall(root, members=members, filter="data")
        except tarfile.FilterError as exc:
            member = getattr(exc, "tarinfo", None)
            label = member.name if member is not None else "?"
            raise DownloadError(f"{archive}: refusing member {label!r}: {exc}") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DownloadError(f"{archive}: extraction failed ({exc})") from None
    if tree.on_disk and links:
        tree.check_disk(str(root))
    return sum(1 for m in members if m.isfile())


def _inside(root: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _extract_zip(archive: Path, root: Path, max_bytes: int | None) -> int:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(f"{archive}: cannot open as a zip archive ({exc})") from None
    with zf:
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath, str]] = []
        links: dict[tuple[str, ...], str] = {}
        for info in zf.infolist():
            if _is_root_dir(info.filename, info.is_dir()):
                continue  # the root folder is ours
            rel = _check_member_name(archive, info.filename)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode) if info.create_system == 3 else 0  # 3 = Unix
            if info.is_dir() or kind == stat.S_IFDIR:
                plan.append((info, rel, "dir"))
            elif kind == stat.S_IFLNK:
                try:
                    target = zf.read(info).decode("utf-8")
                except UnicodeDecodeError:
                    raise DownloadError(
                        f"{archive}: refusing member {info.filename!r}: link target is not UTF-8"
                    ) from None
                except (zipfile.BadZipFile, OSError, EOFError) as exc:
                    raise DownloadError(
                        f"{archive}: reading member {info.filename!r} failed ({exc})"
                    ) from None
                links[rel.parts] = target
                plan.append((info, rel, "link"))
            elif kind in (0, stat.S_IFREG):
                plan.append((info, rel, "file"))
            else:
                raise DownloadError(
                    f"{archive}: refusing member {info.filename!r}: device or special file"
                )
        # Each link is fine on its own; now the links together (and with any already there).
        names = [(rel.parts, info.filename) for info, rel, _ in plan]
        _duplicate_links(archive, names, links)
        tree = _LinkTree(archive, root, links)
        for info, rel, _kind in plan:
            tree.check(rel.parts, info.filename, link=links.get(rel.parts))
        total = sum(info.file_size for info, _, kind in plan if kind == "file")
        _check_expansion(archive, root, total, max_bytes)
        n_files = 0
        # Links last, so that no regular member can be written through a link from the archive.
        for info, rel, kind in sorted(plan, key=lambda item: item[2] == "link"):
            out = root.joinpath(*rel.parts)
            if not _inside(root, out.parent if kind != "dir" else out):
                raise DownloadError(
                    f"{archive}: refusing member {info.filename!r}: resolves outside the "
                    "extraction folder"
                )
            try:
                if kind == "dir":
                    out.mkdir(parents=True, exist_ok=True)
                elif kind == "link":
                    out.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(links[rel.parts], out)
                else:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
                    n_files += 1
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
                raise DownloadError(
                    f"{archive}: extracting member {info.filename!r} failed ({exc})"
                ) from None
    if tree.on_disk and links:
        tree.check_disk(str(root))
    return n_files


def extract_archive(archive: Path, root: Path, *, max_bytes: int | None = None) -> int:
    """Safely extract a zip or tar(.gz/.bz2/.xz) ``archive`` into ``root``; return its file count.

    Every member is checked before anything is written; unsafe members raise
    :class:`DownloadError` naming the archive and the member, and so does an archive whose
    files would expand past ``max_bytes`` or the free disk space under ``root``.
    """
    archive, root = Path(archive), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".zip") or (not _is_archive_name(name) and zipfile.is_zipfile(archive)):
        n = _extract_zip(archive, root, max_bytes)
    elif _is_archive_name(name) or tarfile.is_tarfile(archive):
        n = _extract_tar(archive, root, max_bytes)
    else:
        raise DownloadError(f"{archive}: not a supported archive (zip, tar, tar.gz/bz2/xz)")
    logger.info("extracted %d files from %s", n, archive.name)
    return n


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HttpOptions:
    retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    timeout: float = 60.0
    retry_after_max: float = 300.0

    @classmethod
    def from_source(cls, source: Mapping[str, Any]) -> _HttpOptions:
        opts = cls()
        values = {}
        for key in ("retries", "backoff", "backoff_max", "timeout", "retry_after_max"):
            if key in source:
                value = source[key]
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise DownloadError(
                        f"source.{key}: expected a non-negative number, got {value!r}"
                    )
                values[key] = type(getattr(opts, key))(value)
        return cls(**values)

    def delay(self, attempt: int) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random."""
        cap = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)


@dataclass(frozen=True)
class _HttpFile:
    url: str
    redacted: str
    path: PurePosixPath
    sha256: str | None
    extract: bool
    extract_to: PurePosixPath


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(.+?)\s*$")


def _parse_sums(path: Path, label: str) -> dict[str, str]:
    """Read a ``sha256sum``-style file (PhysioNet's SHA256SUMS.txt) into {path: sha256}."""
    sums: dict[str, str] = {}
    text = path.read_text(encoding="utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SUMS_LINE.match(line)
        if not match:
            raise DownloadError(f"{label}: line {n} is not '<sha256>  <path>'")
        sums[match.group(2).removeprefix("./")] = match.group(1).lower()
    if not sums:
        raise DownloadError(f"{label}: no checksums found")
    return sums


def _parse_http_files(
    source: Mapping[str, Any],
    dataset: str,
    sums: Mapping[str, str] | None = None,
    sums_url: str | None = None,
) -> list[_HttpFile]:
    """Normalise ``source['files']`` (or, without it, the entries of the checksum file)."""
    entries = source.get("files")
    sums_dir = sums_url.rsplit("/", 1)[0] + "/" if sums_url else None
    if entries is None and sums and sums_dir:
        include = source.get("include", ["*"])
        if isinstance(include, str) or not isinstance(include, list):
            raise DownloadError(f"dataset {dataset!r}: 'include' must be a list of glob patterns")
        entries = [
            {"url": urljoin(sums_dir, quote(rel)), "path": rel}
            for rel in sorted(sums)
            if any(fnmatch.fnmatchcase(rel, pattern) for pattern in include)
        ]
        if not entries:
            raise DownloadError(f"dataset {dataset!r}: no checksum entry matches {include}")
    if not isinstance(entries, list) or not entries:
        raise DownloadError(
            f"dataset {dataset!r}: http source needs a non-empty 'files' list (or 'sha256sums')"
        )
    base_url = source.get("base_url")
    require_https = source["type"] == "https"
    files: list[_HttpFile] = []
    seen: set[PurePosixPath] = set()
    for i, entry in enumerate(entries):
        spec = {"url": entry} if isinstance(entry, str) else entry
        if not isinstance(spec, Mapping) or "url" not in spec:
            raise DownloadError(f"dataset {dataset!r}: files[{i}] needs a 'url'")
        unknown = set(spec) - _HTTP_FILE_KEYS
        if unknown:
            raise DownloadError(
                f"dataset {dataset!r}: files[{i}] has unknown keys {sorted(unknown)} "
                f"(allowed: {sorted(_HTTP_FILE_KEYS)})"
            )
        url = str(spec["url"])
        if base_url:
            url = urljoin(str(base_url), url)
        redacted = redact_url(url)
        _check_url(url, require_https, dataset)
        default_name = unquote(PurePosixPath(urlsplit(url).path).name)
        if "path" not in spec and not default_name:
            raise DownloadError(f"dataset {dataset!r}: {redacted}: cannot infer 'path'; set it")
        rel = _safe_relpath(spec.get("path", default_name), f"files[{i}].path")
        if rel in seen:
            raise DownloadError(f"dataset {dataset!r}: two files share the path {rel}")
        seen.add(rel)
        digest = spec.get("sha256")
        if digest is None and sums and sums_dir and url.startswith(sums_dir):
            digest = sums.get(unquote(url[len(sums_dir) :].split("?", 1)[0]))
        if digest is not None:
            digest = str(digest).strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise DownloadError(f"files[{i}].sha256: not a hex sha256 digest: {digest!r}")
        extract = bool(spec.get("extract", False))
        extract_to = _safe_relpath(spec.get("extract_to", "."), f"files[{i}].extract_to")
        files.append(_HttpFile(url, redacted, rel, digest, extract, extract_to))
    return files


def _read_netrc(host: str, scrubber: _Scrubber) -> tuple[str, str] | None:
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except netrc.NetrcParseError as exc:
        # The parser's message may quote a token from the file; name only file and line.
        raise DownloadError(f"{path}: cannot parse netrc file (line {exc.lineno})") from None
    except OSError as exc:
        raise DownloadError(f"{path}: cannot read netrc file ({exc.strerror})") from None
    if entry is None:
        return None
    login, _account, password = entry
    scrubber.add(password)
    logger.info("using credentials from %s for %s", path, host)
    return login or "", password or ""


def _env_secret(auth: Mapping[str, Any], key: str, scrubber: _Scrubber) -> str:
    name = auth.get(key)
    if not isinstance(name, str) or not name:
        raise DownloadError(f"auth.{key}: expected the name of an environment variable")
    value = os.environ.get(name)
    if value is None or value == "":
        raise DownloadError(f"environment variable {name} (auth.{key}) is not set")
    scrubber.add(value)
    return value


class _Auth:
    """Credentials for one host, resolved once (env vars or netrc)."""

    def __init__(self, source: Mapping[str, Any], scrubber: _Scrubber) -> None:
        self.auth = source.get("auth")
        self.scrubber = scrubber
        self._cache: dict[str, tuple[Any, dict[str, str]]] = {}
        self._redirect_cache: dict[str, Any] = {}
        if self.auth is not None and not isinstance(self.auth, Mapping):
            raise DownloadError("source.auth: expected a mapping")
        inline = [k for k in (self.auth or {}) if _SECRET_KEY.match(str(k))]
        if inline:
            raise DownloadError(
                f"source.auth: inline secrets {inline} are not accepted; name environment "
                "variables with username_env/password_env or token_env, or use ~/.netrc"
            )

    def for_url(self, url: str) -> tuple[Any, dict[str, str]]:
        """Return ``(requests auth or None, extra headers)`` for ``url``."""
        import requests

        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.username is not None:
            # Credentials in the URL itself (discouraged, but honoured and kept out of logs).
            user, password = unquote(parts.username), unquote(parts.password or "")
            self.scrubber.add(password, parts.password)
            _warn_cleartext(url)
            return requests.auth.HTTPBasicAuth(user, password), {}
        if host in self._cache:
            return self._cache[host]
        auth: Any = None
        headers: dict[str, str] = {}
        spec = self.auth or {}
        if "token_env" in spec:
            token = _env_secret(spec, "token_env", self.scrubber)
            if any(ord(c) < 32 or ord(c) == 127 for c in token) or token != token.strip():
                raise DownloadError(
                    f"environment variable {spec['token_env']} (auth.token_env) contains "
                    "whitespace, a line break or another control character, which cannot go "
                    "into an HTTP header (a trailing newline?); the value is not shown"
                )
            headers["Authorization"] = f"Bearer {token}"
        elif "password_env" in spec or "username_env" in spec:
            user = _env_secret(spec, "username_env", self.scrubber)
            password = _env_secret(spec, "password_env", self.scrubber)
            auth = requests.auth.HTTPBasicAuth(user, password)
        elif spec.get("netrc", True):
            found = _read_netrc(host, self.scrubber)
            if found is not None:
                auth = requests.auth.HTTPBasicAuth(*found)
        if auth is not None or headers:
            _warn_cleartext(url)
        self._cache[host] = (auth, headers)
        return auth, headers

    def for_redirect(self, url: str) -> Any:
        """Credentials for a redirect target on another origin: only its own netrc entry.

        Credentials named in ``auth`` belong to the configured URL's host and never follow a
        redirect elsewhere; with ``netrc: false`` nothing is looked up.
        """
        import requests

        spec = self.auth or {}
        if not spec.get("netrc", True) or {"token_env", "username_env", "password_env"} & set(spec):
            return None
        host = urlsplit(url).hostname or ""
        if host not in self._redirect_cache:
            found = _read_netrc(host, self.scrubber)
            self._redirect_cache[host] = (
                requests.auth.HTTPBasicAuth(*found) if found is not None else None
            )
        return self._redirect_cache[host]


def _warn_cleartext(url: str) -> None:
    """Warn (naming the host, never the secret) when credentials go out over plain http to a
    host off this machine: anyone on the path can read them."""
    if urlsplit(url).scheme.lower() != "http" or is_loopback(url):
        return
    logger.warning(
        "sending credentials to %s over plain http: they travel unencrypted; use an https URL "
        "(source type https refuses plain http)",
        urlsplit(url).hostname,
    )


def _describe(exc: BaseException, scrubber: _Scrubber) -> str:
    return scrubber(f"{type(exc).__name__}: {exc}")


def _no_auth(request: Any) -> Any:
    return request


def _is_cert_failure(exc: BaseException) -> bool:
    """True if a certificate check failed somewhere in ``exc``'s chain (that will not heal)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return True
        todo.extend([*item.args, getattr(item, "reason", None), item.__cause__, item.__context__])
    return False


def _session(auth: _Auth, scrubber: _Scrubber, require_https: bool) -> Any:
    """A requests session whose redirects keep secrets in and credentials at home."""
    import requests

    class Session(requests.Session):
        def rebuild_auth(self, prepared_request: Any, response: Any) -> None:
            old_url, new_url = response.request.url, prepared_request.url
            # A redirect can hand over a credential of its own (a pre-signed URL): from here on
            # it is scrubbed from urllib3's request log lines and from error messages.
            scrubber.add(*_url_secrets(new_url))
            if require_https and urlsplit(new_url).scheme.lower() != "https":
                raise DownloadError(
                    f"{redact_url(old_url)}: redirected to {redact_url(new_url)}; source type "
                    "'https' refuses plain http"
                )
            # requests' own version drops Authorization for another origin, but then adds
            # ~/.netrc credentials behind our back, even with 'auth: {netrc: false}'.
            if self.should_strip_auth(old_url, new_url):
                prepared_request.headers.pop("Authorization", None)
                extra = auth.for_redirect(new_url)
                if extra is not None:
                    prepared_request.prepare_auth(extra)

    return Session()


class _Fetcher:
    """Resumable, retrying, verifying download of single files into a cache folder."""

    def __init__(
        self,
        opts: _HttpOptions,
        auth: _Auth,
        scrubber: _Scrubber,
        cache: Path,
        *,
        progress: bool,
        require_https: bool = False,
    ) -> None:
        self.cache = cache
        self.progress = progress
        self.opts = opts
        self.auth = auth
        self.scrubber = scrubber
        self.session = _session(auth, scrubber, require_https)
        # Proxies from the environment are welcome, but requests' own netrc lookup is not:
        # _Auth applies netrc itself, and a session-level no-op auth keeps requests from adding
        # it behind our back (so 'auth: {netrc: false}' really disables it).
        self.session.auth = _no_auth

    def close(self) -> None:
        self.session.close()

    # -- cache bookkeeping -------------------------------------------------------------------

    def paths(self, rel: PurePosixPath) -> tuple[Path, Path, Path, Path]:
        """(verified file, ``.part`` file, its metadata, the verified file's metadata).

        Separate trees keep bookkeeping names from colliding with dataset files (a dataset may
        well hold both ``x`` and ``x.json``).
        """
        parts = rel.parts
        leaf = parts[-1]
        return (
            self.cache.joinpath("files", *parts),
            self.cache.joinpath("partial", *parts[:-1], leaf + ".part"),
            self.cache.joinpath("meta", "partial", *parts[:-1], leaf + ".json"),
            self.cache.joinpath("meta", "done", *parts[:-1], leaf + ".json"),
        )

    def cached(self, item: _HttpFile) -> bool:
        """True if the cache holds a verified earlier download of ``item``."""
        target, _, _, sidecar = self.paths(item.path)
        if not target.is_file():
            return False
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        expected = item.sha256 or (meta.get("sha256") if meta.get("url") == item.redacted else None)
        if expected is None:
            return False
        if target.stat().st_size != meta.get("size", target.stat().st_size):
            return False
        return sha256_file(target) == expected

    # -- transfer ----------------------------------------------------------------------------

    def fetch(self, item: _HttpFile) -> Path:
        """Download ``item`` into the cache (via a ``.part`` file), verify it, return its path."""
        target, part, part_meta, sidecar = self.paths(item.path)
        for folder in {target.parent, part.parent, part_meta.parent, sidecar.parent}:
            folder.mkdir(parents=True, exist_ok=True)
        for stale in (target, sidecar):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self._discard_if_foreign(item, part, part_meta)

        attempt = 0
        best = part.stat().st_size if part.exists() else 0
        restarted_for_checksum = False
        while True:
            try:
                self._transfer(item, part, part_meta)
            except _Retryable as exc:
                size = part.stat().st_size if part.exists() else 0
                if size > best:  # progress was made: the failure budget starts afresh
                    best, attempt = size, 0
                attempt += 1
                if attempt > self.opts.retries:
                    raise DownloadError(
                        f"{item.redacted}: giving up after {self.opts.retries} retries "
                        f"({exc.reason}); {size} bytes kept in {part} for the next run"
                    ) from None
                delay = self.opts.delay(attempt)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.opts.retry_after_max))
                logger.warning(
                    "%s: %s; retry %d/%d in %.1fs",
                    item.redacted,
                    exc.reason,
                    attempt,
                    self.opts.retries,
                    delay,
                )
                _sleep(delay)
                continue
            actual = sha256_file(part)
            if item.sha256 is not None and actual != item.sha256:
                resumed = part_meta.exists() and json.loads(part_meta.read_text()).get("resumed")
                part.unlink()
                part_meta.unlink(missing_ok=True)
                if resumed and not restarted_for_checksum:
                    # A resumed transfer can splice two versions of a changing file; one clean
                    # full transfer tells a corrupt splice from a wrong checksum in the config.
                    logger.warning("%s: checksum mismatch after resume; refetching", item.redacted)
                    restarted_for_checksum = True
                    continue
                raise DownloadError(
                    f"{item.redacted}: sha256 mismatch: expected {item.sha256}, got {actual}; "
                    "the downloaded file was removed"
                )
            size = part.stat().st_size
            os.replace(part, target)
            part_meta.unlink(missing_ok=True)
            sidecar.write_text(
                dumps_json({"url": item.redacted, "sha256": actual, "size": size}),
                encoding="utf-8",
            )
            logger.debug("%s: %d bytes, sha256 %s", item.redacted, size, actual)
            return target

    @staticmethod
    def _discard_if_foreign(item: _HttpFile, part: Path, part_meta: Path) -> None:
        """Drop a ``.part`` left by a different URL (the dataset's config changed)."""
        if not part.exists():
            part_meta.unlink(missing_ok=True)
            return
        try:
            meta = json.loads(part_meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if meta.get("url") != item.redacted:
            part.unlink()
            part_meta.unlink(missing_ok=True)

    def _transfer(self, item: _HttpFile, part: Path, part_meta: Path) -> None:
        import requests
        import urllib3

        offset = part.stat().st_size if part.exists() else 0
        try:
            meta = json.loads(part_meta.read_text(encoding="utf-8")) if offset else {}
        except (OSError, ValueError):
            meta = {}
        auth, headers = self.auth.for_url(item.url)
        headers = {**headers, "Accept-Encoding": "identity"}
        if offset:
            # If-Range takes a strong ETag or a Last-Modified date (RFC 9110 13.1.5).
            etag = meta.get("etag")
            validator = etag if etag and not str(etag).startswith("W/") else None
            validator = validator or meta.get("last_modified")
            if validator:
                headers["Range"] = f"bytes={offset}-"
                headers["If-Range"] = validator
            elif item.sha256:
                headers["Range"] = f"bytes={offset}-"  # a splice would fail the checksum
            else:
                # Nothing could tell a file changed on the server since the part was fetched:
                # a resume might splice two versions unnoticed, so fetch it whole.
                logger.warning(
                    "%s: no ETag/Last-Modified and no sha256 to check a resume; restarting",
                    item.redacted,
                )
                part.unlink()
                offset = 0
        timeout = (self.opts.timeout, self.opts.timeout)
        try:
            with self.session.get(
                item.url, headers=headers, auth=auth, stream=True, timeout=timeout
            ) as resp:
                status = resp.status_code
                if status in _RETRY_STATUS:
                    raise _Retryable(
                        f"HTTP {status}", _parse_retry_after(resp.headers.get("Retry-After"))
                    )
                if status == 416 and offset:
                    total = _content_range_total(resp.headers.get("Content-Range"))
                    if total == offset:
                        return  # the part file is already complete
                    part.unlink()
                    raise _Retryable("HTTP 416 for the resume offset; restarting")
                if status in (401, 403):
                    raise DownloadError(
                        f"{item.redacted}: HTTP {status} ({resp.reason}): access denied; check "
                        "the credentials named in the dataset's auth config or ~/.netrc"
                    )
                if status >= 400:
                    raise DownloadError(f"{item.redacted}: HTTP {status} ({resp.reason})")
                mode, total, resumed = "wb", None, False
                length = resp.headers.get("Content-Length")
                if status == 206 and offset:
                    start, total = _content_range(resp.headers.get("Content-Range"))
                    if start != offset:
                        part.unlink()
                        raise _Retryable(f"server resumed at byte {start}, not {offset}")
                    mode, resumed = "ab", True
                else:
                    if offset:
                        logger.warning(
                            "%s: server answered %d to a range request; restarting from 0",
                            item.redacted,
                            status,
                        )
                    offset = 0
                    total = int(length) if length and length.isdigit() else None
                part_meta.write_text(
                    dumps_json(
                        {
                            "url": item.redacted,
                            "etag": resp.headers.get("ETag"),
                            "last_modified": resp.headers.get("Last-Modified"),
                            "resumed": resumed,
                        }
                    ),
                    encoding="utf-8",
                )
                with (
                    open(part, mode) as out,
                    tqdm(
                        total=total,
                        initial=offset,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=item.path.name,
                        mininterval=1.0,
                        disable=not self.progress,
                    ) as bar,
                ):
                    try:
                        # read1 hands over whatever has arrived, so a stall or drop loses no
                        # received bytes; raw bytes (no decoding) are what the sha256 covers.
                        while chunk := resp.raw.read1(_CHUNK, decode_content=False):
                            out.write(chunk)
                            bar.update(len(chunk))
                    finally:
                        out.flush()
                        os.fsync(out.fileno())
        except requests.exceptions.SSLError as exc:
            if _is_cert_failure(exc):
                raise DownloadError(
                    f"{item.redacted}: the server's TLS certificate failed verification "
                    f"({_describe(exc, self.scrubber)}); for a private CA set REQUESTS_CA_BUNDLE"
                ) from None
            raise _Retryable(_describe(exc, self.scrubber)) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retryable(_describe(exc, self.scrubber)) from None
        except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError) as exc:
            raise _Retryable(_describe(exc, self.scrubber)) from None
        except requests.RequestException as exc:
            raise DownloadError(f"{item.redacted}: {_describe(exc, self.scrubber)}") from None
        except OSError as exc:
            if isinstance(exc, ConnectionError | TimeoutError):
                raise _Retryable(_describe(exc, self.scrubber)) from None
            raise
        size = part.stat().st_size
        if total is not None and size != total:
            if size > total:
                part.unlink()
            raise _Retryable(f"transfer ended at {size} of {total} bytes")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    total = match.group(3)
    return int(match.group(1)), (int(total) if total != "*" else None)


def _content_range_total(value: str | None) -> int | None:
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value or "")
    return int(match.group(1)) if match else None


def _place(src: Path, dst: Path, *, keep: bool) -> None:
    """Put a cached file into the raw folder: hard link (no extra disk) or copy, or move."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not keep:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _check_url(url: str, require_https: bool, dataset: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https") or (require_https and scheme != "https"):
        allowed = "https" if require_https else "http or https"
        raise DownloadError(f"dataset {dataset!r}: {redact_url(url)}: URL scheme must be {allowed}")


def _max_extract_bytes(source: Mapping[str, Any], dataset: str) -> int | None:
    """``source.max_extract_gb`` in bytes (``None``: bounded by the free disk space only)."""
    limit = source.get("max_extract_gb")
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0:
        raise DownloadError(
            f"dataset {dataset!r}: source.max_extract_gb must be a positive number, not {limit!r}"
        )
    return int(limit * 1e9)


def _acquire_http(
    source: Mapping[str, Any], dest: Path, cache: Path, dataset: str, scrubber: _Scrubber
) -> None:
    opts = _HttpOptions.from_source(source)
    max_extract = _max_extract_bytes(source, dataset)
    keep_cache = bool(source.get("keep_cache", True))
    workers = source.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise DownloadError(f"dataset {dataset!r}: 'workers' must be a positive integer")
    auth = _Auth(source, scrubber)
    cache.mkdir(parents=True, exist_ok=True)
    # requests sessions are not thread-safe: one fetcher (session) per worker thread.
    local = threading.local()
    fetchers: list[_Fetcher] = []
    fetchers_lock = threading.Lock()

    def fetcher() -> _Fetcher:
        if not hasattr(local, "fetcher"):
            local.fetcher = _Fetcher(
                opts,
                auth,
                scrubber,
                cache,
                progress=workers == 1,
                require_https=source["type"] == "https",
            )
            with fetchers_lock:
                fetchers.append(local.fetcher)
        return local.fetcher

    try:
        sums = sums_url = None
        if source.get("sha256sums"):
            sums_url = urljoin(str(source.get("base_url") or ""), str(source["sha256sums"]))
            _check_url(sums_url, source["type"] == "https", dataset)
            scrubber.add(*_url_secrets(sums_url))
            name = unquote(PurePosixPath(urlsplit(sums_url).path).name) or "SHA256SUMS"
            sums_item = _HttpFile(
                sums_url,
                redact_url(sums_url),
                PurePosixPath(".sha256sums", name),
                None,
                False,
                PurePosixPath("."),
            )
            f = fetcher()
            sums_path = f.paths(sums_item.path)[0] if f.cached(sums_item) else f.fetch(sums_item)
            sums = _parse_sums(sums_path, sums_item.redacted)
        files = _parse_http_files(source, dataset, sums, sums_url)
        for item in files:
            scrubber.add(*_url_secrets(item.url))
        chatty = len(files) <= 50  # per-file INFO lines only where they stay readable

        def get(item: _HttpFile) -> None:
            f = fetcher()
            if f.cached(item):
                logger.log(logging.INFO if chatty else logging.DEBUG, "%s: in cache", item.redacted)
                return
            logger.log(logging.INFO if chatty else logging.DEBUG, "fetching %s", item.redacted)
            f.fetch(item)

        bar = tqdm(total=len(files), desc=f"{dataset} files", unit="file", disable=len(files) < 2)
        with bar:
            if workers == 1:
                for item in files:
                    get(item)
                    bar.update()
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix=f"dl-{dataset}") as pool:
                    futures = [pool.submit(get, item) for item in files]
                    for future in futures:
                        future.add_done_callback(lambda _f: bar.update())
                    wait(futures, return_when=FIRST_EXCEPTION)
                    failed = [f for f in futures if f.done() and f.exception() is not None]
                    if failed:
                        for future in futures:
                            future.cancel()
                        raise failed[0].exception()  # type: ignore[misc]
    finally:
        for f in fetchers:
            f.close()

    with _building(dest) as tmp:
        for item in files:
            cached = cache.joinpath("files", *item.path.parts)
            if item.extract:
                extract_archive(cached, tmp.joinpath(*item.extract_to.parts), max_bytes=max_extract)
            else:
                out = tmp.joinpath(*item.path.parts)
                if out.exists():
                    raise DownloadError(f"dataset {dataset!r}: {item.path} would be overwritten")
                _place(cached, out, keep=keep_cache)
    if not keep_cache:
        shutil.rmtree(cache, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Local and phantom sources
# --------------------------------------------------------------------------------------------


def _copy_tree(src: Path, dst: Path) -> None:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for path in tqdm(files, desc=f"copying {src.name}", unit="file", mininterval=1.0):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)


def _acquire_local(source: Mapping[str, Any], dest: Path, dataset: str) -> None:
    if "path" not in source:
        raise DownloadError(f"dataset {dataset!r}: local source needs a 'path'")
    path = Path(os.path.expandvars(str(source["path"]))).expanduser()
    if not path.exists():
        raise DownloadError(f"dataset {dataset!r}: local source {path} does not exist")
    mode = source.get("mode", "link")
    if mode not in ("link", "copy"):
        raise DownloadError(
            f"dataset {dataset!r}: source.mode must be 'link' or 'copy', not {mode!r}"
        )
    extract = bool(source.get("extract", False))
    max_extract = _max_extract_bytes(source, dataset)

    if path.is_dir():
        if extract:
            raise DownloadError(
                f"dataset {dataset!r}: extract: true needs an archive, {path} is a folder"
            )
        if mode == "link":
            target = path.resolve()
            if dest.absolute() == target or target.is_relative_to(dest.absolute()):
                raise DownloadError(f"dataset {dataset!r}: {path} is inside the raw folder {dest}")
            _link_dir(target, dest)
            logger.info("linked %s -> %s", dest, target)
        else:
            with _building(dest) as tmp:
                _copy_tree(path, tmp)
        return

    expected = source.get("sha256")
    if expected is not None:
        actual = sha256_file(path)
        if actual != str(expected).lower():
            raise DownloadError(f"{path}: sha256 mismatch: expected {expected}, got {actual}")
    with _building(dest) as tmp:
        if extract:
            target = tmp.joinpath(*_safe_relpath(source.get("extract_to", "."), "extract_to").parts)
            extract_archive(path, target, max_bytes=max_extract)
        elif mode == "link":
            os.symlink(path.resolve(), tmp / path.name)
        else:
            shutil.copyfile(path, tmp / path.name)


def _acquire_phantom(source: Mapping[str, Any], dest: Path, dataset: str) -> None:
    import importlib

    kind = source.get("kind")
    if not isinstance(kind, str) or not kind:
        raise DownloadError(f"dataset {dataset!r}: phantom source needs a 'kind'")
    seed = source.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DownloadError(f"dataset {dataset!r}: phantom seed must be an integer, got {seed!r}")
    cfg = source.get("phantom") or {}
    if not isinstance(cfg, Mapping):
        raise DownloadError(f"dataset {dataset!r}: source.phantom must be a mapping")
    module = importlib.import_module("cxrfoundry.data.demo_sources")
    with _building(dest) as tmp:
        info = module.write_demo_source(kind, tmp, cfg, seed=seed)
    logger.info("phantom %s (seed %d) written: %s", kind, seed, info)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _normalise(obj: Any) -> Any:
    """The JSON round-trip of ``obj``, so it compares equal to a manifest read from disk."""
    return json.loads(dumps_json(obj))


def _up_to_date(
    dataset: str, redacted: dict[str, Any], dest: Path, manifest_path: Path
) -> dict[str, Any] | None:
    if not (manifest_path.is_file() and dest.exists()):
        return None
    try:
        old = read_json(manifest_path)
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("dataset") != dataset or old.get("source") != redacted:
        return None
    current = _normalise(_build_manifest(dataset, redacted, dest))
    return old if current == old else None


def download(
    source: Mapping[str, Any],
    dest: Path,
    manifest_path: Path,
    *,
    dataset: str,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Materialise ``dataset``'s raw files under ``dest`` and write its manifest.

    Args:
        source: the dataset's source config (see the module docstring for each ``type``).
        dest: the raw folder, ``resources/raw/{dataset}``; replaced atomically.
        manifest_path: ``resources/raw/{dataset}.manifest.json``; written last, atomically.
        dataset: the dataset name (recorded in the manifest and used in messages).
        cache_dir: where HTTP transfers and ``.part`` files live; default
            ``dest.parent/.{dest.name}.cache``.

    Returns:
        The manifest dict ``{dataset, source (redacted), files, n_files, total_bytes}``.

    Raises:
        DownloadError: bad config, missing input, failed transfer, checksum mismatch or unsafe
            archive; the message names the file or (redacted) URL and contains no secret.
    """
    dest, manifest_path = Path(dest), Path(manifest_path)
    if not isinstance(source, Mapping) or "type" not in source:
        raise DownloadError(f"dataset {dataset!r}: source must be a mapping with a 'type'")
    kind = source["type"]
    redacted = _normalise(redact_source(source))
    scrubber = _Scrubber()
    with _scrubbing(scrubber):
        try:
            previous = _up_to_date(dataset, redacted, dest, manifest_path)
            if previous is not None:
                logger.info("%s: raw folder matches its manifest; nothing to do", dataset)
                return previous
            # Nothing may look finished while we work: the manifest goes first, comes back last.
            manifest_path.unlink(missing_ok=True)
            # What a killed run left beside dest (_building, _replace, _link_dir): never outputs.
            remove_stale_temps(dest, ("tmp", "old", "lnk"))
            logger.info("acquiring %s from %s source", dataset, kind)
            if kind == "phantom":
                _acquire_phantom(source, dest, dataset)
            elif kind == "local":
                _acquire_local(source, dest, dataset)
            elif kind in ("http", "https"):
                cache = Path(cache_dir) if cache_dir else dest.parent / f".{dest.name}.cache"
                _acquire_http(source, dest, cache, dataset, scrubber)
            else:
                raise DownloadError(
                    f"dataset {dataset!r}: unknown source type {kind!r} "
                    "(phantom, local, http, https)"
                )
            manifest = _build_manifest(dataset, redacted, dest)
            write_json(manifest_path, manifest)
        except DownloadError as exc:
            # Belt and braces: a message built from a library exception is scrubbed again.
            clean = scrubber(str(exc))
            if clean != str(exc):
                raise DownloadError(clean) from None
            raise
    logger.info(
        "%s: %d files, %d bytes -> %s",
        dataset,
        manifest["n_files"],
        manifest["total_bytes"],
        manifest_path,
    )
    return _normalise(manifest)
