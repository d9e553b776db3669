"""The Pillow baseline for `datasets-prep pack`: decode, resize the shorter side with Pillow's
antialiased BILINEAR (what the reference does), and store raw pixels, on N worker processes.

    python bench/pack_vs_pillow.py IMAGE_DIR OUT_FILE SHORT_SIDE WORKERS [fsync]
With `fsync`, the output is flushed to disk before the clock stops (what `datasets-prep pack`
does before it renames its output into place); without it, the output may still be in the page
cache. Prints one line: images, seconds, images/s.
"""
import os
import sys
import time
from multiprocessing import Pool

from PIL import Image


def work(path, short=int(sys.argv[3])):
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if h <= w:
            size = (round(w * short / h), short)
        else:
            size = (short, round(h * short / w))
        return im.resize(size, Image.BILINEAR).tobytes()


def main():
    src, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[4])
    durable = sys.argv[5:] == ["fsync"]
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(src) for f in fs if f.endswith(".jpg"))
    start = time.perf_counter()
    with Pool(workers) as pool, open(out, "wb") as f:
        for pixels in pool.imap(work, paths, chunksize=8):
            f.write(pixels)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    secs = time.perf_counter() - start
    print(f"{len(paths)} {secs:.3f} {len(paths) / secs:.1f}")


if __name__ == "__main__":
    main()
