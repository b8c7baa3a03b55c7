"""Every zoo recipe validates, opens with its command, and runs end to end in tiny mode."""

from __future__ import annotations

import pytest

from bigmodel import api
from bigmodel.recipe import load_raw, resolve, zoo_names

SHARED = "../shared/data/"
# quickstart's tiny mode scores the whole embedded digits set (slow here); it is the CLI's own
# smoke test. Every other zoo recipe runs end to end in tiny mode below.
TINY_RUNS = [n for n in zoo_names() if n != "quickstart"]


def _data_overrides(raw: dict, request: pytest.FixtureRequest) -> list[str]:
    """Point every ``../shared/data/<file>`` path of a recipe at the test fixture for that file
    (which skips the test when the file is absent)."""
    fixtures = {"mnist.npz": "mnist_npz", "cifar10.npz": "cifar10_npz"}
    out = []
    sections = [("data", raw.get("data") or {})]
    sections += [(f"transfer.{i}.task", t["task"]) for i, t in enumerate(raw.get("transfer") or [])
                 if isinstance(t.get("task"), dict)]
    for key, section in sections:
        path = str(section.get("path", ""))
        if path.startswith(SHARED):
            out.append(f"{key}.path={request.getfixturevalue(fixtures[path[len(SHARED):]])}")
    return out


@pytest.mark.parametrize("name", zoo_names())
def test_recipe_opens_with_its_command_and_validates(name):
    from bigmodel.recipe import zoo_text

    assert zoo_text(name).startswith(f"# bigmodel run {name}")
    assert resolve(name, []).raw["run"].get("tiny") is not True
    assert resolve(name, ["run.tiny=true"]).run.tiny


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_RUNS)
def test_recipe_runs_in_tiny_mode(name, tmp_path, request):
    overrides = _data_overrides(load_raw(name), request)
    recipe = resolve(name, ["run.tiny=true", f"run.out={tmp_path / name}", *overrides])
    result = api.run(recipe)
    assert result["pretrain"]["steps_done"] == recipe.optim.steps
    for row in result["transfer"]:
        assert {"pretrained", "random_init"} <= set(row["results"])
    assert (tmp_path / name / "report.json").is_file()
