"""Loader throughput: per-image PIL augmentation vs bigmodel's batched tensor augmentation.

    nice -n 10 python benchmarks/loader_throughput.py [--data ../shared/data/cifar10.npz] [--epochs 2]

Both sides start from the same in-memory CIFAR-10 uint8 arrays and end with the same thing, a
normalised float batch ``(B, 3, 32, 32)`` ready for the model, in the same process run:

- PIL: torchvision.transforms on one PIL image at a time in a map-style Dataset, a DataLoader
  with 2 workers (the usual recipe);
- batched: bigmodel.data.loader.batches (in-memory tensors indexed directly) and the functions
  training calls on the whole batch, in the main process: bigmodel.data.augment.random_resized_crop
  (SimCLR's crop, the framework's only resized crop) and bigmodel.data.transforms.random_crop_flip
  (the supervised objective's pad-and-crop).

Two augmentation families: RandomResizedCrop + flip, and pad-4 random crop + flip. The batched
side is measured with 1 and with 2 intra-op threads (on a busy shared machine two threads can be
slower than one). Prints images/s and the ratios batched / PIL.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from bigmodel.data.augment import random_resized_crop
from bigmodel.data.base import from_numpy
from bigmodel.data.loader import batches
from bigmodel.data.transforms import random_crop_flip, to_input

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10.npz"


class PILImages(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def pil_rate(x, y, transform, batch_size: int, epochs: int, workers: int) -> float:
    loader = DataLoader(PILImages(x, y, T.Compose([transform, T.RandomHorizontalFlip(), T.PILToTensor()])),
                        batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True,
                        drop_last=True)
    for _ in loader:  # warm-up epoch: workers started, caches warm
        break
    n, t = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _labels in loader:
            batch = (images.float() / 255 - 0.5) / 0.5  # the same normalisation as to_input
            n += len(batch)
    return n / (time.perf_counter() - t)


def batched_rate(data, augment, batch_size: int, epochs: int) -> float:
    steps = epochs * (len(data) // batch_size)
    for images, _ in batches(data, batch_size, seed=0, stop=2):  # warm-up
        augment(to_input(images, 32, 3), torch.Generator().manual_seed(0))
    n, t = 0, time.perf_counter()
    for step, (images, _labels) in enumerate(batches(data, batch_size, seed=0, stop=steps)):
        out = augment(to_input(images, 32, 3), torch.Generator().manual_seed(step))
        n += len(out)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the PIL pipeline")
    p.add_argument("--threads", default="1,2", help="intra-op threads of the batched side, comma-separated")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    with np.load(args.data) as f:
        x, y = f["x_train"], f["y_train"]
    data = from_numpy(x, y)
    threads = [int(t) for t in args.threads.split(",")]
    print(f"CIFAR-10 train: {len(x)} images 32x32, batch {args.batch_size}, {args.epochs} epochs per measure; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; PIL with {args.workers} DataLoader workers")
    cases = {
        "random resized crop + flip": (
            T.RandomResizedCrop(32, antialias=True),
            lambda v, g: random_resized_crop(v, 32, g, flip_prob=0.5)),
        "pad-4 random crop + flip": (
            T.RandomCrop(32, padding=4, padding_mode="reflect"),
            lambda v, g: random_crop_flip(v, g, pad=4)),
    }
    rows = []
    for name, (pil_t, batched_t) in cases.items():
        pil = pil_rate(x, y, pil_t, args.batch_size, args.epochs, args.workers)
        row = {"augmentation": name, "pil_images_per_s": round(pil)}
        line = f"{name:<28} PIL per-image {pil:>8,.0f} img/s"
        for n in threads:
            torch.set_num_threads(n)
            ours = batched_rate(data, batched_t, args.batch_size, args.epochs)
            row[f"batched_{n}thread_images_per_s"], row[f"ratio_{n}thread"] = round(ours), round(ours / pil, 2)
            line += f" | batched ({n} thread{'s' if n > 1 else ''}) {ours:>8,.0f} img/s = {ours / pil:5.2f}x"
        rows.append(row)
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
