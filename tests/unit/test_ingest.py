"""Tests of the ingest adapters, DICOM header reading, labels and splits.

Fixtures are written here in each dataset's real format (columns and value vocabularies), with
made-up rows; the real samples under /work/shared are used when present.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrfoundry import schema
from cxrfoundry.data import labels as lab
from cxrfoundry.data import splits
from cxrfoundry.data.dicom import parse_age, read_header
from cxrfoundry.data.ingest import IngestResult, ingest, resolve_options, write_ingest

REAL = Path("/work/shared/data/real")
SAMPLES = REAL / "metadata-samples"
FINDINGS = list(schema.FINDING_NAMES)


def png(path: Path, value: int = 100, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def jpeg(path: Path, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 90, dtype=np.uint8)).save(path, format="JPEG")


def write_csv(path: Path, rows: list[dict], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = pd.DataFrame(rows).to_csv(index=False)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def dicom(path: Path, size: int = 16, **tags: object) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = tags.pop("SOPInstanceUID", None) or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = tags.pop("StudyInstanceUID", "1.2.3.4")
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = size, size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = (np.arange(size * size) % 256).astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def by_id(result) -> dict[str, dict]:
    return {r["image_id"]: r for r in result.manifest.to_pylist()}


def reasons(result) -> dict[str, str]:
    return {(r["image_id"] or r["source_file"]): r["reason"] for r in result.rejects.to_pylist()}


def check_invariants(result) -> None:
    c = result.counts
    assert c["rows_in"] == c["rows_kept"] + c["rows_rejected"]
    assert sum(c["rejects_by_reason"].values()) == c["rows_rejected"]
    assert result.manifest.schema == schema.MANIFEST_SCHEMA
    assert result.rejects.schema == schema.REJECTS_SCHEMA
    ids = result.manifest.column("image_id").to_pylist()
    assert len(ids) == len(set(ids))
    rows = result.manifest.to_pylist()
    assert {r["split"] for r in rows} <= set(schema.SPLITS)
    assert {r["view"] for r in rows} <= set(schema.VIEWS)
    owner: dict[str, str] = {}
    for r in rows:  # patient-disjoint
        assert owner.setdefault(r["patient_id"], r["split"]) == r["split"]
        json.loads(r["labels_extra"])


# --------------------------------------------------------------------------------------------
# NIH
# --------------------------------------------------------------------------------------------

NIH_HEADER = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
]


def nih_fixture(root: Path) -> None:
    rows = [
        ("00000001_000.png", "Cardiomegaly|Emphysema", 0, 1, 57, "M", "PA"),
        ("00000001_001.png", "No Finding", 1, 1, 58, "M", "PA"),
        ("00000002_000.png", "Infiltration|Nodule|Effusion", 0, 2, 81, "F", "AP"),
        ("00000003_000.png", "Consolidation", 0, 3, 414, "F", "PA"),  # impossible age
        ("00000004_000.png", "Cardiomegaly|Lung Cancer", 0, 4, 40, "F", "PA"),  # bad term
        ("00000005_000.png", "Hernia", 0, 5, 33, "M", "PA"),  # image missing
        ("00000006_000.png", "No Finding", 0, 6, 30, "F", "PA"),  # empty file
        ("00000007_000.png", "No Finding", 0, 7, 30, "F", "PA"),  # truncated PNG
        ("00000001_000.png", "No Finding", 0, 1, 57, "M", "PA"),  # duplicate
        ("00000008_000.png", "Mass", 0, "", 50, "M", "PA"),  # missing patient id
    ]
    write_csv(
        root / "Data_Entry_2017_v2020.csv", [dict(zip(NIH_HEADER, r, strict=True)) for r in rows]
    )
    png(root / "images_001/images/00000001_000.png")
    png(root / "images_001/images/00000001_001.png")
    png(root / "images_002/images/00000002_000.png")
    png(root / "images_002/images/00000003_000.png")
    png(root / "images_002/images/00000004_000.png")
    (root / "images_002/images/00000006_000.png").write_bytes(b"")
    png(root / "images_002/images/00000007_000.png", size=64)
    data = (root / "images_002/images/00000007_000.png").read_bytes()
    (root / "images_002/images/00000007_000.png").write_bytes(data[: len(data) // 2])
    png(root / "images_002/images/00000008_000.png")
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000002_000.png,Nodule,10.5,20,30,40\n"
    )
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n")
    (root / "test_list.txt").write_text("00000002_000.png\n")


def test_nih_fixture(tmp_path: Path) -> None:
    nih_fixture(tmp_path)
    result = ingest("nih", "nih", tmp_path, {})
    check_invariants(result)
    rows = by_id(result)
    assert sorted(rows) == ["nih/00000001_000", "nih/00000001_001", "nih/00000002_000"]
    r = rows["nih/00000001_000"]
    assert r["image_path"] == "images_001/images/00000001_000.png"
    assert (r["cardiomegaly"], r["no_finding"], r["pneumonia"], r["fracture"]) == (1, 0, 0, None)
    assert json.loads(r["labels_extra"])["Emphysema"] == 1
    assert r["sex"] == "M" and r["age"] == 57.0 and r["view"] == "PA"
    assert rows["nih/00000001_001"]["no_finding"] == 1
    r = rows["nih/00000002_000"]
    assert (r["lung_opacity"], r["lung_lesion"], r["pleural_effusion"]) == (1, 1, 1)
    assert r["split"] == "test"
    assert json.loads(r["boxes"]) == [
        {"label": "Nodule", "x": 10.5, "y": 20.0, "w": 30.0, "h": 40.0}
    ]
    assert rows["nih/00000001_000"]["split"] in ("train", "val")
    bad = reasons(result)
    assert bad["nih/00000003_000"] == "impossible age: 414"
    assert (
        bad["nih/00000004_000"]
        == "unparseable label value 'Lung Cancer' in column 'Finding Labels'"
    )
    assert bad["nih/00000005_000"] == "image missing"
    assert bad["nih/00000006_000"] == "image empty"
    assert bad["nih/00000007_000"].startswith("image unreadable")
    assert bad["nih/00000008_000"] == "missing patient id"
    dup = [r for r in result.rejects.to_pylist() if r["reason"] == "duplicate image id"]
    assert len(dup) == 1 and dup[0]["source_row"] == 8
    assert result.counts["rows_in"] == 10
    assert result.counts["rejects_by_reason"]["impossible age"] == 1


def test_write_ingest_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    nih_fixture(root)
    outs = []
    for run in ("a", "b"):
        result = ingest("nih", "nih", root, {})
        paths = [tmp_path / run / n for n in ("m.parquet", "r.parquet", "audit.json")]
        write_ingest(result, *paths)
        outs.append([p.read_bytes() for p in paths])
    assert outs[0] == outs[1]
    table = pq.read_table(tmp_path / "a" / "m.parquet")
    assert table.schema.equals(schema.MANIFEST_SCHEMA)
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert audit["rows_in"] == audit["rows_kept"] + audit["rows_rejected"] == 10
    assert audit["adapter"] == {
        "annotations_matched": 0,
        "official_lists": ["train_val_list.txt", "test_list.txt"],
        "official_split": True,
        "png_files_found": 8,
    }


# --------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
# --------------------------------------------------------------------------------------------


def mimic_fixture(root: Path) -> None:
    meta = [
        # dicom_id, subject, study, ViewPosition, CodeMeaning, Procedure
        ("d1", "10000032", "50414267", "PA", "postero-anterior", "CHEST (PA AND LAT)"),
        ("d2", "10000032", "50414267", "LATERAL", "lateral", "CHEST (PA AND LAT)"),
        ("d3", "10000032", "50414267", "", "left lateral", "CHEST (PA AND LAT)"),
        ("d4", "10000032", "50414267", "", "", "CHEST (PA AND LAT)"),
        ("d5", "10000764", "57375967", "", "", "CHEST (PORTABLE AP)"),
        ("d6", "10000764", "57375967", "AP AXIAL", "", "CHEST (PORTABLE AP)"),
        ("d7", "10000898", "50771383", "SWIMMERS", "", ""),
    ]
    rows = [
        {
            "dicom_id": d,
            "subject_id": s,
            "study_id": st,
            "PerformedProcedureStepDescription": proc,
            "ViewPosition": vp,
            "Rows": 3056,
            "Columns": 2544,
            "StudyDate": 21800506,
            "StudyTime": 213014.531,
            "ProcedureCodeSequence_CodeMeaning": proc,
            "ViewCodeSequence_CodeMeaning": cm,
            "PatientOrientationCodeSequence_CodeMeaning": "Erect",
        }
        for d, s, st, vp, cm, proc in meta
    ]
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", rows, gz=True)
    labels = [
        {"subject_id": "10000032", "study_id": "50414267", **dict.fromkeys(FINDINGS, "")},
        {"subject_id": "10000764", "study_id": "57375967", **dict.fromkeys(FINDINGS, "")},
    ]
    labels[0].update({"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": ""})
    labels[1].update({"No Finding": "1.0"})
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", labels, gz=True)
    split = [
        {"dicom_id": d, "study_id": st, "subject_id": s, "split": sp}
        for (d, s, st, *_), sp in zip(
            meta, ["train", "train", "train", "train", "validate", "validate", "test"], strict=True
        )
    ]
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", split, gz=True)
    for d, s, st, *_ in meta:
        jpeg(root / f"files/p{s[:2]}/p{s}/s{st}/{d}.jpg")
    report = root / "files/p10/p10000032/s50414267.txt"
    report.write_text(
        "                                 FINAL REPORT\n FINDINGS: Mild cardiomegaly.\n"
    )
    write_csv(
        root / "patients.csv",
        [
            {
                "subject_id": "10000032",
                "gender": "F",
                "anchor_age": 52,
                "anchor_year": 2180,
                "race": "WHITE",
            },
            {
                "subject_id": "10000764",
                "gender": "M",
                "anchor_age": 86,
                "anchor_year": 2175,
                "race": "",
            },
        ],
    )


def test_mimic_fixture(tmp_path: Path) -> None:
    mimic_fixture(tmp_path)
    result = ingest("mimic", "mimic_cxr_jpg", tmp_path, {"demographics": "patients.csv"})
    check_invariants(result)
    rows = by_id(result)
    assert len(rows) == 7
    views = {k.split("/")[1]: (r["view"], r["view_raw"], r["view_source"]) for k, r in rows.items()}
    assert views["d1"] == ("PA", "PA", "metadata")
    assert views["d2"] == ("LATERAL", "LATERAL", "metadata")
    assert views["d3"] == ("LATERAL", "left lateral", "metadata")  # ViewCodeSequence fallback
    assert views["d4"] == ("UNKNOWN", "CHEST (PA AND LAT)", "none")  # ambiguous: not used
    assert views["d5"] == ("AP", "CHEST (PORTABLE AP)", "metadata")
    assert views["d6"][0] == "OTHER"
    assert views["d7"][0] == "OTHER"
    d1 = rows["mimic/d1"]
    assert d1["image_path"] == "files/p10/p10000032/s50414267/d1.jpg"
    assert (d1["cardiomegaly"], d1["edema"], d1["no_finding"]) == (1, -1, None)
    assert d1["report"].startswith("FINAL REPORT") and "cardiomegaly" in d1["report"]
    assert (d1["sex"], d1["age"], d1["race"]) == ("F", 52.0, "WHITE")
    assert d1["split"] == "train"
    d5 = rows["mimic/d5"]
    assert d5["split"] == "val" and d5["report"] is None and d5["no_finding"] == 1
    assert d5["age"] == 91.0  # anchor_age 86 at 2175, study in 2180
    assert d5["race"] is None
    assert rows["mimic/d7"]["split"] == "test"
    assert rows["mimic/d7"]["cardiomegaly"] is None  # study without a label row
    assert result.counts["adapter"]["studies_without_labels"] == 1


def test_mimic_truncated_jpeg_and_decode(tmp_path: Path) -> None:
    mimic_fixture(tmp_path)
    path = tmp_path / "files/p10/p10000032/s50414267/d2.jpg"
    path.write_bytes(path.read_bytes()[:-40])
    result = ingest("mimic", "mimic_cxr_jpg", tmp_path, {})
    assert reasons(result)["mimic/d2"] == "image truncated: no JPEG end-of-image marker"
    assert result.counts["rows_kept"] == 6
    # decode mode in a 2-process pool: the truncated file is still the only reject
    result = ingest("mimic", "mimic_cxr_jpg", tmp_path, {"verify_images": "decode", "workers": 2})
    assert list(reasons(result)) == ["mimic/d2"]


def test_missing_metadata_file_and_unknown_option(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mimic metadata"):
        ingest("mimic", "mimic_cxr_jpg", tmp_path, {})
    with pytest.raises(ValueError, match="unknown options"):
        resolve_options("nih", {"verify": "decode"})
    with pytest.raises(ValueError, match="unknown ingest adapter"):
        resolve_options("mimic", {})
    with pytest.raises(ValueError, match="sum to 1"):
        resolve_options("nih", {"split_fractions": {"train": 0.5, "test": 0.1}})


# --------------------------------------------------------------------------------------------
# CheXpert
# --------------------------------------------------------------------------------------------


def chexpert_row(path: str, sex: str, age: object, fl: str, appa: str, **labels: str) -> dict:
    row = {"Path": path, "Sex": sex, "Age": age, "Frontal/Lateral": fl, "AP/PA": appa}
    row.update(dict.fromkeys(FINDINGS, ""))
    row.update({k.replace("_", " "): v for k, v in labels.items()})
    return row


def test_chexpert_fixture(tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0-small"
    pre = "CheXpert-v1.0-small/"
    train = [
        chexpert_row(
            pre + "train/patient00001/study1/view1_frontal.jpg",
            "Female",
            68,
            "Frontal",
            "AP",
            Support_Devices="1.0",
            No_Finding="1.0",
        ),
        chexpert_row(
            pre + "train/patient00002/study2/view1_frontal.jpg",
            "Male",
            87,
            "Frontal",
            "PA",
            Edema="-1.0",
            Cardiomegaly="0.0",
        ),
        chexpert_row(
            pre + "train/patient00002/study2/view2_lateral.jpg", "Unknown", 87, "Lateral", ""
        ),
        chexpert_row(
            pre + "train/patient00003/study1/view1_frontal.jpg", "Female", 50, "Frontal", ""
        ),
        chexpert_row(
            pre + "train/patient00004/study1/view1_frontal.jpg",
            "Male",
            40,
            "Frontal",
            "AP",
            Edema="2.0",
        ),
    ]
    valid = [
        chexpert_row(
            pre + "valid/patient64541/study1/view1_frontal.jpg",
            "Male",
            73,
            "Frontal",
            "AP",
            Pneumonia="1.0",
        ),
    ]
    write_csv(root / "train.csv", train)
    write_csv(root / "valid.csv", valid)
    for row in train + valid:
        jpeg(root / row["Path"].split("/", 1)[1])
    for raw_root, opts in (
        (root, {}),
        (tmp_path, {"train_csv": root / "train.csv", "valid_csv": root / "valid.csv"}),
    ):
        result = ingest("chexpert", "chexpert", raw_root, opts)
        check_invariants(result)
        rows = by_id(result)
        assert len(rows) == 5
        prefix = "" if raw_root == root else pre
        r = rows["chexpert/train/patient00001/study1/view1_frontal"]
        assert r["image_path"] == prefix + "train/patient00001/study1/view1_frontal.jpg"
        assert (r["patient_id"], r["study_id"]) == ("patient00001", "patient00001/study1")
        assert (r["view"], r["view_raw"], r["sex"]) == ("AP", "Frontal/AP", "F")
        assert (r["support_devices"], r["no_finding"], r["edema"]) == (1, 1, None)
        r = rows["chexpert/train/patient00002/study2/view1_frontal"]
        assert (r["edema"], r["cardiomegaly"], r["view"]) == (-1, 0, "PA")
        r = rows["chexpert/train/patient00002/study2/view2_lateral"]
        assert (r["view"], r["sex"]) == ("LATERAL", None)
        r = rows["chexpert/train/patient00003/study1/view1_frontal"]
        assert (r["view"], r["view_raw"], r["view_source"]) == ("UNKNOWN", "Frontal", "none")
        assert rows["chexpert/valid/patient64541/study1/view1_frontal"]["split"] == "val"
        assert all(r["split"] in ("train", "test") for k, r in rows.items() if "/train/" in k)
        assert reasons(result) == {
            "chexpert/train/patient00004/study1/view1_frontal": (
                "unparseable label value '2.0' in column 'Edema'"
            )
        }


def test_chexpert_plus_variant(tmp_path: Path) -> None:
    rows = [
        {
            "path_to_image": "train/patient42142/study5/view1_frontal.jpg",
            "frontal_lateral": "Frontal",
            "ap_pa": "PA",
            "deid_patient_id": "patient42142",
            "report": "NARRATIVE: normal chest.",
            "split": "train",
            "age": 44,
            "sex": "Female",
            "race": "White",
        },
        {
            "path_to_image": "valid/patient64600/study1/view2_lateral.jpg",
            "frontal_lateral": "Lateral",
            "ap_pa": "",
            "deid_patient_id": "patient64600",
            "report": "",
            "split": "valid",
            "age": 60,
            "sex": "Male",
            "race": "",
        },
    ]
    write_csv(tmp_path / "df_chexpert_plus.csv", rows)
    for row in rows:
        jpeg(tmp_path / row["path_to_image"])
    result = ingest(
        "chexpert_plus",
        "chexpert",
        tmp_path,
        {"train_csv": "df_chexpert_plus.csv", "valid_csv": None},
    )
    check_invariants(result)
    out = by_id(result)
    a = out["chexpert_plus/train/patient42142/study5/view1_frontal"]
    assert (a["view"], a["report"], a["race"], a["split"], a["sex"]) == (
        "PA",
        "NARRATIVE: normal chest.",
        "White",
        "train",
        "F",
    )
    assert a["cardiomegaly"] is None
    b = out["chexpert_plus/valid/patient64600/study1/view2_lateral"]
    assert (b["view"], b["split"], b["report"]) == ("LATERAL", "val", None)


# --------------------------------------------------------------------------------------------
# PadChest, BRAX
# --------------------------------------------------------------------------------------------


#: PadChest's MethodProjection values (the real CSV has only these two).
PADCHEST_MANUAL = "Manual review of DICOM fields"
PADCHEST_MODEL = "resnet-50.t7"


def ingest_padchest(
    root: Path, rows: list[dict], image_dir: str, options: dict | None = None
) -> IngestResult:
    """Write ``rows`` as PadChest's CSV with an image per row under ``image_dir``; ingest them
    with ``options`` (counts checked)."""
    write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", rows)
    for r in rows:
        png(root / image_dir / r["ImageID"])
    result = ingest("padchest", "padchest", root, options or {})
    check_invariants(result)
    return result


def padchest_row(
    image: str,
    projection: str,
    labels: str,
    birth: str = "1950.0",
    sex: str = "M",
    method: str = PADCHEST_MANUAL,
) -> dict:
    """One row of PadChest's CSV (all its columns; images under folder ``7``)."""
    return {
        "Unnamed: 0": 1,
        "ImageID": image,
        "ImageDir": "7",
        "StudyDate_DICOM": "20150312",
        "StudyID": "st" + image[:3],
        "PatientID": "pt" + image[:3],
        "PatientBirth": birth,
        "PatientSex_DICOM": sex,
        "ViewPosition_DICOM": "",
        "Projection": projection,
        "MethodProjection": method,
        "Report": " sin hallazg .",
        "MethodLabel": "Physician",
        "Labels": labels,
    }


