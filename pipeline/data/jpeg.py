"""Region-of-interest JPEG decoding: decode only the pixels a crop needs (pipeline/data/native/roijpeg.c).

RandomResizedCrop keeps on average about half of an image's area, and the crop box is known from the JPEG header
before any pixel is decoded. libjpeg-turbo's libjpeg API (>= 1.5) can skip the IDCT of the rows above a region
(`jpeg_skip_scanlines`), stop after its last row, limit IDCT and colour conversion to the region's columns
(`jpeg_crop_scanline`, widened to whole iMCUs) and scale the IDCT by 1/2..1/8 (`scale_denom`). Neither Pillow nor
torchvision expose the first three, and TurboJPEG 2.1 has no partial decompression, so a ~150-line C file against
the system's libjpeg does it, loaded here with ctypes (no Python headers needed; `make setup` builds it, the
Docker image too). Without it (`available()` False) callers keep the full-decode path; `available()` logs that
once per process.

The library is looked up in this order: $ROIJPEG_LIBRARY (a path), pipeline/data/native/_roijpeg.so (what
`make setup` builds), then `libroijpeg.so` on the loader's path (the Docker image installs it there, since a Ray
job's uploaded working directory leaves out git-ignored build outputs).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

NATIVE_DIR = Path(__file__).resolve().parent / "native"
LOCAL_LIBRARY = NATIVE_DIR / "_roijpeg.so"
SYSTEM_LIBRARY = "libroijpeg.so"
ENV_LIBRARY = "ROIJPEG_LIBRARY"
# The decoder's largest DCT downscale (libjpeg's scale_denom 8).
MAX_DENOM = 8
# Wider than any iMCU at scale 1 (4 x 8 px, the largest horizontal sampling factor JPEG allows, is 32 px): room
# for the column widening jpeg_crop_scanline does on both sides of a region.
_WIDEN = 64
_ERR_LEN = 256
# libjpeg's J_COLOR_SPACE values for the files we accept (JCS_GRAYSCALE, JCS_RGB, JCS_YCbCr).
_DECODABLE_SPACES = {1, 2, 3}

_lib: ctypes.CDLL | None = None
_load_tried = False


class JpegError(ValueError):
    """libjpeg refused the data (corrupt or unsupported JPEG); the message is libjpeg's."""


def _load() -> ctypes.CDLL | None:
    global _lib, _load_tried
    if _load_tried:
        return _lib
    _load_tried = True
    candidates = [os.environ.get(ENV_LIBRARY) or None, str(LOCAL_LIBRARY), SYSTEM_LIBRARY]
    errors = []
    for name in candidates:
        if name is None:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        try:
            _bind(lib)
        except AttributeError as exc:  # an old build of roijpeg.c: `make setup` rebuilds it
            errors.append(f"{name}: {exc} (stale build)")
            continue
        _lib = lib
        return _lib
    # The one line a process logs when ROI decoding is off: training still works, on the full-decode path.
    log.warning("ROI JPEG decoding unavailable (%s); decoding whole images instead. Build it with `make setup` "
                "(needs gcc and libjpeg-turbo headers).", "; ".join(errors))
    return None


def _bind(lib: ctypes.CDLL) -> None:
    """Declare the C signatures (ctypes would otherwise pass Python ints as C ints, truncating pointers)."""
    u8p, ip, cp = ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_char_p
    lib.roi_header.argtypes = [u8p, ctypes.c_ulong, ip, cp, ctypes.c_int]
    lib.roi_header.restype = ctypes.c_int
    lib.roi_decode.argtypes = [u8p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ip, cp, ctypes.c_int]
    lib.roi_decode.restype = ctypes.c_int
    lib.roi_stage.argtypes = [u8p, ctypes.c_ulong, ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, cp,
                              ctypes.c_int]
    lib.roi_stage.restype = ctypes.c_int
    ulp, lp = ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_long)
    lib.rst_transcode.argtypes = [u8p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.POINTER(ctypes.c_void_p), ulp, cp, ctypes.c_int]
    lib.rst_transcode.restype = ctypes.c_int
    lib.rst_free.argtypes = [ctypes.c_void_p]
    lib.rst_free.restype = None
    lib.rst_scan.argtypes = [u8p, ctypes.c_ulong, lp, ctypes.c_void_p, ctypes.c_long, cp, ctypes.c_int]
    lib.rst_scan.restype = ctypes.c_long
    lib.rst_band.argtypes = [u8p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, lp, cp, ctypes.c_int]
    lib.rst_band.restype = ctypes.c_int
    lib.rst_decode.argtypes = lib.roi_decode.argtypes
    lib.rst_decode.restype = ctypes.c_int


