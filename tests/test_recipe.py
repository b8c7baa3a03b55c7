"""Recipe validation: every bad input is one clear line, exit status 2, and nothing written."""

from __future__ import annotations

import pytest

from bigmodel.cli import main
from bigmodel.recipe import RecipeError, resolve


@pytest.mark.parametrize(
    "override, expected",
    [
        ("architecture.patchsize=4", "architecture.patchsize: unknown key; valid keys: size, image_size, patch_size"),
        ("optim.lr=fast", "optim.lr = 'fast': input should be a valid number"),
        ("architecture.name=vitt", "architecture.name = 'vitt': unknown architecture; valid:"),
        ("optim.lr=-1", "optim.lr = -1: input should be greater than 0"),
        ("architecture.size=huge", "architecture.size = 'huge': input should be"),
        ("optim.steps=0", "optim.steps = 0: input should be greater than or equal to 1"),
        ("bogus.key=1", "bogus: unknown section"),
        ("transfer.0.protocol=linearr", "transfer.0.protocol.name = 'linearr': unknown transfer protocol"),
        ("transfer.1.k=0", "transfer.1.protocol.k = 0: input should be greater than or equal to 1"),
        ("data.classes=1", "data.classes = 1: input should be greater than or equal to 2"),
    ],
)
def test_bad_recipe_is_one_line(override: str, expected: str) -> None:
    with pytest.raises(RecipeError) as err:
        resolve("fractals-vit", [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_error_found_only_when_building_is_still_a_recipe_error(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "fractals-vit", "architecture.patch_size=5", f"run.out={tmp_path / 'run'}"]) == 2
    assert "not divisible by patch_size=5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["architecture.patchsize=4"], "recipe"),  # unknown key
        (["optim.batch_size=many"], "recipe"),  # wrong type
        (["objective.name=no-such-objective"], "recipe"),  # unknown component (byol is registered now)
        (["optim.warmup_steps=-3"], "recipe"),  # out of range
        (["data.path=/nonexistent.npz", "data.name=npz"], "data"),  # missing file, found when building
    ],
)
def test_cli_exit_2_one_line_nothing_written(tmp_path, monkeypatch, capsys, args: list[str], kind: str) -> None:
    """Through the CLI's entry point (in-process: a subprocess per case would only add start-up time;
    tests/test_cli.py covers the real subprocess). The line names the kind of input at fault."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", *args, f"run.out={tmp_path / 'run'}"]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{kind} error: "), captured.err
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_overrides_and_tiny_mode() -> None:
    r = resolve("fractals-vit", ["run.tiny=true", "optim.lr=3e-4", "transfer.1.k=5"])
    assert r.optim.lr == pytest.approx(3e-4)
    assert r.optim.steps < 50  # tiny section applied
    assert r.transfer[1].protocol.kwargs["k"] == 5
    # the command line wins over the tiny section
    assert resolve("fractals-vit", ["run.tiny=true", "optim.steps=7"]).optim.steps == 7


def test_recipe_file_and_unknown_recipe(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("architecture: {name: vit, size: nano, image_size: 16, patch_size: 4}\n"
                    "data: {name: digits}\nobjective: {name: supervised}\n")
    r = resolve(path)
    assert r.architecture.kwargs == {"size": "nano", "image_size": 16, "patch_size": 4}
    assert r.transfer == []
    with pytest.raises(RecipeError, match="neither a file nor a zoo recipe"):
        resolve(tmp_path / "missing.yaml")


# Switching a component on the command line starts it from the new component's defaults


def test_switching_data_keeps_only_the_command_line_keys() -> None:
    notes: list[str] = []
    r = resolve(None, ["data.name=npz", "data.path=/m.npz", "data.limit=50"], note=notes.append)
    assert (r.data.name, r.data.kwargs) == ("npz", {"path": "/m.npz", "limit": 50})
    assert r.raw["data"] == {"name": "npz", "path": "/m.npz", "limit": 50}
    assert notes == []  # no tiny mode, nothing dropped


@pytest.mark.parametrize("override, section, kwargs", [
    (["architecture.name=resnet", "architecture.width=0.25"], "architecture", {"width": 0.25}),
    (["objective.name=simclr", "objective.temperature=0.2"], "objective", {"temperature": 0.2}),
    (["data={name: npz, path: /m.npz}"], "data", {"path": "/m.npz"}),
])
def test_switching_a_section_without_tiny(override, section, kwargs) -> None:
    notes: list[str] = []
    r = resolve("fractals-vit", override, note=notes.append)
    assert getattr(r, section).kwargs == kwargs
    assert notes == []


@pytest.mark.parametrize("override, section, kwargs, note", [
    (["architecture.name=resnet", "architecture.width=0.25"], "architecture", {"width": 0.25},
     "tiny keys architecture.size dropped: architecture is now resnet"),
    (["data={name: npz, path: /m.npz}"], "data", {"path": "/m.npz"},
     "tiny keys data.classes, data.images_per_class dropped: data is now npz"),
    (["data.name=digits"], "data", {}, "tiny keys data.classes, data.images_per_class dropped: data is now digits"),
])
def test_switching_a_section_in_tiny_mode_drops_its_tiny_keys_with_one_note(override, section, kwargs, note) -> None:
    notes: list[str] = []
    r = resolve("fractals-vit", ["run.tiny=true", *override], note=notes.append)
    assert getattr(r, section).kwargs == kwargs
    assert notes == [note]
    assert r.optim.steps == 6 and r.run.out == "runs/fractals-vit-tiny"  # the other tiny keys still apply
    dropped = note.split("tiny keys ")[1].split(" dropped")[0].split(", ")
    assert not set(dropped) & set(r.raw["tiny"])  # the saved recipe resolves again as it ran


def test_switching_objective_in_tiny_mode_keeps_tiny_keys_of_other_sections() -> None:
    notes: list[str] = []
    r = resolve("igpt", ["run.tiny=true", "objective.name=supervised"], note=notes.append)
    assert (r.objective.name, r.objective.kwargs) == ("supervised", {})
    assert r.data.kwargs["limit"] == 128 and r.architecture.kwargs["image_size"] == 8
    assert notes == ["tiny keys objective.palette_images dropped: objective is now supervised"]


def test_note_is_printed_to_stderr_once_and_only_for_a_valid_recipe(capsys) -> None:
    resolve("fractals-vit", ["run.tiny=true", "data.name=digits"])
    assert capsys.readouterr().err == (
        "note: tiny keys data.classes, data.images_per_class dropped: data is now digits\n")
    with pytest.raises(RecipeError, match="data.path: required key is missing"):
        resolve("fractals-vit", ["run.tiny=true", "data.name=npz"])
    assert capsys.readouterr().err == ""


def test_same_name_is_not_a_switch() -> None:
    r = resolve("fractals-vit", ["run.tiny=true", "data.name=fractals"], note=pytest.fail)
    assert r.data.kwargs["classes"] == 8 and r.data.kwargs["channels"] == 1


def test_switching_a_transfer_entrys_protocol_or_task() -> None:
    notes: list[str] = []
    r = resolve("fractals-vit", ["transfer.1.protocol=linear", "transfer.1.C=0.5"], note=notes.append)
    assert (r.transfer[1].protocol.name, r.transfer[1].protocol.kwargs) == ("linear", {"C": 0.5})  # k: 20 dropped
    assert r.transfer[1].task.name == "digits"
    r = resolve("igpt", ["run.tiny=true", "transfer.0.task=digits"], note=notes.append)
    assert (r.transfer[0].task.name, r.transfer[0].task.kwargs) == ("digits", {})
    assert r.transfer[1].task.kwargs["limit"] == 300  # entry 1 untouched
    assert notes == ["tiny keys transfer.0.task.limit dropped: transfer.0.task is now digits"]
