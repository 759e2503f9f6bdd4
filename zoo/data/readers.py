"""Low-level readers for the on-disk formats (numpy in, numpy out; no torch, no torchvision downloads).

- IDX (MNIST): big-endian header ``0x00 0x00 <dtype> <ndim>`` then ``ndim`` uint32 sizes then the raw array.
- ConvNetJS CIFAR-10 sprites: PNG 1024 wide x 1000 high, RGB; row i is image i; pixel (y, x) of the image is
  column ``32 * y + x``.
- ConvNetJS label file: ``var labels=[6, 9, ...];``.

Every reader raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for a corrupt one.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import numpy as np

# IDX magic = (dtype code << 8) | ndim; MNIST only uses unsigned bytes (code 0x08).
IDX_UBYTE = 0x08
IDX_LABELS_MAGIC = (IDX_UBYTE << 8) | 1  # 2049
IDX_IMAGES_MAGIC = (IDX_UBYTE << 8) | 3  # 2051

CIFAR_SPRITE_SIZE = 32  # side of one CIFAR image
CIFAR_SPRITE_ROWS = 1000  # images per sprite PNG


def _corrupt(path: Path, what: str) -> ValueError:
    return ValueError(
        f"Corrupt data file {path}: {what}. Replace it with an intact copy (the dataset folder's SOURCE.txt "
        "lists the sha256 of every file)."
    )


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip-compressed when the name ends in ``.gz``) into a uint8 array.

    Args:
        path: the ``.gz`` or uncompressed IDX file.
        expected_magic: 2049 for a label file (result ``[N]``), 2051 for an image file (result ``[N, H, W]``);
            None accepts any unsigned-byte IDX file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: truncated gzip stream, wrong magic number, or payload size not matching the header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, OSError, zlib.error) as err:
        # EOFError: truncated stream; gzip.BadGzipFile (an OSError): not gzip at all; zlib.error: bad deflate data.
        raise _corrupt(path, f"cannot decompress ({type(err).__name__}: {err})") from err
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes, shorter than the 4-byte IDX magic number")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or raw[3] == 0:
        raise _corrupt(path, f"magic number {magic} is not an unsigned-byte IDX magic (2049 labels, 2051 images)")
    if expected_magic is not None and magic != expected_magic:
        raise _corrupt(path, f"magic number {magic}, expected {expected_magic}")
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise _corrupt(path, f"header needs {header_len} bytes, file has {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise _corrupt(path, f"header says shape {shape} ({expected} bytes in all), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def read_cifar_sprite(path: str | Path) -> np.ndarray:
    """Decode one ConvNetJS CIFAR-10 sprite PNG into ``[N, C, H, W]`` = ``[1000, 3, 32, 32]`` uint8.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a readable PNG or not 1024 x 1000 RGB.
    """
    from PIL import Image, UnidentifiedImageError  # Pillow comes with torchvision

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR sprite not found: {path}")
    width = CIFAR_SPRITE_SIZE * CIFAR_SPRITE_SIZE
    try:
        with Image.open(path) as img:
            if img.mode != "RGB":
                raise _corrupt(path, f"mode {img.mode}, expected RGB")
            if img.size != (width, CIFAR_SPRITE_ROWS):
                raise _corrupt(path, f"size {img.size[0]}x{img.size[1]}, expected {width}x{CIFAR_SPRITE_ROWS}")
            pixels = np.asarray(img, dtype=np.uint8)  # [rows, 1024, 3]; forces the full decode
    except (UnidentifiedImageError, OSError, SyntaxError, zlib.error) as err:
        raise _corrupt(path, f"cannot decode PNG ({type(err).__name__}: {err})") from err
    # Column 32*y + x, so a row reshapes to [y, x] directly (row-major); then channels first.
    images = pixels.reshape(CIFAR_SPRITE_ROWS, CIFAR_SPRITE_SIZE, CIFAR_SPRITE_SIZE, 3)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


_LABELS_RE = re.compile(r"\[([^\]]*)\]")


def read_convnetjs_labels(path: str | Path, num_classes: int = 10) -> np.ndarray:
    """Parse ``var labels=[...];`` into an int64 array ``[N]`` and check every label is in ``[0, num_classes)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no ``[...]`` list, a non-integer entry, or a label out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Label file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    match = _LABELS_RE.search(text)
    if match is None:
        raise _corrupt(path, "no '[...]' label list found")
    try:
        labels = np.array([int(tok) for tok in match.group(1).split(",") if tok.strip()], dtype=np.int64)
    except ValueError as err:
        raise _corrupt(path, f"non-integer label ({err})") from err
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(path, f"labels span [{labels.min()}, {labels.max()}], expected [0, {num_classes - 1}]")
    return labels