def available() -> bool:
    """Whether the ROI decoder loaded (logs one warning line per process when it did not)."""
    return _load() is not None


def _as_bytes(data: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError("ROI JPEG decoder not loaded (pipeline.data.jpeg.available() is False)")
    return lib


def header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, components, libjpeg colour space) from the JPEG header; JpegError if unreadable."""
    lib = _load()
    if lib is None:
        raise RuntimeError("ROI JPEG decoder not loaded (pipeline.data.jpeg.available() is False)")
    data = _as_bytes(data)
    info = (ctypes.c_int * 4)()
    err = ctypes.create_string_buffer(_ERR_LEN)
    if lib.roi_header(data, len(data), info, err, _ERR_LEN) != 0:
        raise JpegError(f"JPEG header: {err.value.decode(errors='replace')}")
    return info[0], info[1], info[2], info[3]


def decodable(colorspace: int) -> bool:
    """Whether `decode_region` turns this colour space into RGB (not CMYK/YCCK, which shards never hold)."""
    return colorspace in _DECODABLE_SPACES


def scaled_size(width: int, height: int, denom: int) -> tuple[int, int]:
    """The image size libjpeg outputs at scale 1/denom (ceil, as jdmaster.c computes it)."""
    return -(-width // denom), -(-height // denom)


def dct_denom(box_w: int, box_h: int, out: int) -> int:
    """The largest DCT downscale 1/s (s in 1, 2, 4, 8) that keeps the crop box at least `out` pixels on its
    shorter side: the resize after it still only shrinks, so the antialiased resize sees as many source pixels per
    output pixel as it needs (the same rule Pillow's `draft` follows for whole images)."""
    s = 1
    while s < MAX_DENOM and min(box_w, box_h) >= 2 * s * out:
        s *= 2
    return s


def decode_region(
    data: bytes, x: int, y: int, w: int, h: int, denom: int = 1, channels: int = 3
) -> tuple[np.ndarray, int]:
    """Decode columns [x, x+w) and rows [y, y+h) of the image scaled by 1/denom (coordinates of the scaled image)
    -> (uint8 (h, W, channels) window, x0): RGB, or with channels=4 RGBX (a padding byte per pixel). The window
    starts at column x0 <= x (iMCU-aligned) and covers at least the region, so the region is
    window[:, x - x0 : x - x0 + w]. Raises JpegError on corrupt data."""
    lib = _load()
    if lib is None:
        raise RuntimeError("ROI JPEG decoder not loaded (pipeline.data.jpeg.available() is False)")
    data = _as_bytes(data)
    cap_w = w + _WIDEN
    buf = np.empty(cap_w * h * channels, dtype=np.uint8)
    win = (ctypes.c_int * 4)()
    err = ctypes.create_string_buffer(_ERR_LEN)
    rc = lib.roi_decode(data, len(data), denom, x, y, w, h, channels, buf.ctypes.data, buf.nbytes, win, err,
                        _ERR_LEN)
    if rc != 0:
        raise JpegError(f"JPEG region ({x}, {y}, {w}, {h}) at 1/{denom}: {err.value.decode(errors='replace')}")
    x0, _, width, height = win[0], win[1], win[2], win[3]
    return buf[: width * height * channels].reshape(height, width, channels), x0


def region_for_box(
    width: int, height: int, left: int, top: int, box_w: int, box_h: int, denom: int
) -> tuple[tuple[int, int, int, int], tuple[float, float, float, float]]:
    """The integer region to decode at scale 1/denom for a full-resolution crop box, and the box in that
    region's scaled coordinates (floats: the exact crop the resize takes). At denom 1 the region is the box
    widened by one pixel on each side where the image has one: libjpeg's fancy (triangle) chroma upsampling
    reads one neighbouring sample, and at a region's edge it would replicate the edge instead, so the box's own
    pixels are then bit-identical to a full decode's."""
    sw, sh = scaled_size(width, height, denom)
    fx0, fy0 = left / denom, top / denom
    fx1, fy1 = (left + box_w) / denom, (top + box_h) / denom
    x0 = max(0, math.floor(fx0) - 1)
    y0 = max(0, math.floor(fy0) - 1)
    x1 = min(sw, math.ceil(fx1) + 1)
    y1 = min(sh, math.ceil(fy1) + 1)
    return (x0, y0, x1 - x0, y1 - y0), (fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0)


# What each `decode_stage` stage adds (bench/bench_jpeg.py times them to find where a decode's time goes).
STAGES = ("entropy decoding", "inverse DCT", "chroma upsampling", "colour conversion")


def decode_stage(data: bytes, stage: int, width: int) -> None:
    """Decode the whole image, stopping after STAGES[stage] (0..3); the result is thrown away: for timing."""
    lib = _load()
    if lib is None:
        raise RuntimeError("ROI JPEG decoder not loaded (pipeline.data.jpeg.available() is False)")
    if not 0 <= stage < len(STAGES):
        raise ValueError(f"stage must be 0..{len(STAGES) - 1}, got {stage}")
    data = _as_bytes(data)
    row = np.empty(width * 3, dtype=np.uint8)
    err = ctypes.create_string_buffer(_ERR_LEN)
    if lib.roi_stage(data, len(data), stage, row.ctypes.data, row.nbytes, err, _ERR_LEN) != 0:
        raise JpegError(f"JPEG stage {stage}: {err.value.decode(errors='replace')}")


# ------------------------------------------------------------------------------------------ restart markers
# A baseline JPEG without restart markers can only be entropy-decoded from the start of its scan, so a region
# decode still Huffman-decodes every row above the region (the floor docs/performance.md measures). The functions
# below add restart markers losslessly (same DCT coefficients, so the same decoded pixels) and cut a crop's rows
# out of such a stream ("stream surgery": headers + only the restart intervals of the crop's MCU rows), which
# libjpeg then decodes as a small JPEG: rows above the crop are never entropy-decoded.


@dataclass(frozen=True)
class RestartIndex:
    """What `restart_index` finds: the MCU geometry of the first scan and its RSTn markers' byte offsets."""

    width: int
    height: int
    components: int
    mcu_width: int
    mcu_height: int
    mcus_per_row: int
    mcu_rows: int
    restart_interval: int  # MCUs an interval; 0: no restart markers
    sequential: bool  # baseline/extended sequential Huffman (not progressive, not arithmetic)
    single_scan: bool
    row_addressable: bool  # a crop's MCU rows can be cut out of the stream (`decode_region_restart`)
    column_addressable: bool  # and its columns too: every MCU row is a whole number of shorter intervals
    scan_start: int  # first byte of the entropy-coded data
    scan_end: int  # offset of the marker ending it (EOI)
    offsets: np.ndarray  # int64 offsets of each RSTn marker's 0xFF byte, in stream order


def add_restart_markers(data: bytes, restart_rows: int = 1, restart_mcus: int = 0, strict: bool = True) -> bytes:
    """Losslessly transcode a JPEG with a restart marker every `restart_rows` MCU rows (or, restart_mcus > 0,
    every `restart_mcus` MCUs; both 0: none, only the Huffman tables optimised): the DCT coefficients,
    quantisation tables and sampling are kept (decoding it gives exactly the original's pixels), Huffman tables
    are optimised, a progressive input becomes baseline, and only the markers decoding needs are written (APPn
    such as EXIF and ICC, and COM, are dropped). strict: a file libjpeg can only decode with a corrupt-data
    warning (truncated, bad Huffman data) raises JpegError instead of being transcoded with the damage baked
    in."""
    lib = _lib_or_raise()
    data = _as_bytes(data)
    out = ctypes.c_void_p()
    out_size = ctypes.c_ulong()
    err = ctypes.create_string_buffer(_ERR_LEN)
    if lib.rst_transcode(data, len(data), restart_rows, restart_mcus, int(strict), ctypes.byref(out),
                         ctypes.byref(out_size), err, _ERR_LEN) != 0:
        raise JpegError(f"JPEG restart transcode: {err.value.decode(errors='replace')}")
    try:
        return ctypes.string_at(out.value, out_size.value)
    finally:
        lib.rst_free(out)


def restart_index(data: bytes) -> RestartIndex:
    """Scan a JPEG's markers and first scan (C, memchr over the entropy-coded data) -> its RestartIndex."""
    lib = _lib_or_raise()
    data = _as_bytes(data)
    geom = (ctypes.c_long * 16)()
    err = ctypes.create_string_buffer(_ERR_LEN)
    cap = 256
    while True:
        offs = np.zeros(cap, dtype=np.uint64)
        n = lib.rst_scan(data, len(data), geom, offs.ctypes.data, cap, err, _ERR_LEN)
        if n < 0:
            raise JpegError(f"JPEG marker scan: {err.value.decode(errors='replace')}")
        if n <= cap:
            break
        cap = int(n)
    g = list(geom)
    return RestartIndex(
        width=g[0], height=g[1], components=g[2], mcu_width=g[5], mcu_height=g[6], mcus_per_row=g[7],
        mcu_rows=g[8], restart_interval=g[9], sequential=bool(g[10]), single_scan=bool(g[12]),
        row_addressable=g[13] > 0, column_addressable=g[13] == 2, scan_start=g[14], scan_end=g[15],
        offsets=offs[:n].astype(np.int64),
    )


def restart_band(data: bytes, x: int, y: int, w: int, h: int, denom: int = 1) -> tuple[bytes, int, int]:
    """The sub-image JPEG `decode_region_restart` decodes for the scaled region (x, y, w, h) -> (its bytes, its
    first scaled column, its first scaled row): the region plus a few pixels of context, rounded out to whole
    restart intervals (full width for one interval per MCU row; a rectangle for one per MCU). A stream that is not
    addressable, or a sub-image that would be the whole image, gives the original bytes and (0, 0). Any JPEG
    decoder (nvJPEG too) decodes it; its pixels of the region are the full decode's."""
    lib = _lib_or_raise()
    data = _as_bytes(data)
    buf = np.empty(len(data) + 2 * 8192 + 4, dtype=np.uint8)  # room for a marker between rows (<= 8192 rows)
    info = (ctypes.c_long * 4)()
    err = ctypes.create_string_buffer(_ERR_LEN)
    if lib.rst_band(data, len(data), denom, x, y, w, h, buf.ctypes.data, buf.nbytes, info, err, _ERR_LEN) != 0:
        raise JpegError(f"JPEG sub-image ({x}, {y}, {w}, {h}) at 1/{denom}: {err.value.decode(errors='replace')}")
    return buf[: info[0]].tobytes(), int(info[1]), int(info[2])


def decode_region_restart(
    data: bytes, x: int, y: int, w: int, h: int, denom: int = 1, channels: int = 3
) -> tuple[np.ndarray, int]:
    """`decode_region`'s contract (same window, same pixels) by stream surgery: only the restart intervals of
    the region's MCU rows (with one interval per MCU: of its MCUs) are entropy-decoded. A JPEG without usable
    restart markers (not transcoded by `add_restart_markers`) decodes as `decode_region` does. Raises JpegError
    on corrupt data."""
    lib = _lib_or_raise()
    data = _as_bytes(data)
    buf = np.empty((w + _WIDEN) * h * channels, dtype=np.uint8)
    win = (ctypes.c_int * 4)()
    err = ctypes.create_string_buffer(_ERR_LEN)
    rc = lib.rst_decode(data, len(data), denom, x, y, w, h, channels, buf.ctypes.data, buf.nbytes, win, err,
                        _ERR_LEN)
    if rc < 0:
        raise JpegError(f"JPEG region ({x}, {y}, {w}, {h}) at 1/{denom} (restart surgery): "
                        f"{err.value.decode(errors='replace')}")
    x0, width, height = win[0], win[2], win[3]
    return buf[: width * height * channels].reshape(height, width, channels), x0