def test_padchest_fixture(tmp_path: Path) -> None:
    row = padchest_row
    rows = [
        row("aaa_1.png", "PA", "['normal']"),
        row(
            "bbb_1.png",
            "AP_horizontal",
            "['pleural effusion', 'NSG tube', 'calcified granuloma', 'nodule']",
            sex="F",
        ),
        row("ccc_1.png", "L", "['cardiomegaly', 'pneumonia']"),
        row("ddd_1.png", "COSTAL", "['callus rib fracture']"),
        row("eee_1.png", "UNK", ""),
        row("fff_1.png", "PA", "['normal'"),  # unparseable
        row("ggg_1.png", "PA", "['normal']", birth="1850.0"),  # age 165
    ]
    result = ingest_padchest(tmp_path, rows, image_dir="7")
    out = by_id(result)
    assert len(out) == 5
    a = out["padchest/aaa_1"]
    assert (a["view"], a["age"], a["sex"], a["no_finding"], a["cardiomegaly"]) == (
        "PA",
        65.0,
        "M",
        1,
        0,
    )
    assert a["image_path"] == "7/aaa_1.png" and a["report"] == "sin hallazg ."
    b = out["padchest/bbb_1"]
    assert (b["view"], b["view_raw"]) == ("AP_SUPINE", "AP_horizontal")
    assert (b["pleural_effusion"], b["support_devices"], b["lung_lesion"], b["no_finding"]) == (
        1,
        1,
        1,
        0,
    )
    assert b["lung_opacity"] is None  # a lesion without an opacity term: not a contradicting 0
    assert json.loads(b["labels_extra"]) == {
        "NSG tube": 1,
        "calcified granuloma": 1,
        "nodule": 1,
        "pleural effusion": 1,
    }
    c = out["padchest/ccc_1"]
    assert (c["view"], c["cardiomegaly"], c["pneumonia"]) == ("LATERAL", 1, 1)
    d = out["padchest/ddd_1"]
    assert (d["view"], d["fracture"]) == ("OTHER", 1)
    e = out["padchest/eee_1"]
    assert (e["view"], e["cardiomegaly"], e["labels_extra"]) == ("UNKNOWN", None, "{}")
    bad = reasons(result)
    assert bad["padchest/fff_1"].startswith("unparseable label value")
    assert bad["padchest/ggg_1"] == "impossible age: 165.0"


