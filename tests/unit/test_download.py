"""Tests for the acquire stage (cxrfoundry.data.download) against a real loopback HTTP server."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from httpserver import Fault, HttpTestServer

from cxrfoundry.data import download as dl
from cxrfoundry.data.download import DownloadError, download, redact_source, redact_url

FAST = {"backoff": 0.001, "backoff_max": 0.01, "timeout": 5}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zf.writestr(info, data)
    return buf.getvalue()


def make_tar(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for member in members:
            if isinstance(member, tuple):
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tf.addfile(info, io.BytesIO(member[1]))
            else:
                tf.addfile(member)
    return buf.getvalue()


ARCHIVE_FILES = {
    "images/p1/a.png": os.urandom(0) + bytes(range(256)) * 40,
    "images/p2/b.png": b"\x89PNG" + bytes(reversed(range(256))) * 30,
    "labels.csv": b"id,label\na,1\nb,0\n",
}


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "resources" / "raw"
    return root / "ds", root / "ds.manifest.json"


@pytest.fixture
def server():
    with HttpTestServer() as srv:
        yield srv


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record backoff delays instead of sleeping."""
    calls: list[float] = []
    monkeypatch.setattr(dl, "_sleep", calls.append)
    return calls


def leftovers(root: Path) -> list[str]:
    """Everything under the raw root, as relative paths (hidden files included)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def expected_files(files: dict[str, bytes]) -> list[dict]:
    return [{"path": k, "size": len(v), "sha256": sha(v)} for k, v in sorted(files.items())]


def fetch_one(url: str, payload: bytes, raw: tuple[Path, Path]) -> dict:
    """Download ``url`` (expected to hold ``payload``) as dataset ``ds``; return the manifest."""
    dest, manifest_path = raw
    source = {"type": "http", "files": [{"url": url, "sha256": sha(payload)}], **FAST}
    return download(source, dest, manifest_path, dataset="ds")


# ------------------------------------------------------------------------------------------
# HTTP: resume, retries, checksum
# ------------------------------------------------------------------------------------------


def test_interrupted_transfer_resumes_across_runs(server, raw, sleeps) -> None:
    dest, manifest_path = raw
    payload = make_zip(ARCHIVE_FILES)
    cut = len(payload) // 3
    url = server.add("/data/ds.zip", payload, faults=[Fault.drop(after=cut)])
    source = {
        "type": "http",
        "files": [{"url": url, "sha256": sha(payload), "extract": True}],
        **FAST,
        "retries": 0,
    }
    # First run: the connection drops and no retry is allowed -> error, nothing looks finished.
    with pytest.raises(DownloadError, match="giving up") as err:
        download(source, dest, manifest_path, dataset="ds")
    assert url in str(err.value)
    assert not manifest_path.exists() and not dest.exists()
    part = dest.parent / ".ds.cache" / "partial" / "ds.zip.part"
    assert part.stat().st_size == cut

    # Second run continues from the .part file with a Range request.
    manifest = download({**source, "retries": 0}, dest, manifest_path, dataset="ds")
    reqs = server.requests_for("/data/ds.zip")
    assert len(reqs) == 2
    assert "Range" not in reqs[0].headers
    assert reqs[1].headers["Range"] == f"bytes={cut}-"
    assert reqs[1].status == 206
    assert sum(r.body_bytes for r in reqs) < 2 * len(payload)
    assert sum(r.body_bytes for r in reqs) == len(payload)

    assert manifest["files"] == expected_files(ARCHIVE_FILES)
    assert manifest["n_files"] == 3
    assert manifest["total_bytes"] == sum(len(v) for v in ARCHIVE_FILES.values())
    assert json.loads(manifest_path.read_text()) == manifest
    for name, data in ARCHIVE_FILES.items():
        assert (dest / name).read_bytes() == data
    assert not part.exists()
    assert "ds.zip" not in os.listdir(dest)  # the archive is extracted, not copied in


def test_drop_mid_transfer_is_retried_within_one_run(server, raw, sleeps) -> None:
    dest = raw[0]
    payload = os.urandom(50_000)
    url = server.add("/f.bin", payload, faults=[Fault.drop(100), Fault.drop(20_000)])
    manifest = fetch_one(url, payload, raw)
    reqs = server.requests_for("/f.bin")
    assert [r.headers.get("Range") for r in reqs] == [None, "bytes=100-", "bytes=20100-"]
    assert sum(r.body_bytes for r in reqs) == len(payload)
    assert len(sleeps) == 2
    assert (dest / "f.bin").read_bytes() == payload
    assert manifest["files"] == [{"path": "f.bin", "size": len(payload), "sha256": sha(payload)}]


def test_stalled_transfer_times_out_and_resumes(server, raw, sleeps) -> None:
    dest, manifest_path = raw
    payload = os.urandom(4000)
    url = server.add("/slow.bin", payload, faults=[Fault.stall(after=1000, seconds=2.0)])
    source = {"type": "http", "files": [{"url": url, "sha256": sha(payload)}], **FAST}
    download({**source, "timeout": 0.3}, dest, manifest_path, dataset="ds")
    reqs = server.requests_for("/slow.bin")
    assert [r.headers.get("Range") for r in reqs] == [None, "bytes=1000-"]
    assert (dest / "slow.bin").read_bytes() == payload


def test_server_ignoring_range_restarts_from_zero(server, raw, sleeps) -> None:
    dest = raw[0]
    payload = os.urandom(30_000)
    url = server.add(
        "/f.bin", payload, faults=[Fault.drop(10_000), Fault.ignore_range()], range_support=True
    )
    fetch_one(url, payload, raw)
    reqs = server.requests_for("/f.bin")
    assert reqs[1].headers["Range"] == "bytes=10000-" and reqs[1].status == 200
    # The 200 body replaced the partial file instead of being appended to it.
    assert (dest / "f.bin").read_bytes() == payload


def test_resume_needs_a_validator_or_a_checksum(server, raw, sleeps) -> None:
    # A server that sends neither ETag nor Last-Modified cannot say whether the file changed
    # since the part was fetched: without a sha256 a resume could splice two versions
    # unnoticed, so the file is fetched whole; with a sha256 the splice would fail the check,
    # so the resume goes ahead (no If-Range to send).
    dest, manifest_path = raw
    payload = os.urandom(30_000)
    url = server.add("/plain.bin", payload, faults=[Fault.drop(10_000)], validators=False)
    download({"type": "http", "files": [{"url": url}], **FAST}, dest, manifest_path, dataset="ds")
    reqs = server.requests_for("/plain.bin")
    assert [r.headers.get("Range") for r in reqs] == [None, None]
    assert (dest / "plain.bin").read_bytes() == payload

    url = server.add("/summed.bin", payload, faults=[Fault.drop(10_000)], validators=False)
    source = {"type": "http", "files": [{"url": url, "sha256": sha(payload)}], **FAST}
    download(source, dest, manifest_path, dataset="ds")
    reqs = server.requests_for("/summed.bin")
    assert [r.headers.get("Range") for r in reqs] == [None, "bytes=10000-"]
    assert "If-Range" not in reqs[1].headers
    assert (dest / "summed.bin").read_bytes() == payload


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(server, raw, sleeps) -> None:
    dest, manifest_path = raw
    payload = make_zip(ARCHIVE_FILES)
    url = server.add("/ds.zip", payload, faults=[Fault.content(payload[:-10] + b"0123456789")])
    source = {"type": "http", "files": [{"url": url, "sha256": sha(payload), "extract": True}]}
    with pytest.raises(DownloadError) as err:
        download({**source, **FAST}, dest, manifest_path, dataset="ds")
    msg = str(err.value)
    assert url in msg and "sha256 mismatch" in msg
    assert f"expected {sha(payload)}" in msg
    assert sha(payload[:-10] + b"0123456789") in msg
    assert not dest.exists() and not manifest_path.exists()
    cache = dest.parent / ".ds.cache"
    assert not any(p.is_file() for p in cache.rglob("*")), leftovers(dest.parent)
    assert not list(dest.parent.glob(".ds.*.tmp"))


def test_retries_500_then_succeeds(server, raw, sleeps) -> None:
    dest, manifest_path = raw
    url = server.add("/x.csv", b"a,b\n1,2\n", faults=[Fault.error(500), Fault.error(503)])
    download({"type": "http", "files": [url], **FAST}, dest, manifest_path, dataset="ds")
    assert [r.status for r in server.requests_for("/x.csv")] == [500, 503, 200]
    assert len(sleeps) == 2 and all(0 < s <= 0.01 for s in sleeps)
    assert (dest / "x.csv").read_bytes() == b"a,b\n1,2\n"


def test_429_honours_retry_after(server, raw, sleeps) -> None:
    dest, manifest_path = raw
    url = server.add("/x.csv", b"data", faults=[Fault.error(429, retry_after="3")])
    download({"type": "http", "files": [url], **FAST}, dest, manifest_path, dataset="ds")
    assert [r.status for r in server.requests_for("/x.csv")] == [429, 200]
    assert sleeps == [3.0]


def test_backoff_grows_exponentially_and_gives_up(server, raw, sleeps) -> None:
    dest, manifest_path = raw
    url = server.add("/x", b"data", faults=[Fault.error(502)] * 10)
    source = {"type": "http", "files": [url], "backoff": 1.0, "backoff_max": 100, "retries": 4}
    with pytest.raises(DownloadError, match=r"giving up after 4 retries \(HTTP 502\)"):
        download(source, dest, manifest_path, dataset="ds")
    assert len(server.requests_for("/x")) == 5
    for attempt, delay in enumerate(sleeps, start=1):
        assert 2 ** (attempt - 1) / 2 <= delay <= 2 ** (attempt - 1)
    assert not dest.exists() and not manifest_path.exists()


def test_404_is_not_retried(server, raw, sleeps) -> None:
    dest, manifest_path = raw
    url = server.base_url + "/missing.zip"
    with pytest.raises(DownloadError, match="HTTP 404"):
        download({"type": "http", "files": [url], **FAST}, dest, manifest_path, dataset="ds")
    assert len(server.requests_for("/missing.zip")) == 1 and not sleeps


def test_complete_download_is_not_fetched_again(server, raw, sleeps) -> None:
    dest, manifest_path = raw
    payload = make_zip(ARCHIVE_FILES)
    url = server.add("/ds.zip", payload)
    plain = server.add("/README.txt", b"readme")
    source = {
        "type": "http",
        "files": [
            {"url": url, "sha256": sha(payload), "extract": True, "extract_to": "files"},
            {"url": plain, "path": "docs/README.txt"},
        ],
        **FAST,
    }
    first = download(source, dest, manifest_path, dataset="ds")
    first_bytes = manifest_path.read_bytes()
    assert len(server.requests) == 2
    assert [f["path"] for f in first["files"]] == [
        "docs/README.txt",
        "files/images/p1/a.png",
        "files/images/p2/b.png",
        "files/labels.csv",
    ]
    # Same source, folder intact: nothing fetched, same manifest.
    assert download(source, dest, manifest_path, dataset="ds") == first
    assert len(server.requests) == 2
    # Outputs deleted (as Snakemake does before rerunning a job): rebuilt from the verified cache.
    import shutil

    shutil.rmtree(dest)
    manifest_path.unlink()
    assert download(source, dest, manifest_path, dataset="ds") == first
    assert manifest_path.read_bytes() == first_bytes
    assert len(server.requests) == 2
    # A corrupted cache entry is detected by its checksum and fetched again.
    (dest.parent / ".ds.cache" / "files" / "ds.zip").write_bytes(b"garbage")
    shutil.rmtree(dest)
    assert download(source, dest, manifest_path, dataset="ds") == first
    assert len(server.requests_for("/ds.zip")) == 2


def test_sha256sums_listing_with_include_and_workers(server, raw, sleeps) -> None:
    """PhysioNet style: files and checksums come from SHA256SUMS.txt; several workers."""
    dest, manifest_path = raw
    files = {
        "files/p10/s1.jpg": os.urandom(3000),
        "files/p10/s2.jpg": os.urandom(2000),
        "files/p11/s3.jpg": os.urandom(1000),
        "mimic-cxr-2.0.0-metadata.csv.gz": b"meta",
        "LICENSE.txt": b"licence",
    }
    for rel, data in files.items():
        # One flaky file, to exercise retries inside the worker pool.
        faults = [Fault.drop(500)] if rel.endswith("s1.jpg") else []
        server.add(f"/files/mimic/2.1.0/{rel}", data, faults=faults)
    sums = "".join(f"{sha(d)}  {rel}\n" for rel, d in sorted(files.items()))
    server.add("/files/mimic/2.1.0/SHA256SUMS.txt", sums.encode())
    source = {
        "type": "http",
        "base_url": server.base_url + "/files/mimic/2.1.0/",
        "sha256sums": "SHA256SUMS.txt",
        "include": ["files/*", "*.csv.gz"],
        "workers": 3,
        **FAST,
    }
    manifest = download(source, dest, manifest_path, dataset="mimic")
    wanted = {k: v for k, v in files.items() if k != "LICENSE.txt"}
    assert manifest["files"] == expected_files(wanted)
    assert not server.requests_for("/files/mimic/2.1.0/LICENSE.txt")
    assert len(server.requests_for("/files/mimic/2.1.0/files/p10/s1.jpg")) == 2

    # A file whose content disagrees with SHA256SUMS.txt is caught.
    server.add("/files/mimic/2.1.0/files/p11/s3.jpg", b"tampered")
    with pytest.raises(DownloadError, match=r"s3\.jpg: sha256 mismatch"):
        download(source, dest.parent / "m2", dest.parent / "m2.json", dataset="m2")
    assert not (dest.parent / "m2.json").exists() and not (dest.parent / "m2").exists()


def test_https_type_refuses_plain_http(raw) -> None:
    dest, manifest_path = raw
    with pytest.raises(DownloadError, match="must be https"):
        download(
            {"type": "https", "files": ["http://127.0.0.1:1/x.zip"]},
            dest,
            manifest_path,
            dataset="ds",
        )


def test_complete_part_answered_416_is_finished_without_refetching(server, raw, sleeps) -> None:
    """Killed after the last byte but before the rename: the rerun's Range gets a 416."""
    dest, manifest_path = raw
    payload = os.urandom(20_000)
    url = server.add("/f.bin", payload, faults=[Fault.drop(5_000)])
    source = {"type": "http", "files": [{"url": url, "sha256": sha(payload)}], **FAST}
    with pytest.raises(DownloadError, match="giving up"):
        download({**source, "retries": 0}, dest, manifest_path, dataset="ds")
    part = dest.parent / ".ds.cache" / "partial" / "f.bin.part"
    with part.open("ab") as out:  # the rest arrived, then the job was killed
        out.write(payload[5_000:])
    download(source, dest, manifest_path, dataset="ds")
    reqs = server.requests_for("/f.bin")
    assert [(r.headers.get("Range"), r.status) for r in reqs] == [
        (None, 200),
        (f"bytes={len(payload)}-", 416),
    ]
    assert (dest / "f.bin").read_bytes() == payload and not part.exists()


