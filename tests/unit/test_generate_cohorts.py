"""Synthetic cohort specs, plans and the cohort shard contract (tiny pipeline, tiny shards)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cxrfoundry.generate import cohorts as C
from cxrfoundry.generate import diffusion
from cxrfoundry.generate import vae as vae_lib
from cxrfoundry.schema import FINDING_COLUMNS, SHARD_SCHEMA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_helpers import tiny_text_encoder, tiny_transformer, write_tiny_shards

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "config/schema/cohort.schema.yaml"


def _spec(**kw):
    return C.validate_spec(kw, SCHEMA, name=kw.pop("name", "c"))


def _source(n=10):
    rows = []
    for i in range(n):
        row = {c: None for c in FINDING_COLUMNS}
        row.update(
            image_id=f"d/{i:02d}",
            dataset="d",
            patient_id=f"p{i // 2}",
            study_id=f"s{i}",
            view="PA",
            sex="F" if i < 3 else "M",
            age=30.0 + 5 * i,
            race="White" if i % 2 else "Black",
            report=f"IMPRESSION: case {i}.",
            cardiomegaly=i % 2,
            pleural_effusion=-1 if i == 4 else 0,
            report_source="template",
            qc_status="pass",
        )
        rows.append(row)
    return pa.Table.from_pylist(rows)


def test_repo_cohort_specs_are_valid():
    for path in sorted((REPO / "config/cohorts").glob("*.yaml")):
        spec = C.load_spec(path, SCHEMA)
        assert spec["name"] == path.stem and spec["kind"] in C.KINDS


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "copy"}, "kind"),
        ({"kind": "matched"}, "corpus"),
        ({"kind": "matched", "corpus": "demo", "multiplicity": 0}, "multiplicity"),
        ({"kind": "matched", "corpus": "demo", "typo": 1}, "typo"),
        ({"kind": "balance", "corpus": "demo", "attributes": ["height"]}, "attributes"),
        ({"kind": "stratified", "strata": {"findings": [["Broken Heart"]]}}, "Broken Heart"),
        ({"kind": "stratified", "strata": {"age": ["teen"]}}, "teen"),
        ({"kind": "stratified", "controlnet": True}, "controlnet"),
    ],
)
def test_bad_specs_fail_with_the_key(spec, message):
    with pytest.raises(ValueError, match=message):
        _spec(**spec)


def test_bad_spec_file_names_the_file(tmp_path):
    path = tmp_path / "oops.yaml"
    path.write_text("kind: matched\nsplit: nowhere\ncorpus: demo\n")
    with pytest.raises(ValueError, match=r"oops\.yaml.*split"):
        C.load_spec(path, SCHEMA)


def test_matched_plan_keeps_labels_and_multiplies():
    spec = _spec(kind="matched", corpus="demo", split="test", multiplicity=3, name="m")
    source = _source()
    plan = C.plan_cohort(spec, source, seed=5, guidance=4.0)
    assert len(plan) == 3 * source.num_rows
    rows = source.to_pylist()
    for n, img in enumerate(plan):
        src = rows[n // 3]
        assert img["source_image_id"] == src["image_id"]
        assert img["patient_id"] == f"syn:{src['patient_id']}"
        assert img["image_id"] == f"synthetic/m/{n:06d}" and img["split"] == "test"
        assert img["report"] == src["report"]
        for key in ("sex", "age", "race", "view", *FINDING_COLUMNS):
            assert img[key] == src[key], key
        assert img["synthetic"] and img["guidance"] == 4.0
    seeds = [img["seed"] for img in plan]
    assert len(set(seeds)) == len(seeds)  # k images of one case differ by seed
    assert C.plan_cohort(spec, source, seed=5, guidance=4.0) == plan  # deterministic


def test_matched_template_prompt_and_max_cases():
    spec = _spec(kind="matched", corpus="demo", prompt="template", max_cases=4, name="t")
    plan = C.plan_cohort(spec, _source(), seed=0, guidance=1.0)
    assert len(plan) == 4
    assert all(p["report"].startswith("PATIENT INFORMATION:") for p in plan)
    assert "enlarged" in plan[1]["report"].lower() or "cardiomegaly" in plan[1]["report"].lower()


def test_balance_plan_reaches_parity():
    spec = _spec(kind="balance", corpus="demo", split="train", attributes=["sex"], name="b")
    source = _source()  # 3 F, 7 M
    real, todo = C.balance_counts(spec, source.to_pylist())
    assert real == {"F": 3, "M": 7} and todo == {"F": 4, "M": 0}
    plan = C.plan_cohort(spec, source, seed=1, guidance=4.0)
    assert Counter(p["sex"] for p in plan) == {"F": 4}
    females = {r["image_id"] for r in source.to_pylist() if r["sex"] == "F"}
    assert {p["source_image_id"] for p in plan} == females  # every F case used before repeats
    # an intersection and an explicit target
    spec2 = _spec(kind="balance", corpus="demo", attributes=["sex", "race"], target=5, name="b2")
    real2, todo2 = C.balance_counts(spec2, source.to_pylist())
    plan2 = C.plan_cohort(spec2, source, seed=1, guidance=4.0)
    assert len(plan2) == sum(todo2.values())
    for group, count in real2.items():
        assert count + todo2[group] == max(5, count)


def test_stratified_counts_and_labels():
    spec = _spec(
        kind="stratified",
        strata={"sex": ["F", "M"], "race": ["Asian"], "findings": [[], ["Cardiomegaly", "Edema"]]},
        count=3,
        counts={"M&66+&Asian&Cardiomegaly+Edema": 5},
        name="s",
    )
    cells = C.stratified_cells(spec)
    assert len(cells) == 2 * 3 * 1 * 2  # sex x age groups x race x findings
    plan = C.plan_cohort(spec, None, seed=2, guidance=4.0)
    assert len(plan) == sum(c[-1] for c in cells) == 11 * 3 + 5
    bins = {name: (lo, hi) for name, lo, hi in spec["age_bins"]}
    n = 0
    for sex, age, race, findings, count in cells:
        for img in plan[n : n + count]:
            assert (img["sex"], img["race"]) == (sex, race)
            lo, hi = bins[age]
            assert lo <= img["age"] <= (hi if hi is not None else lo + 24)
            assert img["cardiomegaly"] == img["edema"] == (1 if findings else 0)
            assert img["no_finding"] == (0 if findings else 1)
            assert img["pneumothorax"] == 0 and img["source_image_id"] is None
            assert img["patient_id"] == f"syn:{img['image_id']}"
            impression = img["report"].split("IMPRESSION:")[1].lower()
            assert ("cardiomegaly" in impression) == bool(findings)
        n += count


def _tiny_pipeline(root: Path) -> Path:
    from cxrfoundry.generate.pipeline import ChexGenPipeline

    torch.manual_seed(0)
    vae = vae_lib.build_vae({"arch": {"block_out_channels": [8, 8], "norm_num_groups": 4}})
    encoder, tokenizer = tiny_text_encoder()
    pipe = ChexGenPipeline(
        transformer=tiny_transformer(),
        vae=vae.eval(),
        scheduler=diffusion.sampling_scheduler(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        max_tokens=12,
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def test_synthesize_cohort_writes_the_contract(tmp_path):
    from cxrfoundry.data.dataset import list_shards
    from cxrfoundry.eval.probe import load_cohort
    from cxrfoundry.generate.controlnet import ChexGenControlNet
    from cxrfoundry.generate.pipeline import ChexGenPipeline
    from cxrfoundry.io import sha256_file

    write_tiny_shards(tmp_path / "shards" / "tiny", n=6, size=32)
    pipe_dir = _tiny_pipeline(tmp_path)
    net = ChexGenControlNet.from_transformer(ChexGenPipeline.from_pretrained(pipe_dir).transformer)
    net.save_pretrained(tmp_path / "cn")
    spec = tmp_path / "cohorts" / "mt.yaml"
    spec.parent.mkdir()
    spec.write_text("kind: matched\ncorpus: tiny\nsplit: test\nmultiplicity: 2\ncontrolnet: true\n")
    settings = {
        "image_size": 32,
        "target_shard_mb": 0.002,
        "row_group_size": 4,
        "workers": 1,
        "equalize": True,
    }
    kwargs = {
        "schema": SCHEMA,
        "pipeline_dir": pipe_dir,
        "shards_root": tmp_path / "shards",
        "controlnet_dir": tmp_path / "cn",
        "sampling": {"num_inference_steps": 2, "guidance_scale": 3.0, "batch_size": 5},
        "shard_settings": settings,
        "seed": 3,
    }
    out = tmp_path / "results" / "cohorts" / "mt"
    index = C.synthesize_cohort(spec, out, **kwargs)
    files = list_shards(out, None, verify=True)  # sha256 in index.json match
    assert len(files) > 1 and all(f.name.startswith("test-") for f in files)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.remove_metadata() == C.COHORT_SCHEMA
    assert C.COHORT_SCHEMA.names[: len(SHARD_SCHEMA)] == SHARD_SCHEMA.names
    assert table.num_rows == 12 == index["counts"]["rows_written"]
    rows = sorted(table.to_pylist(), key=lambda r: r["image_id"])
    real = pq.read_table(tmp_path / "shards/tiny/test-00000.parquet").to_pylist()
    source = {r["image_id"]: r for r in real}
    assert len({r["image_id"] for r in rows}) == 12
    for n, row in enumerate(rows):
        src = source[row["source_image_id"]]
        assert row["image_id"] == f"synthetic/mt/{n:06d}" and row["synthetic"]
        assert row["patient_id"] == "syn:" + src["patient_id"]
        assert (row["sex"], row["age"], row["race"], row["view"]) == (
            src["sex"],
            src["age"],
            src["race"],
            src["view"],
        )
        assert all(row[c] == src[c] for c in FINDING_COLUMNS)
        assert row["mask"] is not None and row["boxes"] == src["boxes"]  # ControlNet cohort
        assert row["guidance"] == 3.0 and (row["height"], row["width"]) == (32, 32)
    assert len({r["seed"] for r in rows}) == 12
    assert json.loads((out / "index.json").read_text())["spec"]["kind"] == "matched"
    assert not (tmp_path / "results/cohorts/.work/mt").exists()  # work folder cleaned
    cohort = load_cohort(out, None, {"image_size": None, "equalize": False}, source="synthetic")
    assert len(cohort) == 12 and set(cohort.source) == {"synthetic"}
    # deterministic: a rerun gives the same bytes
    again = C.synthesize_cohort(spec, tmp_path / "again", **kwargs)
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in index["shards"]]
    assert sha256_file(files[0]) == index["shards"][0]["sha256"]


def test_image_depends_on_its_seed_not_its_batch(tmp_path):
    from cxrfoundry.generate.pipeline import ChexGenPipeline

    pipe = ChexGenPipeline.from_pretrained(_tiny_pipeline(tmp_path))
    plan = [{"report": f"r{i}", "seed": 100 + i, "guidance": 2.0} for i in range(5)]
    whole = C.generate(pipe, plan, num_inference_steps=2, batch_size=5, progress=False)
    split = C.generate(pipe, plan, num_inference_steps=2, batch_size=2, progress=False)
    np.testing.assert_allclose(whole, split, atol=1e-5)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(103))
    alone = pipe(
        "r3", latents=noise, num_inference_steps=2, guidance_scale=2.0, output_type="np"
    ).images
    np.testing.assert_allclose(alone[0], whole[3], atol=1e-5)
