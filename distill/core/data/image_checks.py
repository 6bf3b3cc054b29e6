"""Image decoding checks PIL does not do: PNG files whose pixel data stops early (PIL zero-fills the
missing rows when the chunk structure is intact) and 16-bit images (PIL's ``convert("RGB")``
clips 16-bit values at 255 instead of scaling them).
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from distill.core.errors import DataError

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _png_raw_size(width: int, height: int, depth: int, colour: int, interlace: int) -> int:
    """Bytes of the filtered (pre-zlib) image data of a PNG."""
    bits = _CHANNELS[colour] * depth
    if not interlace:
        return height * (1 + math.ceil(width * bits / 8))
    total = 0  # Adam7 passes: (x start, y start, x step, y step)
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        w, h = max(0, math.ceil((width - x0) / dx)), max(0, math.ceil((height - y0) / dy))
        if w and h:
            total += h * (1 + math.ceil(w * bits / 8))
    return total


def check_png_complete(path: Path) -> None:
    """Raise ``ValueError`` unless the PNG's zlib stream is complete and inflates to the full image."""
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_SIG):
        raise DataError("not a PNG file")
    pos, expected, inflater, produced, ended = 8, None, zlib.decompressobj(), 0, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise DataError(f"truncated PNG: chunk {kind!r} is cut off")
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
            expected = _png_raw_size(width, height, depth, colour, interlace)
        elif kind == b"IDAT":
            chunk = body
            while chunk and not inflater.eof:
                produced += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
        elif kind == b"IEND":
            ended = True
            break
        pos += 12 + length
    if not inflater.eof or (expected is not None and produced < expected):
        raise DataError(f"truncated PNG: pixel data ends after {produced} of {expected} bytes"
                         + ("" if ended else " (no IEND chunk)"))


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB; 16-bit grayscale is scaled (``>> 8``), not clipped at 255."""
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im)
        if im.mode == "I" and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"32-bit integer image with values {a.min()}..{a.max()} is not supported")
        return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")
