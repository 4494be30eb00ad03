"""Turn a request into the float32 batch [B, C, H, W] in [0, 1] the model takes, or refuse it
with a status and a message that says what to fix. Nothing here trusts the client: images are
size-checked before decoding, tensors are checked for shape, finiteness and range, and whatever
the decoders raise on a client's bytes (Pillow and NumPy raise OSError, ValueError, SyntaxError,
struct.error, EOFError, DecompressionBombError, ... on malformed files) is a RequestError, never a
500."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("PNG", "JPEG")


class RequestError(Exception):
    """A client error: `status` (4xx) and a message for the client; `reason` labels the
    rejected-requests metric."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class InputSpec:
    channels: int
    size: int
    max_batch_size: int
    max_image_pixels: int

    @property
    def shape(self) -> str:
        return f"[B, {self.channels}, {self.size}, {self.size}]"


def from_tensor(data, spec: InputSpec, what: str = "inputs") -> np.ndarray:
    """A JSON nested list or a NumPy array, checked against the model's input."""
    try:
        x = np.asarray(data, dtype=np.float32)
    except Exception:  # ragged lists, strings, objects, structured dtypes
        raise RequestError(400, "bad_tensor", f"{what} must be a rectangular array of numbers {spec.shape}") from None
    if x.size == 0:
        check_batch(0, spec)
    if x.ndim != 4:
        hint = "; wrap a single image in one more list" if x.ndim == 3 else ""
        raise RequestError(400, "bad_shape", f"{what} must have rank 4 {spec.shape}, got rank {x.ndim} "
                                             f"with shape {list(x.shape)}{hint}")
    check_batch(len(x), spec)
    if x.shape[1] != spec.channels:
        raise RequestError(400, "bad_shape", f"{what} has {x.shape[1]} channels; the model takes {spec.channels} "
                                             f"{spec.shape}")
    if x.shape[2:] != (spec.size, spec.size):
        raise RequestError(400, "bad_shape", f"{what} is {x.shape[2]}x{x.shape[3]}; the model takes "
                                             f"{spec.size}x{spec.size} {spec.shape} (send an image file to have it resized)")
    if not np.isfinite(x).all():
        raise RequestError(400, "not_finite", f"{what} contains NaN or infinity")
    if x.min() < 0 or x.max() > 1:
        raise RequestError(400, "out_of_range", f"{what} has values in [{x.min():g}, {x.max():g}]; pixels must be "
                                                f"in [0, 1] (divide 8-bit values by 255)")
    return np.ascontiguousarray(x)


def from_npy(data: bytes | Path, spec: InputSpec) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(read(data)), allow_pickle=False)
    except Exception as e:  # ValueError, OSError, EOFError, TypeError, ...: the client's file, not our bug
        raise RequestError(400, "bad_tensor", f"tensor is not a readable .npy file ({describe(e)}); write it with "
                                              f"np.save, no pickled objects") from None
    return from_tensor(array, spec, "tensor")


def from_images(files: list[bytes | Path], spec: InputSpec) -> np.ndarray:
    check_batch(len(files), spec)
    return np.stack([decode_image(f, i, spec) for i, f in enumerate(files)])


def decode_image(data: bytes | Path, index: int, spec: InputSpec) -> np.ndarray:
    """PNG or JPEG -> [C, H, W] float32: grey or RGB as the model needs, resized to its input."""
    try:
        image = Image.open(io.BytesIO(read(data)))
    except UnidentifiedImageError:
        raise RequestError(415, "not_an_image", f"images[{index}] is not an image; send PNG or JPEG") from None
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours: refused before our check
        raise RequestError(413, "image_too_large", f"images[{index}] has more pixels than Pillow decodes; the limit "
                                                   f"is {spec.max_image_pixels} pixels") from None
    except Exception as e:  # a header that lies (truncated IHDR, a chunk longer than the file, ...)
        raise RequestError(400, "corrupt_image", f"images[{index}] has a corrupt header ({describe(e)}); "
                                                 f"re-encode it as PNG or JPEG") from None
    if image.format not in IMAGE_FORMATS:
        raise RequestError(415, "not_an_image", f"images[{index}] is {image.format}; send PNG or JPEG")
    if image.width * image.height > spec.max_image_pixels:  # the header is read, the pixels are not yet
        raise RequestError(413, "image_too_large", f"images[{index}] is {image.width}x{image.height}; the limit is "
                                                   f"{spec.max_image_pixels} pixels")
    try:
        image.load()
        image = image.convert("L" if spec.channels == 1 else "RGB")
    except Exception as e:  # truncated or corrupt pixel data, an unconvertible mode
        raise RequestError(400, "corrupt_image", f"images[{index}] is truncated or corrupt ({describe(e)}); "
                                                 f"re-encode it") from None
    if image.size != (spec.size, spec.size):
        image = image.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if spec.channels == 1 else pixels.transpose(2, 0, 1)


def read(data: bytes | Path) -> bytes:
    return data if isinstance(data, (bytes, bytearray)) else Path(data).read_bytes()


def describe(error: Exception) -> str:
    """An exception as the client may see it: its class and the start of its message."""
    text = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_batch(n: int, spec: InputSpec) -> None:
    if n == 0:
        raise RequestError(400, "empty_batch", "the batch is empty; send at least one input")
    if n > spec.max_batch_size:
        raise RequestError(413, "batch_too_large", f"{n} inputs in one request; the limit is {spec.max_batch_size}: "
                                                   f"split the batch")