def test_brax_fixture(tmp_path: Path) -> None:
    def row(i: int, view: str, age: str, sex: str = "M", **labels: str) -> dict:
        out = {
            "DicomPath": f"images/id_{i}/Study_{i}/Series_1/image-{i}.dcm",
            "PngPath": f"images/id_{i}/Study_{i}/Series_1/image-{i}.png",
            "PatientID": f"id_{i % 3}",
            "AccessionNumber": f"acc{i}",
            "ViewPosition": view,
            "PatientSex": sex,
            "PatientAge": age,
            "Manufacturer": "X",
            "Rows": 2000,
            "Columns": 2000,
        }
        out.update(dict.fromkeys(FINDINGS, ""))
        out.update({k.replace("_", " "): v for k, v in labels.items()})
        return out

    rows = [
        row(0, "PA", "045Y", Cardiomegaly="1"),
        row(1, "L", "60"),
        row(2, "AP LLD", "70", sex="F"),
        row(3, "RLO", "70"),
        row(4, "LT-DECUB", "70"),
        row(5, "", "", sex="O", No_Finding="1"),
        row(6, "PA", "old"),
    ]
    write_csv(tmp_path / "master_spreadsheet_update.csv", rows)
    for r in rows:
        png(tmp_path / r["PngPath"])
    result = ingest("brax", "brax", tmp_path, {})
    check_invariants(result)
    out = by_id(result)
    views = {k: r["view"] for k, r in out.items()}
    assert views == {
        "brax/images/id_0/Study_0/Series_1/image-0": "PA",
        "brax/images/id_1/Study_1/Series_1/image-1": "LATERAL",
        "brax/images/id_2/Study_2/Series_1/image-2": "OTHER",
        "brax/images/id_3/Study_3/Series_1/image-3": "OTHER",
        "brax/images/id_4/Study_4/Series_1/image-4": "OTHER",
        "brax/images/id_5/Study_5/Series_1/image-5": "UNKNOWN",
    }
    r0 = out["brax/images/id_0/Study_0/Series_1/image-0"]
    assert (r0["age"], r0["cardiomegaly"], r0["study_id"]) == (45.0, 1, "acc0")
    assert out["brax/images/id_5/Study_5/Series_1/image-5"]["sex"] is None
    assert list(reasons(result).values()) == ["impossible age: old"]
    # decubitus as frontal at ingest
    result = ingest("brax", "brax", tmp_path, {"include_decubitus": True})
    assert by_id(result)["brax/images/id_4/Study_4/Series_1/image-4"]["view"] == "AP"


