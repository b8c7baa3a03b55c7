"""``bigmodel export``: timm and onnxruntime compute what our backbones compute, what timm cannot
express is refused with its reason, and every export carries its preprocessing.

Checkpoints here are built from recipes and saved without training, their weights perturbed away
from initialisation (zero-initialised residual branches and heads would hide a wrong mapping).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from bigmodel.analysis.figures import load_objective
from bigmodel.architectures.resnet import RESNET_STEMS
from bigmodel.cli import main
from bigmodel.export import export
from bigmodel.recipe import resolve
from bigmodel.registry import OBJECTIVES
from bigmodel.train import build, checkpoint

CLASSES = ["cat", "dog", "fish"]
VIT = ["run.tiny=true", "architecture.image_size=16", "architecture.patch_size=4"]  # quickstart: ViT-nano, grey


def saved_run(tmp: Path, recipe: str, overrides: list[str], name: str = "run") -> Path:
    """A run directory ``tmp/name`` holding one checkpoint of ``recipe`` (the objective with its
    heads; a class head names :data:`CLASSES`), as pretraining saves it, every weight perturbed by
    N(0, 0.05²)."""
    r = resolve(recipe, overrides, note=lambda _: None)
    torch.manual_seed(0)
    cls = OBJECTIVES.get(r.objective.name)
    classes = CLASSES if cls.needs_labels else []
    model = cls(backbone=build.backbone(r.architecture), num_classes=len(classes), **r.objective.kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp / name
    checkpoint.save(run / "checkpoints", 5, model, {}, {"recipe": r.raw, "num_classes": len(classes),
                                                        "classes": list(classes)})
    return run


def ours(run: Path):
    """The saved objective, rebuilt independently of the exporter, on the CPU."""
    return load_objective(run)[0].cpu()


def images(c: int, s: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(1))


def timm_from(folder: Path):
    """The exported model as the issue states it: create_model(name, **kwargs) + load_state_dict."""
    cfg = json.loads((folder / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model, cfg


def assert_timm_parity(run: Path, folder: Path, c: int, s: int) -> dict:
    model, cfg = timm_from(folder)
    objective = ours(run)
    x = images(c, s)
    with torch.no_grad():
        feats = objective.backbone(x)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), feats,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), objective.head(feats), atol=1e-5, rtol=0)
        # timm's own loader for such a folder gives the same model
        again = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    assert again.pretrained_cfg["label_names"] == CLASSES
    return cfg


@pytest.mark.parametrize("global_pool,in_chans", [("token", 1), ("avg", 3)])
def test_timm_vit_computes_our_features_and_logits(tmp_path, global_pool, in_chans):
    run = saved_run(tmp_path, "fractals-vit", [*VIT, f"architecture.global_pool={global_pool}",
                                             f"architecture.in_chans={in_chans}", f"data.channels={in_chans}"])
    result = export(run, "timm")
    folder = Path(result["out"])
    assert folder == run / "export" / "timm"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = assert_timm_parity(run, folder, in_chans, 16)
    assert cfg["architecture"] == "vit_tiny_patch16_224"  # the entry point; every size is in model_args
    assert cfg["model_args"] == {"img_size": 16, "patch_size": 4, "in_chans": in_chans, "embed_dim": 96, "depth": 4,
                                 "num_heads": 3, "class_token": True, "global_pool": global_pool, "fc_norm": False,
                                 "num_classes": 3}
    assert cfg["bigmodel"]["max_abs_difference"] <= 1e-5


@pytest.mark.parametrize("depth,name", [(18, "resnetv2_18"), (50, "resnetv2_50x1_bit")])
def test_timm_resnet_computes_our_features_and_logits(tmp_path, depth, name):
    run = saved_run(tmp_path, "supervised-resnet", ["run.tiny=true", f"architecture.depth={depth}",
                                                    "architecture.width=0.5", "architecture.stem=bit",
                                                    "architecture.image_size=32"])
    cfg = assert_timm_parity(run, Path(export(run, "timm")["out"]), 1, 32)
    assert cfg["architecture"] == name
    args = cfg["model_args"]
    assert (args["stem_chs"], args["in_chans"], args["num_classes"]) == (32, 1, 3)
    if depth == 18:  # weight standardisation folded into plain convolutions, BiT's stem and GroupNorm named
        assert args["channels"] == [32, 64, 128, 256] and args["layers"] == [2, 2, 2, 2]
        assert (args["basic"], args["stem_type"], args["norm_layer"]) == (True, "fixed", "groupnorm")
        assert cfg["bigmodel"]["weight_standardization"].startswith("folded")
    else:  # timm's BiT entry point: standardised convolutions in the model
        assert args == {"channels": [128, 256, 512, 1024], "stem_chs": 32, "in_chans": 1, "num_classes": 3}
        assert cfg["bigmodel"]["weight_standardization"].startswith("in the model")


TIMM_ARCH = {  # architecture: timm, tiny members of a CNN and a ViT family
    "convnext": "{name: timm, model: convnext_atto, image_size: 32, in_chans: 1, model_kwargs: "
                "{dims: [8, 16, 32, 64], depths: [1, 1, 1, 1]}}",
    "deit": "{name: timm, model: deit_tiny_patch16_224, image_size: 16, in_chans: 1, model_kwargs: "
            "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}}",
}


@pytest.mark.parametrize("kind", sorted(TIMM_ARCH))
def test_timm_architecture_exports_as_itself(tmp_path, kind):
    run = saved_run(tmp_path, "fractals-vit", ["run.tiny=true", f"architecture={TIMM_ARCH[kind]}"])
    s = 32 if kind == "convnext" else 16
    cfg = assert_timm_parity(run, Path(export(run, "timm")["out"]), 1, s)
    section = resolve("fractals-vit", ["run.tiny=true", f"architecture={TIMM_ARCH[kind]}"], note=lambda _: None).raw
    assert cfg["architecture"] == section["architecture"]["model"]
    expected = {"in_chans": 1, **section["architecture"]["model_kwargs"], "num_classes": 3}
    if kind == "deit":
        expected["img_size"] = 16
    assert cfg["model_args"] == expected


REFUSED = [
    ("small-stem", "supervised-resnet", ["run.tiny=true"],
     "export --format timm: architecture.stem='auto' at image_size=28 is the small-image stem (one 3x3 stride-2 "
     "convolution, no max-pool); timm's ResNetV2 has no such stem: each of its stem_type values "
     f"({RESNET_STEMS}) is a stride-2 convolution followed by a stride-2 max-pool (input / 4), and a config cannot "
     "replace it; use --format onnx or safetensors, or pretrain with architecture.stem=bit"),
    ("group-count", "supervised-resnet", ["run.tiny=true", "architecture.width=0.25", "architecture.stem=bit"],
     "export --format timm: architecture.groups=32, width=0.25: the GroupNorm stages.0.blocks.0.norm1 over 16 "
     "channels has 16 groups; timm's ResNetV2 makes every GroupNorm with 32 groups (norm_layer='groupnorm') and a "
     "config cannot set another count; use --format onnx or safetensors, or pretrain with groups=32 and a width "
     "whose channel counts are multiples of 32"),
    ("moe", "mae-vit-moe", ["run.tiny=true", "architecture.image_size=16"],
     "export --format timm: architecture.moe: blocks 2, 4 of 4 are mixture-of-experts MLPs (4 experts behind a "
     "router, top-2 routing); timm's VisionTransformer has one dense MLP per block, so no timm model holds these "
     "weights; use --format onnx or safetensors"),
    ("lstm", "pixel-lstm", ["run.tiny=true"],
     "export --format timm: architecture 'lstm' has no timm counterpart (timm has no recurrent backbones); use "
     "--format onnx or safetensors"),
]


@pytest.mark.parametrize("recipe,overrides,message", [pytest.param(*r[1:], id=r[0]) for r in REFUSED])
def test_timm_refuses_what_it_cannot_express_and_writes_nothing(tmp_path, capsys, recipe, overrides, message):
    run = saved_run(tmp_path, recipe, overrides)
    capsys.readouterr()
    assert main(["export", str(run), "--format", "timm"]) == 2
    assert capsys.readouterr().err == f"export error: {message}\n"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # no export folder, no temporary left


ONNX = [  # supervised checkpoints carry their classifier: logits and features
    ("vit", "fractals-vit", VIT, 1, 16, ["logits", "features"]),
    ("resnet-small-stem", "supervised-resnet", ["run.tiny=true", "architecture.image_size=16"], 1, 16,
     ["logits", "features"]),
    ("v-moe", "mae-vit-moe", ["run.tiny=true", "architecture.image_size=16"], 1, 16, ["features"]),
]


def assert_onnx_parity(path: Path, objective, c: int, s: int, outputs: list[str]) -> None:
    """onnxruntime on ``path`` gives the objective's features (and its head's logits) at batch 1 and 3."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and [o.name for o in session.get_outputs()] == outputs
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [c, s, s]  # the batch axis is symbolic
    backbone = objective.backbone.eval()  # eval: the V-MoE serves every token's choices
    for n in (1, 3):
        x = images(c, s, n)
        with torch.no_grad():
            feats = backbone(x)
            ref = {"features": feats, "logits": objective.head(feats) if "logits" in outputs else None}
        got = dict(zip(outputs, session.run(None, {"images": x.numpy()}), strict=True))
        assert got["features"].shape == (n, backbone.feature_dim)
        for name in outputs:
            torch.testing.assert_close(torch.from_numpy(got[name]), ref[name], atol=1e-4, rtol=0)


