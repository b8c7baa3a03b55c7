"""Grad-CAM (Selvaraju et al., 2017, arXiv:1610.02391) for CNN (``resnet``) backbones.

For a class ``c`` and the backbone's last feature map ``A`` ``(K, h, w)`` (ResNetV2's
pre-activated final map, :meth:`ResNet.forward_features`), Grad-CAM is
``ReLU(Σ_k α_k A_k)`` with ``α_k`` the spatial mean of ``∂y_c / ∂A_k``, upsampled (bilinear) to the
image size. ``y_c`` is the logit of the predicted class under a linear classifier on the pooled
features: the supervised objective's head when the model has one, else a logistic-regression
probe fitted on the pooled features of the images shown (enough for a figure; it is not a
measurement). With global average pooling and a linear head this is the CAM of Zhou et al. (2016):
``α_k = W[c, k] / (h·w)``.

:func:`make` writes ``gradcam.png``: one row per image, the image beside its heat-map overlay,
the predicted class (and the label, when known) in the title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.architectures.resnet import ResNet
from bigmodel.objectives.supervised import Supervised
from bigmodel.transfer.linear import fit_probe

MAX_IMAGES = 8  # rows of the figure


def linear_head(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> nn.Linear | None:
    """The classifier whose logits Grad-CAM explains: ``model.head`` for the supervised objective,
    else a logistic-regression probe on the pooled features of ``images`` (uint8 ``(N, C, H, W)``),
    folded with its standardisation into one ``nn.Linear`` whose output ``j`` is the score of class
    ``j`` (classes absent from ``labels`` score ``-inf``). None when ``labels`` hold fewer than two
    known classes."""
    if isinstance(model, Supervised):
        return model.head
    known = labels >= 0
    classes = torch.unique(labels[known])
    if len(classes) < 2:
        return None

    net = model.backbone
    with torch.no_grad():
        x = model.to_input(images[known]).to(_device(net))
        feats = _eval(net, lambda: net(x)).double().cpu().numpy()
    scaler, clf, _ = fit_probe(feats, labels[known].numpy(), C=1.0, max_iter=1000, tol=1e-4, solver="lbfgs")
    w = clf.coef_ / scaler.scale_  # (1 or C', D): standardisation folded in
    b = clf.intercept_ - w @ scaler.mean_
    if len(clf.classes_) == 2:  # sklearn's binary model scores only the second class
        w, b = np.concatenate([np.zeros_like(w), w]), np.concatenate([np.zeros_like(b), b])
    n_out = int(classes.max()) + 1
    head = nn.Linear(feats.shape[1], n_out).to(_device(net))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-float("inf"))
        idx = torch.as_tensor(clf.classes_, dtype=torch.long, device=head.weight.device)
        head.weight[idx] = torch.as_tensor(w, dtype=head.weight.dtype, device=idx.device)
        head.bias[idx] = torch.as_tensor(b, dtype=head.bias.dtype, device=idx.device)
    return head


def gradcam(backbone: ResNet, head: nn.Module, x: torch.Tensor, size: tuple[int, int] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of the predicted class.

    Args:
        backbone: a ResNet; run in eval mode here (its mode is restored).
        head: pooled features ``(B, D)`` → logits ``(B, classes)``.
        x: normalised inputs ``(B, C, H, W)``.
        size: ``(height, width)`` to upsample the maps to; default the input's.

    Returns:
        ``cam`` ``(B, *size)`` (not normalised; ≥ 0) and the predicted classes ``(B,)``.
    """
    size = tuple(x.shape[-2:]) if size is None else size

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            fmap = backbone.forward_features(x).detach().requires_grad_(True)  # (B, K, h, w)
            logits = head(backbone.pool(fmap))
            pred = logits.argmax(-1)
            (grad,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), fmap)
        alpha = grad.mean((2, 3), keepdim=True)  # (B, K, 1, 1)
        cam = F.relu((alpha * fmap.detach()).sum(1, keepdim=True))  # (B, 1, h, w)
        return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0], pred

    return _eval(backbone, run)


def make(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, out: Path) -> Path | None:
    """Write ``out/gradcam.png`` for a ResNet backbone; None for other families (or when no
    classifier can be had: no head and fewer than two known classes in ``labels``)."""
    if not isinstance(getattr(model, "backbone", None), ResNet):
        return None
    images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
    head = linear_head(model, images, labels)
    if head is None:
        return None
    n = min(MAX_IMAGES, len(images))
    shown, shown_labels = images[:n], labels[:n]
    x = model.to_input(shown).to(_device(model.backbone))
    cam, pred = gradcam(model.backbone, head, x, size=tuple(shown.shape[-2:]))
    source = "the objective's classifier" if head is getattr(model, "head", None) else \
        "a linear probe fitted on these images"
    return _figure(shown, shown_labels, cam.cpu(), pred.cpu(), source, Path(out) / "gradcam.png")


def _figure(images: torch.Tensor, labels: torch.Tensor, cam: torch.Tensor, pred: torch.Tensor,
            source: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    pairs = 4 if n >= 4 else n  # image | overlay pairs per figure row
    rows = -(-n // pairs)
    fig, grid = plt.subplots(rows, 2 * pairs, figsize=(2.1 * 2 * pairs, 2.3 * rows + 0.8), dpi=100,
                             squeeze=False, layout="constrained")
    for ax in grid.flat:
        ax.set_axis_off()
    im = None
    for i in range(n):
        left, right = grid[i // pairs, 2 * (i % pairs)], grid[i // pairs, 2 * (i % pairs) + 1]
        img = _display(images[i])
        heat = cam[i] / cam[i].max() if cam[i].max() > 0 else cam[i]
        grey = img.ndim == 2
        left.imshow(img, cmap="gray" if grey else None, vmin=0, vmax=1)
        known = f"label {int(labels[i])}, " if labels[i] >= 0 else ""
        left.set_title(f"{known}pred. {int(pred[i])}", fontsize=9)
        right.imshow(img, cmap="gray" if grey else None, vmin=0, vmax=1)
        im = right.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        right.set_title(f"Grad-CAM, class {int(pred[i])}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=grid, fraction=0.02, pad=0.01, label="CAM / max")
    fig.suptitle(f"Grad-CAM of the predicted class\n(logits of {source})", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _display(image: torch.Tensor) -> np.ndarray:
    """uint8 ``(C, H, W)`` → float ``(H, W)`` (grey) or ``(H, W, 3)`` in [0, 1]."""
    img = image.float().numpy() / 255.0
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _eval(module: nn.Module, fn):
    """``fn()`` with ``module`` in eval mode, its mode restored after."""
    was = module.training
    module.eval()
    try:
        return fn()
    finally:
        module.train(was)