# --------------------------------------------------------------------------------------------
# VinDr-CXR, DICOM folder
# --------------------------------------------------------------------------------------------

VINDR_LABELS = list(lab.VINDR_LABELS)


def vindr_reader(image: str, rad: str, *positives: str) -> dict:
    """One reader's row of a wide VinDr label file (image_labels_{train,test}.csv)."""
    return {
        "image_id": image,
        "rad_ID": rad,
        **{name: int(name in positives) for name in VINDR_LABELS},
    }


def test_vindr_fixture(tmp_path: Path) -> None:
    reader = vindr_reader
    train = [
        reader("img1", "R1", "Cardiomegaly", "Aortic enlargement"),
        reader("img1", "R2", "Pleural effusion"),
        reader("img1", "R3", "No finding"),
        reader("img2", "R1", "No finding"),
        reader("img2", "R4", "No finding"),
        reader("img2", "R5", "No finding"),
        reader("img3", "R1", "Nodule/Mass"),
        reader("img4", "R1", "No finding"),
    ]
    write_csv(tmp_path / "annotations/image_labels_train.csv", train)
    write_csv(
        tmp_path / "annotations/image_labels_test.csv", [reader("img9", "R8", "Pneumothorax")]
    )
    write_csv(
        tmp_path / "annotations/annotations_train.csv",
        [
            {
                "image_id": "img1",
                "rad_id": "R1",
                "class_name": "Cardiomegaly",
                "x_min": 10,
                "y_min": 20,
                "x_max": 110,
                "y_max": 70,
            }
        ],
    )
    dicom(
        tmp_path / "train/img1.dicom",
        PatientID="",
        PatientSex="M",
        PatientAge="045Y",
        ViewPosition="",
    )
    dicom(
        tmp_path / "train/img2.dicom",
        PatientID="pat2",
        PatientSex="F",
        PatientAge="018M",
        ViewPosition="PA",
    )
    (tmp_path / "train/img3.dicom").write_bytes(b"not a dicom at all" * 20)
    dicom(tmp_path / "test/img9.dicom", PatientID="pat9", ViewPosition="")
    result = ingest("vindr", "vindr_cxr", tmp_path, {})
    check_invariants(result)
    out = by_id(result)
    assert sorted(out) == ["vindr/img1", "vindr/img2", "vindr/img9"]
    a = out["vindr/img1"]
    assert (a["cardiomegaly"], a["pleural_effusion"], a["no_finding"], a["support_devices"]) == (
        1,
        1,
        0,
        None,
    )
    extra = json.loads(a["labels_extra"])
    assert extra["Aortic enlargement"] == 1 and extra["COPD"] == 0
    assert (a["patient_id"], a["sex"], a["age"], a["view"]) == ("img1", "M", 45.0, "UNKNOWN")
    assert json.loads(a["boxes"]) == [
        {"label": "Cardiomegaly", "x": 10.0, "y": 20.0, "w": 100.0, "h": 50.0}
    ]
    b = out["vindr/img2"]
    assert (b["no_finding"], b["patient_id"], b["age"], b["view"], b["view_source"]) == (
        1,
        "pat2",
        1.5,
        "PA",
        "dicom",
    )
    assert out["vindr/img9"]["split"] == "test"
    assert {out["vindr/img1"]["split"], b["split"]} <= {"train", "val"}
    bad = reasons(result)
    assert bad["vindr/img3"].startswith("corrupt DICOM")
    assert bad["vindr/img4"] == "image missing"
    assert result.counts["adapter"]["source_rows"] == 9
    assert result.counts["adapter"]["patient_id_from_image_id"] == 2  # img1 tag empty, img4 absent
    # default_view is an explicit, recorded assumption
    result = ingest("vindr", "vindr_cxr", tmp_path, {"default_view": "PA"})
    r = by_id(result)["vindr/img1"]
    assert (r["view"], r["view_raw"], r["view_source"]) == ("PA", "default_view option", "metadata")


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_dicom_folder_fixture(tmp_path: Path) -> None:
    code = Dataset()
    code.CodeMeaning = "antero-posterior"
    dicom(
        tmp_path / "a/1.dcm",
        SOPInstanceUID="1.1",
        PatientID="p1",
        PatientSex="F",
        PatientAge="045Y",
        ViewPosition="PA",
    )
    dicom(
        tmp_path / "a/2.dcm",
        SOPInstanceUID="1.2",
        PatientID="p1",
        PatientSex="F",
        PatientAge="",
        PatientBirthDate="19700101",
        StudyDate="20000101",
        ViewCodeSequence=[code],
    )
    dicom(
        tmp_path / "b/3.DICOM",
        SOPInstanceUID="1.3",
        PatientID="p2",
        PatientAge="018M",
        SeriesDescription="CHEST LAT",
    )
    dicom(tmp_path / "b/4.dcm", SOPInstanceUID="1.4", PatientID="p3", PatientAge="abc")
    dicom(tmp_path / "b/5.dcm", SOPInstanceUID="1.5", PatientID="")
    dicom(tmp_path / "b/6.dcm", SOPInstanceUID="1.1", PatientID="p1")  # same instance again
    (tmp_path / "b/7.dcm").write_bytes(b"\x00" * 300)
    dicom(tmp_path / "c/8.dcm", SOPInstanceUID="1.8", PatientID="p8", ViewPosition="AP")
    data = (tmp_path / "c/8.dcm").read_bytes()
    (tmp_path / "c/8.dcm").write_bytes(data[:-100])  # pixel data truncated: header still fine
    write_csv(
        tmp_path / "labels.csv",
        [
            {
                "image_id": "1.1",
                "Cardiomegaly": "1",
                "Edema": "",
                "site": "x",
                "text": "Heart big.",
            },
            {"image_id": "1.3", "Cardiomegaly": "0", "Edema": "-1", "site": "y", "text": ""},
        ],
    )
    opts = {"labels_csv": "labels.csv", "extra_columns": ["site"], "report_col": "text"}
    result = ingest("dcm", "dicom_folder", tmp_path, opts)
    check_invariants(result)
    out = by_id(result)
    assert sorted(out) == ["dcm/1.1", "dcm/1.2", "dcm/1.3", "dcm/1.8"]
    assert (out["dcm/1.1"]["view"], out["dcm/1.1"]["age"], out["dcm/1.1"]["cardiomegaly"]) == (
        "PA",
        45.0,
        1,
    )
    assert out["dcm/1.1"]["report"] == "Heart big."
    assert json.loads(out["dcm/1.1"]["labels_extra"]) == {"site": "x"}
    assert (out["dcm/1.2"]["view"], out["dcm/1.2"]["view_raw"]) == ("AP", "antero-posterior")
    assert out["dcm/1.2"]["age"] == pytest.approx(30.0, abs=0.01)
    assert (out["dcm/1.3"]["view"], out["dcm/1.3"]["age"], out["dcm/1.3"]["edema"]) == (
        "LATERAL",
        1.5,
        -1,
    )
    assert out["dcm/1.2"]["cardiomegaly"] is None
    bad = reasons(result)
    assert bad["dcm/1.4"] == "impossible age: abc"
    assert bad["dcm/1.5"] == "missing patient id"
    assert bad["dcm/1.1"] == "duplicate image id"
    assert bad["dcm/b/7"].startswith("corrupt DICOM")
    # full decode catches the truncated pixel data the header's size check cannot see (the cut
    # is smaller than the header); a cut into the pixel data of a real-sized image it does see
    result = ingest("dcm", "dicom_folder", tmp_path, {**opts, "verify_images": "decode"})
    assert reasons(result)["dcm/1.8"].startswith("corrupt DICOM")
    dicom(tmp_path / "c/9.dcm", SOPInstanceUID="1.9", PatientID="p9", size=256)
    data = (tmp_path / "c/9.dcm").read_bytes()
    (tmp_path / "c/9.dcm").write_bytes(data[: len(data) // 2])
    result = ingest("dcm", "dicom_folder", tmp_path, opts)
    assert reasons(result)["dcm/1.9"] == (
        f"corrupt DICOM: pixel data truncated: file has {len(data) // 2} bytes, "
        "pixel data needs 65536"
    )


def test_parse_age() -> None:
    assert parse_age("045Y") == 45.0
    assert parse_age("018M") == 1.5
    assert parse_age("62") == 62.0
    assert parse_age("") is None
    assert parse_age(float("nan")) is None
    with pytest.raises(ValueError):
        parse_age("45 years old")


# --------------------------------------------------------------------------------------------
# generic_csv, annotations
# --------------------------------------------------------------------------------------------


def test_generic_csv_and_annotations(tmp_path: Path) -> None:
    rows = [
        {
            "file": "./x/1.png",
            "pid": "a",
            "gender": "w",
            "yrs": "30",
            "proj": "Frontal",
            "dx": "effusion;device",
            "txt": "Effusion.",
            "part": "test",
        },
        {
            "file": "x/2.png",
            "pid": "b",
            "gender": "m",
            "yrs": "",
            "proj": "Lateral",
            "dx": "",
            "txt": "",
            "part": "",
        },
        {
            "file": "x/3.png",
            "pid": "c",
            "gender": "",
            "yrs": "-3",
            "proj": "",
            "dx": "",
            "txt": "",
            "part": "",
        },
        {
            "file": "x/4.png",
            "pid": "d",
            "gender": "",
            "yrs": "",
            "proj": "",
            "dx": "",
            "txt": "",
            "part": "holdout",
        },
    ]
    write_csv(tmp_path / "meta.csv", rows)
    for i in range(1, 5):
        png(tmp_path / f"x/{i}.png")
    png(tmp_path / "masks/1.png")
    write_csv(
        tmp_path / "phantom_truth.csv",
        [
            {
                "image_path": "x/1.png",
                "mask_path": "masks/1.png",
                "boxes": json.dumps([{"label": "Effusion", "x": 1, "y": 2, "w": 3, "h": 4}]),
            },
            {"image_path": "x/2.png", "mask_path": "", "boxes": "[]"},
        ],
    )
    opts = {
        "csv": "meta.csv",
        "image_col": "file",
        "patient_col": "pid",
        "sex_col": "gender",
        "age_col": "yrs",
        "view_col": "proj",
        "report_col": "txt",
        "split_col": "part",
        "sex_map": {"w": "F", "m": "M"},
        "view_map": {"Frontal": "PA"},
        "findings_col": "dx",
        "findings_sep": ";",
        "findings_map": {"effusion": "Pleural Effusion", "device": ["Support Devices"]},
        "annotations": "phantom_truth.csv",
    }
    result = ingest("gen", "generic_csv", tmp_path, opts)
    check_invariants(result)
    out = by_id(result)
    a = out["gen/x/1"]
    assert (a["image_path"], a["sex"], a["age"], a["view"], a["split"]) == (
        "x/1.png",
        "F",
        30.0,
        "PA",
        "test",
    )
    assert (a["pleural_effusion"], a["support_devices"], a["cardiomegaly"]) == (1, 1, None)
    assert a["mask_path"] == "masks/1.png"
    assert json.loads(a["boxes"])[0]["label"] == "Effusion"
    b = out["gen/x/2"]
    assert (b["view"], b["sex"], b["boxes"], b["mask_path"]) == ("LATERAL", "M", None, None)
    bad = reasons(result)
    assert bad == {
        "gen/x/3": "impossible age: -3",
        "gen/x/4": "unknown official split value 'holdout'",
    }
    assert result.counts["adapter"]["annotations_matched"] == 2
    with pytest.raises(ValueError, match="label column"):
        ingest(
            "gen",
            "generic_csv",
            tmp_path,
            {
                "csv": "meta.csv",
                "image_col": "file",
                "patient_col": "pid",
                "labels": {"Edema": "nope"},
            },
        )


def test_generic_csv_missing_required(tmp_path: Path) -> None:
    write_csv(tmp_path / "m.csv", [{"a": 1}])
    with pytest.raises(ValueError, match="required"):
        ingest("g", "generic_csv", tmp_path, {"csv": "m.csv"})


# --------------------------------------------------------------------------------------------
# Splits and labels
# --------------------------------------------------------------------------------------------


def test_splits_deterministic_and_patient_disjoint() -> None:
    patients = [f"p{i}" for i in range(3000)]
    first = [splits.assign_split("ds", p) for p in patients]
    assert first == [splits.assign_split("ds", p) for p in patients]
    shares = {s: first.count(s) / len(first) for s in schema.SPLITS}
    assert abs(shares["train"] - 0.8) < 0.03 and abs(shares["test"] - 0.1) < 0.03
    # another dataset or salt gives another (still deterministic) draw
    assert first != [splits.assign_split("other", p) for p in patients]
    assert first != [splits.assign_split("ds", p, salt="x") for p in patients]
    rows = patients * 2
    out, stats = splits.assign_splits("ds", rows, [None] * len(rows))
    assert out == first + first and stats["patients"] == 3000
    # official constraints: a patient with one official test image goes to test entirely
    allowed = [None, frozenset({"test"}), frozenset({"train", "val"})]
    out, stats = splits.assign_splits("ds", ["a", "a", "b"], allowed)
    assert out[:2] == ["test", "test"] and out[2] in ("train", "val")
    out, stats = splits.assign_splits("ds", ["a", "a"], [frozenset({"test"}), frozenset({"val"})])
    assert out == ["test", "test"] and stats["patients_official_conflict"] == 1
    assert splits.patients_in_several_splits(["a", "a"], ["test", "val"]) == {"a": ["test", "val"]}
    assert splits.patients_in_several_splits(["a", "a"], out) == {}
    assert splits.official_split("validate") == "val"
    with pytest.raises(ValueError):
        splits.official_split("holdout")


def test_labels_from_terms_rules() -> None:
    out = lab.labels_from_terms(["Consolidation"], lab.NIH_TO_CHEXPERT)
    assert (out["consolidation"], out["lung_opacity"], out["no_finding"]) == (1, None, 0)
    out = lab.labels_from_terms(["No Finding"], lab.NIH_TO_CHEXPERT)
    assert out["no_finding"] == 1 and out["edema"] == 0
    out = lab.labels_from_terms(["pacemaker", "normal"], lab.PADCHEST_TO_CHEXPERT)
    assert (out["support_devices"], out["no_finding"]) == (1, 1)
    out = lab.labels_from_terms([], lab.PADCHEST_TO_CHEXPERT, unmentioned="null")
    assert set(out.values()) == {None}
    with pytest.raises(lab.LabelError):
        lab.parse_chexpert_value("yes", "Edema")
    assert lab.parse_chexpert_value(" -1.0 ", "Edema") == -1


# --------------------------------------------------------------------------------------------
# Review regressions: real-world values and layouts
# --------------------------------------------------------------------------------------------


def test_nih_official_lists_with_bom_and_crlf(tmp_path: Path) -> None:
    # split lists saved by Windows tools: a UTF-8 BOM and CRLF line ends; the official test
    # image on the first line must still be recognised (else it could land in train)
    nih_fixture(tmp_path)
    (tmp_path / "test_list.txt").write_bytes(b"\xef\xbb\xbf00000002_000.png\r\n")
    (tmp_path / "train_val_list.txt").write_bytes(
        b"\xef\xbb\xbf00000001_000.png\r\n00000001_001.png\r\n"
    )
    result = ingest("nih", "nih", tmp_path, {})
    check_invariants(result)
    rows = by_id(result)
    assert rows["nih/00000002_000"]["split"] == "test"
    assert rows["nih/00000001_000"]["split"] in ("train", "val")


def test_nih_lone_test_list_still_holds_out_its_images(tmp_path: Path) -> None:
    # only test_list.txt shipped (train_val_list.txt missing): its images must still go to
    # test, never to train; the stats say which official lists were used
    nih_fixture(tmp_path)
    (tmp_path / "train_val_list.txt").unlink()
    result = ingest("nih", "nih", tmp_path, {})
    check_invariants(result)
    assert by_id(result)["nih/00000002_000"]["split"] == "test"
    assert result.counts["adapter"]["official_split"] is True
    assert result.counts["adapter"]["official_lists"] == ["test_list.txt"]


def test_brax_age_groups(tmp_path: Path) -> None:
    # BRAX publishes PatientAge in 5-year groups, the oldest as "85 or more": the images of
    # patients aged 85+ are usable and must not be rejected as "impossible age"
    ages = ["85 or more", "40 - 44", "40-44", "45", "065Y", "", "200"]
    rows = [
        {
            "PngPath": f"images/{i}.png",
            "PatientID": f"id_{i}",
            "AccessionNumber": f"acc{i}",
            "ViewPosition": "PA",
            "PatientSex": "O" if i == 0 else "F",
            "PatientAge": age,
        }
        for i, age in enumerate(ages)
    ]
    write_csv(tmp_path / "master_spreadsheet_update.csv", rows)
    for r in rows:
        png(tmp_path / r["PngPath"])
    result = ingest("brax", "brax", tmp_path, {})
    check_invariants(result)
    out = {r["image_path"]: r for r in result.manifest.to_pylist()}
    assert [out[f"images/{i}.png"]["age"] for i in range(6)] == [85.0, 40.0, 40.0, 45.0, 65.0, None]
    assert out["images/0.png"]["sex"] is None
    assert list(reasons(result).values()) == ["impossible age: 200"]


def test_padchest_missing_value_tokens(tmp_path: Path) -> None:
    # PadChest writes missing values as text ("None", "nan" — see ViewPosition_DICOM and
    # PixelAspectRatio_DICOM in the real CSV); a missing birth year or label list is unknown,
    # not a reason to drop the image
    base = {
        "ImageDir": "0",
        "StudyDate_DICOM": "20150312",
        "StudyID": "st",
        "PatientSex_DICOM": "M",
        "Projection": "PA",
        "Labels": "['normal']",
    }
    rows = [
        {**base, "ImageID": "a.png", "PatientID": "pa", "PatientBirth": "None"},
        {**base, "ImageID": "b.png", "PatientID": "pb", "PatientBirth": "nan"},
        {**base, "ImageID": "c.png", "PatientID": "pc", "PatientBirth": "1950.0", "Labels": "nan"},
        {**base, "ImageID": "d.png", "PatientID": "pd", "PatientBirth": "1950.0", "Labels": "None"},
        {**base, "ImageID": "e.png", "PatientID": "pe", "PatientBirth": "19xx"},
    ]
    result = ingest_padchest(tmp_path, rows, image_dir="0")
    out = by_id(result)
    assert (out["padchest/a"]["age"], out["padchest/a"]["no_finding"]) == (None, 1)
    assert out["padchest/b"]["age"] is None
    for key in ("padchest/c", "padchest/d"):
        assert out[key]["age"] == 65.0
        assert out[key]["no_finding"] is None and out[key]["labels_extra"] == "{}"
    assert reasons(result) == {"padchest/e": "impossible age: birth '19xx', study date '20150312'"}


def test_padchest_projection_predicted_by_dataset_model(tmp_path: Path) -> None:
    # PadChest's MethodProjection says who set Projection: a manual review of the DICOM fields,
    # or the authors' CNN ("resnet-50.t7", ~13 % of rows). A CNN's call is not metadata: by
    # default it is kept with view_source "classifier"; "reclassify" leaves it to filter_frontal
    from cxrfoundry.data.views import filter_frontal

    rows = [
        padchest_row("aaa.png", "PA", "['normal']"),
        padchest_row("bbb.png", "L", "['normal']", method=PADCHEST_MODEL),
        padchest_row("ccc.png", "PA", "['normal']", method=" ResNet-50.t7 "),
        padchest_row("ddd.png", "AP", "['normal']", method=""),
        padchest_row("eee.png", "PA", "['normal']", method="None"),
        padchest_row("fff.png", "UNK", "['normal']", method=PADCHEST_MODEL),  # nothing predicted
        padchest_row("ggg.png", "PA", "['normal'", method=PADCHEST_MODEL),  # rejected row
    ]
    result = ingest_padchest(tmp_path, rows, image_dir="7")
    out = by_id(result)
    got = {k.split("/")[1]: (r["view_raw"], r["view"], r["view_source"]) for k, r in out.items()}
    assert got == {
        "aaa": ("PA", "PA", "metadata"),
        "bbb": ("L", "LATERAL", "classifier"),
        "ccc": ("PA", "PA", "classifier"),
        "ddd": ("AP", "AP", "metadata"),
        "eee": ("PA", "PA", "metadata"),
        "fff": ("UNK", "UNKNOWN", "none"),
    }
    assert result.counts["adapter"]["n_view_predicted_by_dataset"] == 2
    assert result.counts["view_sources"] == {"classifier": 2, "metadata": 3, "none": 1}
    # the frontal filter reports who decided
    audit = filter_frontal(result.manifest, tmp_path, {"classifier": {"enabled": False}}).audit
    assert audit["by_decision_source"]["frontal/classifier"] == 1
    assert audit["by_decision_source"]["excluded/classifier"] == 1

    result = ingest_padchest(tmp_path, rows, "7", {"predicted_projection": "reclassify"})
    got = {
        k.split("/")[1]: (r["view_raw"], r["view"], r["view_source"])
        for k, r in by_id(result).items()
    }
    assert got["bbb"] == ("L", "UNKNOWN", "none") and got["ccc"] == ("PA", "UNKNOWN", "none")
    assert got["aaa"] == ("PA", "PA", "metadata")
    assert result.counts["adapter"]["n_view_predicted_by_dataset"] == 2
    assert result.counts["view_sources"] == {"metadata": 3, "none": 3}
    # the filter decides them now; with its classifier off they fall to the unknown policy
    filtered = filter_frontal(result.manifest, tmp_path, {"classifier": {"enabled": False}})
    why = {r["image_id"]: r["reason"] for r in filtered.excluded.to_pylist()}
    assert why["padchest/bbb"] == "view unknown after all fallbacks (raw 'L'): policy exclude"

    with pytest.raises(ValueError, match="predicted_projection"):
        ingest_padchest(tmp_path, rows, "7", {"predicted_projection": "trust"})


def test_official_splits_that_share_a_patient_stay_patient_disjoint(tmp_path: Path) -> None:
    # a patient id found in two official split files (or split values): all of the
    # patient's images go to the most held-out of them (test > val > train), so no image of
    # an official test patient is trained on, and the move is counted
    rows = [
        {"file": "1.png", "pid": "a", "part": "train"},
        {"file": "2.png", "pid": "a", "part": "test"},
        {"file": "3.png", "pid": "b", "part": "validate"},
        {"file": "4.png", "pid": "b", "part": "train"},
        {"file": "5.png", "pid": "b", "part": ""},
        {"file": "6.png", "pid": "c", "part": "train"},
    ]
    write_csv(tmp_path / "meta.csv", rows)
    for r in rows:
        png(tmp_path / r["file"])
    opts = {"csv": "meta.csv", "image_col": "file", "patient_col": "pid", "split_col": "part"}
    result = ingest("gen", "generic_csv", tmp_path, opts)
    check_invariants(result)  # includes patient-disjointness
    split = {r["image_path"]: r["split"] for r in result.manifest.to_pylist()}
    assert split == {
        "1.png": "test",
        "2.png": "test",
        "3.png": "val",
        "4.png": "val",
        "5.png": "val",
        "6.png": "train",
    }
    assert result.counts["patients_official_conflict"] == 2
    assert result.counts["rows_moved_from_official_split"] == 2
    # the same through the split module, and the VinDr layout (one PatientID in both files)
    out, stats = splits.assign_splits(
        "ds", ["a", "a", "a"], [frozenset({"train", "val"}), frozenset({"test"}), None]
    )
    assert out == ["test", "test", "test"] and stats["rows_moved_from_official_split"] == 1
    # CheXpert: a valid.csv patient also in train.csv, whose train rows may hash to train or
    # test: the official val assignment decides, the patient does not move to test
    out, stats = splits.assign_splits(
        "ds", ["a", "a"], [frozenset({"val"}), frozenset({"train", "test"})]
    )
    assert out == ["val", "val"] and stats["rows_moved_from_official_split"] == 1


def test_vindr_patient_in_train_and_test_files(tmp_path: Path) -> None:
    reader = vindr_reader
    write_csv(tmp_path / "annotations/image_labels_train.csv", [reader("tr1", "R1")])
    write_csv(tmp_path / "annotations/image_labels_test.csv", [reader("te1", "R8")])
    dicom(tmp_path / "train/tr1.dicom", PatientID="same", ViewPosition="PA")
    dicom(tmp_path / "test/te1.dicom", PatientID="same", ViewPosition="PA")
    result = ingest("vindr", "vindr_cxr", tmp_path, {})
    check_invariants(result)
    assert {r["split"] for r in result.manifest.to_pylist()} == {"test"}
    assert result.counts["patients_official_conflict"] == 1


def test_vindr_other_disease_has_one_spelling(tmp_path: Path) -> None:
    # VinDr-CXR writes "Other diseases" in its train files and "Other disease" in its test
    # files; labels_extra must have one key for the one label, whatever the file or format
    train = [vindr_reader("tr1", "R1", "Other diseases"), vindr_reader("tr2", "R1")]
    write_csv(tmp_path / "annotations/image_labels_train.csv", train)
    test = [
        {**vindr_reader("te1", "R8"), "Other diseases": 1},
        {**vindr_reader("te2", "R8"), "Other diseases": 0},
    ]
    for r in test:  # the test file's spelling
        r["Other disease"] = r.pop("Other diseases")
    write_csv(tmp_path / "annotations/image_labels_test.csv", test)
    box = {"rad_id": "R8", "x_min": 1, "y_min": 2, "x_max": 11, "y_max": 12}
    write_csv(
        tmp_path / "annotations/annotations_test.csv",
        [{"image_id": "te1", "class_name": "Other disease", **box}],
    )
    for image in ("train/tr1", "train/tr2", "test/te1", "test/te2"):
        dicom(tmp_path / f"{image}.dicom", PatientID=image, ViewPosition="PA")
    result = ingest("vindr", "vindr_cxr", tmp_path, {})
    check_invariants(result)
    out = by_id(result)
    for image, positive in (("tr1", 1), ("tr2", 0), ("te1", 1), ("te2", 0)):
        extra = json.loads(out[f"vindr/{image}"]["labels_extra"])
        assert "Other disease" not in extra, image
        assert extra["Other diseases"] == positive, image
    assert json.loads(out["vindr/te1"]["boxes"])[0]["label"] == "Other diseases"

    # the long format (Kaggle train.csv / annotations_*.csv as the label file)
    long_rows = [
        {"image_id": "tr1", "class_name": "Other disease", "class_id": 13, **box},
        {"image_id": "tr2", "class_name": "No finding", "class_id": 14, "rad_id": "R1"},
    ]
    write_csv(tmp_path / "train.csv", long_rows)
    opts = {"labels_csv": "train.csv", "test_labels_csv": None, "boxes_csv": None}
    out = by_id(ingest("vindr", "vindr_cxr", tmp_path, opts))
    extra = json.loads(out["vindr/tr1"]["labels_extra"])
    assert "Other disease" not in extra and extra["Other diseases"] == 1
    assert json.loads(out["vindr/tr1"]["boxes"])[0]["label"] == "Other diseases"


def test_symlinked_subfolders_are_walked(tmp_path: Path) -> None:
    # the acquire stage follows links (a linked raw folder, or image folders linked in): the
    # adapters that walk the raw folder must see the same files
    store = tmp_path / "store"
    nih_fixture(store / "nih")
    raw = tmp_path / "raw_nih"
    raw.mkdir()
    for item in (store / "nih").iterdir():
        (raw / item.name).symlink_to(item, target_is_directory=item.is_dir())
    (raw / "images_002" / "loop").symlink_to(raw, target_is_directory=True)  # a cycle
    result = ingest("nih", "nih", raw, {})
    check_invariants(result)
    assert result.counts["rows_kept"] == 3
    assert by_id(result)["nih/00000002_000"]["image_path"] == "images_002/images/00000002_000.png"

    dicom(store / "dcm" / "a.dcm", SOPInstanceUID="9.1", PatientID="p1", ViewPosition="PA")
    droot = tmp_path / "raw_dcm"
    droot.mkdir()
    (droot / "linked").symlink_to(store / "dcm", target_is_directory=True)
    result = ingest("dcm", "dicom_folder", droot, {})
    check_invariants(result)
    assert [r["image_path"] for r in result.manifest.to_pylist()] == ["linked/a.dcm"]


# --------------------------------------------------------------------------------------------
# Real data (skipped when /work/shared is absent)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (REAL / "nih1000").is_dir(), reason="real NIH sample absent")
def test_real_nih1000() -> None:
    root = REAL / "nih1000"
    result = ingest("nih", "nih", root, {})
    check_invariants(result)
    c = result.counts
    assert (c["rows_in"], c["rows_kept"], c["rows_rejected"]) == (1000, 1000, 0)
    assert c["views"] == {"AP": 363, "PA": 637}
    entries = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    terms = entries["Finding Labels"].str.split("|")
    table = result.manifest
    expected = {
        "cardiomegaly": terms.apply(lambda t: "Cardiomegaly" in t).sum(),
        "pleural_effusion": terms.apply(lambda t: "Effusion" in t).sum(),
        "lung_lesion": terms.apply(lambda t: "Mass" in t or "Nodule" in t).sum(),
        "no_finding": terms.apply(lambda t: t == ["No Finding"]).sum(),
    }
    for col, n in expected.items():
        assert table.column(col).to_pylist().count(1) == n, col
    assert c["patients"] == 264


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="real metadata samples absent")
@pytest.mark.parametrize(
    ("adapter", "options"),
    [
        ("nih", {"data_entry": "nih_Data_Entry_2017_v2020.csv", "bbox": "nih_BBox_List_2017.csv"}),
        ("chexpert", {"train_csv": "chexpert_train.csv", "valid_csv": None}),
        ("padchest", {"csv": "padchest_labels_160K.csv"}),
        ("vindr_cxr", {"labels_csv": "vinbigdata_train.csv"}),
        (
            "generic_csv",
            {
                "csv": "rsna_dicom_headers.csv",
                "image_col": "Filename",
                "patient_col": "PatientID",
                "sex_col": "PatientSex",
                "age_col": "PatientAge",
                "view_col": "ViewPosition",
            },
        ),
        (
            "generic_csv",
            {
                "csv": "openi_dicom_metadata.csv",
                "image_col": "filename",
                "patient_col": "Patient ID",
                "sex_col": "Patient's Sex",
                "view_col": "View Position",
            },
        ),
    ],
)
def test_real_metadata_samples_all_image_missing(adapter: str, options: dict) -> None:
    result = ingest("sample", adapter, SAMPLES, options)
    check_invariants(result)
    assert result.counts["rows_in"] > 150
    assert result.counts["rejects_by_reason"] == {"image missing": result.counts["rows_in"]}
    # with no image check every row survives parsing: the real values are all understood
    parsed = ingest("sample", adapter, SAMPLES, {**options, "verify_images": "none"})
    assert parsed.counts["rows_rejected"] == 0, parsed.counts["rejects_by_reason"]
    if adapter != "vindr_cxr":  # VinDr views come from the (absent) DICOM headers
        assert parsed.counts["views"].get("UNKNOWN", 0) <= 0.5 * parsed.counts["rows_kept"]


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="real metadata samples absent")
def test_real_samples_values_map_as_documented() -> None:
    # PadChest: the real Projection / Labels / PatientBirth values
    raw = pd.read_csv(SAMPLES / "padchest_labels_160K.csv", dtype=str, keep_default_na=False)
    out = by_id(
        ingest(
            "s", "padchest", SAMPLES, {"csv": "padchest_labels_160K.csv", "verify_images": "none"}
        )
    )
    projection = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP_SUPINE", "L": "LATERAL"}
    for row in raw.to_dict(orient="records"):
        r = out["s/" + row["ImageID"].rsplit(".", 1)[0]]
        assert r["view"] == projection[row["Projection"]] and r["view_raw"] == row["Projection"]
        assert r["age"] == int(row["StudyDate_DICOM"][:4]) - float(row["PatientBirth"])
        assert r["sex"] == row["PatientSex_DICOM"]
        predicted = row["MethodProjection"] != PADCHEST_MANUAL
        assert r["view_source"] == ("classifier" if predicted else "metadata")
        if row["Labels"] == "['normal']":
            assert r["no_finding"] == 1 and r["cardiomegaly"] == 0
    # VinDr (Kaggle train.csv): reader rows united per image; "No finding" only when no
    # reader marked a finding
    raw = pd.read_csv(SAMPLES / "vinbigdata_train.csv", dtype=str, keep_default_na=False)
    out = by_id(
        ingest(
            "s",
            "vindr_cxr",
            SAMPLES,
            {"labels_csv": "vinbigdata_train.csv", "verify_images": "none"},
        )
    )
    classes = raw.groupby("image_id")["class_name"].apply(set).to_dict()
    assert len(out) == len(classes)
    for image, names in classes.items():
        r = out[f"s/{image}"]
        assert r["no_finding"] == int(names == {"No finding"}), (image, names)
        assert r["cardiomegaly"] == int("Cardiomegaly" in names)
        box_rows = raw[(raw.image_id == image) & (raw.class_name != "No finding")]
        assert len(json.loads(r["boxes"] or "[]")) == len(box_rows)  # every reader's box kept


