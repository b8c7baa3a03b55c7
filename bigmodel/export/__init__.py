"""``bigmodel export RUN_DIR|CKPT --format timm|onnx|safetensors``: a checkpoint's model in a form
other tools load, with the preprocessing that feeds it.

Every format writes one folder (default ``RUN_DIR/export/FORMAT``) holding the weights and a
``config.json`` (:mod:`bigmodel.export.config`: timm's layout plus a ``bigmodel`` section).

- ``timm`` (:mod:`bigmodel.export.timm`): the backbone, and its class head where the checkpoint has
  one, as a timm model's state dict and the arguments that create it; what timm cannot express is
  refused with the setting and the reason.
- ``onnx`` (:mod:`bigmodel.export.onnx`): one ONNX model, ``images`` → ``logits`` and ``features``
  (``features`` alone without a class head). ``--out NAME.onnx`` names the model file itself, its
  ``config.json`` beside it; any other ``--out`` is a folder.
- ``safetensors``: ``backbone.safetensors``, the backbone's weights alone (no objective heads) under
  our own names: ``build.backbone(config["bigmodel"]["architecture"])`` loads them.

The checkpoint is rebuilt by the one loader (:func:`bigmodel.loader.load`): a pretraining run or a
fine-tune, from a safetensors or a sharded checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bigmodel import loader
from bigmodel.errors import ExportError
from bigmodel.export import onnx as onnx_format
from bigmodel.export import timm as timm_format
from bigmodel.export.config import config
from bigmodel.loader import Pretrained

FORMATS = ("timm", "onnx", "safetensors")


def write_safetensors(loaded: Pretrained, folder: Path) -> dict[str, Any]:
    """Write ``backbone.safetensors`` (the backbone's own names) into ``folder``; returns ``config.json``'s contents."""
    weights = {k: v.detach().contiguous() for k, v in loaded.backbone.state_dict().items()}
    save_file(weights, str(folder / "backbone.safetensors"), metadata={"format": "pt"})
    return config(loaded, "safetensors", 0, {})


def _destination(loaded: Pretrained, fmt: str, out: str | Path | None) -> tuple[Path, str | None]:
    """The folder to write into and, for ``--out NAME.onnx``, the model file's name."""
    if out is None:
        return loader.run_dir_of(loaded.checkpoint) / "export" / fmt, None
    out = Path(out)
    if out.suffix == ".onnx":
        if fmt != "onnx":
            raise ExportError(f"export --format {fmt} --out {out}: a name ending in .onnx is an ONNX model file; "
                              f"give --format onnx, or a folder")
        if out.is_dir():
            raise ExportError(f"export --out {out}: a folder of that name exists; a name ending in .onnx is the "
                              f"model file itself: move the folder aside or give another name")
        return out.parent, out.name
    if out.exists() and not out.is_dir():
        raise ExportError(f"export --out {out}: exists and is not a folder")
    return out, None


def export(source: str | Path, fmt: str, out: str | Path | None = None) -> dict[str, Any]:
    """Export the model of ``source`` (a run directory or a checkpoint folder) as ``fmt`` into
    ``out`` (default ``RUN_DIR/export/FORMAT``; for onnx, a name ending in ``.onnx`` is the model
    file, written with ``config.json`` beside it): weights and ``config.json``.

    Everything is built and checked in a temporary folder first, so a refusal or a failure writes
    nothing; files already there with the same names are replaced.

    Returns:
        ``{"format", "out", "files", "config"}``; ``out`` is the folder written into.

    Raises:
        ExportError: an unknown format, a bad ``out``, or a setting the format cannot express (one
            line naming it).
        CheckpointError: no checkpoint there, or one that cannot be rebuilt.
    """
    if fmt not in FORMATS:
        raise ExportError(f"export --format {fmt!r}: unknown format; valid: {', '.join(FORMATS)}")
    loaded = loader.load(source, device="cpu")
    folder, filename = _destination(loaded, fmt, out)
    tmp = Path(tempfile.mkdtemp(prefix=f"bigmodel-export-{fmt}-"))
    try:
        with torch.no_grad():
            if fmt == "timm":
                cfg = timm_format.write(loaded, tmp)
            elif fmt == "onnx":
                cfg = onnx_format.write(loaded, tmp, filename)
            else:
                cfg = write_safetensors(loaded, tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for f in sorted(tmp.iterdir()):
            shutil.move(f, folder / f.name)
            files.append(str(folder / f.name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"format": fmt, "out": str(folder), "files": files, "config": cfg}