def test_content_range_from_another_offset_restarts(server, raw, sleeps) -> None:
    dest = raw[0]
    payload = os.urandom(30_000)
    url = server.add("/f.bin", payload, faults=[Fault.drop(10_000), Fault.wrong_range(0)])
    fetch_one(url, payload, raw)
    reqs = server.requests_for("/f.bin")
    assert [(r.headers.get("Range"), r.status) for r in reqs] == [
        (None, 200),
        ("bytes=10000-", 206),
        (None, 200),
    ]
    assert (dest / "f.bin").read_bytes() == payload


def test_killed_process_leaves_nothing_finished_and_rerun_resumes(server, raw) -> None:
    """SIGKILL a real download mid-transfer; the next run resumes from the .part file."""
    import signal
    import subprocess
    import time

    dest, manifest_path = raw
    payload = os.urandom(400_000)
    url = server.add("/big.bin", payload, faults=[Fault.stall(after=250_000, seconds=30)])
    source = {"type": "http", "files": [{"url": url, "sha256": sha(payload)}], "timeout": 60}
    code = (
        "import json, sys; from pathlib import Path; "
        "from cxrfoundry.data.download import download; "
        "download(json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), dataset='ds')"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(source), str(dest), str(manifest_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    part = dest.parent / ".ds.cache" / "partial" / "big.bin.part"
    try:
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size >= 200_000):
            assert proc.poll() is None and time.monotonic() < deadline, "download never stalled"
            time.sleep(0.02)
        time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    kept = part.stat().st_size
    assert 0 < kept <= 250_000
    assert not manifest_path.exists() and not dest.exists()
    assert not (dest.parent / ".ds.cache" / "files" / "big.bin").exists()

    manifest = download({**source, **FAST}, dest, manifest_path, dataset="ds")
    reqs = server.requests_for("/big.bin")
    assert len(reqs) == 2
    assert reqs[1].headers["Range"] == f"bytes={kept}-" and reqs[1].status == 206
    assert (dest / "big.bin").read_bytes() == payload
    assert manifest["files"] == [{"path": "big.bin", "size": len(payload), "sha256": sha(payload)}]


# ------------------------------------------------------------------------------------------
# Credentials
# ------------------------------------------------------------------------------------------

PASSWORD = "s3cret-Pa55word"
TOKEN = "tok-9f8e7d6c5b4a"
QUERY_TOKEN = "qt-0a1b2c3d4e5f"


def test_basic_auth_from_env_never_leaks(server, raw, sleeps, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    dest, manifest_path = raw
    monkeypatch.setenv("TEST_PN_USER", "alice")
    monkeypatch.setenv("TEST_PN_PASS", PASSWORD)
    payload = make_zip(ARCHIVE_FILES)
    url = server.add("/files/ds.zip", payload, basic=("alice", PASSWORD), faults=[Fault.drop(99)])
    source = {
        "type": "http",
        "files": [{"url": url + f"?token={QUERY_TOKEN}", "sha256": sha(payload), "extract": True}],
        "auth": {"username_env": "TEST_PN_USER", "password_env": "TEST_PN_PASS"},
        **FAST,
    }
    manifest = download(source, dest, manifest_path, dataset="ds")
    assert [r.status for r in server.requests_for("/files/ds.zip")] == [200, 206]
    assert manifest["source"]["auth"] == {
        "username_env": "TEST_PN_USER",
        "password_env": "TEST_PN_PASS",
    }
    assert manifest["source"]["files"][0]["url"].endswith("?token=***")
    texts = [caplog.text, manifest_path.read_text(), json.dumps(manifest)]
    texts += [p.read_text() for p in (dest.parent / ".ds.cache").rglob("*.json")]
    for text in texts:
        assert PASSWORD not in text and QUERY_TOKEN not in text
    assert "/files/ds.zip" in caplog.text  # the logs do mention what was fetched

    # Wrong password: the error names the URL and the problem, not the secret.
    monkeypatch.setenv("TEST_PN_PASS", "wrong-" + PASSWORD)
    dest2 = dest.parent / "ds2"
    with pytest.raises(DownloadError, match="HTTP 401") as err:
        download(source, dest2, dest.parent / "ds2.manifest.json", dataset="ds2")
    assert PASSWORD not in str(err.value) and QUERY_TOKEN not in str(err.value)
    assert "/files/ds.zip" in str(err.value)
    assert PASSWORD not in caplog.text and QUERY_TOKEN not in caplog.text


def test_bearer_token_and_userinfo_urls_are_redacted(server, raw, sleeps, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    dest, manifest_path = raw
    monkeypatch.setenv("TEST_TOKEN", TOKEN)
    url = server.add("/t.csv", b"x,y\n", bearer=TOKEN, faults=[Fault.error(500)])
    source = {"type": "http", "files": [url], "auth": {"token_env": "TEST_TOKEN"}, **FAST}
    manifest = download(source, dest, manifest_path, dataset="ds")
    assert server.requests_for("/t.csv")[-1].headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in caplog.text and TOKEN not in manifest_path.read_text()
    assert TOKEN not in json.dumps(manifest)

    # Missing environment variable: named, no value invented.
    monkeypatch.delenv("TEST_TOKEN")
    with pytest.raises(DownloadError, match=r"TEST_TOKEN \(auth.token_env\) is not set"):
        download(source, dest.parent / "b", dest.parent / "b.json", dataset="b")

    # Inline secrets in config are refused (without echoing them).
    bad = {"type": "http", "files": [url], "auth": {"password": PASSWORD}}
    with pytest.raises(DownloadError, match="inline secrets") as err:
        download(bad, dest.parent / "c", dest.parent / "c.json", dataset="c")
    assert PASSWORD not in str(err.value)

    # Credentials inside a URL are honoured, and hidden from the manifest, errors and logs.
    basic_url = server.add("/u.csv", b"u", basic=("bob", PASSWORD))
    userinfo = basic_url.replace("http://", f"http://bob:{PASSWORD}@")
    found = download(
        {"type": "http", "files": [userinfo], **FAST},
        dest.parent / "d",
        dest.parent / "d.json",
        dataset="d",
    )
    assert found["source"]["files"] == [basic_url.replace("http://", "http://***@")]
    assert PASSWORD not in (dest.parent / "d.json").read_text()
    bad_userinfo = userinfo.replace("bob:", "eve:")
    with pytest.raises(DownloadError, match="HTTP 401") as err:
        download(
            {"type": "http", "files": [bad_userinfo], **FAST},
            dest.parent / "f",
            dest.parent / "f.json",
            dataset="f",
        )
    assert PASSWORD not in str(err.value) and "eve" not in str(err.value)
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://data.example.org/x.zip", True),
        ("https://data.example.org/x.zip", False),
        ("http://127.0.0.1:8000/x.zip", False),
        ("http://[::1]:8000/x.zip", False),
        ("http://localhost/x.zip", False),
    ],
)
def test_credentials_over_plain_http_are_warned_about(
    url: str, warned: bool, monkeypatch, caplog
) -> None:
    """Basic auth over http to another machine goes out readable: warn, naming the host only."""
    caplog.set_level(logging.WARNING, logger=dl.logger.name)
    monkeypatch.setenv("CXRF_TEST_USER", "alice")
    monkeypatch.setenv("CXRF_TEST_PASSWORD", PASSWORD)
    auth = dl._Auth(
        {"auth": {"username_env": "CXRF_TEST_USER", "password_env": "CXRF_TEST_PASSWORD"}},
        dl._Scrubber(),
    )
    assert auth.for_url(url)[0] is not None
    auth.for_url(url)  # once per host
    found = [r.getMessage() for r in caplog.records if "plain http" in r.getMessage()]
    assert len(found) == (1 if warned else 0)
    if warned:
        assert "data.example.org" in found[0]
    assert PASSWORD not in caplog.text
    # Without credentials there is nothing to warn about.
    caplog.clear()
    dl._Auth({"auth": {"netrc": False}}, dl._Scrubber()).for_url(url)
    assert "plain http" not in caplog.text


def test_netrc_credentials(server, raw, sleeps, monkeypatch, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    dest, manifest_path = raw
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine 127.0.0.1 login carol password {PASSWORD}\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    url = server.add("/n.txt", b"netrc ok", basic=("carol", PASSWORD))
    manifest = download({"type": "http", "files": [url], **FAST}, dest, manifest_path, dataset="ds")
    assert (dest / "n.txt").read_bytes() == b"netrc ok"
    assert PASSWORD not in caplog.text and PASSWORD not in json.dumps(manifest)
    # netrc can be switched off: then the server refuses us.
    with pytest.raises(DownloadError, match="HTTP 401"):
        download(
            {"type": "http", "files": [url], "auth": {"netrc": False}, **FAST},
            dest.parent / "e",
            dest.parent / "e.json",
            dataset="e",
        )


def test_redaction_helpers() -> None:
    url = f"https://u:{PASSWORD}@host/x.zip?a=1&X-Amz-Signature={TOKEN}&token={QUERY_TOKEN}"
    red = redact_url(url)
    assert PASSWORD not in red and TOKEN not in red and QUERY_TOKEN not in red
    assert red.startswith("https://***@host/x.zip?a=1&")
    src = redact_source({"type": "http", "files": [{"url": url}], "auth": {"token_env": "T"}})
    assert src["auth"] == {"token_env": "T"} and PASSWORD not in json.dumps(src)


# ------------------------------------------------------------------------------------------
# Archives
# ------------------------------------------------------------------------------------------


def _tar_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _tar_dev(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


def _zip_symlink(name: str, target: str | bytes, *more: tuple[str, str]) -> bytes:
    """A zip with ``ok.txt`` and Unix symlinks ``name -> target`` (plus ``more`` of them)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        for link, to in ((name, target), *more):
            info = zipfile.ZipInfo(link)
            info.create_system = 3
            info.external_attr = (0o120777) << 16
            zf.writestr(info, to)
    return buf.getvalue()


def _tar_dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


# CVE-2025-4517: tarfile's filter="data" is bypassed on Python < 3.11.13 / 3.12.11 when link
# resolution runs past PATH_MAX, so a chain of links through very long folder names lets a
# later member be written outside the extraction folder.
_LONG = "d" * 247
_STEPS = "abcdefghijklmnop"


def _cve_2025_4517() -> tuple[bytes, str]:
    members: list[tarfile.TarInfo | tuple[str, bytes]] = []
    path = ""
    for step in _STEPS:
        members.append(_tar_dir(f"{path}{_LONG}"))
        members.append(_tar_link(f"{path}{step}", _LONG))
        path = f"{path}{_LONG}/"
    deep = "/".join(_STEPS) + "/" + "l" * 254
    members.append(_tar_link(deep, "../" * len(_STEPS)))
    members.append(_tar_link("escape", deep + "/.."))
    members.append(("escape/escaped.txt", b"x"))
    return make_tar(members, "w"), deep


_CVE_TAR, _CVE_MEMBER = _cve_2025_4517()


UNSAFE = {
    "tar-dotdot": (
        "evil.tar.gz",
        make_tar([("ok.txt", b"ok"), ("../escaped.txt", b"x")]),
        "../escaped.txt",
    ),
    "tar-absolute": ("evil.tgz", make_tar([("/tmp/abs-evil.txt", b"x")]), "/tmp/abs-evil.txt"),
    "tar-symlink-out": ("evil.tar", make_tar([_tar_link("lnk", "../../outside")], "w"), "lnk"),
    "tar-symlink-abs": ("evil.tar.gz", make_tar([_tar_link("etc", "/etc/passwd")]), "etc"),
    "tar-hardlink-out": ("evil.tar.gz", make_tar([_tar_link("h", "../x", tarfile.LNKTYPE)]), "h"),
    "tar-device": ("evil.tar.gz", make_tar([_tar_dev("dev/null")]), "dev/null"),
    "zip-dotdot": ("evil.zip", make_zip({"a/../../escaped.txt": b"x"}), "a/../../escaped.txt"),
    "zip-absolute": ("evil.zip", make_zip({"/abs.txt": b"x"}), "/abs.txt"),
    "zip-symlink-out": ("evil.zip", _zip_symlink("lnk", "../../etc/passwd"), "lnk"),
    # Each link alone stays inside; together 'c' -> 'a/b/..' -> '(a/..)/..' leaves the folder.
    "zip-link-chain": ("evil.zip", _zip_symlink("a/b", "..", ("c", "a/b/..")), "c"),
    "tar-link-chain": (
        "evil.tar",
        make_tar([_tar_dir("a"), _tar_link("c", "a/b/.."), _tar_link("a/b", "..")], "w"),
        "c",
    ),
    "tar-write-through-link": (
        "evil.tar",
        make_tar([_tar_link("a/b", ".."), _tar_link("c", "a/b/.."), ("c/escaped.txt", b"x")], "w"),
        "c",
    ),
    "tar-cve-2025-4517": ("evil.tar", _CVE_TAR, _CVE_MEMBER),
    # tarfile extracts a hard link to a not-yet-resolvable symlink as a *copy of the symlink*,
    # re-anchored at the hard link's folder: 'h' -> '../f' (CVE-2025-4330 class).
    "tar-hardlink-to-symlink": (
        "evil.tar",
        make_tar([_tar_link("x/s", "../f"), _tar_link("h", "x/s", tarfile.LNKTYPE)], "w"),
        "h",
    ),
    "zip-symlink-not-utf8": ("evil.zip", _zip_symlink("lnk", b"ok\xff.txt"), "lnk"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archive_members_are_refused(case: str, raw, tmp_path: Path) -> None:
    dest, manifest_path = raw
    name, data, member = UNSAFE[case]
    archive = tmp_path / "in" / name
    archive.parent.mkdir()
    archive.write_bytes(data)
    with pytest.raises(DownloadError, match="refusing member") as err:
        download(
            {"type": "local", "path": str(archive), "extract": True},
            dest,
            manifest_path,
            dataset="ds",
        )
    assert str(archive) in str(err.value) and repr(member) in str(err.value)
    assert not dest.exists() and not manifest_path.exists()
    assert (
        not (tmp_path / "escaped.txt").exists()
        and not (tmp_path / "resources" / "escaped.txt").exists()
    )
    assert leftovers(dest.parent) == []
    assert list(tmp_path.rglob("escaped.txt")) == []


def test_link_chain_split_across_two_archives_is_refused(server, raw, sleeps) -> None:
    """Two archives unpacked into one folder: each link is harmless alone, not together."""
    dest, manifest_path = raw
    first = server.add("/one.tar", make_tar([_tar_link("c", "a/b/..")], "w"))
    second = server.add("/two.tar", make_tar([_tar_dir("a"), _tar_link("a/b", "..")], "w"))
    source = {
        "type": "http",
        "files": [{"url": first, "extract": True}, {"url": second, "extract": True}],
        **FAST,
    }
    with pytest.raises(DownloadError, match=r"two\.tar: refusing member 'c'"):
        download(source, dest, manifest_path, dataset="ds")
    assert not dest.exists() and not manifest_path.exists()
    assert not list(dest.parent.glob(".ds.*.tmp"))


def test_safe_archives_extract_with_internal_links(raw, tmp_path: Path) -> None:
    dest, manifest_path = raw
    data = make_tar(
        [("d/a.txt", b"A"), ("d/sub/b.txt", b"BB"), _tar_link("d/sub/a-link", "../a.txt")], "w:bz2"
    )
    archive = tmp_path / "ok.tar.bz2"
    archive.write_bytes(data)
    manifest = download(
        {"type": "local", "path": str(archive), "extract": True, "sha256": sha(data)},
        dest,
        manifest_path,
        dataset="ds",
    )
    assert [f["path"] for f in manifest["files"]] == ["d/a.txt", "d/sub/a-link", "d/sub/b.txt"]
    assert (dest / "d/sub/a-link").is_symlink()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_made_from_dot_extracts(kind: str, raw, tmp_path: Path) -> None:
    """`tar -C dir -czf x.tgz .` starts with a './' folder member: that is the root itself."""
    dest, manifest_path = raw
    if kind == "tar":
        data = make_tar(
            [_tar_dir("./"), *((f"./{name}", body) for name, body in ARCHIVE_FILES.items())]
        )
        archive = tmp_path / "dot.tgz"
    else:
        data = make_zip({"./": b"", **{f"./{k}": v for k, v in ARCHIVE_FILES.items()}})
        archive = tmp_path / "dot.zip"
    archive.write_bytes(data)
    manifest = download(
        {"type": "local", "path": str(archive), "extract": True}, dest, manifest_path, dataset="ds"
    )
    assert manifest["files"] == expected_files(ARCHIVE_FILES)


def _bomb(kind: str, size: int) -> bytes:
    """An archive of a few kB whose one file expands to ``size`` bytes of zeros."""
    if kind == "tar":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            info = tarfile.TarInfo("zeros.bin")
            info.size = size
            tf.addfile(info, io.BytesIO(bytes(size)))
        return buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(size))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_expanding_past_the_limit_is_refused_before_writing(
    kind: str, raw, tmp_path: Path
) -> None:
    dest, manifest_path = raw
    data = _bomb(kind, 20_000_000)
    assert len(data) < 100_000  # a bomb: 200x and more
    archive = tmp_path / f"bomb.{'tgz' if kind == 'tar' else 'zip'}"
    archive.write_bytes(data)
    source = {"type": "local", "path": str(archive), "extract": True, "max_extract_gb": 0.01}
    with pytest.raises(DownloadError, match=r"expand to 0\.020 GB .*max_extract_gb") as err:
        download(source, dest, manifest_path, dataset="ds")
    assert str(archive) in str(err.value)
    assert not dest.exists() and not manifest_path.exists()
    assert leftovers(dest.parent) == []
    # Under a higher limit the same archive extracts, whole.
    manifest = download({**source, "max_extract_gb": 0.05}, dest, manifest_path, dataset="ds")
    assert manifest["total_bytes"] == 20_000_000


def test_archive_larger_than_the_free_disk_space_is_refused(
    raw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, manifest_path = raw
    archive = tmp_path / "big.zip"
    archive.write_bytes(_bomb("zip", 3_000_000))
    usage = types.SimpleNamespace(total=10**9, used=10**9 - 1_000_000, free=1_000_000)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda _path: usage)
    with pytest.raises(DownloadError, match=r"expand to 0\.003 GB .* only 0\.001 GB .* is free"):
        download(
            {"type": "local", "path": str(archive), "extract": True},
            dest,
            manifest_path,
            dataset="ds",
        )
    assert not dest.exists() and not manifest_path.exists()


@pytest.mark.parametrize("limit", [0, -1, "10", True])
def test_max_extract_gb_must_be_a_positive_number(limit, raw, tmp_path: Path) -> None:
    dest, manifest_path = raw
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip(ARCHIVE_FILES))
    source = {"type": "local", "path": str(archive), "extract": True, "max_extract_gb": limit}
    with pytest.raises(DownloadError, match="max_extract_gb must be a positive number"):
        download(source, dest, manifest_path, dataset="ds")


def test_corrupt_archive_names_the_archive(server, raw, sleeps) -> None:
    dest, manifest_path = raw
    url = server.add("/broken.zip", b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DownloadError, match=r"broken\.zip: cannot open as a zip archive"):
        download(
            {"type": "http", "files": [{"url": url, "extract": True}], **FAST},
            dest,
            manifest_path,
            dataset="ds",
        )
    assert not dest.exists() and not manifest_path.exists()


# ------------------------------------------------------------------------------------------
# Local and phantom sources
# ------------------------------------------------------------------------------------------


@pytest.fixture
def local_folder(tmp_path: Path) -> Path:
    src = tmp_path / "site" / "NIH"
    for name, data in ARCHIVE_FILES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return src


def test_local_link(local_folder: Path, raw) -> None:
    dest, manifest_path = raw
    manifest = download(
        {"type": "local", "path": str(local_folder)}, dest, manifest_path, dataset="ds"
    )
    assert dest.is_symlink() and dest.resolve() == local_folder.resolve()
    assert manifest["files"] == expected_files(ARCHIVE_FILES)
    before = manifest_path.read_bytes()
    # Rerun: up to date, manifest untouched.
    assert (
        download({"type": "local", "path": str(local_folder)}, dest, manifest_path, dataset="ds")
        == manifest
    )
    assert manifest_path.read_bytes() == before
    # A changed source folder is noticed and the manifest rebuilt.
    (local_folder / "labels.csv").write_bytes(b"changed")
    again = download(
        {"type": "local", "path": str(local_folder)}, dest, manifest_path, dataset="ds"
    )
    assert again != manifest and any(f["size"] == 7 for f in again["files"])
    # Switching to copy replaces the link with a real folder and leaves the source alone.
    copied = download(
        {"type": "local", "path": str(local_folder), "mode": "copy"},
        dest,
        manifest_path,
        dataset="ds",
    )
    assert not dest.is_symlink() and dest.is_dir()
    assert copied["files"] == again["files"]
    assert (local_folder / "labels.csv").read_bytes() == b"changed"
    assert copied["source"]["mode"] == "copy"


def test_local_missing_folder_is_named(tmp_path: Path, raw) -> None:
    dest, manifest_path = raw
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(DownloadError, match=str(missing)):
        download({"type": "local", "path": str(missing)}, dest, manifest_path, dataset="ds")
    assert not dest.exists() and not manifest_path.exists()


def test_stale_cleanup_spares_other_datasets_work(local_folder: Path, raw) -> None:
    """Leftovers of a killed 'ds' job go; the build folder of dataset 'ds.v2' (maybe running
    right now in a parallel job) is not 'ds' leftovers."""
    dest, manifest_path = raw
    dest.parent.mkdir(parents=True)
    mine = dest.parent / ".ds.k1ll3d_x.tmp"
    theirs = dest.parent / ".ds.v2.a1b2c3d4.tmp"
    for folder in (mine, theirs):
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "a.png").write_bytes(b"half")
    download({"type": "local", "path": str(local_folder)}, dest, manifest_path, dataset="ds")
    assert not mine.exists()
    assert (theirs / "images" / "a.png").read_bytes() == b"half"


def test_unknown_type_and_bad_paths(raw) -> None:
    dest, manifest_path = raw
    with pytest.raises(DownloadError, match="unknown source type 'ftp'"):
        download({"type": "ftp"}, dest, manifest_path, dataset="ds")
    with pytest.raises(DownloadError, match=r"without '\.\.'"):
        download(
            {"type": "http", "files": [{"url": "http://127.0.0.1:1/x", "path": "../x"}]},
            dest,
            manifest_path,
            dataset="ds",
        )


def _fake_demo_module(calls: list) -> types.ModuleType:
    def write_demo_source(kind: str, root: Path, cfg, *, seed: int) -> dict:
        calls.append((kind, dict(cfg), seed))
        import random

        rng = random.Random(seed)
        for i in range(cfg["n"]):
            (root / kind / f"img{i}.bin").parent.mkdir(parents=True, exist_ok=True)
            (root / kind / f"img{i}.bin").write_bytes(rng.randbytes(64))
        return {"n_images": cfg["n"]}

    module = types.ModuleType("cxrfoundry.data.demo_sources")
    module.write_demo_source = write_demo_source
    return module


def test_phantom_source_is_seeded_and_deterministic(raw, monkeypatch) -> None:
    dest, manifest_path = raw
    calls: list = []
    monkeypatch.setitem(sys.modules, "cxrfoundry.data.demo_sources", _fake_demo_module(calls))
    source = {"type": "phantom", "kind": "nih", "seed": 7, "phantom": {"n": 3}}
    first = download(source, dest, manifest_path, dataset="demo_nih")
    first_bytes = manifest_path.read_bytes()
    assert calls == [("nih", {"n": 3}, 7)]
    assert first["n_files"] == 3 and first["dataset"] == "demo_nih"
    assert first["source"] == source
    # Rebuilt from scratch: bit-identical manifest.
    import shutil

    shutil.rmtree(dest)
    assert download(source, dest, manifest_path, dataset="demo_nih") == first
    assert manifest_path.read_bytes() == first_bytes
    # Another seed gives other files.
    other = download({**source, "seed": 8}, dest, manifest_path, dataset="demo_nih")
    assert other["files"] != first["files"]


def test_phantom_failure_leaves_nothing(raw, monkeypatch) -> None:
    dest, manifest_path = raw

    def boom(kind, root, cfg, *, seed):
        (root / "half-written.png").write_bytes(b"x")
        raise RuntimeError("generator crashed")

    module = types.ModuleType("cxrfoundry.data.demo_sources")
    module.write_demo_source = boom
    monkeypatch.setitem(sys.modules, "cxrfoundry.data.demo_sources", module)
    with pytest.raises(RuntimeError, match="generator crashed"):
        download({"type": "phantom", "kind": "nih"}, dest, manifest_path, dataset="ds")
    assert not dest.parent.exists() or leftovers(dest.parent) == []


# ------------------------------------------------------------------------------------------
# Redirects, TLS, awkward secrets
# ------------------------------------------------------------------------------------------


@pytest.fixture
def other_host():
    """A second server, addressed as 'localhost' (another host name and port than 127.0.0.1)."""
    with HttpTestServer() as srv:
        yield srv, srv.base_url.replace("127.0.0.1", "localhost")


def test_redirect_to_another_host_carries_no_credentials(
    server, other_host, raw, sleeps, monkeypatch, tmp_path
) -> None:
    cdn, cdn_url = other_host
    dest, _ = raw
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(
        f"machine 127.0.0.1 login carol password {PASSWORD}\n"
        f"machine localhost login mallory password other-{PASSWORD}\n"
    )
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    monkeypatch.setenv("TEST_TOKEN", TOKEN)
    monkeypatch.setenv("TEST_PN_USER", "alice")
    monkeypatch.setenv("TEST_PN_PASS", PASSWORD)
    cdn.add("/cdn/x.bin", b"from the cdn")
    basic = {"username_env": "TEST_PN_USER", "password_env": "TEST_PN_PASS"}
    cases = [
        ({"token_env": "TEST_TOKEN"}, {"bearer": TOKEN}),
        ({"token_env": "TEST_TOKEN", "netrc": False}, {"bearer": TOKEN}),
        (basic, {"basic": ("alice", PASSWORD)}),
        ({"netrc": False}, {}),
    ]
    for i, (auth, protection) in enumerate(cases):
        server.add(
            "/x.bin", b"origin", faults=[Fault.redirect(cdn_url + "/cdn/x.bin")], **protection
        )
        download(
            {"type": "http", "files": [server.base_url + "/x.bin"], "auth": auth, **FAST},
            dest.parent / f"d{i}",
            dest.parent / f"d{i}.json",
            dataset=f"d{i}",
        )
        assert (dest.parent / f"d{i}" / "x.bin").read_bytes() == b"from the cdn"
        sent = cdn.requests_for("/cdn/x.bin")[-1].headers
        assert "Authorization" not in sent, (auth, sent.get("Authorization"))

    # With netrc, the redirect target gets its own entry, never the origin's.
    import base64

    server.add("/x.bin", b"origin", faults=[Fault.redirect(cdn_url + "/cdn/x.bin")])
    download(
        {"type": "http", "files": [server.base_url + "/x.bin"], **FAST},
        dest.parent / "n",
        dest.parent / "n.json",
        dataset="n",
    )

    def user_pass(headers: dict[str, str]) -> str:
        return base64.b64decode(headers["Authorization"].split()[1]).decode()

    assert user_pass(server.requests_for("/x.bin")[-1].headers) == f"carol:{PASSWORD}"
    assert user_pass(cdn.requests_for("/cdn/x.bin")[-1].headers) == f"mallory:other-{PASSWORD}"


@contextlib.contextmanager
def closed_port():
    """A loopback port that nothing listens on (bound once, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


SIGNATURE = "sig-77aa88bb99cc"


def test_signed_redirect_urls_never_reach_logs_or_errors(
    server, other_host, raw, sleeps, caplog
) -> None:
    """A redirect to a pre-signed URL (S3/GCS style) hands over a credential too."""
    caplog.set_level(logging.DEBUG)
    cdn, cdn_url = other_host
    dest, manifest_path = raw
    cdn.add("/cdn/x.bin", b"signed content")
    signed = f"{cdn_url}/cdn/x.bin?X-Goog-Signature={SIGNATURE}&X-Amz-Signature={SIGNATURE}2"
    server.add("/x.bin", b"origin", faults=[Fault.redirect(signed)])
    manifest = download(
        {"type": "http", "files": [server.base_url + "/x.bin"], **FAST},
        dest,
        manifest_path,
        dataset="ds",
    )
    assert cdn.requests_for("/cdn/x.bin")[-1].path.endswith(f"{SIGNATURE}2")  # it was used
    assert "/cdn/x.bin" in caplog.text
    assert SIGNATURE not in caplog.text and SIGNATURE not in json.dumps(manifest)
    assert "X-Goog-Signature=***" in redact_url(signed)

    # The signed host is down: the retry warnings and the final error stay clean too.
    with closed_port() as port:
        dead = f"http://localhost:{port}/cdn/y.bin?X-Goog-Signature={SIGNATURE}"
        server.add("/y.bin", b"origin", faults=[Fault.redirect(dead)] * 3)
        with pytest.raises(DownloadError, match="giving up") as err:
            download(
                {"type": "http", "files": [server.base_url + "/y.bin"], **FAST, "retries": 1},
                dest.parent / "y",
                dest.parent / "y.json",
                dataset="y",
            )
    assert "/y.bin" in str(err.value)
    assert SIGNATURE not in str(err.value) and SIGNATURE not in caplog.text


def test_token_with_a_line_break_is_refused_without_echoing_it(
    server, raw, sleeps, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    dest, manifest_path = raw
    monkeypatch.setenv("TEST_TOKEN", TOKEN + "\r\n")  # e.g. read from a Windows-edited file
    url = server.add("/t.csv", b"x", bearer=TOKEN)
    with pytest.raises(DownloadError, match="TEST_TOKEN") as err:
        download(
            {"type": "http", "files": [url], "auth": {"token_env": "TEST_TOKEN"}, **FAST},
            dest,
            manifest_path,
            dataset="ds",
        )
    assert TOKEN not in str(err.value) and TOKEN not in caplog.text
    assert not server.requests_for("/t.csv")


@pytest.fixture
def tls_server():
    pytest.importorskip("cryptography")
    with HttpTestServer(tls=True) as srv:
        yield srv


def test_https_source_refuses_a_redirect_to_plain_http(
    tls_server, server, raw, sleeps, monkeypatch
) -> None:
    dest, manifest_path = raw
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_server.ca_file))
    url = tls_server.add("/ok.csv", b"over tls")
    download({"type": "https", "files": [url], **FAST}, dest, manifest_path, dataset="ds")
    assert (dest / "ok.csv").read_bytes() == b"over tls"

    plain = server.add("/x.csv", b"plain http")
    tls_server.add("/x.csv", b"tls", faults=[Fault.redirect(plain)])
    with pytest.raises(DownloadError, match=r"redirect.*http://") as err:
        download(
            {"type": "https", "files": [tls_server.base_url + "/x.csv"], **FAST},
            dest.parent / "p",
            dest.parent / "p.json",
            dataset="p",
        )
    assert "/x.csv" in str(err.value)
    assert not server.requests_for("/x.csv")
    assert not (dest.parent / "p").exists() and not (dest.parent / "p.json").exists()


def test_untrusted_certificate_fails_at_once(tls_server, raw, sleeps, monkeypatch) -> None:
    dest, manifest_path = raw
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    url = tls_server.add("/x.csv", b"x")
    with pytest.raises(DownloadError, match="certificate") as err:
        download({"type": "https", "files": [url], **FAST}, dest, manifest_path, dataset="ds")
    assert url in str(err.value)
    assert sleeps == []  # a certificate that failed verification will fail again
