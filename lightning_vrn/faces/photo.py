"""Reading a photo as a person sees it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def read_photo(path: str | Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of an image file, as a viewer shows it: turned by its EXIF orientation (a phone's
    portrait photo is stored sideways), 16-bit and 32-bit greyscale scaled to 8 bits (Pillow's own conversion
    would clip them to white), an alpha channel dropped. Any failure to decode is a ValueError naming the cause."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):
                values = np.asarray(image, dtype=np.float64)
                grey = values / 257.0 if values.max() > 255 else values
                return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            return np.asarray(image.convert("RGB"))
    except Exception as error:  # Pillow raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"unreadable image ({' '.join(str(error).split())[:200]})") from error
