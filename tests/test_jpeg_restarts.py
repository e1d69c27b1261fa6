"""Restart markers added losslessly (pipeline.data.jpeg.add_restart_markers), the marker scan (restart_index) and
region decoding by stream surgery (decode_region_restart, restart_band): the transcoded file decodes to exactly
the original's pixels, and a crop cut out of its stream to exactly the full decode's pixels of that box."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data import jpeg
from pipeline.data import transforms as tf
from tests.test_jpeg_decode import roi_library  # noqa: F401 (autouse: builds the decoder where it is not built)


def photo(size: tuple[int, int], seed: int, *, gray: bool = False, **save: object) -> bytes:
    """A photo-like JPEG: smooth colour gradients, sensor-like noise, hard edges (shapes of other colours) and a
    patch of fine texture, so every kind of 8x8 block (flat, edge, busy) and long Huffman codes occur."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([
        80 + 120 * xx / w + 30 * np.sin(yy / 37.0),
        60 + 150 * yy / h + 20 * np.cos(xx / 23.0),
        200 - 100 * (xx + yy) / (w + h),
    ], axis=-1)
    for _ in range(6):  # edges: discs and rectangles of flat colour
        colour = rng.uniform(0, 255, 3)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, min(w, h) / 3)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r / 2)
        base[mask] = colour
    tx, ty = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    base[ty : ty + h // 4, tx : tx + w // 4] += rng.normal(0, 40, (h // 4, w // 4, 3))  # fine texture
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if gray:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **({"quality": 90} | save))
    return buf.getvalue()


