"""Report-synthesis throughput against the scripted OpenAI-compatible server on loopback.

With injected latency L per request and concurrency C, N requests should take about N·L/C;
the target is elapsed <= 1.25 × N·L/C. A second run on the same cache must send 0 requests.
QC is disabled here so that one row = one request (QC doubles the requests, not the ratio).

    .venv/bin/python bench/bench_reports.py --n 320 --latency 0.5 --concurrency 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cxrfoundry.reports.endpoint import free_port  # noqa: E402
from cxrfoundry.reports.synthesize import synthesize_reports  # noqa: E402
from cxrfoundry.reports.validate import random_label_rows  # noqa: E402
from cxrfoundry.schema import MANIFEST_SCHEMA, conform  # noqa: E402


def _manifest(n: int):
    rows = random_label_rows(n, seed=0)
    for i, row in enumerate(rows):
        row.update(
            dataset="bench",
            patient_id=str(i),
            study_id=str(i),
            image_path=f"{i}.png",
            view_source="metadata",
            labels_extra="{}",
            split="train",
            report=None,
        )
    return conform(rows, MANIFEST_SCHEMA)


@contextlib.contextmanager
def _server(latency: float) -> Iterator[str]:
    """The scripted server in its own process, as a real endpoint would be (no shared GIL)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "llm_server.py"),
            "--port",
            str(port),
            "--config",
            json.dumps({"latency": latency}),
        ],
        stdout=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(root + "/health", timeout=1).close()
                break
            time.sleep(0.1)
        yield root
    finally:
        proc.terminate()
        proc.wait()


def _count(root: str) -> int:
    with urllib.request.urlopen(root + "/_requests", timeout=10) as response:
        return len(json.loads(response.read()))


def main() -> None:
    """Run the benchmark and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=320)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    manifest = _manifest(args.n)
    with _server(args.latency) as root, tempfile.TemporaryDirectory() as d:
        cfg = {
            "backend": "openai",
            "prompts_dir": str(ROOT / "config" / "prompts"),
            "openai": {
                "base_url": root + "/v1",
                "model": "bench",
                "concurrency": args.concurrency,
                "timeout": 30.0,
            },
            "qc": {"enabled": False},
        }
        start = time.perf_counter()
        _, audit = synthesize_reports(
            manifest, cfg, cache_dir=Path(d), dataset_policy="public", seed=0
        )
        elapsed = time.perf_counter() - start
        sent = _count(root)
        start = time.perf_counter()
        _, rerun = synthesize_reports(
            manifest, cfg, cache_dir=Path(d), dataset_policy="public", seed=0
        )
        cached_elapsed = time.perf_counter() - start
        ideal = args.n * args.latency / args.concurrency
        result = {
            "n": args.n,
            "latency_s": args.latency,
            "concurrency": args.concurrency,
            "ideal_s": round(ideal, 3),
            "elapsed_s": round(elapsed, 3),
            "ratio_to_ideal": round(elapsed / ideal, 3),
            "target_ratio": 1.25,
            "requests_sent": sent,
            "rows_llm": audit["report_source"]["llm"],
            "cached_rerun_requests_sent": _count(root) - sent,
            "cached_rerun_cache_hits": rerun["requests"]["cache_hits"],
            "cached_rerun_elapsed_s": round(cached_elapsed, 3),
        }
    print(json.dumps(result, indent=2))
    ok = result["ratio_to_ideal"] <= 1.25 and result["cached_rerun_requests_sent"] == 0
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
