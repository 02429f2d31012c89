"""A scriptable HTTP file server on 127.0.0.1 for tests (nothing leaves the machine).

Usage::

    with HttpTestServer() as server:
        url = server.add("/data.zip", payload, faults=[Fault.drop(after=100)], basic=("u", "p"))
        ...                                   # fetch url
        server.requests_for("/data.zip")      # what the client sent, what it got

Each resource supports ``Range: bytes=N-`` / ``bytes=N-M`` (206 + ``Content-Range``; 416 past
the end), ``If-Range`` against its ETag, optional Basic or Bearer authentication, and a queue of
scripted faults consumed one per request: answer with a status (``500``, ``429`` with
``Retry-After``...), redirect elsewhere, drop the connection after N body bytes, or serve other
content.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, used for a single request."""

    kind: str  # "status" | "drop" | "stall" | "content" | "ignore_range" | "wrong_range"
    status: int = 500
    headers: tuple[tuple[str, str], ...] = ()
    after: int = 0
    body: bytes = b""
    seconds: float = 0.0

    @classmethod
    def error(cls, status: int = 500, retry_after: str | None = None) -> Fault:
        """Answer ``status`` (with ``Retry-After`` when given) instead of the content."""
        headers = (("Retry-After", retry_after),) if retry_after is not None else ()
        return cls("status", status=status, headers=headers)

    @classmethod
    def drop(cls, after: int) -> Fault:
        """Send the headers and ``after`` body bytes, then close the connection abruptly."""
        return cls("drop", after=after)

    @classmethod
    def stall(cls, after: int, seconds: float) -> Fault:
        """Send ``after`` body bytes, go silent for ``seconds``, then drop the connection."""
        return cls("stall", after=after, seconds=seconds)

    @classmethod
    def content(cls, body: bytes) -> Fault:
        """Serve ``body`` instead of the resource's content (e.g. a corrupted copy)."""
        return cls("content", body=body)

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Fault:
        """Answer ``status`` with ``Location: location`` (after the authentication check)."""
        return cls("status", status=status, headers=(("Location", location),))

    @classmethod
    def ignore_range(cls) -> Fault:
        """Answer 200 with the full content even if the request had a Range header."""
        return cls("ignore_range")

    @classmethod
    def wrong_range(cls, start: int) -> Fault:
        """Answer a range request with 206 from byte ``start`` instead of the one asked for."""
        return cls("wrong_range", after=start)


@dataclass
class Resource:
    data: bytes
    faults: list[Fault] = field(default_factory=list)
    range_support: bool = True
    basic: tuple[str, str] | None = None
    bearer: str | None = None
    validators: bool = True  # send an ETag (False: a server that gives no validator at all)

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'


@dataclass
class RequestRecord:
    path: str  # path and query, as requested
    headers: dict[str, str]
    status: int
    body_bytes: int  # body bytes written to the socket (recorded before the client sees them)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def _send(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        drop_after: int | None = None,
        stall: float = 0.0,
    ) -> None:
        sent = body if drop_after is None else body[:drop_after]
        # Recorded before anything is written (end_headers already flushes the status line), so
        # a test reading the log right after its client returns never races this thread.
        record = RequestRecord(self.path, dict(self.headers.items()), status, len(sent))
        self.server.owner._record(record)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(sent)
            self.wfile.flush()
        except OSError:
            record.body_bytes = 0
        if stall:
            time.sleep(stall)
        if drop_after is not None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _authorised(self, res: Resource) -> bool:
        given = self.headers.get("Authorization", "")
        if res.basic is not None:
            token = base64.b64encode(f"{res.basic[0]}:{res.basic[1]}".encode()).decode()
            return given == f"Basic {token}"
        if res.bearer is not None:
            return given == f"Bearer {res.bearer}"
        return True

    def do_GET(self) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        with owner.lock:
            res = owner.resources.get(path)
            fault = res.faults.pop(0) if res is not None and res.faults else None
        if res is None:
            self._send(404, {}, b"not found")
            return
        if not self._authorised(res):
            self._send(401, {"WWW-Authenticate": 'Basic realm="test"'}, b"unauthorised")
            return
        if fault is not None and fault.kind == "status":
            self._send(fault.status, dict(fault.headers), b"scripted failure")
            return
        data = fault.body if fault is not None and fault.kind == "content" else res.data
        headers = {"Content-Type": "application/octet-stream"}
        if res.validators:
            headers["ETag"] = res.etag
        status, body = 200, data
        range_header = self.headers.get("Range")
        honour = res.range_support and not (fault is not None and fault.kind == "ignore_range")
        if honour:
            headers["Accept-Ranges"] = "bytes"
        if range_header and honour:
            if_range = self.headers.get("If-Range")
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if match and (if_range is None or if_range == res.etag):
                start = int(match.group(1))
                if fault is not None and fault.kind == "wrong_range":
                    start = fault.after
                end = int(match.group(2)) if match.group(2) else len(data) - 1
                if start >= len(data):
                    self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
                    return
                end = min(end, len(data) - 1)
                status, body = 206, data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        cut = fault is not None and fault.kind in ("drop", "stall")
        drop_after = fault.after if cut else None
        stall = fault.seconds if fault is not None and fault.kind == "stall" else 0.0
        self._send(status, headers, body, drop_after=drop_after, stall=stall)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: HttpTestServer

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up on kept-alive or deliberately dropped connections are expected.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """Write a throw-away certificate for 127.0.0.1/localhost and its key; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cxrfoundry test server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class HttpTestServer:
    """Context manager running the server in a daemon thread on an ephemeral port.

    ``tls=True`` serves HTTPS with a fresh self-signed certificate (needs ``cryptography``);
    point a client at :attr:`ca_file` (e.g. ``REQUESTS_CA_BUNDLE``) to trust it.
    """

    def __init__(self, *, tls: bool = False) -> None:
        self.resources: dict[str, Resource] = {}
        self.requests: list[RequestRecord] = []
        self.lock = threading.Lock()
        self.tls = tls
        self.ca_file: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HttpTestServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        if self.tls:
            self._tmp = tempfile.TemporaryDirectory(prefix="httpserver-")
            cert_file, key_file = _self_signed(Path(self._tmp.name))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert_file, key_file)
            # The handshake runs in accept(); a client refusing the certificate makes accept()
            # raise an OSError, which socketserver ignores.
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.ca_file = cert_file
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def add(
        self,
        path: str,
        data: bytes,
        *,
        faults: list[Fault] | None = None,
        range_support: bool = True,
        basic: tuple[str, str] | None = None,
        bearer: str | None = None,
        validators: bool = True,
    ) -> str:
        """Serve ``data`` at ``path``; return its URL. ``validators=False``: no ETag."""
        with self.lock:
            self.resources[path] = Resource(
                data, list(faults or []), range_support, basic, bearer, validators
            )
        return self.base_url + path

    def _record(self, record: RequestRecord) -> None:
        with self.lock:
            self.requests.append(record)

    def requests_for(self, path: str) -> list[RequestRecord]:
        """Requests whose path (query ignored) is ``path``, in arrival order."""
        with self.lock:
            return [r for r in self.requests if urlsplit(r.path).path == path]
