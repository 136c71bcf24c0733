"""σ_min (Ambient-o Eq. 3.2) and σ_max (Eq. 3.4) read off hand-made classifier probability curves."""

import pytest
import torch

from ambient_ray.diffusion.thresholds import sigma_max, sigma_min

GRID = torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0])


def test_first_crossing_per_sample():
    curves = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.46, 0.5],  # crosses 0.45 at 1.0
            [0.5, 0.5, 0.5, 0.5, 0.5],  # fooled from the start: 0.1
            [0.1, 0.5, 0.2, 0.1, 0.6],  # crosses, dips, crosses again: the first crossing counts
            [0.0, 0.1, 0.2, 0.3, 0.4],  # never crosses: the top of the grid, reported
        ]
    )
    s, crossed = sigma_min(curves, GRID, tau=0.45)
    assert s.tolist() == pytest.approx([1.0, 0.1, 0.2, 2.0])
    assert crossed.tolist() == [True, True, True, False]


def test_crossing_is_strict_and_tau_moves_it():
    curves = torch.tensor([[0.2, 0.3, 0.4, 0.45, 0.49]], dtype=torch.float64)  # exact decimals
    assert sigma_min(curves, GRID, tau=0.45)[0].tolist() == pytest.approx([2.0])  # 0.45 is not > 0.45
    assert sigma_min(curves, GRID, tau=0.449)[0].tolist() == pytest.approx([1.0])
    assert sigma_min(curves, GRID, tau=0.1)[0].tolist() == pytest.approx([0.1])
    s, crossed = sigma_min(curves, GRID, tau=0.49)  # equal at the top only: never crossed
    assert s.tolist() == pytest.approx([2.0]) and not crossed.item()
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="tau"):
            sigma_min(curves, GRID, tau=bad)


def test_per_dataset_gives_one_sigma_from_the_mean_curve():
    curves = torch.tensor(
        [
            [0.1, 0.2, 0.5, 0.5, 0.5],
            [0.1, 0.2, 0.3, 0.3, 0.6],
        ]
    )
    # mean: 0.1, 0.2, 0.4, 0.4, 0.55 -> crosses 0.45 at 2.0, for both
    s, crossed = sigma_min(curves, GRID, tau=0.45, mode="per-dataset")
    assert s.tolist() == pytest.approx([2.0, 2.0]) and crossed.all()
    assert sigma_min(curves, GRID, tau=0.45)[0].tolist() == pytest.approx([0.5, 2.0])
    with pytest.raises(ValueError, match="mode"):
        sigma_min(curves, GRID, tau=0.45, mode="per-batch")


def test_sigma_max_is_the_last_fooled_sigma():
    curves = torch.tensor(
        [
            [0.5, 0.5, 0.48, 0.3, 0.1],  # crops fool it up to 0.5
            [0.1, 0.1, 0.1, 0.1, 0.1],  # never: 0, no use through crops
            [0.1, 0.5, 0.1, 0.5, 0.1],  # the sup: 1.0
        ]
    )
    s, fooled = sigma_max(curves, GRID, tau=0.45)
    assert s.tolist() == pytest.approx([0.5, 0.0, 1.0])
    assert fooled.tolist() == [True, False, True]
    # per dataset: mean 0.233, 0.367, 0.227, 0.3, 0.1 -> none above 0.45
    s, fooled = sigma_max(curves, GRID, tau=0.45, mode="per-dataset")
    assert s.tolist() == [0.0, 0.0, 0.0] and not fooled.any()


@pytest.mark.parametrize(
    "curves, grid, words",
    [
        (torch.tensor([[0.1, float("nan"), 0.2, 0.3, 0.4]]), GRID, "sample 0"),
        (torch.tensor([[0.1, 0.2], [0.1, 1.2]]), torch.tensor([0.1, 0.2]), "sample 1"),
        (torch.tensor([[0.1, 0.2, 0.3]]), GRID, "grid points"),
        (torch.tensor([[0.1, 0.2]]), torch.tensor([0.2, 0.1]), "strictly increasing"),
    ],
)
def test_bad_curves_are_refused(curves, grid, words):
    with pytest.raises(ValueError, match=words):
        sigma_min(curves, grid, tau=0.45)