@pytest.mark.parametrize("recipe,overrides,c,s,outputs", [  # make test: the ViT; test-all: every family
    pytest.param(*r[1:], id=r[0], marks=() if r[0] == "vit" else pytest.mark.slow) for r in ONNX])
def test_onnx_matches_pytorch_at_any_batch_size(tmp_path, recipe, overrides, c, s, outputs):
    run = saved_run(tmp_path, recipe, overrides)
    result = export(run, "onnx")
    folder = Path(result["out"])
    name = "model.onnx" if "logits" in outputs else "backbone.onnx"
    assert sorted(p.name for p in folder.iterdir()) == sorted([name, "config.json"])
    assert_onnx_parity(folder / name, ours(run), c, s, outputs)
    onnx_cfg = result["config"]["bigmodel"]["onnx"]
    assert onnx_cfg["input"] == "images" and onnx_cfg["max_abs_difference"] <= 1e-4
    assert (onnx_cfg["file"], onnx_cfg["outputs"]) == (name, outputs)
    n = len(CLASSES) if "logits" in outputs else 0
    assert (result["config"]["num_classes"], result["config"].get("label_names")) == (n, CLASSES if n else None)


@pytest.mark.slow  # 7 s; test-all (CI) runs it
def test_onnx_out_ending_in_onnx_is_the_model_file(tmp_path):
    """``--out vit.onnx`` writes the model file ``vit.onnx`` with config.json beside it; any other
    name is a folder."""
    run = saved_run(tmp_path, "fractals-vit", VIT)
    out = tmp_path / "models" / "vit.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["config.json", "vit.onnx"]
    cfg = json.loads((out.parent / "config.json").read_text())
    assert cfg["bigmodel"]["onnx"]["file"] == "vit.onnx" and cfg["label_names"] == CLASSES
    assert_onnx_parity(out, ours(run), 1, 16, ["logits", "features"])
    folder = tmp_path / "vit-folder"
    assert Path(export(run, "onnx", folder)["out"]) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.onnx"]