@pytest.mark.skipif(not (REAL / "dicom").is_dir(), reason="real DICOM samples absent")
def test_real_dicoms() -> None:
    root = REAL / "dicom"
    rg1 = read_header(root / "RG1_J2KI.dcm")
    assert rg1.ViewPosition == "PA"
    result = ingest("dcm", "dicom_folder", root, {})
    check_invariants(result)
    out = {r["image_path"]: r for r in result.manifest.to_pylist()}
    assert out["RG1_J2KI.dcm"]["view"] == "PA" and out["RG1_J2KI.dcm"]["sex"] == "F"
    assert out["siim_cr_pa.dcm"]["view"] == "PA" and out["siim_cr_pa.dcm"]["age"] == 62.0
    # the MONOCHROME1 copy is the same SOP instance: a duplicate, not a second image
    assert result.counts["rejects_by_reason"] == {"duplicate image id": 1}


@pytest.mark.skipif(not (REAL / "dicom").is_dir(), reason="real DICOM samples absent")
@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "siim_cr_pa.dcm"])
def test_real_dicom_truncated_is_caught_by_header_check(tmp_path: Path, name: str) -> None:
    data = (REAL / "dicom" / name).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: int(len(data) * 0.6)])
    result = ingest("dcm", "dicom_folder", tmp_path, {"id_from": "path"})
    assert reasons(result) == {
        "dcm/cut": "corrupt DICOM: pixel data truncated: no end of encapsulated pixel data"
    }


