"""Tests of view normalisation, DICOM view tags and the frontal filter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrfoundry import schema
from cxrfoundry.data.dicom import read_header, view_from_tags
from cxrfoundry.data.views import (
    filter_frontal,
    normalize_view,
    resolve_policy,
    view_from_code_meaning,
    view_from_text,
)

REAL = Path("/work/shared/data/real")

# The real vocabularies (datasets.md; PadChest ViewPosition_DICOM values seen in its CSV).
MIMIC = {
    "AP": "AP",
    "AP AXIAL": "OTHER",
    "AP LLD": "OTHER",
    "AP RLD": "OTHER",
    "PA": "PA",
    "PA LLD": "OTHER",
    "PA RLD": "OTHER",
    "LAO": "OTHER",
    "LATERAL": "LATERAL",
    "LL": "LATERAL",
    "LPO": "OTHER",
    "RAO": "OTHER",
    "SWIMMERS": "OTHER",
    "XTABLE LATERAL": "LATERAL",
    "": "UNKNOWN",
}
CHEXPERT_AP_PA = {"AP": "AP", "PA": "PA", "LL": "LATERAL", "RL": "LATERAL", "": "UNKNOWN"}
NIH = {"PA": "PA", "AP": "AP"}
PADCHEST = {
    "PA": "PA",
    "AP": "AP",
    "AP_horizontal": "AP_SUPINE",
    "L": "LATERAL",
    "COSTAL": "OTHER",
    "EXCLUDE": "OTHER",
    "UNK": "UNKNOWN",
}
PADCHEST_DICOM = {
    "POSTEROANTERIOR": "PA",
    "ANTEROPOSTERIOR": "AP",
    "LATERAL": "LATERAL",
    "LL": "LATERAL",
    "nan": "UNKNOWN",
}
BRAX = {
    "PA": "PA",
    "AP": "AP",
    "AP LLD": "OTHER",
    "L": "LATERAL",
    "RL": "LATERAL",
    "RLO": "OTHER",
    "LT-DECUB": "OTHER",
    "": "UNKNOWN",
}


@pytest.mark.parametrize(
    ("vocab", "table"),
    [
        ("mimic", MIMIC),
        ("chexpert", CHEXPERT_AP_PA),
        ("nih", NIH),
        ("padchest", PADCHEST),
        ("padchest", PADCHEST_DICOM),
        ("brax", BRAX),
    ],
)
def test_normalize_view_real_vocabularies(vocab: str, table: dict[str, str]) -> None:
    for raw, expected in table.items():
        assert normalize_view(raw, vocab) == expected, raw
        assert expected in schema.VIEWS


def test_normalize_view_edge_cases() -> None:
    assert normalize_view(None) == "UNKNOWN"
    assert normalize_view(float("nan")) == "UNKNOWN"
    assert normalize_view("  pa ") == "PA"
    assert normalize_view("Foo bar") == "UNKNOWN"
    assert normalize_view("Frontal", "chexpert") == "UNKNOWN"
    # decubitus is configurable as frontal
    assert normalize_view("AP LLD", decubitus_as_frontal=True) == "AP"
    assert normalize_view("PA RLD", decubitus_as_frontal=True) == "PA"
    assert normalize_view("LT-DECUB", decubitus_as_frontal=True) == "AP"
    # a lateral decubitus is a lateral projection, never frontal
    assert normalize_view("LATERAL DECUBITUS", decubitus_as_frontal=True) == "LATERAL"


def test_view_from_code_meaning_and_text() -> None:
    assert view_from_code_meaning("postero-anterior") == "PA"
    assert view_from_code_meaning("antero-posterior") == "AP"
    assert view_from_code_meaning("left lateral") == "LATERAL"
    assert view_from_code_meaning("lateral") == "LATERAL"
    assert view_from_text("CHEST (PORTABLE AP)") == "AP"
    assert view_from_text("view: PA") == "PA"
    assert view_from_text("CHEST LAT") == "LATERAL"
    assert view_from_text("CHEST (PA AND LAT)") == "UNKNOWN"  # a two-view study: ambiguous
    assert view_from_text("Xray Chest PA and Lateral") == "UNKNOWN"
    assert view_from_text("THORAX") == "UNKNOWN"
    assert view_from_text("CHEST AP SUPINE") == "AP_SUPINE"
    assert view_from_text("PARENCHYMA") == "UNKNOWN"  # "PA" must be a whole word


def _ds(**tags: object) -> Dataset:
    ds = Dataset()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def test_view_from_tags_fallback_order() -> None:
    assert view_from_tags(_ds(ViewPosition="PA")) == ("PA", "PA", "ViewPosition")
    code = Dataset()
    code.CodeMeaning = "left lateral"
    ds = _ds(ViewPosition="", ViewCodeSequence=[code])
    assert view_from_tags(ds) == ("left lateral", "LATERAL", "ViewCodeSequence")
    ds = _ds(SeriesDescription="THORAX", StudyDescription="CHEST PORTABLE AP")
    assert view_from_tags(ds) == ("CHEST PORTABLE AP", "AP", "StudyDescription")
    ds = _ds(PerformedProcedureStepDescription="CHEST (PA AND LAT)")
    assert view_from_tags(ds) == ("CHEST (PA AND LAT)", "UNKNOWN", "none")
    assert view_from_tags(_ds()) == (None, "UNKNOWN", "none")
    # an unrecognised ViewPosition falls through to the next tag
    assert view_from_tags(_ds(ViewPosition="XX", ProtocolName="PA chest"))[1:] == (
        "PA",
        "ProtocolName",
    )


@pytest.mark.skipif(not (REAL / "dicom").is_dir(), reason="real DICOM samples absent")
@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "siim_cr_pa.dcm", "siim_cr_pa_monochrome1.dcm"])
def test_real_dicom_views(name: str) -> None:
    view_raw, view, how = view_from_tags(read_header(REAL / "dicom" / name))
    assert (view_raw, view, how) == ("PA", "PA", "ViewPosition")


# --------------------------------------------------------------------------------------------
# filter_frontal
# --------------------------------------------------------------------------------------------


def synthetic_cxr(kind: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A crude radiograph: frontal = two dark lungs either side of a bright spine;
    lateral = one dark lung field with the spine band at the back (right)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.full((size, size), 170.0)
    jitter = rng.normal(0, 0.03, 4)
    if kind == "frontal":
        for cx in (0.3 + jitter[0], 0.7 + jitter[1]):
            lung = ((xx - cx) / 0.14) ** 2 + ((yy - 0.5 - jitter[2]) / 0.3) ** 2 < 1
            img[lung] = 60
        img[:, int(size * 0.47) : int(size * 0.53)] = 230
    else:
        lung = ((xx - 0.45 - jitter[0]) / 0.28) ** 2 + ((yy - 0.5 - jitter[1]) / 0.3) ** 2 < 1
        img[lung] = 70
        img[:, int(size * (0.8 + jitter[2])) : int(size * (0.9 + jitter[2]))] = 230
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _manifest_rows(tmp: Path, specs: list[tuple[str, str, str | None, str]]) -> pa.Table:
    """specs: (kind for pixels, view, view_raw, view_source)."""
    rng = np.random.default_rng(0)
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (kind, view, view_raw, source) in enumerate(specs):
        rel = f"img/{i:04d}.png"
        Image.fromarray(synthetic_cxr(kind, rng)).save(tmp / rel)
        rows.append(
            {
                "image_id": f"demo/{i:04d}",
                "dataset": "demo",
                "patient_id": f"p{i}",
                "study_id": f"s{i}",
                "image_path": rel,
                "view": view,
                "view_raw": view_raw,
                "view_source": source,
                "labels_extra": "{}",
                "split": "train",
            }
        )
    return schema.conform(rows, schema.MANIFEST_SCHEMA)


def _dicom_file(path: Path, view_position: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P1"
    ds.ViewPosition = view_position
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_filter_metadata_dicom_and_policy(tmp_path: Path) -> None:
    specs = [
        ("frontal", "PA", "PA", "metadata"),
        ("frontal", "AP", "AP", "metadata"),
        ("frontal", "AP_SUPINE", "AP_horizontal", "metadata"),
        ("lateral", "LATERAL", "LL", "metadata"),
        ("frontal", "OTHER", "AP LLD", "metadata"),
        ("frontal", "OTHER", "SWIMMERS", "metadata"),
        ("frontal", "UNKNOWN", "FOO", "none"),
    ]
    table = _manifest_rows(tmp_path, specs)
    # one more row: a DICOM whose manifest view is unknown but whose tags say LL
    _dicom_file(tmp_path / "dcm" / "x.dcm", "LL")
    extra = table.slice(0, 1).to_pylist()[0]
    extra.update(
        image_id="demo/dcm",
        image_path="dcm/x.dcm",
        view="UNKNOWN",
        view_raw=None,
        view_source="none",
    )
    table = pa.concat_tables([table, schema.conform([extra], schema.MANIFEST_SCHEMA)])

    result = filter_frontal(table, tmp_path, {"classifier": {"enabled": False}})
    audit = result.audit
    assert audit["rows_in"] == 8 == audit["rows_frontal"] + audit["rows_excluded"]
    assert sorted(result.frontal.column("image_id").to_pylist()) == [
        "demo/0000",
        "demo/0001",
        "demo/0002",
    ]
    reasons = dict(
        zip(
            result.excluded.column("image_id").to_pylist(),
            result.excluded.column("reason").to_pylist(),
            strict=True,
        )
    )
    assert reasons["demo/0003"] == "view LATERAL is not frontal"
    assert reasons["demo/0004"].startswith("view OTHER is not frontal")
    assert reasons["demo/0006"] == "view unknown after all fallbacks (raw 'FOO'): policy exclude"
    assert reasons["demo/dcm"] == "view LATERAL is not frontal"
    assert set(result.excluded.column("stage").to_pylist()) == {"filter_frontal"}
    assert audit["by_source"] == {"metadata": 6, "dicom": 1, "classifier": 0, "none": 1}
    assert sum(v["count"] for v in audit["views"]) == 8
    assert audit["classifier"]["reason"] == "disabled by policy"
    assert result.frontal.schema == schema.MANIFEST_SCHEMA
    assert result.excluded.schema == schema.REJECTS_SCHEMA
    json.dumps(audit)

    # decubitus as frontal, unknown included
    result = filter_frontal(
        table,
        tmp_path,
        {"include_decubitus": True, "unknown_policy": "include", "classifier": {"enabled": False}},
    )
    kept = dict(
        zip(
            result.frontal.column("image_id").to_pylist(),
            result.frontal.column("view").to_pylist(),
            strict=True,
        )
    )
    assert kept["demo/0004"] == "AP"
    assert kept["demo/0006"] == "UNKNOWN"
    assert "demo/0005" not in kept
    assert result.audit["rows_frontal"] == 5

    # keep_apart: excluded with the policy in the reason, and returned for review
    result = filter_frontal(
        table, tmp_path, {"unknown_policy": "keep_apart", "classifier": {"enabled": False}}
    )
    assert result.kept_apart.column("image_id").to_pylist() == ["demo/0006"]
    assert result.audit["rows_kept_apart"] == 1
    assert any(
        r.endswith("policy keep_apart") for r in result.excluded.column("reason").to_pylist()
    )


#: A classifier policy the 80 known-view images of :func:`_known_then_unknown_views` satisfy.
CLASSIFIER_POLICY = {"min_accuracy": 0.9, "min_confidence": 0.8, "min_per_class": 10}


def _known_then_unknown_views(
    tmp: Path, more: list[tuple[str, str, str | None, str]] | None = None
) -> pa.Table:
    """Rows 0-39 PA, 40-79 lateral (views known), 80-89 frontal, 90-99 lateral (UNKNOWN), then
    the rows of ``more`` (specs as for :func:`_manifest_rows`)."""
    known = [("frontal", "PA", "PA", "metadata")] * 40 + [
        ("lateral", "LATERAL", "L", "metadata")
    ] * 40
    unknown = [("frontal", "UNKNOWN", None, "none")] * 10 + [
        ("lateral", "UNKNOWN", None, "none")
    ] * 10
    return _manifest_rows(tmp, known + unknown + list(more or []))


def test_filter_classifier_decides_unknown_views(tmp_path: Path) -> None:
    table = _known_then_unknown_views(tmp_path)
    policy = {"classifier": CLASSIFIER_POLICY}
    result = filter_frontal(table, tmp_path, policy)
    clf = result.audit["classifier"]
    assert clf["used"] is True
    assert clf["accuracy"] >= 0.9
    assert clf["n_holdout"] == 20
    assert clf["n_decided"] >= 18
    frontal_ids = set(result.frontal.column("image_id").to_pylist())
    unknown_frontal = {f"demo/{i:04d}" for i in range(80, 90)}
    unknown_lateral = {f"demo/{i:04d}" for i in range(90, 100)}
    assert len(frontal_ids & unknown_frontal) >= 9
    assert not frontal_ids & unknown_lateral
    by_id = {r["image_id"]: r for r in result.frontal.to_pylist()}
    decided = [by_id[i] for i in unknown_frontal & frontal_ids]
    assert all(r["view_source"] == "classifier" for r in decided)
    audit = result.audit
    assert audit["rows_in"] == 100 == audit["rows_frontal"] + audit["rows_excluded"]
    assert audit["by_source"]["classifier"] == clf["n_decided"]
    # deterministic
    again = filter_frontal(table, tmp_path, policy)
    assert again.audit == audit
    assert again.frontal.equals(result.frontal)

    # an accuracy bar the classifier cannot reach: it is not used, unknowns fall to the policy
    strict = {"classifier": {"min_accuracy": 1.01, "min_per_class": 10}}
    result = filter_frontal(table, tmp_path, strict)
    assert result.audit["classifier"]["used"] is False
    assert "below min_accuracy" in result.audit["classifier"]["reason"]
    assert result.audit["by_source"]["none"] == 20
    assert result.audit["rows_frontal"] == 40


def test_filter_does_not_train_on_views_from_another_classifier(tmp_path: Path) -> None:
    # a manifest view set by another model (PadChest's "resnet-50.t7" projections: view_source
    # "classifier") is used as it is, and counted as the classifier's, but it is not ground
    # truth for training the filter's own classifier; here those 15 calls are wrong on purpose
    from cxrfoundry.data.views import train_view_classifier

    table = _known_then_unknown_views(tmp_path, [("lateral", "PA", "PA", "classifier")] * 15)
    predicted = {f"demo/{i:04d}" for i in range(100, 115)}
    result = filter_frontal(table, tmp_path, {"classifier": CLASSIFIER_POLICY})
    audit = result.audit
    clf = audit["classifier"]
    assert clf["used"] is True
    assert (clf["n_labelled"], clf["n_frontal"], clf["n_lateral"]) == (80, 40, 40)
    assert clf["n_known_view_from_classifier"] == 15
    assert audit["by_source"]["classifier"] == 15 + clf["n_decided"]
    assert audit["by_decision_source"]["frontal/classifier"] >= 15
    frontal = {r["image_id"]: r for r in result.frontal.to_pylist()}
    assert all(frontal[i]["view_source"] == "classifier" for i in predicted)
    assert audit["rows_in"] == 115 == audit["rows_frontal"] + audit["rows_excluded"]
    # the stand-alone trainer follows the same rule
    _model, stats = train_view_classifier(table, tmp_path, CLASSIFIER_POLICY)
    assert stats["n_labelled"] == 80


def test_filter_pretrained_classifier(tmp_path: Path) -> None:
    from cxrfoundry.data.views import save_view_classifier, train_view_classifier

    src = tmp_path / "src"
    known = [("frontal", "PA", "PA", "metadata")] * 30 + [
        ("lateral", "LATERAL", "L", "metadata")
    ] * 30
    model, stats = train_view_classifier(_manifest_rows(src, known), src, {"min_per_class": 10})
    assert model is not None and stats["accuracy"] >= 0.9
    save_view_classifier(tmp_path / "view.joblib", model, 32, stats["accuracy"])
    # a dataset with no lateral rows cannot train its own; the pretrained one decides
    dst = tmp_path / "dst"
    specs = [("frontal", "PA", "PA", "metadata")] * 5 + [("lateral", "UNKNOWN", None, "none")] * 4
    policy = {
        "classifier": {
            "pretrained": str(tmp_path / "view.joblib"),
            "min_accuracy": 0.9,
            "min_confidence": 0.6,
        }
    }
    result = filter_frontal(_manifest_rows(dst, specs), dst, policy)
    clf = result.audit["classifier"]
    assert clf["source"] == "pretrained" and clf["used"] is True
    assert "too few labelled images" in clf["trained_attempt"]["reason"]
    assert clf["n_holdout"] == 5  # evaluated on this dataset's known (frontal) rows
    assert result.audit["by_source"]["classifier"] >= 3
    assert result.audit["rows_frontal"] == 5


def test_filter_classifier_needs_both_classes(tmp_path: Path) -> None:
    specs = [("frontal", "PA", "PA", "metadata")] * 12 + [("frontal", "UNKNOWN", "", "none")] * 2
    result = filter_frontal(_manifest_rows(tmp_path, specs), tmp_path, {})
    clf = result.audit["classifier"]
    assert clf["used"] is False
    assert "too few labelled images" in clf["reason"]
    assert result.audit["rows_excluded"] == 2


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="unknown policy keys"):
        resolve_policy({"frontal": ["PA"]})
    with pytest.raises(ValueError, match="unknown_policy"):
        resolve_policy({"unknown_policy": "drop"})
    with pytest.raises(ValueError, match="frontal_views"):
        resolve_policy({"frontal_views": ["FRONT"]})
    with pytest.raises(ValueError, match="classifier keys"):
        resolve_policy({"classifier": {"accuracy": 1}})


@pytest.mark.skipif(not (REAL / "nih1000").is_dir(), reason="real NIH sample absent")
def test_filter_real_nih() -> None:
    from cxrfoundry.data.ingest import ingest

    root = REAL / "nih1000"
    manifest = ingest("nih", "nih", root, {"verify_images": "exists"}).manifest
    result = filter_frontal(manifest, root, {})
    assert result.audit["rows_frontal"] == 1000
    assert result.audit["by_source"]["metadata"] == 1000
    assert result.audit["classifier"]["reason"] == "no unknown views"


# --------------------------------------------------------------------------------------------
# Review regressions: frontal of unknown side
# --------------------------------------------------------------------------------------------


def test_filter_metadata_frontal_without_side(tmp_path: Path) -> None:
    # CheXpert "Frontal" with an empty AP/PA cell (and Open-I's "Frontal" projection): the
    # metadata says frontal, only the side is unknown; the metadata decides, not the fallbacks
    specs = [
        ("frontal", "PA", "PA", "metadata"),
        ("frontal", "UNKNOWN", "Frontal", "none"),
        ("frontal", "UNKNOWN", "Frontal/LL", "none"),  # contradictory: stays unknown
        ("lateral", "UNKNOWN", "FOO", "none"),
    ]
    table = _manifest_rows(tmp_path, specs)
    result = filter_frontal(table, tmp_path, {"classifier": {"enabled": False}})
    frontal = {r["image_id"]: r for r in result.frontal.to_pylist()}
    assert sorted(frontal) == ["demo/0000", "demo/0001"]
    assert (frontal["demo/0001"]["view"], frontal["demo/0001"]["view_source"]) == (
        "UNKNOWN",
        "metadata",
    )
    audit = result.audit
    assert audit["by_source"] == {"metadata": 2, "dicom": 0, "classifier": 0, "none": 2}
    assert {
        "view_raw": "Frontal",
        "view": "UNKNOWN",
        "decision": "frontal",
        "source": "metadata",
        "count": 1,
    } in audit["views"]
    assert audit["rows_in"] == audit["rows_frontal"] + audit["rows_excluded"] == 4

    # a PA-only policy cannot accept a frontal of unknown side: it may be AP
    result = filter_frontal(
        table, tmp_path, {"frontal_views": ["PA"], "classifier": {"enabled": False}}
    )
    assert result.frontal.column("image_id").to_pylist() == ["demo/0000"]
    reasons = dict(
        zip(
            result.excluded.column("image_id").to_pylist(),
            result.excluded.column("reason").to_pylist(),
            strict=True,
        )
    )
    assert reasons["demo/0001"].startswith("view unknown after all fallbacks (raw 'Frontal')")


def test_filter_classifier_frontal_respects_frontal_views(tmp_path: Path) -> None:
    # the classifier tells frontal from lateral, not PA from AP: with frontal_views [PA] its
    # "frontal" calls must not be let in as PA images; its "lateral" calls still exclude
    table = _known_then_unknown_views(tmp_path)
    policy = {
        "frontal_views": ["PA"],
        "classifier": CLASSIFIER_POLICY,
    }
    result = filter_frontal(table, tmp_path, policy)
    frontal_ids = set(result.frontal.column("image_id").to_pylist())
    assert frontal_ids == {f"demo/{i:04d}" for i in range(40)}
    audit = result.audit
    assert audit["classifier"]["used"] is True
    assert audit["by_decision_source"].get("frontal/classifier", 0) == 0
    assert audit["by_decision_source"]["excluded/classifier"] >= 9
    assert audit["rows_in"] == 100 == audit["rows_frontal"] + audit["rows_excluded"]