@pytest.mark.parametrize("fmt,make_dir,message", [
    ("timm", False, "export error: export --format timm --out {out}: a name ending in .onnx is an ONNX model file; "
                    "give --format onnx, or a folder"),
    ("onnx", True, "export error: export --out {out}: a folder of that name exists; a name ending in .onnx is the "
                   "model file itself: move the folder aside or give another name"),
])
def test_onnx_names_are_refused_where_they_cannot_be_the_file(tmp_path, capsys, fmt, make_dir, message):
    run = saved_run(tmp_path, "fractals-vit", VIT)
    out = tmp_path / "vit.onnx"
    if make_dir:
        out.mkdir()
    capsys.readouterr()
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    assert capsys.readouterr().err == message.format(out=out) + "\n"
    assert out.is_dir() == make_dir and not (tmp_path / "config.json").exists()


def test_onnx_of_a_finetuned_checkpoint_is_its_classifier(tmp_path):
    """A fine-tune's ONNX model takes its test view (the centre crop) and gives the fine-tuned head's
    logits, as PyTorch's classifier does."""
    from bigmodel.data.base import TensorImages
    from bigmodel.transfer.finetune import Finetune

    run = saved_run(tmp_path, "fractals-vit", VIT)
    net = ours(run).backbone
    g = torch.Generator().manual_seed(0)
    train = TensorImages(torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8, generator=g),
                         torch.arange(24) % 3, classes=CLASSES)
    model, schedule = Finetune(steps=2, batch_size=8, checkpoint_dir=str(tmp_path / "ft")).fit(net, train)
    (folder,) = (tmp_path / "ft").iterdir()
    result = export(folder, "onnx", tmp_path / "ft.onnx")
    assert result["config"]["pretrained_cfg"]["input_size"] == [1, schedule.crop, schedule.crop]
    assert result["config"]["label_names"] == CLASSES and result["config"]["bigmodel"]["objective"] == "finetune"
    assert_onnx_parity(tmp_path / "ft.onnx", model.cpu(), 1, schedule.crop, ["logits", "features"])


