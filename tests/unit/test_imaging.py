"""Tests for cxrfoundry.data.imaging: decoding (PNG/JPEG/DICOM), resizing, equalising, encoding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxrfoundry.data import imaging
from cxrfoundry.data.imaging import ImageDecodeError

REAL_DICOM = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "dicom"


def make_dicom(
    path: Path,
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    compress: str | None = None,
    **tags: object,
) -> Path:
    """Write a minimal valid DICOM file holding ``arr`` (2-D, frames×H×W, or H×W×3)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.set_pixel_data(arr, photometric, bits_stored)
    for key, value in tags.items():
        setattr(ds, key, value)
    if compress == "rle":
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(height: int = 40, width: int = 60, top: int = 4095) -> np.ndarray:
    """Horizontal ramp 0..top: left dark, right bright (easy to check inversion and windows)."""
    row = np.linspace(0, top, width).round().astype(np.uint16)
    return np.tile(row, (height, 1))


# --- DICOM -----------------------------------------------------------------------------------


def test_dicom_uncompressed_12bit_stretches_to_uint16(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a.dcm", ramp())
    img = imaging.load_image(path)
    assert img.dtype == np.uint16 and img.shape == (40, 60)
    assert img[0, 0] == 0 and img[0, -1] == 65535
    assert np.all(np.diff(img[0].astype(int)) >= 0)


def test_dicom_8bit_kept_exact(tmp_path: Path) -> None:
    arr = (np.arange(40 * 60).reshape(40, 60) % 200 + 20).astype(np.uint8)
    img = imaging.load_image(make_dicom(tmp_path / "a.dcm", arr, bits_stored=8))
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img, arr)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    mono2 = imaging.load_image(make_dicom(tmp_path / "m2.dcm", ramp()))
    mono1 = imaging.load_image(make_dicom(tmp_path / "m1.dcm", ramp(), photometric="MONOCHROME1"))
    np.testing.assert_array_equal(mono1, 65535 - mono2)
    assert mono1[0, 0] == 65535  # stored 0 = white in MONOCHROME1


def test_dicom_rle_equals_uncompressed(tmp_path: Path) -> None:
    arr = ramp()
    arr[10:20, 10:30] = 3000
    plain = imaging.load_image(make_dicom(tmp_path / "plain.dcm", arr))
    rle_path = make_dicom(tmp_path / "rle.dcm", arr, compress="rle")
    assert pydicom.dcmread(rle_path).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(imaging.load_image(rle_path), plain)


def test_dicom_window_applied(tmp_path: Path) -> None:
    # Window 1000..3000 over a 0..4095 ramp: below → black, above → white, linear between.
    path = make_dicom(tmp_path / "w.dcm", ramp(width=4096), WindowCenter=2000, WindowWidth=2000)
    img = imaging.load_image(path)[0]
    assert img.dtype == np.uint16
    assert img[:900].max() == 0
    assert img[3100:].min() == 65535
    assert 30000 < img[2000] < 36000
    assert np.all(np.diff(img.astype(int)) >= 0)


@pytest.mark.parametrize("width", [0, 0.5, -5, [0, 2000]])
def test_dicom_forbidden_window_width_is_ignored(tmp_path: Path, width: object) -> None:
    # A Window Width below 1 is invalid (PS3.3 C.11.2.1.2) and pydicom refuses it; viewers
    # ignore such a window, so the image decodes as if it had none (data-range stretch).
    plain = imaging.load_image(make_dicom(tmp_path / "p.dcm", ramp(width=4096)))
    path = make_dicom(tmp_path / "w.dcm", ramp(width=4096), WindowCenter=2000, WindowWidth=width)
    np.testing.assert_array_equal(imaging.load_image(path), plain)


def test_dicom_window_then_monochrome1(tmp_path: Path) -> None:
    kwargs = {"WindowCenter": 2000, "WindowWidth": 2000}
    m2 = imaging.load_image(make_dicom(tmp_path / "a.dcm", ramp(width=4096), **kwargs))
    m1 = imaging.load_image(
        make_dicom(tmp_path / "b.dcm", ramp(width=4096), photometric="MONOCHROME1", **kwargs)
    )
    np.testing.assert_array_equal(m1, 65535 - m2)