def test_label_mapping_doc_lists_every_mapped_term() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "label-mapping.md"
    if not doc.is_file():
        pytest.skip("docs/label-mapping.md absent")
    text = doc.read_text()
    terms = [*lab.NIH_TO_CHEXPERT, *lab.VINDR_TO_CHEXPERT, *lab.PADCHEST_TO_CHEXPERT]
    missing = [t for t in terms if f"`{t}`" not in text]
    assert not missing, f"docs/label-mapping.md does not list {missing}"


# --------------------------------------------------------------------------------------------
# The demo sources (phantom radiographs in native layouts, with planted bad inputs)
# --------------------------------------------------------------------------------------------

DEMO_KINDS = {
    "mimic": ("mimic_cxr_jpg", {"demographics": ["patients.csv.gz", "admissions.csv.gz"]}),
    "chexpert": ("chexpert", {}),
    "nih": ("nih", {}),
    "dicom": ("vindr_cxr", {}),
}


@pytest.mark.parametrize("kind", sorted(DEMO_KINDS))
def test_demo_sources_bad_inputs_become_rejects(tmp_path: Path, kind: str) -> None:
    demo = pytest.importorskip("cxrfoundry.data.demo_sources")
    summary = demo.write_demo_source(
        kind, tmp_path / kind, {"n_images": 30, "image_size": 32, "bad_min_images": 20}, seed=3
    )
    adapter, options = DEMO_KINDS[kind]
    result = ingest(kind, adapter, tmp_path / kind, {**options, "annotations": "phantom_truth.csv"})
    check_invariants(result)
    truth = pd.read_csv(tmp_path / kind / "phantom_truth.csv", dtype=str, keep_default_na=False)
    kept = {r["image_path"]: r for r in result.manifest.to_pylist()}
    rejected = set(truth["image_path"]) - set(kept)
    planted: set[str] = set()
    for record in summary["bad_input_records"]:
        paths = record.get("image_paths") or [record["image_path"]]
        if record["kind"] == "unknown_view":
            assert all(kept[p]["view"] == "UNKNOWN" for p in paths), record
        else:
            planted.update(paths)
    assert rejected == planted
    assert result.counts["rows_rejected"] == len(planted)
    # ground truth joins on image_path: every kept image has its mask, views agree with truth
    assert all(r["mask_path"] for r in kept.values())
    true_view = dict(zip(truth["image_path"], truth["view"], strict=True))
    wrong = [p for p, r in kept.items() if r["view"] not in ("UNKNOWN", true_view[p])]
    assert not wrong
