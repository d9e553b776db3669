"""The PyTorch side of bench/loader.sh: a torch DataLoader delivering the same ready training
batches as our loader, (a) from the JPEG files (Pillow decode, resize of the shorter side to 512,
random 448 crop, flip, to tensor, normalise, random erasing: what torchvision's transforms do for
a CUB-style recipe), (b) from a numpy memmap of raw pixels already resized (crop, flip, normalise,
erase in torch). Same workers and batch size; one untimed pass, then EPOCHS timed passes.

    python bench/loader_pytorch.py jpeg IMAGE_DIR WORKERS BATCH EPOCHS
    python bench/loader_pytorch.py memmap FILE.npy WORKERS BATCH EPOCHS
    python bench/loader_pytorch.py make-memmap IMAGE_DIR FILE.npy   (512x512 centre crops)
"""
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def augment(x, g):
    """x: uint8 (3, H, W) tensor of an image whose shorter side is 512."""
    _, h, w = x.shape
    top = int(torch.randint(h - 448 + 1, (1,), generator=g))
    left = int(torch.randint(w - 448 + 1, (1,), generator=g))
    x = x[:, top:top + 448, left:left + 448].float().div_(255)
    if torch.rand(1, generator=g) < 0.5:
        x = x.flip(2)
    x = (x - MEAN) / STD
    if torch.rand(1, generator=g) < 0.5:  # random erasing of a 2-33% area, aspect 0.3-3.3
        area = 448 * 448 * float(torch.empty(1).uniform_(0.02, 0.33, generator=g))
        ratio = float(torch.empty(1).uniform_(0.3, 3.3, generator=g))
        eh, ew = int(min(448, (area * ratio) ** 0.5)), int(min(448, (area / ratio) ** 0.5))
        i = int(torch.randint(448 - eh + 1, (1,), generator=g))
        j = int(torch.randint(448 - ew + 1, (1,), generator=g))
        x[:, i:i + eh, j:j + ew] = torch.randn(3, eh, ew, generator=g)
    return x


class Jpegs(Dataset):
    def __init__(self, root):
        self.paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".jpg"))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB")
            w, h = im.size
            size = (round(w * 512 / h), 512) if h <= w else (512, round(h * 512 / w))
            im = im.resize(size, Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        return augment(x, g), i % 10


class Memmap(Dataset):
    def __init__(self, path):
        self.a = np.load(path, mmap_mode="r")

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.from_numpy(np.array(self.a[i])).permute(2, 0, 1)
        return augment(x, g), i % 10


def make_memmap(root, out):
    paths = Jpegs(root).paths
    a = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(paths), 512, 512, 3))
    for k, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            size = (round(w * 512 / h), 512) if h <= w else (512, round(h * 512 / w))
            im = im.resize(size, Image.BILINEAR)
            left, top = (im.size[0] - 512) // 2, (im.size[1] - 512) // 2
            a[k] = np.asarray(im.crop((left, top, left + 512, top + 512)))
    a.flush()


def main():
    if sys.argv[1] == "make-memmap":
        make_memmap(sys.argv[2], sys.argv[3])
        return
    kind, src, workers, batch, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)
    ds = Jpegs(src) if kind == "jpeg" else Memmap(src)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    for _ in dl:
        pass
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for x, _ in dl:
            n += x.shape[0]
    secs = time.perf_counter() - start
    print(json.dumps({"kind": kind, "images": n, "seconds": secs, "images_per_sec": n / secs, "workers": workers}))


if __name__ == "__main__":
    main()