def test_dicom_rescale_then_window(tmp_path: Path) -> None:
    # Modality LUT first: stored v → 2v - 1000; the window is expressed in rescaled units.
    path = make_dicom(
        tmp_path / "r.dcm",
        ramp(width=4096),
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=3000,
        WindowWidth=2000,
    )
    img = imaging.load_image(path)[0]
    # rescaled 2000 ↔ stored 1500 is the window's bottom; rescaled 4000 ↔ stored 2500 its top.
    assert img[1400] == 0 and img[2600] == 65535
    assert 28000 < img[2000] < 37000


def _frame_group(**tags: object) -> Dataset:
    """One functional-group item with the Pixel Value Transformation / Frame VOI LUT macros
    holding ``tags`` (rescale keywords in the first, window keywords in the second)."""
    group = Dataset()
    for macro, keywords in (
        ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
        ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth")),
    ):
        item = Dataset()
        for key in keywords:
            if key in tags:
                setattr(item, key, tags[key])
        if len(item):
            setattr(group, macro, [item])
    return group


@pytest.mark.parametrize("where", ["shared", "per_frame", "per_frame_over_shared"])
def test_dicom_enhanced_frame_window_applied(tmp_path: Path, where: str) -> None:
    # Enhanced (multi-frame) objects keep rescale and window in functional groups, frame by
    # frame; frame 1 must decode exactly as if they were top-level tags.
    tags = {"RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 3000, "WindowWidth": 2000}
    frames = np.stack([ramp(width=4096), 4095 - ramp(width=4096)])
    top_level = imaging.load_image(make_dicom(tmp_path / "top.dcm", frames, **tags))
    groups: dict[str, object] = {}
    if where == "shared":
        groups["SharedFunctionalGroupsSequence"] = [_frame_group(**tags)]
    else:
        groups["PerFrameFunctionalGroupsSequence"] = [_frame_group(**tags), _frame_group()]
        if where == "per_frame_over_shared":  # the per-frame macro overrides the shared one
            groups["SharedFunctionalGroupsSequence"] = [
                _frame_group(WindowCenter=100, WindowWidth=50)
            ]
    enhanced = imaging.load_image(make_dicom(tmp_path / "enh.dcm", frames, **groups))
    np.testing.assert_array_equal(enhanced, top_level)
    assert enhanced[0, 1400] == 0 and enhanced[0, 2600] == 65535  # the window, not a stretch


def test_dicom_multiframe_first_frame(tmp_path: Path) -> None:
    frames = np.stack([ramp(), 4095 - ramp()])
    path = make_dicom(tmp_path / "mf.dcm", frames)
    single = imaging.load_image(make_dicom(tmp_path / "one.dcm", ramp()))
    np.testing.assert_array_equal(imaging.load_image(path), single)


def test_dicom_rgb_to_gray(tmp_path: Path) -> None:
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    img = imaging.load_image(
        make_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8)
    )
    assert img.dtype == np.uint8 and img.shape == (20, 30)
    assert abs(int(img[0, 0]) - round(200 * 0.587)) <= 1


def test_dicom_palette_color_16bit_lut(tmp_path: Path) -> None:
    # Palette Color LUTs usually hold 16-bit entries: an identity ramp (index × 257) must give
    # back the indices, not an image clipped to white.
    idx = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    path = make_dicom(tmp_path / "pal.dcm", idx, photometric="PALETTE COLOR", bits_stored=8)
    ds = pydicom.dcmread(path)
    lut = (np.arange(256) * 257).astype("<u2").tobytes()
    for offset in range(3):  # Red, Green, Blue descriptor (0028,110x) and data (0028,120x)
        ds.add_new(0x00281101 + offset, "US", [256, 0, 16])
        ds.add_new(0x00281201 + offset, "OW", lut)
    ds.save_as(path)
    img = imaging.load_image(path)
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img, idx)


