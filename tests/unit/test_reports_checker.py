"""Checker: negation/uncertainty scope, flags, and precision/recall floors (template, Open-I)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrfoundry.reports.checker import check_report, extract, flag_kind
from cxrfoundry.reports.template import template_report
from cxrfoundry.reports.validate import (
    evaluate_labelled,
    evaluate_openi,
    load_openi,
    random_label_rows,
)

OPENI = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "openi-reports"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
        (
            "Negative for focal pulmonary consolidation, pleural effusion, or pneumothorax.",
            {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0},
        ),
        (
            "The heart is enlarged without pleural effusion.",
            {"Cardiomegaly": 1, "Pleural Effusion": 0},
        ),
        ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
        ("Possible left lower lobe atelectasis.", {"Atelectasis": -1}),
        ("Findings may represent pulmonary edema.", {"Edema": -1}),
        ("The right pneumothorax has resolved.", {"Pneumothorax": 0}),
        (
            "No pneumothorax, but there is a small effusion.",
            {"Pneumothorax": 0, "Pleural Effusion": 1},
        ),
        ("No change in the left pleural effusion.", {"Pleural Effusion": 1}),
        ("Heart size is normal. Free of infiltrates.", {"Cardiomegaly": 0, "Lung Opacity": 0}),
        ("Right IJ catheter tip in the SVC.", {"Support Devices": 1}),
        ("Pacemaker leads are in place.", {"Support Devices": 1}),
        ("Widened mediastinum.", {"Enlarged Cardiomediastinum": 1}),
        ("Left apical pleural thickening.", {"Pleural Other": 1}),
        ("Nodular opacity in the right upper lobe.", {"Lung Lesion": 1, "Lung Opacity": 1}),
        ("Mild pulmonary vascular congestion.", {"Edema": 1}),
        ("Old healed rib fractures.", {"Fracture": 1}),
        ("No pericardial effusion.", {}),
        ("Mediastinal contours are widened.", {"Enlarged Cardiomediastinum": 1}),
        ("The heart is possibly mildly enlarged.", {"Cardiomegaly": -1}),
        ("Monitoring leads overlie the chest.", {"Support Devices": 1}),
        ("No acute osseous abnormality.", {"Fracture": 0}),
        ("Patchy opacity concerning for pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1}),
    ],
)
def test_extract_negation_and_uncertainty(text: str, expected: dict[str, int]) -> None:
    found = {k: v for k, v in extract(text).findings.items() if k != "No Finding"}
    assert found == expected


def test_no_finding_and_demographics() -> None:
    ex = extract("63-year-old woman. PA view. No acute cardiopulmonary abnormality.")
    assert ex.findings == {"No Finding": 1}
    assert ex.sexes == {"F"} and ex.ages == {63} and ex.views == {"PA"}
    assert "No Finding" not in extract("No acute disease. Cardiomegaly.").findings


def _row(**labels):
    row = {"image_id": "t/1", "sex": "F", "age": 63.0, "race": None, "view": "PA"}
    row.update(labels)
    return row


def test_flags_against_labels() -> None:
    row = _row(cardiomegaly=1, pneumothorax=0, edema=None)
    text = "FINDINGS: Possible cardiomegaly. Small pneumothorax. Pulmonary edema. IMPRESSION: x"
    flags = check_report(text, row)
    assert set(flags) == {
        "missing_positive:Cardiomegaly",
        "contradicts_negative:Pneumothorax",
        "unsupported:Edema",
    }
    assert check_report("54-year-old man, AP supine. Cardiomegaly.", row) == [
        "sex_mismatch",
        "age_mismatch",
        "view_mismatch",
    ]
    assert check_report("", row) == ["empty_report"]
    # A child finding satisfies its positive parent label.
    assert check_report("There is consolidation.", _row(lung_opacity=1, consolidation=1)) == []
    assert flag_kind("repaired:unsupported:Edema") == "repaired:unsupported"
    assert flag_kind("missing_positive:Edema") == "missing_positive"


#: Stated floor for template reports: every finding and status read back at >= 0.98.
TEMPLATE_FLOOR = 0.98


def test_template_reports_floor() -> None:
    rows = random_label_rows(600, seed=3)
    counts = evaluate_labelled((template_report(r, seed=7), r) for r in rows)
    for name, by_status in counts.items():
        for status, c in by_status.items():
            if c.tp + c.fn >= 5:
                assert c.recall >= TEMPLATE_FLOOR, (name, status, c)
            if c.tp + c.fp >= 5:
                assert c.precision >= TEMPLATE_FLOOR, (name, status, c)
    assert all(check_report(template_report(r, seed=7), r) == [] for r in rows)


#: Stated floor on the 60 real Open-I reports (micro over findings present in MeSH).
OPENI_MICRO_PRECISION, OPENI_MICRO_RECALL = 0.70, 0.85


@pytest.mark.skipif(not OPENI.is_dir(), reason="shared Open-I reports not present")
def test_openi_floor() -> None:
    reports = load_openi(OPENI)
    assert len(reports) >= 50
    counts = evaluate_openi(reports)
    tp = sum(c.tp for c in counts.values())
    fp = sum(c.fp for c in counts.values())
    fn = sum(c.fn for c in counts.values())
    assert tp / (tp + fp) >= OPENI_MICRO_PRECISION
    assert tp / (tp + fn) >= OPENI_MICRO_RECALL


def test_openi_bad_xml_names_file(tmp_path: Path) -> None:
    (tmp_path / "bad.xml").write_text("<eCitation><oops")
    with pytest.raises(ValueError, match=r"bad\.xml"):
        load_openi(tmp_path)