def test_safetensors_holds_the_backbone_alone_with_its_preprocessing(tmp_path):
    run = saved_run(tmp_path, "fractals-vit", VIT)
    out = tmp_path / "elsewhere"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "config.json"]
    weights = load_file(str(out / "backbone.safetensors"))
    objective = ours(run)
    expected = objective.backbone.state_dict()
    assert weights.keys() == expected.keys()  # no head, no objective key
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrained_cfg"] == {"input_size": [1, 16, 16], "interpolation": "bilinear", "crop_pct": 1.0,
                                     "crop_mode": "center", "mean": [0.5], "std": [0.5], "num_classes": 0}
    recipe = json.loads(json.dumps(resolve("fractals-vit", VIT, note=lambda _: None).raw))
    section = cfg["bigmodel"]["architecture"]
    assert section == recipe["architecture"] == {"name": "vit", "size": "nano", "image_size": 16, "patch_size": 4,
                                                 "in_chans": 1}
    assert ((cfg["bigmodel"]["classes"], cfg["bigmodel"]["step"], cfg["bigmodel"]["objective"])
            == (CLASSES, 5, "supervised"))
    assert (cfg["num_classes"], cfg["num_features"]) == (0, 96)
    # the section and the weights rebuild the backbone
    from bigmodel.recipe import component
    from bigmodel.registry import ARCHITECTURES

    net = build.backbone(component("architecture", section, ARCHITECTURES)).eval()
    net.load_state_dict(weights, strict=True)
    x = images(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), objective.backbone(x), atol=0, rtol=0)


def test_timm_preprocessing_says_how_inputs_are_made(tmp_path):
    """to_input: x / 255 for every channel, then (x - 0.5) / 0.5, bilinear resizing, whole image."""
    run = saved_run(tmp_path, "fractals-vit", [*VIT, "architecture.in_chans=3", "data.channels=3"])
    cfg = json.loads((Path(export(run, "timm")["out"]) / "config.json").read_text())
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, 16, 16] and pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3
    assert ((pre["interpolation"], pre["crop_pct"], pre["num_classes"], pre["classifier"])
            == ("bilinear", 1.0, 3, "head"))
    assert cfg["label_names"] == CLASSES
    from bigmodel.data.transforms import to_input

    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    by_cfg = (u8.float() / 255 - torch.tensor(pre["mean"])[:, None, None]) / torch.tensor(pre["std"])[:, None, None]
    torch.testing.assert_close(by_cfg, to_input(u8, 16, 3))