def test_dicom_bits_stored_below_8_uses_full_range(tmp_path: Path) -> None:
    # 6 stored bits in an 8-bit container: 0..63 must not come out as a near-black image.
    arr = (np.arange(40 * 64).reshape(40, 64) % 64).astype(np.uint8)
    img = imaging.load_image(make_dicom(tmp_path / "b6.dcm", arr, bits_stored=6))
    assert img.dtype == np.uint8
    assert img.min() == 0 and img.max() == 255
    assert np.all(np.diff(img[0].astype(int)) > 0)


def test_dicom_without_suffix_detected(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "noext", ramp())
    assert imaging.load_image(path).dtype == np.uint16


def test_dicom_errors_name_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom at all")
    with pytest.raises(ImageDecodeError, match=r"bad\.dcm"):
        imaging.load_image(bad)
    # Truncated pixel data: header fine, decoding must fail with a clear message.
    good = make_dicom(tmp_path / "trunc.dcm", ramp())
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 2000])
    with pytest.raises(ImageDecodeError, match=r"trunc\.dcm"):
        imaging.load_image(good)


def _real(name: str) -> Path:
    path = REAL_DICOM / name
    if not path.is_file():
        pytest.skip(f"real sample {path} not available")
    return path


def test_real_jpeg2000_monochrome1() -> None:
    path = _real("RG1_J2KI.dcm")
    img = imaging.load_image(path)
    assert img.dtype == np.uint16 and img.shape == (1955, 1841)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    # MONOCHROME1 → the output must be inversely related to the stored values.
    corr = np.corrcoef(raw[::8, ::8].ravel(), img[::8, ::8].astype(np.float64).ravel())[0, 1]
    assert corr < -0.95
    # Lungs (upper-outer thirds) darker than the spine/mediastinum strip in the centre.
    h, w = img.shape
    lungs = np.concatenate(
        [img[h // 4 : h // 2, w // 8 : w // 3], img[h // 4 : h // 2, -w // 3 : -w // 8]]
    )
    spine = img[h // 4 : h // 2, w // 2 - w // 20 : w // 2 + w // 20]
    assert lungs.mean() < spine.mean()


def test_real_siim_jpeg_and_monochrome1_relabel() -> None:
    mono2 = imaging.load_image(_real("siim_cr_pa.dcm"))
    mono1 = imaging.load_image(_real("siim_cr_pa_monochrome1.dcm"))
    assert mono2.dtype == np.uint8 and mono2.shape == (1024, 1024)
    # Same stored pixels, opposite photometric interpretation → exact inverse after handling.
    np.testing.assert_array_equal(mono1, 255 - mono2)
    h, w = mono2.shape
    lungs = mono2[h // 4 : h // 2, w // 6 : w // 3]
    spine = mono2[h // 4 : h // 2, w // 2 - w // 20 : w // 2 + w // 20]
    assert lungs.mean() < spine.mean()


# --- PNG / JPEG ------------------------------------------------------------------------------


def test_png_8_16_rgb_jpeg(tmp_path: Path) -> None:
    arr8 = (np.arange(30 * 20).reshape(30, 20) % 256).astype(np.uint8)
    Image.fromarray(arr8).save(tmp_path / "a.png")
    np.testing.assert_array_equal(imaging.load_image(tmp_path / "a.png"), arr8)

    arr16 = (np.arange(30 * 20).reshape(30, 20) * 100).astype(np.uint16)
    (tmp_path / "b.png").write_bytes(imaging.encode_png(arr16))
    out16 = imaging.load_image(tmp_path / "b.png")
    assert out16.dtype == np.uint16
    np.testing.assert_array_equal(out16, arr16)

    Image.fromarray(np.stack([arr8] * 3, axis=-1)).save(tmp_path / "c.png")
    np.testing.assert_array_equal(imaging.load_image(tmp_path / "c.png"), arr8)

    Image.fromarray(arr8).save(tmp_path / "d.jpg", quality=95)
    jpg = imaging.load_image(tmp_path / "d.jpg")
    assert jpg.dtype == np.uint8 and jpg.shape == arr8.shape


def _with_orientation(arr: np.ndarray, path: Path, orientation: int, **options: object) -> None:
    pil = Image.fromarray(arr)
    exif = pil.getexif()
    exif[0x0112] = orientation  # EXIF Orientation
    pil.save(path, exif=exif.tobytes(), **options)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # Orientation 6: the stored pixels must be turned 90° clockwise to be shown upright.
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, :10] = 255  # a bright band on the stored image's left
    _with_orientation(arr, tmp_path / "o.png", 6)
    np.testing.assert_array_equal(imaging.load_image(tmp_path / "o.png"), np.rot90(arr, -1))
    _with_orientation(arr, tmp_path / "o.jpg", 6, quality=95)
    jpg = imaging.load_image(tmp_path / "o.jpg")
    assert jpg.shape == (40, 20)
    assert jpg[:8].min() > 200 and jpg[12:].max() < 50  # the band is now on top
    # Masks follow the same rule, so they stay aligned with their images.
    mask = (arr // 255).astype(np.uint8)
    _with_orientation(mask, tmp_path / "m.png", 6)
    np.testing.assert_array_equal(imaging.load_mask(tmp_path / "m.png"), np.rot90(mask, -1))


def test_png_errors_name_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"missing\.png: file not found"):
        imaging.load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageDecodeError, match=r"junk\.png"):
        imaging.load_image(tmp_path / "junk.png")
    data = imaging.encode_png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"trunc\.png"):
        imaging.load_image(tmp_path / "trunc.png")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (256, 256)])
