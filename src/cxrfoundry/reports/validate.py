"""Validation of the report checker: real Open-I reports (MeSH terms) and template reports.

``python -m cxrfoundry.reports.validate [--openi DIR] [--n N] [--seed S]`` prints the
per-finding precision/recall tables that docs/reports.md reports.

Open-I (Indiana University) report XMLs carry FINDINGS / IMPRESSION text and MeSH "major"
terms written by annotators; :data:`MESH_TO_FINDING` maps the MeSH heading (the part before
the first ``/``) to a CheXpert finding. MeSH lists only what is present, so Open-I measures
the detection of present findings (positive or uncertain mention) only; template reports,
whose labels are known exactly, also measure negation and uncertainty.
"""

from __future__ import annotations

import argparse
import random
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrfoundry.reports.checker import NO_FINDING, extract
from cxrfoundry.schema import FINDING_COLUMN_BY_NAME, FINDING_NAMES, NEGATIVE, POSITIVE, UNCERTAIN

#: MeSH major heading (lower case, before the first "/") -> CheXpert finding.
MESH_TO_FINDING: dict[str, str] = {
    "normal": NO_FINDING,
    "cardiomegaly": "Cardiomegaly",
    "cardiac shadow": "Cardiomegaly",  # only with the "enlarged" qualifier, see _mesh_findings
    "mediastinum": "Enlarged Cardiomediastinum",  # only with "widened"/"enlarged"
    "opacity": "Lung Opacity",
    "infiltrate": "Lung Opacity",
    "airspace disease": "Lung Opacity",
    "density": "Lung Opacity",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "lung neoplasms": "Lung Lesion",
    "pulmonary edema": "Edema",
    "pulmonary congestion": "Edema",
    "edema": "Edema",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "pulmonary atelectasis": "Atelectasis",
    "atelectasis": "Atelectasis",
    "pneumothorax": "Pneumothorax",
    "pleural effusion": "Pleural Effusion",
    "pleural thickening": "Pleural Other",
    "fractures, bone": "Fracture",
    "rib fractures": "Fracture",
    "catheters, indwelling": "Support Devices",
    "tube, inserted": "Support Devices",
    "implanted medical device": "Support Devices",
    "pacemaker, artificial": "Support Devices",
    "medical device": "Support Devices",
    "stents": "Support Devices",
    "surgical instruments": "Support Devices",
}
_QUALIFIED = {"cardiac shadow": ("enlarged",), "mediastinum": ("widened", "enlarged")}


@dataclass(frozen=True)
class OpenIReport:
    """One Open-I report: id, report text (FINDINGS + IMPRESSION) and MeSH-derived findings."""

    report_id: str
    text: str
    findings: frozenset[str]
    mesh: tuple[str, ...]


def _mesh_findings(terms: Iterable[str]) -> frozenset[str]:
    found = set()
    for term in terms:
        parts = [p.strip().lower() for p in term.split("/")]
        head = parts[0]
        if head not in MESH_TO_FINDING:
            continue
        needed = _QUALIFIED.get(head)
        if needed and not any(q in parts[1:] for q in needed):
            continue
        found.add(MESH_TO_FINDING[head])
    return frozenset(found)


def load_openi(folder: Path) -> list[OpenIReport]:
    """Parse every ``*.xml`` Open-I report in ``folder`` (sorted by name).

    Raises ``ValueError`` naming the file when one is not a parseable Open-I report.
    """
    reports = []
    for path in sorted(Path(folder).glob("*.xml")):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            raise ValueError(f"{path}: not valid XML ({exc})") from exc
        sections = {
            node.get("Label"): (node.text or "").strip()
            for node in root.iter("AbstractText")
            if node.get("Label")
        }
        if "FINDINGS" not in sections and "IMPRESSION" not in sections:
            raise ValueError(f"{path}: no FINDINGS or IMPRESSION section")
        text = "\n".join(
            f"{label}: {sections[label]}"
            for label in ("FINDINGS", "IMPRESSION")
            if sections.get(label)
        )
        mesh = tuple((node.text or "").strip() for node in root.iter("major"))
        reports.append(OpenIReport(path.stem, text, _mesh_findings(mesh), mesh))
    return reports


@dataclass
class Counts:
    """Confusion counts for one finding and one target status."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float | None:
        """tp / (tp + fp), None when nothing was predicted."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        """tp / (tp + fn), None when there was nothing to find."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    def add(self, truth: bool, predicted: bool) -> None:
        """Count one (truth, prediction) pair."""
        if truth and predicted:
            self.tp += 1
        elif predicted:
            self.fp += 1
        elif truth:
            self.fn += 1


