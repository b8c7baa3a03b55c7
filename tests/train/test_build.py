"""build.random_twin: the weights pretraining started from, data-dependent state included."""

import pytest
import torch

from bigmodel import recipe
from bigmodel.train import build


def test_random_twin_of_a_palette_model_needs_the_fitted_palette() -> None:
    r = recipe.resolve("igpt", ["run.tiny=true"])
    with pytest.raises(ValueError, match="palette is fitted to the pretraining data; pass data="):
        build.random_twin(r)  # the grey default would be another model's twin
    torch.manual_seed(123)
    trained = build.backbone(r.architecture)
    trained.palette.colours.copy_(torch.linspace(-0.9, 0.8, trained.palette.size)[:, None])
    trained.palette.fitted.fill_(True)
    twin = build.random_twin(r, pretrained=trained)
    assert torch.equal(twin.palette.colours, trained.palette.colours) and bool(twin.palette.fitted)
    torch.manual_seed(r.run.seed)
    fresh = build.backbone(r.architecture)
    for (name, a), (_, b) in zip(twin.state_dict().items(), fresh.state_dict().items(), strict=True):
        if not name.startswith("palette."):
            assert torch.equal(a, b), name  # everything else is the seed's initialisation


def test_random_twin_without_data_dependent_state_needs_nothing() -> None:
    r = recipe.resolve("simclr-resnet", ["run.tiny=true"])
    torch.manual_seed(r.run.seed)
    fresh = build.backbone(r.architecture)
    twin = build.random_twin(r)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), fresh.state_dict().values(), strict=True))