def test_gray_png_fast_path_equals_pillow(dtype: type, shape: tuple[int, int]) -> None:
    top = np.iinfo(dtype).max
    arr = np.random.default_rng(shape[1]).integers(0, top, shape, endpoint=True).astype(dtype)
    for data in (imaging.encode_png(arr), _pillow_png(arr, optimize=True)):
        fast = imaging.decode_gray_png(data)
        assert fast is not None and fast.dtype == arr.dtype
        np.testing.assert_array_equal(fast, arr)
        with Image.open(io.BytesIO(data)) as img:
            np.testing.assert_array_equal(imaging.decode_image(data), np.asarray(img))


def test_gray_png_fast_path_leaves_other_images_to_pillow() -> None:
    gray = (np.arange(12 * 10).reshape(12, 10) % 256).astype(np.uint8)
    rgb = _pillow_png(np.stack([gray] * 3, axis=-1))
    assert imaging.decode_gray_png(rgb) is None
    np.testing.assert_array_equal(imaging.decode_image(rgb), gray)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=95)
    assert imaging.decode_gray_png(buf.getvalue()) is None
    assert imaging.decode_image(buf.getvalue()).shape == gray.shape
    assert imaging.decode_gray_png(b"") is None


def test_gray_png_into_decodes_only_what_fits_exactly() -> None:
    arr = np.random.default_rng(1).integers(0, 65535, (7, 30), endpoint=True).astype(np.uint16)
    for want in (arr, (arr >> 8).astype(np.uint8)):
        data = imaging.encode_png(want)
        out = np.zeros(want.shape, dtype=want.dtype)
        assert imaging.decode_gray_png_into(data, out)
        np.testing.assert_array_equal(out, want)
        # another depth, another size, a truncated file: left to the general path, untouched
        other = np.uint16 if want.dtype == np.uint8 else np.uint8
        for target in (np.zeros(want.shape, other), np.zeros((30, 7), want.dtype)):
            assert not imaging.decode_gray_png_into(data, target) and not target.any()
        assert not imaging.decode_gray_png_into(data[: len(data) // 2], out.copy())
    rgb = _pillow_png(np.zeros((7, 30, 3), dtype=np.uint8))
    assert not imaging.decode_gray_png_into(rgb, np.zeros((7, 30), np.uint8))


def test_gray_png_fast_path_errors_name_the_image() -> None:
    data = imaging.encode_png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    corrupt = data[:60] + bytes(16) + data[76:]
    for bad in (data[: len(data) // 2], data[:40], corrupt):
        with pytest.raises(ImageDecodeError, match=r"img-7: cannot decode PNG"):
            imaging.decode_gray_png(bad, name="img-7")
        with pytest.raises(ImageDecodeError, match=r"img-7"):
            imaging.decode_image(bad, name="img-7")


def _pillow_png(arr: np.ndarray, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **options)
    return buf.getvalue()


# --- resize / equalize / encode --------------------------------------------------------------


def test_resize_policies() -> None:
    img = np.full((100, 50), 200, dtype=np.uint8)  # tall
    pad = imaging.resize(img, 64, "pad")
    assert pad.shape == (64, 64)
    # Letterbox: image occupies the central 32 columns, black bands either side.
    assert pad[:, :16].max() == 0 and pad[:, -16:].max() == 0
    assert pad[:, 17:47].min() == 200
    assert imaging.resize(img, 64, "crop").min() == 200  # crop never shows padding
    assert imaging.resize(img, 64, "stretch").shape == (64, 64)
    with pytest.raises(ValueError, match="unknown resize policy"):
        imaging.resize(img, 64, "zoom")


def test_resize_crop_is_centred() -> None:
    img = np.zeros((100, 300), dtype=np.uint8)
    img[:, 100:200] = 255  # the centre square is white, the sides black
    assert imaging.resize(img, 50, "crop").min() == 255


def test_resize_area_antialiasing_and_16bit() -> None:
    # A 1-pixel checkerboard shrinks to mid-grey with area averaging (no aliasing).
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 65535).astype(np.uint16)
    small = imaging.resize(board, 16, "stretch")
    assert small.dtype == np.uint16
    assert np.abs(small.astype(int) - 32768).max() <= 1


def test_resize_nearest_keeps_label_values() -> None:
    mask = np.zeros((90, 60), dtype=np.uint8)
    mask[10:50, 5:30] = 1
    mask[40:80, 20:55] |= 2
    out = imaging.resize(mask, 32, "pad", interpolation="nearest")
    assert set(np.unique(out)) <= {0, 1, 2, 3}


def test_equalize() -> None:
    img = (np.random.default_rng(1).random((64, 64)) * 60 + 100).astype(np.uint8)
    eq = imaging.equalize(img)
    assert eq.dtype == np.uint8 and eq.min() == 0 and eq.max() == 255
    # Monotonic: the order of grey levels is preserved.
    order = np.argsort(img.ravel(), kind="stable")
    assert np.all(np.diff(eq.ravel()[order].astype(int)) >= 0)
    flat = np.full((8, 8), 7, dtype=np.uint16)
    np.testing.assert_array_equal(imaging.equalize(flat), flat)


def _png_chunks(data: bytes) -> list[bytes]:
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return chunks


def test_encode_png_deterministic_no_metadata() -> None:
    img = np.random.default_rng(2).integers(0, 65535, (33, 47), dtype=np.uint16)
    first, second = imaging.encode_png(img), imaging.encode_png(img.copy())
    assert first == second
    assert set(_png_chunks(first)) <= {b"IHDR", b"IDAT", b"IEND"}
    assert first[24] == 16  # IHDR bit depth
    np.testing.assert_array_equal(imaging.decode_png(first), img)
    eight = imaging.encode_png(img, bit_depth=8)
    assert eight[24] == 8
    np.testing.assert_array_equal(imaging.decode_png(eight), imaging.to_bit_depth(img, 8))


def test_bit_depth_roundtrip_and_jpeg() -> None:
    arr8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(imaging.to_bit_depth(imaging.to_bit_depth(arr8, 16), 8), arr8)
    jpeg = imaging.encode_image(arr8, "jpeg")
    assert jpeg[:2] == b"\xff\xd8"
    assert imaging.decode_image(jpeg).shape == (16, 16)
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    with pytest.raises(ValueError, match="8-bit only"):
        imaging.encode_image(arr8.astype(np.uint16), "jpeg")
    with pytest.raises(ImageDecodeError, match="<bytes>"):
        imaging.decode_png(b"nope")
