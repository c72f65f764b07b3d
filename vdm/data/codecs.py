"""The yardstick for bits/dim: the test split's size under lossless codecs, in the same unit
(bits per subpixel), written by the preprocess stage into metrics/data.json."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def codec_bits_per_subpixel(images: np.ndarray) -> dict[str, float]:
    """Size of each (H, W, 3) uint8 image under lossless codecs, in bits per subpixel (the
    unit of bits/dim): PNG (Pillow, optimize) and WebP lossless (Pillow, method 6, quality 100)."""
    total = {"png": 0, "webp_lossless": 0}
    for img in images:
        im = Image.fromarray(np.asarray(img), "RGB")
        for fmt, kwargs, key in (
            ("PNG", {"optimize": True}, "png"),
            ("WEBP", {"lossless": True, "method": 6, "quality": 100}, "webp_lossless"),
        ):
            buf = io.BytesIO()
            im.save(buf, format=fmt, **kwargs)
            total[key] += buf.tell()
    subpixels = max(1, int(np.prod(images.shape)))
    return {k: 8.0 * v / subpixels for k, v in total.items()}