# (size, save options): 4:4:4, 4:2:2, 4:2:0, progressive 4:2:0, greyscale; sizes not multiples of the MCU too.
CASES = {
    "444": ((500, 375), {"subsampling": 0}),
    "422": ((375, 500), {"subsampling": 1}),
    "420": ((500, 375), {"subsampling": 2}),
    "420-odd": ((333, 251), {"subsampling": 2, "quality": 75}),
    "progressive": ((500, 333), {"subsampling": 2, "progressive": True}),
    "gray": ((345, 230), {"gray": True}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, bytes, bytes]:
    size, save = CASES[request.param]
    data = photo(size, seed=len(request.param), **save)
    return request.param, data, jpeg.add_restart_markers(data)


def _pil(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _full_rgb(data: bytes) -> np.ndarray:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_jpeg(raw, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


def test_transcoded_file_decodes_to_the_originals_pixels(case: tuple[str, bytes, bytes]) -> None:
    name, data, rst = case
    assert rst != data and rst[:2] == b"\xff\xd8"
    a, b = _pil(data), _pil(rst)
    assert a.shape == b.shape and np.array_equal(a, b), name  # Pillow's libjpeg
    assert np.array_equal(_full_rgb(data), _full_rgb(rst)), name  # torchvision's libjpeg-turbo
    # Same for the other restart spacings (restart_rows=0: none, an optimising transcode only).
    for kw in ({"restart_rows": 0}, {"restart_rows": 3}, {"restart_mcus": 1}, {"restart_mcus": 7}):
        assert np.array_equal(_pil(jpeg.add_restart_markers(data, **kw)), a), (name, kw)
    if name == "progressive":
        assert jpeg.restart_index(data).sequential is False and jpeg.restart_index(rst).sequential is True


def test_marker_scan_finds_one_marker_per_mcu_row(case: tuple[str, bytes, bytes]) -> None:
    name, data, rst = case
    ix = jpeg.restart_index(rst)
    w, h = Image.open(io.BytesIO(data)).size
    mcu = 8 if name == "gray" else {"444": (8, 8), "422": (16, 8)}.get(name, (16, 16))
    mw, mh = (mcu, mcu) if isinstance(mcu, int) else mcu
    assert (ix.width, ix.height, ix.mcu_width, ix.mcu_height) == (w, h, mw, mh)
    assert ix.mcus_per_row == -(-w // mw) and ix.mcu_rows == -(-h // mh)
    assert ix.restart_interval == ix.mcus_per_row and ix.row_addressable and ix.single_scan
    assert len(ix.offsets) == ix.mcu_rows - 1  # libjpeg writes none after the last interval
    raw = np.frombuffer(rst, np.uint8)
    assert np.all(raw[ix.offsets] == 0xFF)
    assert np.array_equal(raw[ix.offsets + 1], 0xD0 + np.arange(len(ix.offsets)) % 8)
    assert ix.scan_start < ix.offsets[0] and ix.offsets[-1] < ix.scan_end == len(rst) - 2
    # The source has none; other spacings give the counts their geometry implies.
    orig = jpeg.restart_index(data)
    assert orig.restart_interval == 0 and len(orig.offsets) == 0 and not orig.row_addressable
    two = jpeg.restart_index(jpeg.add_restart_markers(data, restart_rows=2))
    assert len(two.offsets) == -(-ix.mcu_rows // 2) - 1 and two.row_addressable
    each = jpeg.restart_index(jpeg.add_restart_markers(data, restart_mcus=1))
    assert len(each.offsets) == ix.mcus_per_row * ix.mcu_rows - 1 and each.column_addressable


def _boxes(w: int, h: int, seed: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    boxes = [tf.random_resized_crop_box(w, h, rng, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(40)]
    boxes += [(int(rng.integers(0, w - 3)), int(rng.integers(0, h - 3)), 3, 3) for _ in range(10)]
    return boxes + [
        (0, 0, w, h), (0, 0, 1, 1), (w - 1, h - 1, 1, 1),  # whole image, corners
        (0, h - 9, w, 9), (w - 17, 0, 17, h),  # bottom band, right column
        (5, 17, 30, 15), (1, 31, 7, 2), (3, 47, 40, 50),  # not MCU-aligned, at MCU-row edges
    ]


SPACINGS = ({"restart_rows": 1}, {"restart_mcus": 1}, {"restart_rows": 2}, {"restart_mcus": 7})


def test_surgery_crop_equals_the_full_decode(case: tuple[str, bytes, bytes]) -> None:
    """Rows (one interval per MCU row, or two rows), rectangles (one per MCU), and a spacing that is neither
    (7 MCUs: not addressable, decoded whole): the box's pixels are the full decode's."""
    name, data, _ = case
    full = _full_rgb(data)
    h, w = full.shape[:2]
    for kw in SPACINGS:
        rst = jpeg.add_restart_markers(data, **kw)
        ix = jpeg.restart_index(rst)
        assert ix.row_addressable == ("restart_rows" in kw or kw["restart_mcus"] == 1 or ix.mcus_per_row % 7 == 0)
        assert ix.column_addressable == (kw.get("restart_mcus") == 1 or (kw.get("restart_mcus") == 7
                                                                         and ix.mcus_per_row % 7 == 0))
        for left, top, bw, bh in _boxes(w, h, seed=len(name)):
            (x, y, rw, rh), _ = jpeg.region_for_box(w, h, left, top, bw, bh, 1)
            window, x0 = jpeg.decode_region_restart(rst, x, y, rw, rh)
            assert window.shape[0] == rh and x0 <= x and x0 + window.shape[1] >= x + rw
            got = window[top - y : top - y + bh, left - x0 : left - x0 + bw]
            assert np.array_equal(got, full[top : top + bh, left : left + bw]), (name, kw, left, top, bw, bh)
            # The sub-image it decoded is a JPEG any decoder reads; its pixels of the region are the full decode's.
            sub, sx, sy = jpeg.restart_band(rst, x, y, rw, rh)
            part = _full_rgb(sub)[y - sy : y - sy + rh, x - sx : x - sx + rw]
            assert np.array_equal(part, full[y : y + rh, x : x + rw]), (name, kw, left, top, bw, bh)


def test_surgery_crop_at_dct_scale_equals_the_region_decode() -> None:
    data = photo((1200, 900), seed=5, subsampling=2)
    rng = np.random.default_rng(0)
    for denom, kw in ((2, {"restart_rows": 1}), (4, {"restart_mcus": 1}), (8, {"restart_rows": 1}),
                      (2, {"restart_mcus": 1})):
        rst = jpeg.add_restart_markers(data, **kw)
        for _ in range(8):
            left, top, bw, bh = tf.random_resized_crop_box(1200, 900, rng, (0.08, 1.0), (3 / 4, 4 / 3))
            (x, y, rw, rh), _ = jpeg.region_for_box(1200, 900, left, top, bw, bh, denom)
            ours, ox = jpeg.decode_region_restart(rst, x, y, rw, rh, denom)
            ref, rx = jpeg.decode_region(data, x, y, rw, rh, denom)
            inner = (slice(1, rh - 1), slice(1, rw - 1))  # the box's pixels: the region less its 1 px margin
            a, b = ours[:, x - ox : x - ox + rw][inner], ref[:, x - rx : x - rx + rw][inner]
            assert np.array_equal(a, b), (denom, kw, left, top, bw, bh)


def test_surgery_skips_the_rows_above_the_box() -> None:
    """A box low in the image: the band holds only its few MCU rows; with one interval per MCU, only the
    box's MCUs (plus context): far fewer bytes than the file."""
    data = photo((500, 375), seed=2, subsampling=2)
    rst = jpeg.add_restart_markers(data)
    band, left, top = jpeg.restart_band(rst, 40, 300, 100, 20)
    ix = jpeg.restart_index(band)
    assert (left, top) == (0, 288) and (ix.width, ix.height) == (500, 48)  # MCU rows 18..20 of 24, full width
    assert len(band) < len(rst) / 4
    assert len(ix.offsets) == ix.mcu_rows - 1 and ix.row_addressable  # renumbered RST0.. from the band's start
    per_mcu = jpeg.add_restart_markers(data, restart_mcus=1)
    rect, left, top = jpeg.restart_band(per_mcu, 40, 300, 100, 20)
    ix = jpeg.restart_index(rect)
    assert (left, top) == (32, 288) and (ix.width, ix.height) == (112, 48)  # MCU columns 2..8: [38, 142) + context
    assert len(rect) < len(per_mcu) / 12 and ix.column_addressable and len(ix.offsets) == 7 * 3 - 1
    # An untranscoded file (no restart markers) decodes whole, with the same result as decode_region.
    a, ax = jpeg.decode_region_restart(data, 40, 300, 100, 20)
    b, bx = jpeg.decode_region(data, 40, 300, 100, 20)
    assert ax == bx and np.array_equal(a, b)
    assert jpeg.restart_band(data, 40, 300, 100, 20) == (data, 0, 0)


def test_corrupt_or_truncated_input_raises_naming_the_problem() -> None:
    data = photo((300, 200), seed=3, subsampling=2)
    rst = jpeg.add_restart_markers(data)
    with pytest.raises(jpeg.JpegError, match="Premature end of JPEG file"):
        jpeg.add_restart_markers(data[: len(data) // 2])  # strict: libjpeg's warning is an error
    assert len(jpeg.add_restart_markers(data[: len(data) // 2], strict=False)) > 0
    with pytest.raises(jpeg.JpegError, match="Not a JPEG file"):
        jpeg.add_restart_markers(b"GIF89a not a jpeg")
    with pytest.raises(jpeg.JpegError, match="restart interval"):
        jpeg.add_restart_markers(data, restart_rows=-1)
    with pytest.raises(jpeg.JpegError, match="without an EOI marker"):
        jpeg.restart_index(rst[: len(rst) // 2])
    with pytest.raises(jpeg.JpegError, match="without an EOI marker"):
        jpeg.decode_region_restart(rst[: len(rst) // 2], 0, 150, 50, 20)
    with pytest.raises(jpeg.JpegError, match="no SOI marker"):
        jpeg.restart_index(b"\x00\x01garbage")
    with pytest.raises(jpeg.JpegError, match="truncated JPEG header"):
        jpeg.restart_index(rst[:100])
    # Headers the marker parser refuses go to libjpeg, as decode_region's would (same recovery or message).
    with pytest.raises(jpeg.JpegError, match="contains no image"):
        jpeg.decode_region_restart(rst[:100], 0, 0, 10, 10)
    with pytest.raises(jpeg.JpegError, match="outside"):
        jpeg.decode_region_restart(rst, 0, 190, 10, 20)  # below the image
    with pytest.raises(jpeg.JpegError, match="outside"):
        jpeg.restart_band(jpeg.add_restart_markers(data, restart_mcus=1), 295, 0, 10, 20)  # right of it
    broken = bytearray(rst)
    sof = broken.index(b"\xff\xc0")
    broken[sof + 11] = 0x00  # the first component's sampling factors: 0x0
    with pytest.raises(jpeg.JpegError, match="sampling"):
        jpeg.restart_index(bytes(broken))


def test_prepare_adds_restart_markers_to_train_images_only(tiny_folders_tree, tmp_path) -> None:
    """data.restart_markers: mcu: every train image is the same picture with one restart interval per MCU; val
    and minival keep their bytes; the default (none) leaves the plan's fingerprint as it was."""
    from pipeline.data.prepare import prepare_shards
    from pipeline.data.shards import read_shard, shard_files

    def images(out, split: str) -> dict[str, bytes]:
        rows: dict[str, bytes] = {}
        for loc in shard_files(out, split):
            t = read_shard(loc, ["key", "image"]).to_pydict()
            rows.update(zip(t["key"], t["image"], strict=True))
        return rows

    opts = {"max_side": 128, "rows_per_shard": 8, "workers": 1, "progress": False, "minival_per_class": 1}
    plain = prepare_shards(tiny_folders_tree.root, tmp_path / "plain", **opts)
    rst = prepare_shards(tiny_folders_tree.root, tmp_path / "rst", restart_markers="mcu", **opts)
    assert "restart_markers" not in plain["options"] and rst["options"]["restart_markers"] == "mcu"
    assert plain["fingerprint"] != rst["fingerprint"]
    n_train = rst["splits"]["train"]["n_images"]
    assert rst["splits"]["train"]["n_restart_transcoded"] == n_train > 0
    assert rst["splits"]["val"]["n_restart_transcoded"] == rst["splits"]["minival"]["n_restart_transcoded"] == 0
    before, after = images(tmp_path / "plain", "train"), images(tmp_path / "rst", "train")
    assert before.keys() == after.keys() and len(after) == n_train
    for key, data in after.items():
        assert data != before[key] and jpeg.restart_index(data).column_addressable, key
        assert np.array_equal(_pil(data), _pil(before[key])), key
        # The train transform (stream surgery on these bytes) gives the crops it gives the original bytes.
        for seed in range(3):
            ours = tf.train_image(data, 32, np.random.default_rng(seed), 0.08)
            assert np.array_equal(ours, tf.train_image(before[key], 32, np.random.default_rng(seed), 0.08)), key
    for split in ("val", "minival"):
        assert images(tmp_path / "plain", split) == images(tmp_path / "rst", split)
