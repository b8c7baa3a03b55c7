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
        resolve("quickstart", [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_error_found_only_when_building_is_still_a_recipe_error(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quickstart", "architecture.patch_size=5", f"run.out={tmp_path / 'run'}"]) == 2
    assert "not divisible by patch_size=5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["architecture.patchsize=4"],  # unknown key
        ["optim.batch_size=many"],  # wrong type
        ["objective.name=byol"],  # unknown component
        ["optim.warmup_steps=-3"],  # out of range
        ["data.path=/nonexistent.npz", "data.name=npz"],  # missing file, found when building
    ],
)
def test_cli_exit_2_one_line_nothing_written(tmp_path, monkeypatch, capsys, args: list[str]) -> None:
    """Through the CLI's entry point (in-process: a subprocess per case would only add start-up time;
    tests/test_cli.py covers the real subprocess)."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", *args, f"run.out={tmp_path / 'run'}"]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("recipe error: "), captured.err
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_overrides_and_tiny_mode() -> None:
    r = resolve("quickstart", ["run.tiny=true", "optim.lr=3e-4", "transfer.1.k=5"])
    assert r.optim.lr == pytest.approx(3e-4)
    assert r.optim.steps < 50  # tiny section applied
    assert r.transfer[1].protocol.kwargs["k"] == 5
    # the command line wins over the tiny section
    assert resolve("quickstart", ["run.tiny=true", "optim.steps=7"]).optim.steps == 7


def test_recipe_file_and_unknown_recipe(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("architecture: {name: vit, size: nano, image_size: 16, patch_size: 4}\n"
                    "data: {name: digits}\nobjective: {name: supervised}\n")
    r = resolve(path)
    assert r.architecture.kwargs == {"size": "nano", "image_size": 16, "patch_size": 4}
    assert r.transfer == []
    with pytest.raises(RecipeError, match="neither a file nor a zoo recipe"):
        resolve(tmp_path / "missing.yaml")
