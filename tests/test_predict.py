"""``bigmodel predict``: image files in, the classes the model itself ranks first out, named from
the training data; a checkpoint without a class head is refused with the way to get one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bigmodel import api
from bigmodel.cli import main
from bigmodel.data.transforms import to_input
from bigmodel.errors import ImageError
from bigmodel.export import export
from bigmodel.predict import predict, read_image
from bigmodel.train import checkpoint

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHOWN = 6  # test digits written as PNG files


@pytest.fixture(scope="module")
def mnist(tmp_path_factory, synthetic_dir) -> dict:
    """The generated MNIST's (tests/conftest.py) first 512 training and 64 test images in an npz that
    names the classes, a tiny supervised ViT pretrained on it for a few steps (16 px input: the 28 px
    digits are resized by ``to_input``), and PNG files of the first test digits."""
    root = tmp_path_factory.mktemp("predict")
    with np.load(synthetic_dir / "mnist.npz") as d:
        arrays = {"x_train": d["x_train"][:512], "y_train": d["y_train"][:512], "x_test": d["x_test"][:64],
                  "y_test": d["y_test"][:64], "classes": np.array(NAMES)}
    np.savez(root / "named.npz", **arrays)
    run = root / "run"
    assert main(["pretrain", "supervised-vit", f"data.path={root / 'named.npz'}", "architecture.image_size=16",
                 "optim.steps=6", "optim.batch_size=32", "optim.warmup_steps=1", "run.checkpoint_every=3",
                 "transfer=[]", f"run.out={run}"]) == 0  # no transfer task: no probe figures to draw
    pngs = []
    for i in range(SHOWN):
        pngs.append(root / f"digit{i}.png")
        Image.fromarray(arrays["x_test"][i]).save(pngs[-1])
    return {"run": run, "pngs": pngs, "digits": torch.from_numpy(arrays["x_test"][:SHOWN])[:, None],
            "npz": root / "named.npz"}


def parse(stdout: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """``IMAGE<TAB>name prob<TAB>name prob ...`` lines → ``[(image, [(name, prob), ...])]``."""
    rows = []
    for line in stdout.strip().splitlines():
        image, *pairs = line.split("\t")
        rows.append((image, [(p.rsplit(" ", 1)[0], float(p.rsplit(" ", 1)[1])) for p in pairs]))
    return rows


def assert_ranked_as(rows, pngs, probs: torch.Tensor, k: int) -> None:
    """Each line names the model's own top-k classes, in order, with their probabilities."""
    assert [r[0] for r in rows] == [str(p) for p in pngs]
    top_p, top_i = probs.topk(k)
    for (_, pairs), p, idx in zip(rows, top_p, top_i, strict=True):
        assert [name for name, _ in pairs] == [NAMES[i] for i in idx]
        assert [q for _, q in pairs] == pytest.approx(p.tolist(), abs=6e-5)  # printed with 4 decimals


def test_predict_names_the_classes_a_supervised_model_ranks_first(mnist, capsys):
    capsys.readouterr()
    assert main(["predict", str(mnist["run"]), *map(str, mnist["pngs"]), "--top-k", "3"]) == 0
    rows = parse(capsys.readouterr().out)
    from bigmodel.analysis.figures import load_objective

    objective = load_objective(mnist["run"])[0].cpu()
    with torch.no_grad():  # the model's own view of the same digits: to_input(uint8) → head(backbone)
        probs = objective.head(objective.backbone(to_input(mnist["digits"], 16, 1))).softmax(-1)
    assert_ranked_as(rows, mnist["pngs"], probs, 3)
    assert [r[1][0][0] for r in rows] == [NAMES[i] for i in probs.argmax(1)]


