"""Content-addressed, persistent cache of LLM answers.

Key = sha256 of the canonical JSON of (model, prompt sha256, sampling parameters, messages):
everything that determines an answer and nothing else (not the endpoint URL, not the key),
so one cache serves every dataset and every endpoint that serves the same model. One JSON file
per key under ``cache_dir/ab/cd/<key>.json``, written atomically the moment an answer arrives,
so a run killed part-way keeps every answer it received and a rerun only sends the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrfoundry.io import write_json

log = logging.getLogger(__name__)


def cache_key(
    model: str, prompt_sha256: str, params: Mapping[str, Any], messages: list[dict[str, str]]
) -> str:
    """The sha256 key of one request."""
    payload = {
        "messages": messages,
        "model": model,
        "params": dict(params),
        "prompt": prompt_sha256,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """One JSON file per answer under ``root`` in a two-level fan-out."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        """Where the answer for ``key`` lives."""
        return self.root / key[:2] / key[2:4] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached answer text, or None; an unreadable entry is logged and treated as absent."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            text = entry["content"]
            if entry.get("key") != key or not isinstance(text, str):
                raise ValueError("key or content mismatch")
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring corrupt cache entry %s (%s)", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return text

    def put(self, key: str, model: str, content: str) -> None:
        """Store an answer atomically."""
        write_json(self.path(key), {"content": content, "key": key, "model": model})

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*/*.json")) if self.root.exists() else 0
