"""An OpenAI-compatible chat server with scripted behaviour, on loopback, for tests and benches.

It reads the structured metadata our prompts carry (the first fenced ```json block) and answers
like a well-behaved writer / QC model, or injects faults chosen deterministically from a hash
of the request, so a rerun of the same requests sees the same faults:

- content faults, on writer requests only: ``hallucinate`` (adds a finding the metadata does not
  have), ``omit`` (drops a positive finding), ``wrong_sex``;
- transient faults, on any request, for the first ``transient_attempts`` attempts of that
  request: ``rate_limit`` (429 + Retry-After), ``error500``, ``hang`` (sleeps ``hang_seconds``),
  ``garbage`` (200 with a body that is not JSON), ``empty`` (a completion with no text).

QC behaviour (``qc``): ``fix`` (returns a correct report), ``echo`` (returns the draft),
``fix_on_repair`` (echoes a plain QC request, fixes when the request lists problems).
``latency`` adds a delay to every chat answer. Every chat request is recorded (body, kind,
fault) and is visible at ``GET /_requests`` and, with ``--log``, appended to a JSONL file.

Run: ``python tests/llm_server.py --port 8011 --config '{"faults": {"omit": 0.2}}'`` or use
:class:`ScriptedLLMServer` in-process (``with ScriptedLLMServer(config) as server: server.url``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PHRASE = {
    "Enlarged Cardiomediastinum": "a widened mediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "an airspace opacity",
    "Lung Lesion": "a pulmonary nodule",
    "Edema": "pulmonary edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "a pneumothorax",
    "Pleural Effusion": "a pleural effusion",
    "Pleural Other": "pleural thickening",
    "Fracture": "a rib fracture",
    "Support Devices": "a support device",
}
CONTENT_FAULTS = ("hallucinate", "omit", "wrong_sex")
TRANSIENT_FAULTS = ("rate_limit", "error500", "hang", "garbage", "empty")
DEFAULTS: dict[str, Any] = {
    "faults": {},
    "qc": "fix",
    "latency": 0.0,
    "transient_attempts": 1,
    "retry_after": 0.05,
    "hang_seconds": 3.0,
}
_JSON_RE = re.compile(r"```json\s*(.*?)```", re.S)
_REPORT_RE = re.compile(r"<report>\s*(.*?)\s*</report>", re.S)


def write_report(
    meta: dict[str, Any],
    *,
    omit: bool = False,
    add: str | None = None,
    sex_override: str | None = None,
) -> str:
    """A correct report for ``meta`` (optionally with one positive omitted / one finding added)."""
    positives = [f for f in meta.get("positive_findings", []) if f in PHRASE]
    if omit and positives:
        positives = positives[1:]
    uncertain = [f for f in meta.get("uncertain_findings", []) if f in PHRASE]
    negatives = [f for f in meta.get("negative_findings", []) if f in PHRASE]
    sentences = [f"There is {PHRASE[f]}." for f in positives]
    sentences += [f"{PHRASE[f][0].upper()}{PHRASE[f][1:]} cannot be excluded." for f in uncertain]
    sentences += [f"No {PHRASE[f].removeprefix('a ').removeprefix('an ')}." for f in negatives]
    if add:
        sentences.append(f"There is also {PHRASE[add]}.")
        positives = [*positives, add]
    age = meta.get("age")
    sex = sex_override or meta.get("sex") or "patient"
    patient = f"{age}-year-old {sex}" if age is not None else f"{sex}, age unknown"
    view = {"PA": "PA", "AP": "AP", "AP_SUPINE": "supine AP"}.get(meta.get("view") or "", "frontal")
    impression = [PHRASE[f] for f in positives] + [f"possible {PHRASE[f]}" for f in uncertain]
    abnormal = [f for f in positives + uncertain if f != "Support Devices"]
    imp = ("; ".join(impression).capitalize() + ". ") if impression else ""
    if not abnormal:
        imp += "No acute cardiopulmonary abnormality."
    return (
        f"PATIENT INFORMATION: {patient}.\nTECHNIQUE: {view} chest radiograph.\n"
        f"FINDINGS: {' '.join(sentences) or 'Unremarkable.'}\nIMPRESSION: {imp.strip()}"
    )


class _State:
    def __init__(self, config: dict[str, Any], log_path: Path | None) -> None:
        self.config = {**DEFAULTS, **config}
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.log_path = log_path

    def pick_fault(self, key: str, kind: str) -> str | None:
        u = int(key[:8], 16) / 0xFFFFFFFF
        edge = 0.0
        for name in TRANSIENT_FAULTS + CONTENT_FAULTS:
            rate = float(self.config["faults"].get(name, 0.0))
            if edge <= u < edge + rate:
                if name in CONTENT_FAULTS:
                    return name if kind == "writer" else None
                with self.lock:
                    attempt = self.attempts[key]
                return name if attempt <= int(self.config["transient_attempts"]) else None
            edge += rate
        return None

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(entry)
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry) + "\n")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers + body writes stall on delayed ACKs
    state: _State

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access log
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
        elif self.path == "/_requests":
            with self.state.lock:
                self._json(200, list(self.state.requests))
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        if self.path == "/_config":
            with self.state.lock:
                self.state.config.update(json.loads(raw))
            self._json(200, self.state.config)
            return
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found"}})
            return
        body = json.loads(raw)
        user = "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")
        kind = "writer" if "<report>" not in user else "repair" if "<problems>" in user else "qc"
        key = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()
        with self.state.lock:
            self.state.attempts[key] += 1
        config = self.state.config
        fault = self.state.pick_fault(key, kind)
        self.state.record(
            {
                "key": key,
                "kind": kind,
                "fault": fault,
                "body": body,
                "auth": bool(self.headers.get("Authorization")),
            }
        )
        if config["latency"]:
            time.sleep(float(config["latency"]))
        if fault == "rate_limit":
            self._json(
                429,
                {"error": {"message": "slow down"}},
                {"Retry-After": str(config["retry_after"])},
            )
            return
        if fault == "error500":
            self._json(500, {"error": {"message": "boom"}})
            return
        if fault == "hang":
            time.sleep(float(config["hang_seconds"]))
        if fault == "garbage":
            self._send(200, b"{this is not json")
            return
        match = _JSON_RE.search(user)
        meta = json.loads(match.group(1)) if match else {}
        if fault == "empty":
            text = ""
        elif kind == "writer":
            add = None
            if fault == "hallucinate":
                taken = set(meta.get("positive_findings", []) + meta.get("uncertain_findings", []))
                add = next(
                    f
                    for f in ("Pneumothorax", "Fracture", "Pleural Effusion", "Cardiomegaly")
                    if f not in taken
                )
            sex = {"male": "female", "female": "male"}.get(meta.get("sex") or "", "female")
            text = write_report(
                meta,
                omit=fault == "omit",
                add=add,
                sex_override=sex if fault == "wrong_sex" else None,
            )
        elif config["qc"] == "echo" or (config["qc"] == "fix_on_repair" and kind == "qc"):
            draft = _REPORT_RE.search(user)
            text = draft.group(1) if draft else ""
        else:
            text = write_report(meta)
        self._json(
            200,
            {
                "id": f"chatcmpl-{key[:12]}",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "scripted"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": text},
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) drops SYNs when many clients connect at once, and each
    # dropped SYN costs the client a 1 s retransmit.
    request_queue_size = 1024
    daemon_threads = True


class ScriptedLLMServer:
    """The scripted server in a background thread; ``url`` is the OpenAI base URL (``.../v1``)."""

    def __init__(
        self, config: dict[str, Any] | None = None, *, port: int = 0, log_path: Path | None = None
    ) -> None:
        handler = type("Handler", (_Handler,), {"state": _State(config or {}, log_path)})
        self.httpd = _Server(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.state: _State = handler.state
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every chat request received so far."""
        with self.state.lock:
            return list(self.state.requests)

    def configure(self, **changes: Any) -> None:
        """Change the behaviour of a running server."""
        with self.state.lock:
            self.state.config.update(changes)


def main() -> None:
    """Serve until killed (used as a managed-endpoint command in tests)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", default="{}", help="JSON text or a path to a JSON file")
    parser.add_argument("--log", type=Path, default=None, help="append requests as JSONL here")
    args = parser.parse_args()
    text = args.config if args.config.lstrip().startswith("{") else Path(args.config).read_text()
    config = json.loads(text)
    server = ScriptedLLMServer(config, port=args.port, log_path=args.log)
    print(f"serving on {server.url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
