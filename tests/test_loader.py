"""The one loader: a run directory or checkpoint folder (safetensors or sharded DCP, pretraining or
fine-tune) → the model with its recipe, classes and test view, the same object behind
``bigmodel.load``, every command and the figures; a missing or damaged checkpoint is a
``checkpoint error``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import bigmodel
from bigmodel import loader
from bigmodel.analysis.figures import load_objective
from bigmodel.cli import main
from bigmodel.data.base import TensorImages
from bigmodel.data.transforms import to_input
from bigmodel.errors import CheckpointError
from bigmodel.train import checkpoint
from bigmodel.transfer.finetune import Finetune
from tests.test_export import CLASSES, VIT, images, saved_run


def test_the_public_face_is_the_loader():
    assert bigmodel.load is loader.load and bigmodel.Pretrained is loader.Pretrained
    assert bigmodel.api.load is loader.load and bigmodel.api.load_backbone is loader.load_backbone


def test_a_supervised_run_loads_with_its_classifier_and_test_view(tmp_path):
    run = saved_run(tmp_path, "fractals-vit", VIT)
    m = loader.load(run, device="cpu")
    meta = checkpoint.load_meta(run / "checkpoints" / "step_00000005")
    assert (m.checkpoint, m.step, m.kind, m.meta) == (run / "checkpoints" / "step_00000005", 5, "supervised", meta)
    assert (m.classes, m.labels, m.recipe.raw, m.architecture) == (CLASSES, CLASSES, meta["recipe"],
                                                                    meta["recipe"]["architecture"])
    assert not m.objective.training and m.objective.backbone is m.backbone and m.head is m.objective.head
    saved = checkpoint.read_weights(m.checkpoint)
    assert all(torch.equal(saved[k], v) for k, v in m.objective.state_dict().items())
    u8 = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.preprocess(u8), to_input(u8, 16, 1))
    x = images(1, 16)
    with torch.no_grad():
        assert torch.equal(m.logits(x), m.objective.head(m.objective.backbone(x)))


def test_a_self_supervised_run_has_classes_but_no_head(tmp_path):
    run = saved_run(tmp_path, "mae-vit", ["run.tiny=true"])
    m = loader.load(run, device="cpu")
    assert (m.kind, m.labels, m.head) == ("mae", [], None)


def test_a_sharded_checkpoint_loads_as_its_safetensors_twin(tmp_path):
    """The same objective saved by DCP (as a run of several processes saves it) rebuilds to the same
    weights and outputs, its head's rows read from the shards when meta lacks ``num_classes``."""
    run = saved_run(tmp_path, "fractals-vit", VIT)
    plain = loader.load(run, device="cpu")
    meta = {k: v for k, v in plain.meta.items() if k not in ("step", "files", "num_classes")}
    opt = torch.optim.SGD(plain.objective.parameters(), lr=0.1)
    sharded = checkpoint.save_sharded(tmp_path / "dcp" / "checkpoints", 5, plain.objective, opt, meta)
    assert checkpoint.is_sharded(sharded)
    m = loader.load(tmp_path / "dcp", device="cpu")
    assert (m.checkpoint, m.labels, m.head.out_features) == (sharded, CLASSES, 3)
    x = images(1, 16)
    with torch.no_grad():
        assert torch.equal(m.logits(x), plain.logits(x))


def test_head_rows_stand_in_for_a_missing_num_classes(tmp_path):
    """Checkpoints saved before meta.json recorded ``num_classes``: the head is sized from the saved
    ``head.weight`` (written once, in the loader)."""
    run = saved_run(tmp_path, "fractals-vit", VIT)
    ckpt = run / "checkpoints" / "step_00000005"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["num_classes"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    m = loader.load(run, device="cpu")
    assert (m.head.out_features, m.labels) == (3, CLASSES)


def test_a_finetune_loads_as_its_classifier(tmp_path):
    run = saved_run(tmp_path, "fractals-vit", VIT)
    net = loader.load(run, device="cpu").backbone
    g = torch.Generator().manual_seed(0)
    train = TensorImages(torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8, generator=g),
                         torch.arange(24) % 3, classes=CLASSES)
    model, schedule = Finetune(steps=2, batch_size=8, checkpoint_dir=str(tmp_path / "ft")).fit(net, train)
    (folder,) = (tmp_path / "ft").iterdir()
    m = loader.load(folder, device="cpu")
    assert (m.kind, m.recipe, m.labels, m.classes, m.step) == ("finetune", None, CLASSES, CLASSES, 2)
    assert m.architecture == net.architecture
    u8 = train.images[:4]
    model = model.cpu()
    assert torch.equal(m.preprocess(u8), model.test_input(u8))  # the centre crop of the resized image
    with torch.no_grad():
        assert torch.equal(m.logits(m.preprocess(u8)), model.logits(model.test_input(u8)))
    with pytest.raises(CheckpointError, match="a fine-tune checkpoint has no pretraining recipe"):
        load_objective(folder)


def test_a_generative_finetune_of_igpt_loads_with_its_next_pixel_head(tmp_path):
    net = loader.load(saved_run(tmp_path, "igpt", ["run.tiny=true"]), device="cpu").backbone
    g = torch.Generator().manual_seed(0)
    train = TensorImages(torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8, generator=g),
                         torch.arange(24) % 3, classes=CLASSES)
    ft = Finetune(steps=2, batch_size=8, generative_weight=1.0, checkpoint_dir=str(tmp_path / "ft"))
    model, _ = ft.fit(net, train)
    (folder,) = (tmp_path / "ft").iterdir()
    m = loader.load(folder, device="cpu")
    assert m.kind == "finetune" and m.objective.generative_weight == 1.0
    assert (net.feature_layer, m.objective.backbone.feature_layer) == (2, 4)  # probes the middle, fine-tunes all
    saved = checkpoint.read_weights(m.checkpoint)
    assert "gen_head.weight" in saved and all(torch.equal(saved[k], v) for k, v in m.objective.state_dict().items())
    u8 = train.images[:4]
    with torch.no_grad():
        assert torch.equal(m.logits(m.preprocess(u8)), model.cpu().logits(model.test_input(u8)))


def test_missing_and_damaged_checkpoints_are_checkpoint_errors(tmp_path, capsys):
    """Every command loads through the loader, so each says ``checkpoint error:`` and exits 2."""
    run = saved_run(tmp_path, "fractals-vit", VIT)
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "nothing"
    commands = [["export", "{}", "--format", "safetensors"], ["predict", "{}", "x.png"],
                ["transfer", "{}", "--task", "digits", "--protocol", "knn"]]
    for argv in commands:
        for where, why in ((missing, "no such run directory or checkpoint folder"),
                           (empty, "no complete checkpoint (expected a run directory or checkpoints/step_*)")):
            capsys.readouterr()
            assert main([a.replace("{}", str(where)) for a in argv]) == 2
            assert capsys.readouterr().err == f"checkpoint error: {where}: {why}\n"
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    weights = damaged / "checkpoints" / "step_00000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    capsys.readouterr()
    assert main(["export", str(damaged), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"checkpoint error: checkpoint {weights.parent}: model.safetensors has ") and "\n" == err[-1]
    assert not (damaged / "export").exists()
