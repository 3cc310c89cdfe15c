"""Images from what users send: PIL images or arrays (`multi_modal_data`), and chat `image_url` parts (base64
data URLs; `file://` URLs only under `multimodal.allowed_local_media_path`). Nothing is ever fetched from a network:
an http(s) URL is refused. Every failure is a `MultiModalInputError` naming the item and the fix. The size cap
is checked from the image header, before the pixels are decoded."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from typing import Any
from urllib.parse import unquote, urlparse

from weavelm.errors import MultiModalInputError


def check_size(image: Any, where: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise MultiModalInputError(f"{where}: the image is {width}x{height} = {width * height} pixels, over the "
                                   f"limit of {max_pixels} (multimodal.max_image_pixels); send a smaller image")
    if width < 1 or height < 1:
        raise MultiModalInputError(f"{where}: the image is empty ({width}x{height})")


def decode_image(data: bytes, where: str, max_pixels: int) -> Any:
    """A PIL image from encoded bytes (PNG, JPEG, ...), fully decoded; MultiModalInputError when it cannot be."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise MultiModalInputError(f"{where}: cannot decode the image ({type(e).__name__}: {e}); send PNG, JPEG, "
                                   f"WebP or another format Pillow reads") from None
    check_size(image, where, max_pixels)
    try:
        image.load()
    except Exception as e:
        raise MultiModalInputError(f"{where}: the image data is corrupt ({type(e).__name__}: {e})") from None
    return image


def as_image(item: Any, where: str, max_pixels: int) -> Any:
    """A `multi_modal_data` image (PIL image, HxWxC uint8 array, or encoded bytes) as a PIL image."""
    from PIL import Image

    if isinstance(item, Image.Image):
        check_size(item, where, max_pixels)
        return item
    if isinstance(item, (bytes, bytearray)):
        return decode_image(bytes(item), where, max_pixels)
    shape = getattr(item, "shape", None)
    if shape is not None and len(shape) in (2, 3):
        import numpy as np

        if len(shape) == 3 and shape[2] not in (1, 3, 4) or int(shape[0]) * int(shape[1]) > max_pixels:
            raise MultiModalInputError(f"{where}: an image array must be HxW or HxWxC (C in 1, 3, 4) within "
                                       f"{max_pixels} pixels (got shape {tuple(shape)})")
        array = np.asarray(item)
        if array.dtype != np.uint8:
            raise MultiModalInputError(f"{where}: an image array must be uint8 (got {array.dtype})")
        return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    raise MultiModalInputError(f"{where}: expected a PIL.Image, a uint8 HxWxC array or encoded image bytes (got "
                               f"{type(item).__name__})")


def image_hash(image: Any) -> str:
    """A hash of the image's content (mode, size, pixels): equal images share prefix-cache blocks."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def load_image_url(url: Any, where: str, allowed_local_media_path: str, max_pixels: int) -> Any:
    """The image an `image_url` names: a `data:image/...;base64,` URL, or a `file://` URL inside
    `allowed_local_media_path`. Remote URLs are refused, never fetched."""
    if not isinstance(url, str) or not url:
        raise MultiModalInputError(f"{where}: must be a non-empty URL string")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise MultiModalInputError(f"{where}: a data URL must look like data:image/png;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MultiModalInputError(f"{where}: the data URL is not valid base64 ({e})") from None
        return decode_image(data, where, max_pixels)
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        return decode_image(_read_local(url, where, allowed_local_media_path), where, max_pixels)
    if scheme in ("http", "https"):
        raise MultiModalInputError(f"{where}: remote URLs are not fetched (weavelm never downloads media); send the "
                                   f"image inline as a base64 data URL (data:image/png;base64,...)")
    raise MultiModalInputError(f"{where}: unsupported URL scheme {scheme or url[:16]!r}; send a base64 data URL")


def _read_local(url: str, where: str, allowed: str) -> bytes:
    if not allowed:
        raise MultiModalInputError(f"{where}: file:// URLs are refused unless multimodal.allowed_local_media_path "
                                   f"names a directory that may be read")
    path = os.path.realpath(unquote(urlparse(url).path))
    root = os.path.realpath(allowed)
    if os.path.commonpath([path, root]) != root:
        raise MultiModalInputError(f"{where}: {path} is outside allowed_local_media_path ({root})")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise MultiModalInputError(f"{where}: cannot read {path} ({e.strerror})") from None
