"""Tests of the CXR phantom and the demo source writers (small, 64 px, fast)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from cxrfoundry.data import demo_sources as ds
from cxrfoundry.data import phantom as P
from cxrfoundry.io import sha256_tree
from cxrfoundry.schema import FINDING_NAMES, MASK_BITS

SIZE = 64
REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "metadata-samples"


def _labels(*positive: str) -> dict[str, int]:
    labels = {n: 0 for n in FINDING_NAMES}
    for name in positive:
        labels[name] = 1
    if any(labels[c] for c in P.OPACITY_CHILDREN):
        labels["Lung Opacity"] = 1
    labels["No Finding"] = int(not any(labels[n] for n in P.PATHOLOGIES))
    return labels


def _pair(seed: int, finding: str, view: str = "PA", cfg=None, size: int = SIZE):
    """The same patient rendered without and with one finding (identical anatomy and noise)."""
    neg = P.sample_case(np.random.default_rng(seed), cfg, view=view, labels=_labels())
    pos = P.sample_case(np.random.default_rng(seed), cfg, view=view, labels=_labels(finding))
    assert neg.anatomy == pos.anatomy and neg.seed == pos.seed
    return P.render_case(neg, size), P.render_case(pos, size)


# --------------------------------------------------------------------------- phantom


def test_same_seed_same_pixels_and_different_seed_differs():
    a = P.generate_cases(6, seed=3, size=SIZE)
    b = P.generate_cases(6, seed=3, size=SIZE)
    c = P.generate_cases(6, seed=4, size=SIZE)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image)
        assert all(np.array_equal(x.masks[k], y.masks[k]) for k in x.masks)
        assert x.boxes == y.boxes and x.labels == y.labels
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c, strict=True))


def test_label_rules_hold_over_many_cases():
    rng = np.random.default_rng(0)
    cfg = {"uncertain_fraction": 0.3, "prevalence": {"Lung Opacity": 0.0}}
    for _ in range(300):
        spec = P.sample_case(rng, cfg)
        lab, rep = spec.labels, spec.reported_labels
        children = any(lab[c] for c in P.OPACITY_CHILDREN)
        assert lab["Lung Opacity"] == int(children)  # no stand-alone opacity configured
        assert lab["No Finding"] == int(not any(lab[n] for n in P.PATHOLOGIES))
        for name in FINDING_NAMES:
            assert rep[name] in (lab[name], -1)
            if rep[name] == -1:
                assert lab[name] == 1 and name in P.PATHOLOGIES


def test_cardiomegaly_enlarges_heart_mask():
    for seed in range(5):
        neg, pos = _pair(seed, "Cardiomegaly")
        assert pos.masks["heart"].sum() > 1.25 * neg.masks["heart"].sum()
        assert any(b["label"] == "Cardiomegaly" for b in pos.boxes)


@pytest.mark.parametrize(
    ("finding", "sign"),
    [
        ("Pleural Effusion", 1),
        ("Consolidation", 1),
        ("Pneumonia", 1),
        ("Edema", 1),
        ("Atelectasis", 1),
        ("Pleural Other", 1),
        ("Enlarged Cardiomediastinum", 1),
        ("Pneumothorax", -1),
    ],
)
def test_finding_changes_lung_field_intensity(finding, sign):
    for seed in range(4):
        neg, pos = _pair(seed, finding)
        lungs = neg.masks["lungs"].astype(bool)
        delta = pos.image[lungs].astype(float).mean() - neg.image[lungs].astype(float).mean()
        assert sign * delta > 0.5, (finding, seed, delta)


def test_effusion_is_basal_and_shrinks_aerated_lung():
    for seed in range(4):
        neg, pos = _pair(seed, "Pleural Effusion")
        lungs = neg.masks["lungs"].astype(bool)
        rows = np.flatnonzero(lungs.any(axis=1))
        cut = rows[0] + (rows[-1] - rows[0]) * 2 // 3
        lower, upper = lungs.copy(), lungs.copy()
        lower[:cut] = False
        upper[cut:] = False
        diff = pos.image.astype(float) - neg.image.astype(float)
        assert diff[lower].mean() > 2 * max(diff[upper].mean(), 0.1)
        assert pos.masks["lungs"].sum() < neg.masks["lungs"].sum()


def test_pneumothorax_is_dark_and_excluded_from_lungs():
    for seed in range(4):
        neg, pos = _pair(seed, "Pneumothorax")
        box = next(b for b in pos.boxes if b["label"] == "Pneumothorax")
        assert pos.masks["lungs"].sum() < neg.masks["lungs"].sum()
        region = (neg.masks["lungs"] == 1) & (pos.masks["lungs"] == 0)
        assert pos.image[region].mean() < neg.image[region].mean()
        assert box["w"] > 0 and box["h"] > 0


def test_lesion_mask_boxes_and_local_signal():
    for seed in range(4):
        neg, pos = _pair(seed, "Lung Lesion")
        lesion = pos.masks["lesion"].astype(bool)
        assert lesion.any() and not neg.masks["lesion"].any()
        boxes = [b for b in pos.boxes if b["label"] == "Lung Lesion"]
        assert 1 <= len(boxes) <= 3
        for b in boxes:
            inside = np.zeros_like(lesion)
            inside[b["y"] : b["y"] + b["h"], b["x"] : b["x"] + b["w"]] = True
            assert (lesion & inside).any()
        assert pos.image[lesion].mean() > neg.image[lesion].mean() + 5


def test_fracture_and_devices_change_the_image_locally():
    for seed in range(4):
        neg, pos = _pair(seed, "Fracture")
        box = next(b for b in pos.boxes if b["label"] == "Fracture")
        diff = np.abs(pos.image.astype(int) - neg.image.astype(int))
        y0, x0 = box["y"], box["x"]
        assert diff[y0 : y0 + box["h"], x0 : x0 + box["w"]].max() >= 3
        neg, pos = _pair(seed, "Support Devices", view="AP")
        assert (pos.image.astype(int) - neg.image.astype(int)).max() > 20


def test_masks_and_boxes_consistent_with_image():
    for case in P.generate_cases(20, seed=11, size=SIZE):
        assert case.image.shape == (SIZE, SIZE) and case.image.dtype == np.uint8
        for name in ("lungs", "heart", "lesion"):
            m = case.masks[name]
            assert m.shape == case.image.shape and m.dtype == np.uint8
            assert set(np.unique(m)) <= {0, 1}
        assert case.masks["lungs"].sum() > 0.08 * SIZE * SIZE
        assert not (case.masks["lungs"] & case.masks["heart"]).any()
        bits = case.mask_bits()
        assert np.array_equal(bits & MASK_BITS["lungs"] > 0, case.masks["lungs"] > 0)
        assert np.array_equal(bits & MASK_BITS["heart"] > 0, case.masks["heart"] > 0)
        for b in case.boxes:
            assert b["label"] in FINDING_NAMES and case.labels[b["label"]] == 1
            assert b["x"] >= 0 and b["y"] >= 0 and b["w"] >= 1 and b["h"] >= 1
            assert b["x"] + b["w"] <= SIZE and b["y"] + b["h"] <= SIZE


def test_lateral_differs_from_frontal():
    for seed in range(4):
        rng_cfg = {"prevalence": {n: 0.0 for n in P.DEFAULT_PREVALENCE}}
        pa = P.render_case(P.sample_case(np.random.default_rng(seed), rng_cfg, view="PA"), SIZE)
        lat = P.render_case(
            P.sample_case(np.random.default_rng(seed), rng_cfg, view="LATERAL"), SIZE
        )
        # Two lung fields on a frontal film, one on a lateral.
        assert ndimage.label(pa.masks["lungs"])[1] == 2
        assert ndimage.label(lat.masks["lungs"])[1] == 1
        corr = np.corrcoef(pa.image.ravel().astype(float), lat.image.ravel().astype(float))[0, 1]
        assert corr < 0.8

        # Frontal anatomy is roughly mirror-symmetric; the lateral is not (spine at the back).
        def asym(im):
            im = im.astype(float)
            return np.abs(im - im[:, ::-1]).mean()

        assert asym(lat.image) > 1.5 * asym(pa.image)


def test_ap_view_has_bigger_heart_and_lower_contrast():
    hearts, stds = {"PA": [], "AP": []}, {"PA": [], "AP": []}
    for seed in range(6):
        for view in ("PA", "AP"):
            spec = P.sample_case(np.random.default_rng(seed), None, view=view, labels=_labels())
            c = P.render_case(spec, SIZE, {"noise": 0.0, "marker": False})
            hearts[view].append(c.masks["heart"].sum())
            stds[view].append(c.image.std())
    assert np.mean(hearts["AP"]) > np.mean(hearts["PA"])
    assert np.mean(stds["AP"]) < np.mean(stds["PA"])


def test_bias_knob_weakens_findings_for_a_group():
    cfg_weak = {"bias": {"signal_strength": {"race": {"Black": 0.4}}}}
    assert P.subgroup_signal(P.merge_config(P.DEFAULT_CONFIG, cfg_weak), "F", "Black", 50) == 0.4
    assert P.subgroup_signal(P.merge_config(P.DEFAULT_CONFIG, cfg_weak), "F", "White", 50) == 1.0
    demo = {"sex": "M", "age": 60, "race": "Black"}
    for seed in range(3):
        deltas = []
        for cfg in (None, cfg_weak):
            rng = np.random.default_rng(seed)
            neg = P.sample_case(rng, cfg, view="PA", demographics=demo, labels=_labels())
            rng = np.random.default_rng(seed)
            pos = P.sample_case(
                rng, cfg, view="PA", demographics=demo, labels=_labels("Consolidation")
            )
            a, b = P.render_case(neg, SIZE), P.render_case(pos, SIZE)
            deltas.append(np.abs(b.image.astype(float) - a.image.astype(float)).sum())
        assert deltas[1] < 0.8 * deltas[0]
    with pytest.raises(ValueError, match="signal_strength"):
        P.subgroup_signal({"bias": {"signal_strength": {"height": {}}}}, "F", "White", 50)


def test_demographic_imbalance_is_configurable():
    cfg = {"demographics": {"female_fraction": 0.1, "race": {"White": 0.9, "Asian": 0.1}}}
    rng = np.random.default_rng(5)
    demos = [P.sample_demographics(rng, P.merge_config(P.DEFAULT_CONFIG, cfg)) for _ in range(400)]
    assert sum(d["sex"] == "F" for d in demos) < 80
    assert {d["race"] for d in demos} <= {"White", "Asian"}


def test_site_effects_and_bit_depth(tmp_path):
    spec = P.sample_case(np.random.default_rng(2), None, view="PA")
    a = P.render_case(spec, SIZE, P.SITE_PRESETS["nih"])
    b = P.render_case(spec, SIZE, P.SITE_PRESETS["chexpert"])
    assert not np.array_equal(a.image, b.image)
    deep = P.render_case(spec, SIZE, P.SITE_PRESETS["dicom"])
    assert deep.image.dtype == np.uint16 and deep.image.max() <= 4095
    with pytest.raises(ValueError, match="unknown keys"):
        P.render_case(spec, SIZE, {"gama": 2})
    sheet = P.contact_sheet([a.image, b.image, a.image, b.image], ncols=2)
    Image.fromarray(sheet).save(tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == sheet.shape[::-1]


def test_render_speed_is_reasonable():
    import time

    rng = np.random.default_rng(0)
    specs = [P.sample_case(rng) for _ in range(40)]
    start = time.process_time()
    for spec in specs:
        P.render_case(spec, 128)
    per_image = (time.process_time() - start) / len(specs)
    assert per_image < 0.05, per_image  # ~10 ms on one core; generous for shared machines


# --------------------------------------------------------------------------- demo sources

MINI = {"n_images": 40, "image_size": SIZE}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = {}
    for kind in ds.KINDS:
        out[kind] = (root / kind, ds.write_demo_source(kind, root / kind, MINI, seed=5))
    return out


def _read_csv_gz(path: Path) -> pd.DataFrame:
    with gzip.open(path, "rt") as handle:
        return pd.read_csv(handle, keep_default_na=False, dtype=str)


def _truth(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "phantom_truth.csv", keep_default_na=False, dtype=str)


def _bad(root: Path) -> list[dict]:
    return json.loads((root / "phantom_bad_inputs.json").read_text())["bad_inputs"]


def test_sources_are_byte_identical_for_a_seed(tmp_path, sources):
    path, _ = sources["nih"]
    again = tmp_path / "nih"
    ds.write_demo_source("nih", again, MINI, seed=5)
    assert sha256_tree(again) == sha256_tree(path)
    for kind in ("mimic", "dicom"):
        a, b = tmp_path / f"{kind}_a", tmp_path / f"{kind}_b"
        ds.write_demo_source(kind, a, {"n_images": 12, "image_size": 32}, seed=1)
        ds.write_demo_source(kind, b, {"n_images": 12, "image_size": 32}, seed=1)
        assert sha256_tree(a) == sha256_tree(b)
    other = tmp_path / "nih_other"
    ds.write_demo_source("nih", other, MINI, seed=6)
    assert sha256_tree(other) != sha256_tree(path)


def test_every_source_has_truth_masks_and_all_bad_kinds(sources):
    for kind, (root, summary) in sources.items():
        truth = _truth(root)
        assert len(truth) == summary["n_images"] >= MINI["n_images"]
        expected = set(ds.BAD_KINDS) | ({"corrupt_dicom"} if kind == "dicom" else set())
        assert set(summary["bad_inputs"]) == expected, kind
        records = _bad(root)
        assert len(records) == sum(summary["bad_inputs"].values())
        assert {r["kind"] for r in records} == expected
        marked = truth[truth["bad_input"] != ""]
        assert len(marked) == len(records)
        for row in truth.itertuples():
            mask = np.asarray(Image.open(root / row.mask_path))
            assert mask.shape == (SIZE, SIZE) and mask.max() <= 7
            assert (mask & MASK_BITS["lungs"]).any()
            for box in json.loads(row.boxes):
                assert box["x"] + box["w"] <= SIZE and box["y"] + box["h"] <= SIZE
        for rec in records:
            path = root / rec["image_path"]
            if rec["kind"] == "missing_file":
                assert not path.exists()
            elif rec["kind"] == "zero_byte_image":
                assert path.stat().st_size == 0
            elif rec["kind"] in ("truncated_image", "corrupt_dicom"):
                assert path.stat().st_size > 0
                if kind == "dicom":
                    with pytest.raises(Exception):  # noqa: B017 - any decode failure will do
                        pydicom.dcmread(path).pixel_array  # noqa: B018
                else:
                    with pytest.raises(OSError):
                        Image.open(path).load()


def test_mimic_layout_and_metadata(sources):
    root, summary = sources["mimic"]
    meta = _read_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert list(meta.columns) == [
        "dicom_id",
        "subject_id",
        "study_id",
        "PerformedProcedureStepDescription",
        "ViewPosition",
        "Rows",
        "Columns",
        "StudyDate",
        "StudyTime",
        "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]
    labels = _read_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert list(labels.columns) == ["subject_id", "study_id", *sorted(FINDING_NAMES)]
    assert set(labels[list(FINDING_NAMES)].stack()) <= {"1.0", "0.0", "-1.0", ""}
    split = _read_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz")
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split["split"]) <= {"train", "validate", "test"}
    assert split.groupby("subject_id")["split"].nunique().max() == 1
    pats = _read_csv_gz(root / "patients.csv.gz")
    assert {"subject_id", "gender", "anchor_age"} <= set(pats.columns)
    assert "race" in _read_csv_gz(root / "admissions.csv.gz").columns
    assert set(meta["ViewPosition"]) >= {"PA", "AP", ""}
    assert set(meta["ViewPosition"]) <= {"PA", "AP", "LATERAL", "LL", "", *ds.UNKNOWN_VIEW_CODES}
    for row in meta.itertuples():
        sub = row.subject_id
        path = root / f"files/p{sub[:2]}/p{sub}/s{row.study_id}/{row.dicom_id}.jpg"
        report = root / f"files/p{sub[:2]}/p{sub}/s{row.study_id}.txt"
        assert "FINDINGS:" in report.read_text() and "IMPRESSION:" in report.read_text()
        bad = [r for r in _bad(root) if r["row_id"] == row.dicom_id]
        if not bad:
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.size == (SIZE, SIZE)
    # Reports agree with the labels: every positive finding is named.
    merged = labels.set_index("study_id")
    for report in (root / "files").rglob("*.txt"):
        row = merged.loc[report.stem[1:]]
        text = report.read_text().lower()
        if row["Pleural Effusion"] == "1.0":
            assert "effusion" in text
        if row["Cardiomegaly"] == "1.0":
            assert "cardiomegaly" in text or "heart is enlarged" in text or "enlarged" in text
        if row["No Finding"] == "1.0":
            assert "no acute" in text
    bad_age = next(r for r in _bad(root) if r["kind"] == "impossible_age")
    subject = bad_age["row_id"].split("=")[1]
    value = pats.set_index("subject_id").loc[subject, "anchor_age"]
    assert value == str(bad_age["value"])
    assert summary["empty_views"]


def test_chexpert_layout(sources):
    root, _ = sources["chexpert"]
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDING_NAMES]
    train = pd.read_csv(root / "CheXpert-v1.0-small/train.csv", dtype=str, keep_default_na=False)
    valid = pd.read_csv(root / "CheXpert-v1.0-small/valid.csv", dtype=str, keep_default_na=False)
    assert list(train.columns) == header and list(valid.columns) == header
    assert set(train["Sex"]) <= {"Male", "Female"}
    assert set(train["Frontal/Lateral"]) <= {"Frontal", "Lateral", *ds.UNKNOWN_VIEW_CODES}
    assert set(valid[list(FINDING_NAMES)].stack()) <= {"1.0", "0.0"}
    missing = {r["image_path"] for r in _bad(root) if r["kind"] == "missing_file"}
    for path in pd.concat([train, valid])["Path"]:
        assert path.startswith("CheXpert-v1.0-small/")
        assert (root / path).exists() != (path in missing)
    if (REAL / "chexpert_train.csv").exists():
        real = (REAL / "chexpert_train.csv").read_text().splitlines()[0]
        assert real == ",".join(header)


def test_nih_layout(sources):
    root, summary = sources["nih"]
    first = (root / "Data_Entry_2017.csv").read_text().splitlines()[0]
    assert first == ds.NIH_HEADER
    entries = pd.read_csv(root / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    assert {"OriginalImage[Width", "Height]", "Finding Labels", "View Position"} <= set(
        entries.columns
    )
    vocab = {
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
        "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
        "Hernia", "No Finding",
    }  # fmt: skip
    for labels in entries["Finding Labels"]:
        parts = labels.split("|")
        assert set(parts) <= vocab and ("No Finding" not in parts or parts == ["No Finding"])
    assert set(entries["View Position"]) <= {"PA", "AP", *ds.UNKNOWN_VIEW_CODES}
    assert (root / "BBox_List_2017.csv").read_text().splitlines()[0] == ds.NIH_BBOX_HEADER
    boxes = pd.read_csv(root / "BBox_List_2017.csv")
    assert len(boxes) == summary["boxes"]
    if (REAL / "nih_Data_Entry_2017_v2020.csv").exists():
        assert (REAL / "nih_Data_Entry_2017_v2020.csv").read_text().splitlines()[0] == first
        real_bbox = (REAL / "nih_BBox_List_2017.csv").read_text().splitlines()[0]
        assert real_bbox == ds.NIH_BBOX_HEADER


def test_dicom_files_decode_with_views_photometric_and_compression(sources):
    root, summary = sources["dicom"]
    labels = pd.read_csv(root / "annotations/image_labels_train.csv")
    assert list(labels.columns) == ["image_id", "rad_id", *ds.VINDR_LABELS]
    assert (labels.groupby("image_id").size() == 3).all()
    truth = _truth(root).set_index("image_id")
    # The union over readers equals the truth.
    union = labels.groupby("image_id")[list(ds.VINDR_LABELS)].max()
    for image_id, row in union.iterrows():
        for chex, vin in ds.VINDR_FROM_CHEXPERT.items():
            assert int(truth.loc[image_id, chex]) == row[vin], (image_id, chex)
    bad = {r["row_id"] for r in _bad(root)}
    seen = {"syntax": set(), "photometric": set(), "view": set()}
    for image_id, row in truth.iterrows():
        if image_id in bad:
            continue
        dcm = pydicom.dcmread(root / row["image_path"])
        assert dcm.file_meta.MediaStorageSOPClassUID in ds.SOP_CLASS.values()
        assert dcm.PatientAge.endswith("Y") and dcm.PatientSex in ("M", "F")
        seen["syntax"].add(str(dcm.file_meta.TransferSyntaxUID))
        seen["photometric"].add(dcm.PhotometricInterpretation)
        pixels = dcm.pixel_array.astype(float)
        assert pixels.shape == (SIZE, SIZE)
        if dcm.PhotometricInterpretation == "MONOCHROME1":
            pixels = (2**dcm.BitsStored - 1) - pixels
        mask = np.asarray(Image.open(root / row["mask_path"]))
        lungs, heart = (mask & 1) > 0, (mask & 2) > 0
        # After honouring the photometric interpretation lungs are darker than the heart.
        assert pixels[lungs].mean() < pixels[heart].mean()
        if "ViewPosition" in dcm and dcm.ViewPosition:
            seen["view"].add("position")
        elif "ViewCodeSequence" in dcm or "SeriesDescription" in dcm:
            seen["view"].add("fallback")
        else:
            seen["view"].add("none")
    assert seen["syntax"] >= {
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.50",
    }
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["view"] == {"position", "fallback", "none"}
    assert summary["dicom"]["view_missing"] > 0


def test_bad_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        ds.write_demo_source("padchest", tmp_path / "x", {}, seed=0)
    with pytest.raises(ValueError, match="n_images"):
        ds.write_demo_source("nih", tmp_path / "x", {"n_images": 0}, seed=0)
    with pytest.raises(ValueError, match="prevalence"):
        ds.write_demo_source("nih", tmp_path / "x", {"prevalence": {"Flu": 0.1}}, seed=0)
    assert not (tmp_path / "x").exists()


def test_tiny_source_has_no_bad_inputs(tmp_path):
    summary = ds.write_demo_source(
        "chexpert", tmp_path / "c", {"n_images": 5, "image_size": 32}, seed=0
    )
    assert summary["bad_inputs"] == {} and summary["n_image_files"] == summary["n_images"]
    buf = io.BytesIO((tmp_path / "c" / "phantom_bad_inputs.json").read_bytes())
    assert json.load(buf)["bad_inputs"] == []
