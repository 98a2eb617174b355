"""Reading conditioning images: the one place that opens and resizes them."""

from __future__ import annotations

import os

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image that is missing, unreadable or unusable; the message names the file and the reason."""


def load_image(path: str):
    """Open an image as RGB (an alpha channel is dropped, as in the original scripts)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path} is not a readable image ({e.__class__.__name__}: {e})") from e


def fit_to_multiple(image, multiple: int = 64, min_size: int = 64):
    """Resize each side down to a multiple of `multiple` (the original scripts' behaviour); returns (image, resized)."""
    from PIL import Image

    w, h = image.size
    if w < min_size or h < min_size:
        raise ImageError(f"image is {w}x{h}; the model needs at least {min_size}x{min_size} pixels")
    nw, nh = w - w % multiple, h - h % multiple
    if (nw, nh) == (w, h):
        return image, False
    return image.resize((nw, nh), Image.BICUBIC), True


def resize_center_crop(image, width: int, height: int):
    """Scale to cover width x height keeping the aspect ratio, then crop the centre (e.g. 1024x576)."""
    from PIL import Image

    w, h = image.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return image.crop((left, top, left + width, top + height))


def list_images(paths: list[str]) -> list[str]:
    """Files as given, folders expanded to their images (sorted, not recursive)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ImageError(f"folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        else:
            out.append(p)
    return out


def to_uint8(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
