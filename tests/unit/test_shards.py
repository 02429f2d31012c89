"""Tests for cxrfoundry.data.shards (writing) and cxrfoundry.data.dataset (reading)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from torch.utils.data import DataLoader, default_collate

from cxrfoundry.data import imaging
from cxrfoundry.data.dataset import (
    ShardDataset,
    ShardIterableDataset,
    _BufferPool,
    decode_pixels,
    list_shards,
    to_float,
)
from cxrfoundry.data.shards import FAULT_ENV, ShardSource, write_shards
from cxrfoundry.schema import (
    FINDING_COLUMNS,
    REJECTS_SCHEMA,
    REPORTS_SCHEMA,
    SHARD_SCHEMA,
    conform,
)

IMAGE_SIZE = 32
PARAMS = {
    "corpus": "demo",
    "image_size": IMAGE_SIZE,
    "target_shard_mb": 0.008,
    "row_group_size": 2,
    "seed": 7,
}


def _row(dataset: str, i: int, image_path: str, split: str, mask_path: str | None = None) -> dict:
    rng = np.random.default_rng(i)
    row = {
        "image_id": f"{dataset}/{i:04d}",
        "dataset": dataset,
        "patient_id": f"{dataset}-p{i // 2}",
        "study_id": f"{dataset}-s{i}",
        "image_path": image_path,
        "view": "PA",
        "view_source": "metadata",
        "sex": ["M", "F", None][i % 3],
        "age": None if i % 5 == 0 else float(20 + i),
        "race": None,
        "labels_extra": "{}",
        "report": f"Report {i}.",
        "split": split,
        "mask_path": mask_path,
        "report_source": "template",
        "qc_status": "pass",
        "qc_flags": "[]",
    }
    for col in FINDING_COLUMNS:
        row[col] = [1, 0, -1, None][int(rng.integers(4))]
    return row


def build_sources(root: Path, n_a: int = 26, n_b: int = 10) -> list[ShardSource]:
    """Two datasets: 8-/16-bit PNGs with masks (A) and DICOMs incl. RLE (B), plus bad rows."""
    rng = np.random.default_rng(0)
    splits = ["train", "train", "val", "test"]
    rows_a, rows_b = [], []
    root_a, root_b = root / "a", root / "b"
    (root_a / "img").mkdir(parents=True)
    (root_a / "mask").mkdir()
    root_b.mkdir()
    for i in range(n_a):
        h, w = 40 + i % 9, 36 + (i * 3) % 11
        if i % 4 == 3:
            pixels = rng.integers(0, 65535, (h, w), dtype=np.uint16)
            (root_a / "img" / f"{i}.png").write_bytes(imaging.encode_png(pixels))
        else:
            Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(
                root_a / "img" / f"{i}.png"
            )
        mask_path = None
        if i % 3 == 0:
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[5:20, 5:15] = 1
            mask[15:30, 10:25] |= 2
            Image.fromarray(mask).save(root_a / "mask" / f"{i}.png")
            mask_path = f"mask/{i}.png"
        rows_a.append(_row("a", i, f"img/{i}.png", splits[i % 4], mask_path))
    (root_a / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows_a.append(_row("a", 900, "img/corrupt.png", "train"))
    rows_a.append(_row("a", 901, "img/missing.png", "val"))
    rows_a.append(_row("a", 902, "img/0.png", "holdout"))  # unknown split
    rows_a.append(_row("a", 903, "img/0.png", "train", "mask/missing.png"))  # mask missing
    dup = _row("a", 0, "img/1.png", "train")  # duplicate image_id a/0000
    rows_a.append(dup)
    for i in range(n_b):
        arr = rng.integers(0, 4095, (48, 40), dtype=np.uint16)
        make_dicom(
            root_b / f"{i}.dcm",
            arr,
            photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
            compress=i % 3 == 0,
        )
        rows_b.append(_row("b", i, f"{i}.dcm", splits[i % 4]))
    return [
        ShardSource("a", conform(rows_a, REPORTS_SCHEMA), root_a),
        ShardSource("b", conform(rows_b, REPORTS_SCHEMA), root_b),
    ]


def make_dicom(path: Path, arr: np.ndarray, photometric: str, compress: bool) -> None:
    """A minimal 12-bit DICOM file (optionally RLE-compressed)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(arr, photometric, 12)
    if compress:
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)


