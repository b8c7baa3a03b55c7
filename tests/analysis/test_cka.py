"""Linear CKA against its definition (Kornblith et al., 2019) on synthetic features."""

from __future__ import annotations

import pytest
import torch

from bigmodel.analysis import cka


def naive_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels K = XXᵀ, L = YYᵀ and
    HSIC(K, L) = tr(K H L H) / (n - 1)², H = I - 11ᵀ/n: the n × n form of the paper's eq. (3)-(4)."""
    x, y = x.double(), y.double()
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)

    def hsic(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.trace(k @ h @ m @ h) / (n - 1) ** 2

    k, m = x @ x.T, y @ y.T  # the paper's K and L
    return float(hsic(k, m) / torch.sqrt(hsic(k, k) * hsic(m, m)))


def data(n: int = 50, p: int = 12, q: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = (x[:, :q] @ torch.randn(q, q, generator=g, dtype=torch.float64)
         + torch.randn(n, q, generator=g, dtype=torch.float64))
    return x, y


def orthogonal(d: int, seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_identical_inputs_give_one() -> None:
    x, _ = data()
    assert cka.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka.linear_cka(x.float(), x.float()) == pytest.approx(1.0, abs=1e-12)  # computed in float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_naive_hsic_reference(seed: int) -> None:
    x, y = data(seed=seed)
    assert cka.linear_cka(x, y) == pytest.approx(naive_cka(x, y), abs=1e-12)
    # uncentred inputs with a large offset: the centring is part of the definition
    assert cka.linear_cka(x + 5.0, y - 3.0) == pytest.approx(naive_cka(x, y), abs=1e-10)


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    x, y = data()
    ref = cka.linear_cka(x, y)
    assert ref == pytest.approx(naive_cka(x, y), abs=1e-12)
    assert ref != pytest.approx(1.0, abs=1e-3)  # the test means something: x and y differ
    assert cka.linear_cka(x @ orthogonal(12), y) == pytest.approx(ref, abs=1e-12)
    assert cka.linear_cka(x, y @ orthogonal(7, seed=3)) == pytest.approx(ref, abs=1e-12)
    assert cka.linear_cka(3.5 * x, 0.01 * y) == pytest.approx(ref, abs=1e-12)
    assert cka.linear_cka(x, x @ orthogonal(12) * 2.0) == pytest.approx(1.0, abs=1e-12)


def test_not_invariant_to_anisotropic_scaling() -> None:
    """CKA is not invariant to every invertible linear map (the paper's point against CCA)."""
    x, _ = data()
    scale = torch.ones(12, dtype=torch.float64)
    scale[0] = 10.0
    value = cka.linear_cka(x, x * scale)
    assert value == pytest.approx(naive_cka(x, x * scale), abs=1e-12)
    assert value != pytest.approx(1.0, abs=1e-3)


def test_symmetric_and_widths_may_differ() -> None:
    x, y = data(p=30, q=3)
    assert cka.linear_cka(x, y) == pytest.approx(cka.linear_cka(y, x), abs=1e-14)
    assert cka.linear_cka(x, y) == pytest.approx(naive_cka(x, y), abs=1e-12)


def test_bad_inputs_raise_one_clear_error() -> None:
    x, y = data()
    with pytest.raises(ValueError, match=r"same n examples, got \(50, 12\) and \(49, 7\)"):
        cka.linear_cka(x, y[:49])
    with pytest.raises(ValueError, match="constant"):
        cka.linear_cka(torch.ones(50, 4), y)


def test_matrix_between_every_pair_of_layers(tmp_path) -> None:
    x, y = data()
    z = torch.tanh(x[:, :5])
    a = [("l1", x), ("l2", z)]
    b = [("m1", y), ("m2", x), ("m3", z)]
    result = cka.matrix(a, b)
    assert result["rows"] == ["l1", "l2"]
    assert result["cols"] == ["m1", "m2", "m3"]
    expected = [[round(naive_cka(fa, fb), 6) for _, fb in b] for _, fa in a]
    assert [len(r) for r in result["cka"]] == [3, 3]
    assert sum(result["cka"], []) == pytest.approx(sum(expected, []), abs=1e-6)
    assert result["cka"][0][1] == 1.0 and result["cka"][1][2] == 1.0
    png = cka.heatmap_png(result, tmp_path / "sub" / "cka.png", "pretrained", "random_init", "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
