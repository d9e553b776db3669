"""Writes N CUB-like JPEGs (about 500x375, quality 90, smooth content plus noise) into
DIR/train/<class>/ and DIR/test/<class>/ for the folder source.

    python bench/make_cub_like.py DIR N
"""
import os
import sys

import numpy as np
from PIL import Image


def main():
    out, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (500, 375) if i % 3 else (375, 500)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * (1 + i % 5) + y) % 256, (y * 2 + i) % 256, (x + y * (i % 7)) % 256], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        split = "test" if (i // 10) % 10 == 0 else "train"
        d = os.path.join(out, split, f"class{i % 10:02d}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


if __name__ == "__main__":
    main()
