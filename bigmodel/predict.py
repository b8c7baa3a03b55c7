"""``bigmodel predict RUN_DIR|CKPT IMAGE... [--top-k 5]``: the most probable classes of image files,
from a checkpoint with a class head — a ``supervised`` pretraining or a fine-tune (``bigmodel
transfer ... --protocol finetune --set checkpoint_dir=DIR`` keeps its checkpoints under ``DIR``).

Images are read as our image-folder data is (PIL, converted to the model's channels: ``L`` for
grey models, ``RGB`` for colour ones), cut to their centre square when they are not square, and
turned into the model's input exactly as in evaluation (:meth:`bigmodel.loader.Pretrained.preprocess`:
:func:`~bigmodel.data.transforms.to_input`'s bilinear resize to the backbone's size and
normalisation, or a fine-tuned model's centre crop). Class names come from the training data
(``classes`` in the checkpoint's meta), else the label index.

A self-supervised checkpoint (simclr, mae, autoregressive) has no class head: it is refused with
the way to get one (fine-tune it first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel import loader
from bigmodel.data.imagefolder import centre_square
from bigmodel.errors import CheckpointError, ImageError, RecipeError
from bigmodel.loader import Pretrained

BATCH = 256  # images per forward pass


def read_image(path: str | Path, channels: int) -> torch.Tensor:
    """An image file → uint8 ``(channels, S, S)``: decoded by PIL, converted to ``L`` (1 channel)
    or ``RGB`` (3), and cut to its centre ``S × S`` square, ``S`` its shorter side.

    Raises:
        ImageError: no such file, a folder, or a file PIL cannot decode (one line naming it).
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file (give image files)")
    try:
        with Image.open(path) as im:
            im.load()  # decodes the whole file: truncated data raises here
            im = im.convert("L" if channels == 1 else "RGB")
    except Exception as e:  # noqa: BLE001  (PIL raises many kinds: UnidentifiedImageError, OSError, ...)
        why = f"{type(e).__name__}: {e}".replace(str(path), "<file>")
        raise ImageError(f"{path}: not an image PIL can read ({why})") from None
    a = np.asarray(centre_square(im))  # as an imagefolder cuts its images
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a.copy())  # PIL's buffer is read-only


def classifier(source: str | Path) -> Pretrained:
    """The checkpoint of ``source`` with its class head, on the CPU.

    Raises:
        CheckpointError: the checkpoint cannot be loaded, or has no class head (self-supervised).
    """
    loaded = loader.load(source, device="cpu")
    if loaded.head is None:
        raise CheckpointError(
            f"predict: {source} is a {loaded.kind} checkpoint (self-supervised): it has no class head. Fine-tune "
            f"it on labelled data first, keeping the checkpoints: bigmodel transfer {source} --task TASK --protocol "
            f"finetune --set checkpoint_dir=DIR, then bigmodel predict DIR/<the folder it made> IMAGE...")
    return loaded


@torch.inference_mode()
def probabilities(loaded: Pretrained, images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``(N, C, S, S)`` (one size) → class probabilities ``(N, num_classes)``, float32."""
    out = []
    for i in range(0, len(images), BATCH):
        x = loaded.preprocess(images[i:i + BATCH])
        out.append(loaded.logits(x).float().softmax(-1))
    return torch.cat(out)


def predict(source: str | Path, images: list[str | Path], top_k: int = 5) -> list[dict[str, Any]]:
    """The ``top_k`` most probable classes (at most all of them) of each image file.

    Returns:
        One ``{"image": path, "top": [{"class": name, "index": i, "prob": p}, ...]}`` per image, in
        the order given, most probable first.

    Raises:
        RecipeError: a bad ``top_k`` or no image.
        CheckpointError: no checkpoint there, or one without a class head.
        ImageError: an image file that cannot be read.
    """
    if top_k < 1:
        raise RecipeError(f"predict --top-k {top_k}: must be at least 1")
    if not images:
        raise RecipeError("predict: give at least one image file")
    loaded = classifier(source)
    decoded = [read_image(p, loaded.backbone.in_chans) for p in images]
    by_size: dict[tuple[int, ...], list[int]] = {}  # files of one size share a batch
    for i, image in enumerate(decoded):
        by_size.setdefault(tuple(image.shape), []).append(i)
    probs: list[torch.Tensor] = [torch.empty(0)] * len(decoded)
    for index in by_size.values():
        for i, row in zip(index, probabilities(loaded, torch.stack([decoded[i] for i in index])), strict=True):
            probs[i] = row
    results = []
    for path, row in zip(images, probs, strict=True):
        p, idx = row.topk(min(top_k, len(row)))
        results.append({"image": str(path), "top": [{"class": loaded.labels[i], "index": i, "prob": float(q)}
                                                    for q, i in zip(p.tolist(), idx.tolist(), strict=True)]})
    return results


def lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per image: the path, then ``name prob`` for each class, tab-separated (class names
    may hold spaces)."""
    return ["\t".join([r["image"], *(f"{t['class']} {t['prob']:.4f}" for t in r["top"])]) for r in results]