def evaluate_openi(reports: Iterable[OpenIReport]) -> dict[str, Counts]:
    """Per-finding counts for "finding present" (positive or uncertain mention) vs MeSH."""
    counts = {name: Counts() for name in FINDING_NAMES}
    for report in reports:
        said = extract(report.text).findings
        for name in FINDING_NAMES:
            counts[name].add(name in report.findings, said.get(name) in (POSITIVE, UNCERTAIN))
    return counts


def random_label_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Random manifest-like rows with varied labels, demographics and views (for templates)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {
            "image_id": f"validate/{i}",
            "sex": rng.choice(["M", "F", None]),
            "age": rng.choice([None, float(rng.randint(18, 95))]),
            "race": rng.choice([None, "White", "Black", "Asian"]),
            "view": rng.choice(["PA", "AP", "AP_SUPINE"]),
        }
        abnormal = 0
        for name in FINDING_NAMES[1:]:
            value = rng.choices([None, POSITIVE, NEGATIVE, UNCERTAIN], [0.55, 0.15, 0.2, 0.1])[0]
            abnormal += value in (POSITIVE, UNCERTAIN) and name != "Support Devices"
            row[FINDING_COLUMN_BY_NAME[name]] = value
        # CheXpert: No Finding when nothing but support devices is positive or uncertain.
        row["no_finding"] = POSITIVE if abnormal == 0 else None
        rows.append(row)
    return rows


def evaluate_labelled(
    pairs: Iterable[tuple[str, Mapping[str, Any]]],
) -> dict[str, dict[int, Counts]]:
    """Per finding and per status (1 / 0 / -1): counts of the extraction against row labels."""
    counts = {
        name: {s: Counts() for s in (POSITIVE, NEGATIVE, UNCERTAIN)} for name in FINDING_NAMES
    }
    for text, row in pairs:
        said = extract(text).findings
        for name in FINDING_NAMES:
            label = row.get(FINDING_COLUMN_BY_NAME[name])
            for status, c in counts[name].items():
                c.add(label == status, said.get(name) == status)
    return counts


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def openi_table(counts: Mapping[str, Counts]) -> str:
    """Markdown table of Open-I per-finding precision/recall plus the micro average."""
    lines = [
        "| finding | MeSH n | tp | fp | fn | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    total = Counts()
    for name, c in counts.items():
        n = c.tp + c.fn
        lines.append(
            f"| {name} | {n} | {c.tp} | {c.fp} | {c.fn} | {_fmt(c.precision)} | {_fmt(c.recall)} |"
        )
        total.tp, total.fp, total.fn = total.tp + c.tp, total.fp + c.fp, total.fn + c.fn
    lines.append(
        f"| **micro** | {total.tp + total.fn} | {total.tp} | {total.fp} | {total.fn} "
        f"| {_fmt(total.precision)} | {_fmt(total.recall)} |"
    )
    return "\n".join(lines)


def labelled_table(counts: Mapping[str, Mapping[int, Counts]]) -> str:
    """Markdown table of per-finding precision/recall for positive, negative, uncertain."""
    head = "| finding | P(pos) | R(pos) | P(neg) | R(neg) | P(unc) | R(unc) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, by_status in counts.items():
        cells = []
        for status in (POSITIVE, NEGATIVE, UNCERTAIN):
            c = by_status[status]
            cells += [_fmt(c.precision), _fmt(c.recall)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the validation tables (Open-I when the folder exists, and template reports)."""
    from cxrfoundry.reports.template import template_report

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--openi", type=Path, default=None)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--manifest", type=Path, default=None, help="a manifest Parquet: check its original reports"
    )
    args = parser.parse_args(argv)
    if args.manifest:
        import pyarrow.parquet as pq

        rows = [r for r in pq.read_table(args.manifest).to_pylist() if r.get("report")]
        print(f"## Original reports in {args.manifest} ({len(rows)} rows vs their labels)\n")
        print(labelled_table(evaluate_labelled((r["report"], r) for r in rows)))
        print()
    if args.openi and args.openi.exists():
        reports = load_openi(args.openi)
        print(f"## Open-I ({len(reports)} real reports, MeSH major terms)\n")
        print(openi_table(evaluate_openi(reports)))
        print()
    rows = random_label_rows(args.n, args.seed)
    pairs = [(template_report(row, seed=args.seed), row) for row in rows]
    print(f"## Template reports ({len(rows)} random label rows)\n")
    print(labelled_table(evaluate_labelled(pairs)))


if __name__ == "__main__":
    main()
