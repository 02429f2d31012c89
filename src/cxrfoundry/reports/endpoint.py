"""A managed local inference server: start it, wait for health, use it on loopback, stop it.

With ``reports.openai.managed`` set, the stage runs a configured command such as
``vllm serve {model} --port {port}`` itself (``{model}`` and ``{port}`` are filled in; the port
is a free loopback port), waits until ``health_path`` (then ``/v1/models``) answers 200, runs
synthesis against ``http://127.0.0.1:{port}/v1`` and stops the server's whole process group
afterwards, also when synthesis fails. On Slurm this makes LLM synthesis one GPU job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANAGED_DEFAULTS: dict[str, Any] = {
    "command": "vllm serve {model} --port {port}",
    "health_path": "/health",
    "startup_timeout": 600.0,
    "stop_timeout": 20.0,
    "log_file": None,
}


class EndpointError(RuntimeError):
    """The managed server did not start or died."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(root: str, paths: tuple[str, ...]) -> bool:
    for path in paths:
        try:
            with urllib.request.urlopen(root + path, timeout=2.0) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return False


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("managed endpoint did not stop in %.0f s; killing it", timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def managed_endpoint(cfg: Mapping[str, Any], *, model: str, log_dir: Path) -> Iterator[str]:
    """Run the configured server for the ``with`` block; yields its OpenAI base URL.

    ``cfg`` keys: see :data:`MANAGED_DEFAULTS`. The server's output goes to
    ``log_file`` (default ``log_dir/managed_endpoint.log``). Raises :class:`EndpointError` when
    the command exits or is not healthy within ``startup_timeout`` seconds.
    """
    settings = {**MANAGED_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    port = free_port()
    command = shlex.split(str(settings["command"]).format(model=model, port=port))
    log_path = Path(settings["log_file"] or Path(log_dir) / "managed_endpoint.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = f"http://127.0.0.1:{port}"
    health = (str(settings["health_path"]), "/v1/models")
    log.info("starting managed endpoint: %s (log: %s)", " ".join(command), log_path)
    with open(log_path, "ab") as out:
        # Own session/process group, so stopping it also stops workers it spawned.
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + float(settings["startup_timeout"])
        while not _healthy(root, health):
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise EndpointError(
                    f"managed endpoint {command[0]!r} exited with {process.returncode} before "
                    f"becoming healthy; last output ({log_path}):\n{tail}"
                )
            if time.monotonic() > deadline:
                raise EndpointError(
                    f"managed endpoint {command[0]!r} not healthy at {root}{health[0]} after "
                    f"{settings['startup_timeout']} s (log: {log_path})"
                )
            time.sleep(0.2)
        log.info("managed endpoint healthy at %s (pid %d)", root, process.pid)
        yield f"{root}/v1"
    finally:
        _stop(process, float(settings["stop_timeout"]))
        log.info("managed endpoint stopped (exit %s)", process.returncode)
