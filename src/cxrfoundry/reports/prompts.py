"""Prompt files (config/prompts/*.txt) and the structured metadata that fills them.

Prompts are our own, editable text files with :class:`string.Template` placeholders
(``$metadata``, ``$report``, ``$problems``); their combined sha256 goes into the output
(``prompt_sha256``) and into every cache key, so editing a prompt invalidates exactly the
cached answers it produced. Only structured metadata is ever put into a prompt: age, sex, race,
view and the finding lists (never image ids, paths, pixels or original report text).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from cxrfoundry.schema import FINDING_COLUMN_BY_NAME, FINDING_NAMES, NEGATIVE, POSITIVE, UNCERTAIN

PROMPT_FILES = ("writer_system", "writer_user", "qc_system", "qc_user", "repair_user")
#: Default location, relative to the working directory (the repository root under Snakemake).
DEFAULT_PROMPTS_DIR = Path("config/prompts")

_PROBLEM_TEXT = {
    "missing_positive": "the report does not affirm the positive finding {f}",
    "contradicts_negative": "the report affirms or suggests {f}, which the metadata says is absent",
    "unsupported": "the report mentions {f}, which the metadata does not support",
    "sex_mismatch": "the patient's sex does not match the metadata",
    "age_mismatch": "the patient's age does not match the metadata",
    "view_mismatch": "the view does not match the metadata",
    "empty_report": "the report is empty",
}


@dataclass(frozen=True)
class Prompts:
    """The five prompt templates and their combined sha256."""

    texts: Mapping[str, str]
    sha256: str

    def writer(self, metadata: Mapping[str, Any]) -> list[dict[str, str]]:
        """Chat messages asking for a report from ``metadata``."""
        user = Template(self.texts["writer_user"]).substitute(metadata=metadata_json(metadata))
        return [
            {"role": "system", "content": self.texts["writer_system"]},
            {"role": "user", "content": user},
        ]

    def qc(
        self, metadata: Mapping[str, Any], report: str, problems: list[str] | None = None
    ) -> list[dict[str, str]]:
        """Chat messages asking to check and correct ``report`` (with checker problems, if any)."""
        fields = {"metadata": metadata_json(metadata), "report": report.strip()}
        if problems:
            fields["problems"] = "\n".join(f"- {p}" for p in problems)
            user = Template(self.texts["repair_user"]).substitute(fields)
        else:
            user = Template(self.texts["qc_user"]).substitute(fields)
        return [
            {"role": "system", "content": self.texts["qc_system"]},
            {"role": "user", "content": user},
        ]


def load_prompts(folder: Path | str | None = None) -> Prompts:
    """Read the prompt files from ``folder`` (default ``config/prompts``).

    Raises ``FileNotFoundError`` naming the missing file, ``ValueError`` naming a file whose
    placeholders are wrong.
    """
    root = Path(folder) if folder else DEFAULT_PROMPTS_DIR
    texts: dict[str, str] = {}
    digest = hashlib.sha256()
    needed = {
        "writer_user": {"metadata"},
        "qc_user": {"metadata", "report"},
        "repair_user": {"metadata", "report", "problems"},
    }
    for name in PROMPT_FILES:
        path = root / f"{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prompt file is missing")
        text = path.read_text(encoding="utf-8")
        template = Template(text)
        if not template.is_valid():
            raise ValueError(f"{path}: invalid $placeholder syntax")
        found = set(template.get_identifiers())
        if name in needed and found != needed[name]:
            raise ValueError(
                f"{path}: placeholders {sorted(found)}, expected {sorted(needed[name])}"
            )
        texts[name] = text
        digest.update(f"{name}\0{text}\0".encode())
    return Prompts(texts, digest.hexdigest())


def row_metadata(row: Mapping[str, Any]) -> dict[str, Any]:
    """The structured metadata of one row that a prompt may contain (and nothing else)."""
    age = row.get("age")
    if isinstance(age, float) and math.isnan(age):
        age = None
    lists: dict[int, list[str]] = {POSITIVE: [], UNCERTAIN: [], NEGATIVE: []}
    for name in FINDING_NAMES:
        value = row.get(FINDING_COLUMN_BY_NAME[name])
        if value is not None and int(value) in lists:
            lists[int(value)].append(name)
    return {
        "age": None if age is None else int(age),
        "sex": {"M": "male", "F": "female"}.get(row.get("sex") or ""),
        "race": row.get("race") or None,
        "view": row.get("view"),
        "positive_findings": lists[POSITIVE],
        "uncertain_findings": lists[UNCERTAIN],
        "negative_findings": lists[NEGATIVE],
    }


def metadata_json(metadata: Mapping[str, Any]) -> str:
    """Canonical JSON of the metadata (sorted keys), so equal rows give equal requests."""
    return json.dumps(dict(metadata), sort_keys=True, indent=1)


def problems_text(flags: list[str]) -> list[str]:
    """Checker flags rewritten as instructions for a repair round."""
    out = []
    for flag in flags:
        kind, _, finding = flag.partition(":")
        out.append(_PROBLEM_TEXT.get(kind, flag).format(f=finding))
    return out