def test_predict_json_and_top_k_beyond_the_classes(mnist, capsys):
    capsys.readouterr()
    assert main(["predict", str(mnist["run"]), str(mnist["pngs"][0]), "--top-k", "50", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["image"] == str(mnist["pngs"][0])
    assert sorted(t["class"] for t in result["top"]) == sorted(NAMES)  # all 10 classes, no more
    assert [t["class"] for t in result["top"]] == [NAMES[t["index"]] for t in result["top"]]
    probs = [t["prob"] for t in result["top"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_predict_from_a_finetuned_checkpoint(mnist, tmp_path, capsys):
    """A fine-tune kept under checkpoint_dir records the task's classes and the backbone's
    architecture, and predicts through its own test view (the centre crop of the resized image)."""
    from bigmodel.data import npz
    from bigmodel.transfer.finetune import Finetune

    net, _, recipe = api.load_backbone(mnist["run"])
    assert net.architecture == {"name": recipe.architecture.name, **recipe.architecture.kwargs}  # build.backbone's
    train = npz.npz(str(mnist["npz"]), split="train")
    # BiT's upscale-then-crop view (a ViT's default is the whole image), so the test view is a centre crop
    model, schedule = Finetune(steps=3, batch_size=32, bit_crop=True,
                               checkpoint_dir=str(tmp_path / "ft")).fit(net, train)
    (folder,) = (tmp_path / "ft").iterdir()
    meta = checkpoint.load_meta(checkpoint.latest(folder))
    assert (meta["num_classes"], meta["classes"], meta["architecture"]) == (10, NAMES, recipe.raw["architecture"])
    assert meta["finetune"]["test_crop"] is True

    capsys.readouterr()
    assert main(["predict", str(folder), *map(str, mnist["pngs"]), "--top-k", "2"]) == 0
    rows = parse(capsys.readouterr().out)
    model = model.cpu()  # predict runs on the CPU: the same numbers on a GPU host too
    with torch.no_grad():
        probs = model.logits(model.test_input(mnist["digits"])).softmax(-1)
    assert_ranked_as(rows, mnist["pngs"], probs, 2)
    # its export says so: a 16 px centre crop of the digit resized to 20 px
    pre = export(folder, "safetensors", tmp_path / "exported")["config"]["pretrained_cfg"]
    assert (schedule.resize, schedule.crop) == (20, 16)
    assert pre["input_size"] == [1, 16, 16] and pre["crop_pct"] == 16 / 20


def test_predict_refuses_a_self_supervised_checkpoint(mnist, tmp_path, capsys):
    from bigmodel.recipe import resolve
    from bigmodel.registry import OBJECTIVES
    from bigmodel.train import build

    r = resolve("mae-vit", ["run.tiny=true"], note=lambda _: None)
    mae = OBJECTIVES.get("mae")(backbone=build.backbone(r.architecture), num_classes=0, **r.objective.kwargs)
    checkpoint.save(tmp_path / "mae" / "checkpoints", 4, mae, {}, {"recipe": r.raw, "num_classes": 0, "classes": []})
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "mae"), str(mnist["pngs"][0])]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"checkpoint error: predict: {tmp_path / 'mae'} is a mae checkpoint (self-supervised): "
                   f"it has no class "
                   f"head. Fine-tune it on labelled data first, keeping the checkpoints: bigmodel transfer "
                   f"{tmp_path / 'mae'} --task TASK --protocol finetune --set checkpoint_dir=DIR, then bigmodel "
                   f"predict DIR/<the folder it made> IMAGE...\n")


def test_read_image_converts_channels_and_keeps_the_centre_square(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)  # 20 wide, 30 high
    Image.fromarray(rgb).save(tmp_path / "tall.png")
    grey = np.array(Image.fromarray(rgb).convert("L"))
    assert torch.equal(read_image(tmp_path / "tall.png", 1), torch.from_numpy(grey[5:25])[None])
    assert torch.equal(read_image(tmp_path / "tall.png", 3), torch.from_numpy(rgb[5:25]).permute(2, 0, 1))
    Image.fromarray(grey[:8, :8]).save(tmp_path / "grey.png")  # a grey file for a colour model: RGB, as PIL converts
    assert read_image(tmp_path / "grey.png", 3).shape == (3, 8, 8)


def test_predict_api_refuses_a_bad_top_k(mnist):
    from bigmodel.recipe import RecipeError

    with pytest.raises(RecipeError, match="predict --top-k 0: must be at least 1"):
        predict(mnist["run"], mnist["pngs"][:1], top_k=0)


def test_an_unreadable_image_is_an_image_error(tmp_path, capsys):
    from tests.test_export import VIT, saved_run

    run = saved_run(tmp_path, "fractals-vit", VIT)
    notes = tmp_path / "notes.png"
    notes.write_text("a shopping list, not an image\n")
    line = f"{notes}: not an image PIL can read (UnidentifiedImageError: cannot identify image file '<file>')"
    with pytest.raises(ImageError) as e:
        read_image(notes, 1)
    assert str(e.value) == line
    capsys.readouterr()
    assert main(["predict", str(run), str(notes)]) == 2
    assert capsys.readouterr() == ("", f"image error: {line}\n")
