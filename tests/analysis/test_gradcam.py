"""Grad-CAM against a reference computed by hand from hooked activations and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigmodel.analysis import gradcam
from bigmodel.architectures.resnet import ResNet
from bigmodel.architectures.vit import ViT
from bigmodel.objectives.base import Objective
from bigmodel.objectives.supervised import Supervised
from bigmodel.transfer.linear import fit_probe


def _resnet(image_size: int = 16) -> ResNet:
    torch.manual_seed(0)
    # zero_init_last=False: random residual branches, so the map is not just the stem's
    return ResNet(depth=18, width=0.125, image_size=image_size, in_chans=1, zero_init_last=False)


def _images(n: int, side: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, side, side), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_cam_equals_hand_computation_from_hooks():
    model = Supervised(_resnet(), num_classes=3)
    x = model.to_input(_images(4))
    cam, pred = gradcam.gradcam(model.backbone, model.head, x)

    # reference: hook the last feature map (ResNetV2's final norm+ReLU), backprop the predicted logit
    seen = {}

    def keep(module, args, output):
        seen["A"] = output
        output.register_hook(lambda g: seen.__setitem__("G", g))

    handle = model.backbone.net.norm.register_forward_hook(keep)
    model.eval()
    logits = model.head(model.backbone(x))
    handle.remove()
    ref_pred = logits.argmax(-1)
    logits[torch.arange(4), ref_pred].sum().backward()
    a, g = seen["A"].detach(), seen["G"]
    assert a.shape == (4, model.backbone.feature_dim, 2, 2)  # 16 px → 16, 8, 4, 2
    ref = torch.zeros(4, 2, 2)
    for i in range(4):
        for k in range(a.shape[1]):
            ref[i] += g[i, k].mean() * a[i, k]
    ref = F.interpolate(ref.clamp_min(0)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]

    assert torch.equal(pred, ref_pred)
    assert cam.shape == (4, 16, 16)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-7)
    # average pooling + linear head: α_k = W[c, k] / (h·w) (the CAM of Zhou et al., 2016)
    w = model.head.weight[pred].detach()
    cam_small = torch.einsum("bk,bkhw->bhw", w, a).clamp_min(0) / 4
    torch.testing.assert_close(F.interpolate(cam_small[:, None], size=(16, 16), mode="bilinear")[:, 0], cam,
                               rtol=1e-5, atol=1e-7)
    assert cam.max() > 0


def test_cam_upsampled_to_requested_image_size():
    model = Supervised(_resnet(), num_classes=3)
    cam, pred = gradcam.gradcam(model.backbone, model.head, model.to_input(_images(2)), size=(28, 28))
    assert cam.shape == (2, 28, 28) and pred.shape == (2,)


def test_probe_head_scores_like_the_sklearn_probe():
    model = Objective(_resnet())  # no classifier head: a probe is fitted
    images = _images(30)
    labels = torch.arange(30) % 3
    labels[-1] = -1  # unknown label: left out of the fit
    head = gradcam.linear_head(model, images, labels)
    with torch.no_grad():
        feats = model.backbone.eval()(model.to_input(images[:29])).double()
    scaler, clf, _ = fit_probe(feats.numpy(), labels[:29].numpy(), C=1.0, max_iter=1000, tol=1e-4, solver="lbfgs")
    expected = torch.as_tensor(clf.decision_function(scaler.transform(feats.numpy())))
    got = head(feats.float()).double().detach()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_binary_probe_and_missing_classes():
    model = Objective(_resnet())
    images = _images(20)
    labels = torch.where(torch.arange(20) % 2 == 0, 1, 3)  # classes 1 and 3 only
    head = gradcam.linear_head(model, images, labels)
    assert head.out_features == 4
    assert torch.isinf(head.bias[[0, 2]]).all() and not torch.isinf(head.bias[[1, 3]]).any()
    with torch.no_grad():
        feats = model.backbone.eval()(model.to_input(images)).double()
    scaler, clf, _ = fit_probe(feats.numpy(), labels.numpy(), C=1.0, max_iter=1000, tol=1e-4, solver="lbfgs")
    pred = head(feats.float()).argmax(-1)
    assert torch.equal(pred, torch.as_tensor(clf.predict(scaler.transform(feats.numpy()))))
    assert gradcam.linear_head(model, images, torch.full((20,), -1)) is None


def test_make_writes_png_and_skips_other_families(tmp_path):
    model = Supervised(_resnet(), num_classes=3)
    path = gradcam.make(model, _images(3), torch.tensor([0, 1, 2]), tmp_path)
    assert path == tmp_path / "gradcam.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vit = Supervised(ViT(size="nano", image_size=16, patch_size=4, in_chans=1), num_classes=3)
    assert gradcam.make(vit, _images(3), torch.tensor([0, 1, 2]), tmp_path / "v") is None
    assert gradcam.make(Objective(_resnet()), _images(3), torch.full((3,), -1), tmp_path / "n") is None