N_BAD = 5  # corrupt, missing, unknown split, missing mask, duplicate id


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[ShardSource]:
    return build_sources(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def written(
    sources: list[ShardSource], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("ref")
    index = write_shards(sources, base / "out", workers=2, work_dir=base / "work", **PARAMS)
    return base / "out", index


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_index_counts_and_files(written: tuple[Path, dict], sources: list[ShardSource]) -> None:
    out, index = written
    rows_in = sum(s.table.num_rows for s in sources)
    counts = index["counts"]
    assert counts["rows_in"] == rows_in
    assert counts["rows_rejected"] == N_BAD
    assert counts["rows_written"] == rows_in - N_BAD
    assert index["datasets"] == ["a", "b"]
    assert index == json.loads((out / "index.json").read_text())
    names = sorted(p.name for p in out.glob("*-*.parquet"))
    assert names == sorted(e["file"] for e in index["shards"])
    for entry in index["shards"]:  # the index describes the published bytes exactly
        data = (out / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files
    assert len(names) > 3  # several shards per split with this tiny target size
    for split, total in index["splits"].items():
        entries = [e for e in index["shards"] if e["split"] == split]
        assert total["rows"] == sum(e["rows"] for e in entries)
        assert [e["file"] for e in entries] == [
            f"{split}-{i:05d}.parquet" for i in range(len(entries))
        ]


def test_shard_schema_rows_and_pixels(written: tuple[Path, dict]) -> None:
    out, index = written
    rows_per_shard = index["params"]["rows_per_shard"]
    seen = []
    for entry in index["shards"]:
        handle = pq.ParquetFile(out / entry["file"])
        assert handle.schema_arrow.equals(SHARD_SCHEMA)
        assert handle.metadata.num_rows == entry["rows"] <= rows_per_shard
        groups = [
            handle.metadata.row_group(g).num_rows for g in range(handle.metadata.num_row_groups)
        ]
        # Full row groups, rejects or not; only a shard's last group may be short.
        assert all(n == PARAMS["row_group_size"] for n in groups[:-1])
        assert 0 < groups[-1] <= PARAMS["row_group_size"]
        table = handle.read()
        assert set(table.column("split").to_pylist()) == {entry["split"]}
        for row in table.select(["image_id", "image", "height", "width", "mask"]).to_pylist():
            img = imaging.decode_image(row["image"])
            assert img.shape == (row["height"], row["width"]) == (IMAGE_SIZE, IMAGE_SIZE)
            assert img.dtype == np.uint8  # bit_depth=8 (default) even for 16-bit sources
            if row["mask"] is not None:
                mask = imaging.decode_image(row["mask"])
                assert mask.shape == img.shape and set(np.unique(mask)) <= {0, 1, 2, 3}
            seen.append(row["image_id"])
    assert len(seen) == len(set(seen)) == index["counts"]["rows_written"]
    files = [out / e["file"] for e in index["shards"]]
    masked = pq.read_table(files, columns=["mask"]).column("mask").drop_null()
    assert len(masked) == 9  # rows 0, 3, ..., 24 of dataset a


def test_rejects_have_reasons(written: tuple[Path, dict]) -> None:
    out, _ = written
    rejects = pq.read_table(out / "rejects.parquet")
    assert rejects.schema.equals(REJECTS_SCHEMA)
    reasons = dict(
        zip(
            rejects.column("image_id").to_pylist(),
            rejects.column("reason").to_pylist(),
            strict=True,
        )
    )
    assert len(rejects) == N_BAD
    assert "decode failed: image img/corrupt.png" in reasons["a/0900"]
    assert "img/missing.png: file not found" in reasons["a/0901"]
    assert "unknown split 'holdout'" in reasons["a/0902"]
    assert "mask mask/missing.png" in reasons["a/0903"]
    assert set(rejects.column("stage").to_pylist()) == {"shard"}
    dup = [r for r in rejects.to_pylist() if r["reason"].startswith("duplicate image_id")]
    assert len(dup) == 1 and dup[0]["image_id"] == "a/0000" and dup[0]["source_row"] == 30


def test_deterministic_across_workers_and_16bit(
    sources: list[ShardSource], written: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = written
    write_shards(sources, tmp_path / "out1", workers=1, work_dir=tmp_path / "w1", **PARAMS)
    assert _files(tmp_path / "out1") == _files(out)

    deep = write_shards(
        sources, tmp_path / "out16", workers=1, work_dir=tmp_path / "w16", bit_depth=16, **PARAMS
    )
    files = [tmp_path / "out16" / e["file"] for e in deep["shards"]]
    table = pq.read_table(files, columns=["image_id", "image"])
    dtypes = {
        i: imaging.decode_image(b).dtype
        for i, b in zip(
            table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True
        )
    }
    assert dtypes["a/0003"] == np.uint16 and dtypes["a/0001"] == np.uint8
    assert dtypes["b/0001"] == np.uint16  # 12-bit DICOM keeps its depth
    # Different settings are a different plan/fingerprint: nothing from the 8-bit run is reused.
    assert deep["params"]["bit_depth"] == 16


_CHILD = """
import pyarrow.parquet as pq
from pathlib import Path
from cxrfoundry.data.shards import ShardSource, write_shards
srcs = [ShardSource(n, pq.read_table(t), Path(r)) for n, t, r in {srcs!r}]
write_shards(srcs, Path({out!r}), workers=2, work_dir=Path({work!r}), **{params!r})
"""


def test_killed_run_resumes_byte_identical(
    sources: list[ShardSource], written: tuple[Path, dict], tmp_path: Path
) -> None:
    ref_out, ref_index = written
    specs = []
    for s in sources:
        pq.write_table(s.table, tmp_path / f"{s.dataset}.parquet")
        specs.append((s.dataset, str(tmp_path / f"{s.dataset}.parquet"), str(s.raw_root)))
    out, work = tmp_path / "out", tmp_path / "work"
    code = _CHILD.format(srcs=specs, out=str(out), work=str(work), params=PARAMS)
    # SIGKILL right after the first row group of the second shard: one shard finished, the
    # next one half-written.
    first_groups = -(-ref_index["shards"][0]["rows"] // PARAMS["row_group_size"])
    env = {**os.environ, FAULT_ENV: str(first_groups + 1)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not out.exists()  # nothing published that Snakemake could take for finished
    done = sorted(p.name for p in work.glob("*.done.json"))
    assert done == ["train-00000.done.json"]
    assert list(work.glob(".*.tmp"))  # the half-written shard's temporary file
    inode = (work / "train-00000.parquet").stat().st_ino

    write_shards(sources, out, workers=2, work_dir=work, **PARAMS)
    assert _files(out) == _files(ref_out)
    assert (work / "train-00000.parquet").stat().st_ino == inode  # reused, not rebuilt
    assert not list(work.glob(".*.tmp"))


def test_corrupt_work_shard_is_rebuilt(
    sources: list[ShardSource], written: tuple[Path, dict], tmp_path: Path
) -> None:
    ref_out, _ = written
    out, work = tmp_path / "out", tmp_path / "work"
    write_shards(sources, out, workers=1, work_dir=work, **PARAMS)
    shard = work / "val-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.unlink()  # published copy is a hard link: replace, do not edit in place
    shard.write_bytes(bytes(data))
    write_shards(sources, out, workers=1, work_dir=work, **PARAMS)
    assert _files(out) == _files(ref_out)


def test_folder_left_by_a_kill_while_publishing_is_removed(
    sources: list[ShardSource], written: tuple[Path, dict], tmp_path: Path
) -> None:
    # a kill between atomic_dir's mkdtemp and its rename leaves '.out.XXXXXXXX.tmp' (hard
    # links to work shards: disk kept forever); the rerun removes it, and only it
    ref_out, _ = written
    out = tmp_path / "out"
    stale = tmp_path / ".out.k7_2ab9q.tmp"
    stale.mkdir()
    (stale / "train-00000.parquet").write_bytes(b"half")
    other = tmp_path / ".out.v2.k7_2ab9q.tmp"  # another output's write in progress
    other.mkdir()
    write_shards(sources, out, workers=1, work_dir=tmp_path / "work", **PARAMS)
    assert _files(out) == _files(ref_out)
    assert not stale.exists() and other.is_dir()


def test_bad_settings_raise(sources: list[ShardSource], tmp_path: Path) -> None:
    params = {**PARAMS, "workers": 1}
    with pytest.raises(ValueError, match="resize_policy"):
        write_shards(sources, tmp_path / "o", resize_policy="zoom", **params)
    with pytest.raises(ValueError, match="jpeg"):
        write_shards(sources, tmp_path / "o", image_format="jpeg", bit_depth=16, **params)
    broken = ShardSource("x", pa.table({"image_id": ["x/1"]}), tmp_path)
    with pytest.raises(ValueError, match="source 'x'"):
        write_shards([broken], tmp_path / "o", **params)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        write_shards(sources, tmp_path / "o", **{**params, "workers": -1})


# --- reading without project code --------------------------------------------------------------


def test_read_with_polars_pyarrow_and_hf_datasets(
    written: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polars as pl

    out, index = written
    files = [str(out / e["file"]) for e in index["shards"]]
    total = index["counts"]["rows_written"]

    frame = pl.read_parquet(files)
    assert frame.height == total
    table = pq.read_table(files)
    assert table.num_rows == total

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    import datasets

    train_files = [str(out / e["file"]) for e in index["shards"] if e["split"] == "train"]
    ds = datasets.load_dataset(
        "parquet", data_files={"train": train_files}, cache_dir=str(tmp_path / "hf")
    )["train"]
    assert len(ds) == index["splits"]["train"]["rows"]

    # Image bytes decode (with plain Pillow) to the stored height/width in every reader.
    import io

    for image, height, width in zip(
        frame["image"].to_list(), frame["height"].to_list(), frame["width"].to_list(), strict=True
    ):
        assert Image.open(io.BytesIO(image)).size == (width, height)
    for row in ds:
        assert Image.open(io.BytesIO(row["image"])).size == (row["width"], row["height"])


# --- torch datasets ----------------------------------------------------------------------------


def test_list_shards(written: tuple[Path, dict]) -> None:
    out, index = written
    val = list_shards(out, "val", verify=True)
    assert [p.name for p in val] == [e["file"] for e in index["shards"] if e["split"] == "val"]
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        list_shards(out / "nope")


def test_map_dataset(written: tuple[Path, dict]) -> None:
    out, index = written
    ds = ShardDataset(out, include_mask=True, cache_row_groups=2)
    assert len(ds) == index["counts"]["rows_written"]
    rows = {ds[i]["image_id"]: ds[i] for i in range(len(ds))}
    assert len(rows) == len(ds)
    sample = ds[-1]
    assert sample["image"].shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert sample["image"].dtype == torch.float32
    assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0
    assert sample["labels"].shape == (14,) and sample["label_mask"].all()
    assert rows["a/0003"]["has_mask"] and not rows["a/0001"]["has_mask"]
    assert rows["a/0003"]["mask"].shape == (1, IMAGE_SIZE, IMAGE_SIZE)

    # Label policies: U-Ones vs ignore, against the raw values.
    raw = ShardDataset(out, uncertain="positive", unmentioned="ignore")
    for i in range(len(raw)):
        row, sample = raw.row(i), raw[i]
        for k, col in enumerate(FINDING_COLUMNS):
            value = row[col]
            expected = {None: 0.0, -1: 1.0, 0: 0.0, 1: 1.0}[value]
            assert float(sample["labels"][k]) == expected
            assert bool(sample["label_mask"][k]) == (value is not None)
    with pytest.raises(ValueError, match="uncertain"):
        ShardDataset(out, uncertain="maybe")
    raw_pixels = ShardDataset(out, normalize=False)[0]["image"]
    assert raw_pixels.dtype == torch.uint8
    assert torch.allclose(raw_pixels.float() / 255, ShardDataset(out)[0]["image"])

    # Works inside a DataLoader with worker processes (lazy handles are not pickled).
    loader = DataLoader(ShardDataset(out, "train"), batch_size=4, num_workers=2)
    ids = [i for batch in loader for i in batch["image_id"]]
    assert len(ids) == index["splits"]["train"]["rows"] == len(set(ids))


@pytest.mark.parametrize("split_by", ["shard", "row_group"])
def test_iterable_every_row_once_across_ranks_and_workers(
    written: tuple[Path, dict], split_by: str
) -> None:
    out, index = written
    seen: Counter[str] = Counter()
    orders = {}
    for epoch in (0, 1):
        epoch_ids = []
        for rank in (0, 1):
            ds = ShardIterableDataset(
                out, seed=3, buffer_size=5, split_by=split_by, rank=rank, world_size=2
            )
            ds.set_epoch(epoch)
            expected = len(ds)
            loader = DataLoader(ds, batch_size=3, num_workers=2)
            ids = [i for batch in loader for i in batch["image_id"]]
            assert len(ids) == expected
            epoch_ids += ids
        seen.update(epoch_ids)
        orders[epoch] = epoch_ids
    assert len(seen) == index["counts"]["rows_written"]
    assert set(seen.values()) == {2}  # exactly once per epoch
    assert orders[0] != orders[1]  # reshuffled by set_epoch


def test_iterable_unshuffled_matches_file_order(written: tuple[Path, dict]) -> None:
    out, _ = written
    ds = ShardIterableDataset(out, "test", shuffle=False)
    ids = [s["image_id"] for s in ds]
    expected = pq.read_table(list_shards(out, "test"), columns=["image_id"]).column(0).to_pylist()
    assert ids == expected


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _assert_batches_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key].nan_to_num(-1), value.nan_to_num(-1)), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize(
    ("normalize", "include_mask", "policy"),
    [(True, False, "negative"), (False, True, "ignore"), (False, False, "positive")],
)
def test_iterable_batches_equal_collated_samples(
    written: tuple[Path, dict], normalize: bool, include_mask: bool, policy: str
) -> None:
    out, _ = written
    common = {
        "seed": 5,
        "buffer_size": 7,
        "split_by": "row_group",
        "normalize": normalize,
        "include_mask": include_mask,
        "uncertain": policy,
        "unmentioned": "ignore" if policy == "ignore" else "negative",
    }
    samples = list(ShardIterableDataset(out, **common))
    batches = list(ShardIterableDataset(out, batch_size=4, **common))
    assert [len(b["image_id"]) for b in batches] == [len(c) for c in _chunks(samples, 4)]
    for got, chunk in zip(batches, _chunks(samples, 4), strict=True):
        _assert_batches_equal(got, default_collate(chunk))
    # The dtype-aware scaling after transfer gives exactly the in-worker float images.
    if not normalize:
        floats = list(ShardIterableDataset(out, batch_size=4, **{**common, "normalize": True}))
        for raw, ref in zip(batches, floats, strict=True):
            assert raw["image"].dtype == torch.uint8
            assert torch.equal(to_float(raw)["image"], ref["image"])
    dropped = list(ShardIterableDataset(out, batch_size=4, drop_last=True, **common))
    assert [len(b["image_id"]) for b in dropped] == [4] * (len(samples) // 4)


def test_iterable_batches_every_row_once_across_ranks_and_workers(
    written: tuple[Path, dict],
) -> None:
    out, index = written
    seen: Counter[str] = Counter()
    for rank in (0, 1):
        ds = ShardIterableDataset(
            out,
            seed=3,
            buffer_size=5,
            split_by="row_group",
            rank=rank,
            world_size=2,
            batch_size=3,
            normalize=False,
        )
        batches = list(ds.loader(num_workers=2, pin_memory=False))
        assert len(batches) == ds.num_batches(num_workers=2)
        assert all(b["image"].shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE) for b in batches)
        assert all(b["image"].dtype == torch.uint8 for b in batches)
        ids = [i for b in batches for i in b["image_id"]]
        assert len(ids) == len(ds)
        seen.update(ids)
        # Same seed, same worker count: the same batches again, bit for bit.
        again = list(ds.loader(num_workers=2))
        assert [b["image_id"] for b in again] == [b["image_id"] for b in batches]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, batches, strict=True))
    assert len(seen) == index["counts"]["rows_written"]
    assert set(seen.values()) == {1}


def test_iterable_batches_mixed_bit_depth(sources: list[ShardSource], tmp_path: Path) -> None:
    params = {**PARAMS, "target_shard_mb": 1.0}
    index = write_shards(sources, tmp_path / "out", workers=1, bit_depth=16, **params)
    assert index["counts"]["rows_written"] > 0
    out = tmp_path / "out"
    common = {"shuffle": False, "normalize": False}
    samples = list(ShardIterableDataset(out, **common))
    dtypes = {s["image"].dtype for s in samples}
    assert dtypes == {torch.uint8, torch.uint16}  # 8-bit PNGs stay 8-bit, DICOMs are 16-bit
    batches = list(ShardIterableDataset(out, batch_size=len(samples), **common))
    assert len(batches) == 1 and batches[0]["image"].dtype == torch.uint16
    floats = to_float(batches[0])["image"]
    for k, sample in enumerate(samples):
        top = 255.0 if sample["image"].dtype == torch.uint8 else 65535.0
        expected = sample["image"].to(torch.float32) / top
        assert torch.allclose(floats[k], expected, atol=1e-7, rtol=0)
    reference = ShardIterableDataset(out, batch_size=len(samples), shuffle=False)
    assert torch.allclose(next(iter(reference))["image"], floats, atol=1e-7, rtol=0)
    # Threads write in place from the PNG header's bit depth: the same uint16 batch, and the
    # same uint8 batches where a batch happens to hold only 8-bit images.
    for size in (len(samples), 3):
        serial = list(ShardIterableDataset(out, batch_size=size, **common))
        threaded = list(ShardIterableDataset(out, batch_size=size, decode_threads=2, **common))
        for got, want in zip(threaded, serial, strict=True):
            _assert_batches_equal(got, want)
        assert {b["image"].dtype for b in serial} >= {torch.uint16}


class _SeededNoise:
    """A random transform: which image gets which noise depends on call order."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.float() + torch.rand(image.shape)


@pytest.mark.parametrize(
    ("normalize", "include_mask", "policy", "threads"),
    [(True, False, "negative", 2), (False, True, "ignore", 3), (False, False, "positive", 1)],
)
def test_threaded_batches_equal_collated_samples(
    written: tuple[Path, dict], normalize: bool, include_mask: bool, policy: str, threads: int
) -> None:
    out, _ = written
    common = {
        "seed": 5,
        "buffer_size": 7,
        "split_by": "row_group",
        "normalize": normalize,
        "include_mask": include_mask,
        "uncertain": policy,
        "unmentioned": "ignore" if policy == "ignore" else "negative",
    }
    samples = list(ShardIterableDataset(out, **common))
    ds = ShardIterableDataset(out, batch_size=4, decode_threads=threads, **common)
    for _ in range(2):  # a second pass reuses the pool
        batches = list(ds)
        assert [len(b["image_id"]) for b in batches] == [len(c) for c in _chunks(samples, 4)]
        for got, chunk in zip(batches, _chunks(samples, 4), strict=True):
            _assert_batches_equal(got, default_collate(chunk))
    # Stopping early leaves nothing behind that changes the next pass.
    first = next(iter(ds))
    _assert_batches_equal(first, default_collate(_chunks(samples, 4)[0]))
    assert [b["image_id"] for b in ds] == [b["image_id"] for b in batches]


@pytest.mark.parametrize("threads", [0, 2])
def test_batch_memory_is_reused_only_once_released(
    written: tuple[Path, dict], threads: int
) -> None:
    out, _ = written
    common = {"seed": 3, "buffer_size": 6, "batch_size": 3, "shuffle": True}
    samples = list(ShardIterableDataset(out, **{**common, "batch_size": None}))
    expected = [default_collate(chunk)["image"] for chunk in _chunks(samples, 3)]
    assert len(expected) >= 6
    ds = ShardIterableDataset(out, decode_threads=threads, **common)
    kept: dict[int, torch.Tensor] = {}
    views: dict[int, torch.Tensor] = {}
    arrays: dict[int, np.ndarray] = {}
    pointers = []
    for k, batch in enumerate(ds):
        image = batch["image"]
        pointers.append(image.data_ptr())
        # Whatever still refers to a batch's memory keeps it from being reused.
        if k % 4 == 0:
            kept[k] = image
        elif k % 4 == 1:
            views[k] = image[:, :, 1:, :2]
        elif k % 4 == 2:
            arrays[k] = image.numpy()
        del batch, image
    for k, image in kept.items():
        assert torch.equal(image, expected[k]), k
    for k, view in views.items():
        assert torch.equal(view, expected[k][:, :, 1:, :2]), k
    for k, array in arrays.items():
        assert np.array_equal(array, expected[k].numpy()), k
    # ... and released batches are reused (fewer distinct buffers than batches).
    assert len(set(pointers)) < len(pointers)


def test_buffer_pool_bounds_what_it_keeps() -> None:
    pool = _BufferPool(2)
    held = [pool.tensor((2, 3), torch.float32) for _ in range(3)]
    assert len({t.data_ptr() for t in held}) == 3  # all busy: fresh memory each time
    assert len(pool.arrays) == 2
    ptr = held[0].data_ptr()
    del held[0]
    again = pool.tensor((2, 3), torch.float32)
    assert again.data_ptr() == ptr
    other = pool.tensor((4, 3), torch.uint8)  # another shape while all are busy
    assert other.dtype == torch.uint8 and tuple(other.shape) == (4, 3)
    assert len(pool.arrays) == 2
    del held, again, other
    wide = pool.tensor((1, 5), torch.uint16)  # a free buffer makes room for a new shape
    assert wide.dtype == torch.uint16 and len(pool.arrays) == 2


def test_threaded_batches_keep_transform_order(written: tuple[Path, dict]) -> None:
    out, _ = written
    common = {"seed": 2, "buffer_size": 5, "transform": _SeededNoise(), "batch_size": 5}
    torch.manual_seed(0)
    serial = list(ShardIterableDataset(out, **common))
    torch.manual_seed(0)
    threaded = list(ShardIterableDataset(out, decode_threads=3, **common))
    for got, want in zip(threaded, serial, strict=True):
        _assert_batches_equal(got, want)
    torch.manual_seed(0)
    samples = list(ShardIterableDataset(out, **{**common, "batch_size": None}))
    assert torch.equal(
        torch.cat([b["image"] for b in threaded]), torch.stack([s["image"] for s in samples])
    )


def test_threaded_every_row_once_across_ranks(written: tuple[Path, dict]) -> None:
    out, index = written
    common = {"seed": 3, "buffer_size": 5, "split_by": "row_group", "world_size": 2}
    seen: Counter[str] = Counter()
    for rank in (0, 1):
        serial = ShardIterableDataset(out, rank=rank, batch_size=3, **common)
        want = list(serial)
        ds = ShardIterableDataset(out, rank=rank, batch_size=3, **common)
        loader = ds.loader()  # default: this process, one decode thread per core
        assert loader.num_workers == 0 and ds.decode_threads >= 1
        ds._set_decode_threads(2)  # the same on a 1-core machine
        got = list(loader)
        assert len(got) == ds.num_batches()
        for a, b in zip(got, want, strict=True):
            _assert_batches_equal(a, b)
        ids = [i for b in got for i in b["image_id"]]
        assert len(ids) == len(ds) == len(set(ids))
        seen.update(ids)
        # Worker processes with threads each: every row of the rank once, as without threads.
        workers = list(ds.loader(num_workers=2, decode_threads=2))
        plain = list(serial.loader(num_workers=2, decode_threads=0))
        assert [b["image_id"] for b in workers] == [b["image_id"] for b in plain]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(workers, plain, strict=True))
    assert len(seen) == index["counts"]["rows_written"]
    assert set(seen.values()) == {1}


def test_threaded_errors(written: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = written
    table = pq.read_table(list_shards(out)[0])
    images = table.column("image").to_pylist()
    images[3] = images[3][:60]  # truncated PNG
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        table.set_column(
            table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())
        ),
        bad,
    )
    bad_id = table.column("image_id")[3].as_py()
    ds = ShardIterableDataset([bad], shuffle=False, batch_size=2, decode_threads=2)
    with pytest.raises(imaging.ImageDecodeError, match=bad_id):
        list(ds)
    with pytest.raises(ValueError, match="decode_threads"):
        ShardIterableDataset(out, decode_threads=2)  # per-sample: nothing to thread
    with pytest.raises(ValueError, match="decode_threads"):
        ShardIterableDataset(out, batch_size=2, decode_threads=-1)
    per_sample = ShardIterableDataset(out)
    assert per_sample.loader().num_workers >= 1 and per_sample.decode_threads == 0


def _shard_with_images(out: Path, tmp_path: Path, edit: dict[int, bytes]) -> tuple[Path, list]:
    """A copy of the first shard with rows ``edit`` given other image bytes, and its ids."""
    table = pq.read_table(list_shards(out)[0])
    images = table.column("image").to_pylist()
    for row, data in edit.items():
        images[row] = data
    path = tmp_path / "edited.parquet"
    column = table.schema.get_field_index("image")
    pq.write_table(table.set_column(column, "image", pa.array(images, pa.binary())), path)
    return path, table.column("image_id").to_pylist()


@pytest.mark.parametrize("threads", [0, 2])
def test_integer_batches_report_bad_images(
    written: tuple[Path, dict], tmp_path: Path, threads: int
) -> None:
    # Integer batches decode PNGs straight into the batch; what does not fit takes the general
    # path, which names the image: a truncated PNG, and one whose size differs from its row's.
    out, _ = written
    table = pq.read_table(list_shards(out)[0], columns=["image"])
    good = table.column(0)[0].as_py()
    other_size = imaging.encode_image(np.zeros((9, 7), dtype=np.uint8), "png")
    for data, problem in ((good[:60], "cannot decode"), (other_size, r"decoded \(9, 7\)")):
        path, ids = _shard_with_images(out, tmp_path, {3: data})
        ds = ShardIterableDataset(
            [path], shuffle=False, batch_size=2, decode_threads=threads, normalize=False
        )
        with pytest.raises(imaging.ImageDecodeError, match=f"{ids[3]}.*{problem}"):
            list(ds)


def test_batch_memory_is_reused_across_epochs(written: tuple[Path, dict]) -> None:
    # Fresh memory each epoch costs page faults again: the second epoch reuses the first's
    # buffers, except one the consumer still holds, which keeps its contents.
    out, _ = written
    ds = ShardIterableDataset(out, seed=1, buffer_size=4, batch_size=3, decode_threads=2)
    first = [b["image"].data_ptr() for b in ds]
    ds.set_epoch(1)
    held = next(iter(ds))["image"]
    kept = held.clone()
    ds.set_epoch(2)
    second = [b["image"].data_ptr() for b in ds]
    assert set(second) & set(first)
    assert held.data_ptr() not in second and torch.equal(held, kept)


@pytest.mark.parametrize("split_by", ["shard", "row_group"])
def test_read_ahead_keeps_rows_and_order(written: tuple[Path, dict], split_by: str) -> None:
    # Threaded reading fetches the next row groups on the decode pool: the same rows in the
    # same order as reading them in this thread, whole shards (several row groups each) or
    # single row groups; a consumer that stops early leaves the pool usable.
    out, index = written
    common = {"seed": 3, "buffer_size": 5, "split_by": split_by, "normalize": False}
    serial = list(ShardIterableDataset(out, batch_size=3, **common))
    ds = ShardIterableDataset(out, batch_size=3, decode_threads=2, **common)
    first = next(iter(ds))
    _assert_batches_equal(first, serial[0])
    for _ in range(2):
        threaded = list(ds)
        assert len(threaded) == len(serial)
        for got, want in zip(threaded, serial, strict=True):
            _assert_batches_equal(got, want)
    assert sum(len(b["image_id"]) for b in serial) == index["counts"]["rows_written"]


def test_shuffle_buffer_bounds_the_row_groups_it_keeps_alive(
    written: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Buffered rows view their row group's Arrow memory; the buffer copies out the rows of its
    # oldest groups so that the groups it keeps alive stay within budget (buffer + one group).
    from cxrfoundry.data import dataset as ds_module

    checks = {"releases": 0, "copied": 0, "viewed": 0}

    class Checked(ds_module._PinnedGroups):
        def release(self, buffer: list) -> None:
            super().release(buffer)
            checks["releases"] += 1
            assert len(self.groups) <= 1 or self.rows <= self.budget
            assert self.rows == sum(g.num_rows for g in self.groups)
            alive = {id(g) for g in self.groups}
            for meta, _, image, _ in buffer:
                if isinstance(image, memoryview):
                    checks["viewed"] += 1
                    assert id(meta) in alive  # a view only into a group still accounted for
                else:
                    checks["copied"] += 1

    monkeypatch.setattr(ds_module, "_PinnedGroups", Checked)
    out, index = written
    common = {"seed": 2, "buffer_size": 5, "split_by": "shard", "normalize": False}
    rows = list(ShardIterableDataset(out, **common))
    assert len(rows) == index["counts"]["rows_written"]
    assert checks["releases"] and checks["copied"] and checks["viewed"]


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_binary_views_are_the_column_values(kind: pa.DataType) -> None:
    # Zero-copy views of a binary column: nulls, empty values, a sliced chunk (non-zero
    # offset) and several chunks give exactly the values to_pylist copies out.
    from cxrfoundry.data.dataset import _binary_views

    values = [b"ab", None, b"", b"xyz", b"\x00\x01", None, b"last"]
    chunk = pa.array(values, type=kind)
    column = pa.chunked_array([chunk.slice(2, 4), chunk.slice(0, 2), chunk[6:]], type=kind)
    views = _binary_views(column)
    assert [None if v is None else bytes(v) for v in views] == column.to_pylist()
    assert all(v is None or isinstance(v, memoryview) for v in views)
    assert _binary_views(pa.chunked_array([pa.array([None, None], type=kind)])) == [None, None]


def test_decode_pixels_errors_and_matches_imaging(written: tuple[Path, dict]) -> None:
    out, _ = written
    data = pq.read_table(list_shards(out)[0], columns=["image"]).column(0)[0].as_py()
    assert np.array_equal(decode_pixels(data), imaging.decode_image(data))
    with pytest.raises(imaging.ImageDecodeError, match="row-7"):
        decode_pixels(b"\x89PNG\r\n\x1a\n broken", name="row-7")
    with pytest.raises(ValueError, match="batch_size"):
        ShardIterableDataset(out, batch_size=0)


def test_shard_corpus_entry_point(
    sources: list[ShardSource], written: tuple[Path, dict], tmp_path: Path
) -> None:
    from cxrfoundry.data.shards import shard_corpus

    ref_out, _ = written
    paths = []
    for s in sources:
        pq.write_table(s.table, tmp_path / f"{s.dataset}.parquet")
        paths.append(tmp_path / f"{s.dataset}.parquet")
    settings = {k: v for k, v in PARAMS.items() if k not in ("corpus", "seed")}
    index = shard_corpus(
        corpus="demo",
        datasets=[s.dataset for s in sources],
        report_paths=paths,
        raw_roots=[s.raw_root for s in sources],
        out_dir=tmp_path / "out",
        settings={**settings, "workers": 2},
        seed=PARAMS["seed"],
        work_dir=tmp_path / "work",
    )
    assert _files(tmp_path / "out") == _files(ref_out)
    assert index["counts"]["rows_rejected"] == N_BAD
    with pytest.raises(ValueError, match="unknown keys"):
        shard_corpus(
            corpus="demo",
            datasets=["a"],
            report_paths=paths[:1],
            raw_roots=[sources[0].raw_root],
            out_dir=tmp_path / "o2",
            settings={"image_size": 32, "colour": "blue"},
            seed=0,
        )


# --- hardening: rows that must become rejects, stale work, crashing decoders --------------------


def _png_rows(root: Path, n: int = 6, shape: tuple[int, int] = (20, 30)) -> list[dict]:
    """``n`` small 8-bit PNGs ``{i}.png`` under ``root`` and their report rows (all train)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(np.full(shape, 9 * i, dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(_row("t", i, f"{i}.png", "train"))
    return rows


def _reasons(out: Path) -> dict[str | None, str]:
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    return {r["image_id"]: r["reason"] for r in rejects}


def test_rows_missing_required_values_are_rejected(tmp_path: Path) -> None:
    # One bad row must not abort the corpus (TypeError on a null path, ArrowInvalid on write).
    rows = _png_rows(tmp_path / "raw")
    rows[1]["image_path"] = None
    rows[2]["patient_id"] = None
    rows[3]["image_id"] = None
    source = ShardSource("t", conform(rows, REPORTS_SCHEMA), tmp_path / "raw")
    index = write_shards([source], tmp_path / "out", workers=1, work_dir=tmp_path / "w", **PARAMS)
    assert index["counts"] == {"rows_in": 6, "rows_written": 3, "rows_rejected": 3}
    reasons = _reasons(tmp_path / "out")
    assert reasons["t/0001"] == "missing value in required column 'image_path'"
    assert reasons["t/0002"] == "missing value in required column 'patient_id'"
    assert reasons[None] == "missing value in required column 'image_id'"


def test_mask_that_cannot_align_with_its_image_is_rejected(tmp_path: Path) -> None:
    rows = _png_rows(tmp_path / "raw", n=3, shape=(20, 30))
    (tmp_path / "raw" / "m").mkdir()
    Image.fromarray(np.ones((30, 20), dtype=np.uint8)).save(tmp_path / "raw" / "m" / "t.png")
    Image.fromarray(np.ones((10, 15), dtype=np.uint8)).save(tmp_path / "raw" / "m" / "h.png")
    rows[0]["mask_path"] = "m/t.png"  # transposed: resizing both would misalign every label
    rows[1]["mask_path"] = "m/h.png"  # half resolution, same aspect: aligns after resizing
    source = ShardSource("t", conform(rows, REPORTS_SCHEMA), tmp_path / "raw")
    index = write_shards([source], tmp_path / "out", workers=1, work_dir=tmp_path / "w", **PARAMS)
    assert index["counts"] == {"rows_in": 3, "rows_written": 2, "rows_rejected": 1}
    reason = _reasons(tmp_path / "out")["t/0000"]
    assert "mask m/t.png" in reason and "30x20" in reason and "20x30" in reason


def test_code_change_rebuilds_work_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Snakemake reruns the rule when the decoding code changes; the rerun must not hand back the
    # shards the old code wrote into work_dir.
    from cxrfoundry import provenance

    rows = _png_rows(tmp_path / "raw")
    sources = [ShardSource("t", conform(rows, REPORTS_SCHEMA), tmp_path / "raw")]
    done = tmp_path / "w" / "train-00000.done.json"

    def run() -> str:
        write_shards(sources, tmp_path / "out", workers=1, work_dir=tmp_path / "w", **PARAMS)
        return json.loads(done.read_text())["fingerprint"]

    first = run()
    assert run() == first  # same code, same inputs: reused
    module_path = provenance.module_path
    edited = tmp_path / "imaging.py"
    edited.write_text(module_path("cxrfoundry.data.imaging").read_text() + "\n# edited\n")
    monkeypatch.setattr(
        provenance,
        "module_path",
        lambda name: edited if name == "cxrfoundry.data.imaging" else module_path(name),
    )
    assert run() != first


def test_replaced_image_rebuilds_its_work_shard(tmp_path: Path) -> None:
    # A source image replaced under the same name (a re-download, a fixed file): the rerun
    # must encode the new pixels, not hand back the work shard of the old ones.
    rows = _png_rows(tmp_path / "raw")
    sources = [ShardSource("t", conform(rows, REPORTS_SCHEMA), tmp_path / "raw")]
    out, work = tmp_path / "out", tmp_path / "w"

    def pixels_of_image_2() -> np.ndarray:
        write_shards(sources, out, workers=1, work_dir=work, **PARAMS)
        table = pq.read_table(list(out.glob("train-*.parquet")))
        row = table.to_pylist()[table.column("image_id").to_pylist().index("t/0002")]
        return imaging.decode_image(row["image"])

    before = pixels_of_image_2()
    Image.fromarray(np.full((20, 30), 200, dtype=np.uint8)).save(tmp_path / "raw" / "2.png")
    after = pixels_of_image_2()
    assert int(before.max()) == 18 and int(after.max()) > 150  # (padded: the border is 0)


_CRASH_CHILD = """
import os, signal
from pathlib import Path
import pyarrow.parquet as pq
from cxrfoundry.data import imaging
from cxrfoundry.data.shards import ShardSource, write_shards
load = imaging.load_image
def crashing(path):
    if Path(path).name == "crash.png":  # a decoder bug or the OOM killer: the process dies
        os.kill(os.getpid(), signal.SIGKILL)
    return load(path)
imaging.load_image = crashing  # workers are forked: they inherit this
srcs = [ShardSource("t", pq.read_table({table!r}), Path({root!r}))]
write_shards(srcs, Path({out!r}), workers={workers}, work_dir=Path({work!r}), **{params!r})
"""


@pytest.mark.skipif(
    sys.platform != "linux" or os.name != "posix", reason="needs fork to patch the workers"
)
@pytest.mark.parametrize("workers", [2, 1])  # one core (--cores 1) is still isolated
def test_worker_process_crash_becomes_a_reject(tmp_path: Path, workers: int) -> None:
    rows = _png_rows(tmp_path / "raw", n=20)
    (tmp_path / "raw" / "crash.png").write_bytes(b"whatever")
    rows.insert(9, _row("t", 99, "crash.png", "train"))
    pq.write_table(conform(rows, REPORTS_SCHEMA), tmp_path / "t.parquet")
    out = tmp_path / "out"
    code = _CRASH_CHILD.format(
        table=str(tmp_path / "t.parquet"),
        root=str(tmp_path / "raw"),
        out=str(out),
        work=str(tmp_path / "w"),
        params=PARAMS,
        workers=workers,
    )
    env = {**os.environ, "PYTHONFAULTHANDLER": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    index = json.loads((out / "index.json").read_text())
    assert index["counts"] == {"rows_in": 21, "rows_written": 20, "rows_rejected": 1}
    reason = _reasons(out)["t/0099"]
    assert "image crash.png" in reason and "SIGKILL" in reason
