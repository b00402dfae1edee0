"""Difficulty, its normalisation, the map to ε, the ε table, and the loss that reads it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scripts.difficulty import (
    EpsilonTable,
    dice_error,
    epsilon_from_difficulty,
    image_difficulty,
    normalise_difficulty,
)
from scripts.losses import AdaptivePolyDiceLoss, PolyDiceLoss


def test_difficulty_is_the_mean_mi_over_the_foreground():
    rng = np.random.default_rng(0)
    mi = rng.random((3, 4, 5))
    mask = rng.random((3, 4, 5)) > 0.6
    mask[2] = False  # no foreground
    expected = [mi[i][mask[i]].mean() for i in range(2)]
    d = image_difficulty(torch.as_tensor(mi), torch.as_tensor(mask)[:, None])
    np.testing.assert_allclose(d[:2].numpy(), expected, rtol=1e-6)
    assert d[2] == 0
    d = image_difficulty(torch.as_tensor(mi), torch.as_tensor(mask), empty="image_mean")
    np.testing.assert_allclose(float(d[2]), mi[2].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="empty must be one of"):
        image_difficulty(torch.as_tensor(mi), torch.as_tensor(mask), empty="nan")
    with pytest.raises(ValueError, match="does not match"):
        image_difficulty(torch.as_tensor(mi), torch.as_tensor(mask)[:, :3])


def test_dice_error_by_hand():
    mean = torch.zeros(3, 4, 4)
    mask = torch.zeros(3, 1, 4, 4)
    mean[0, :2, :2], mask[0, 0, :2, :2] = 0.9, 1  # perfect
    mean[1, :2, :] = 0.7
    mask[1, 0, :2, :2] = 1  # 4 of 8 predicted pixels right: Dice = 2*4 / (8 + 4)
    # image 2: both empty, no error
    np.testing.assert_allclose(dice_error(mean, mask).numpy(), [0.0, 1 - 8 / 12, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        dice_error(mean, mask[:, :, :2])


def test_normalisation_and_epsilon_against_numpy():
    d = np.random.default_rng(1).gamma(2.0, 0.01, size=50)
    d_norm = normalise_difficulty(torch.as_tensor(d), percentile=25, delta=1e-9).numpy()
    expected = (d - np.percentile(d, 25)) / (np.std(d) + 1e-9)
    np.testing.assert_allclose(d_norm, expected, rtol=1e-12)
    eps = epsilon_from_difficulty(torch.as_tensor(expected), eps_min=0.0, eps_max=0.5, slope=2.0).numpy()
    np.testing.assert_allclose(eps, 0.5 / (1 + np.exp(-2 * expected)), rtol=1e-12)
    assert eps.min() >= 0 and eps.max() <= 0.5
    assert np.argmax(eps) == np.argmax(d)  # the hardest image gets the steepest loss
    # identical difficulties: D_norm = 0 everywhere, so every image gets the middle of the range
    same = epsilon_from_difficulty(normalise_difficulty(torch.full((4,), 0.3)), 0.1, 0.3)
    torch.testing.assert_close(same, torch.full((4,), 0.2, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps_max"):
        epsilon_from_difficulty(torch.zeros(2), eps_min=0.5, eps_max=0.1)


def test_table_lookup_update_and_checkpoint_round_trip():
    table = EpsilonTable(default=0.1)
    torch.testing.assert_close(table.lookup(["a", "b"]), torch.tensor([0.1, 0.1]))
    table.update(["a", "c"], torch.tensor([0.4, 0.2]))
    assert table.num_passes == 1 and len(table) == 2
    torch.testing.assert_close(table.lookup(["c", "b", "a"]), torch.tensor([0.2, 0.1, 0.4]))
    buffer = io.BytesIO()
    torch.save({"epsilon_table": table.state_dict()}, buffer)
    buffer.seek(0)
    restored = EpsilonTable()
    restored.load_state_dict(torch.load(buffer, weights_only=True)["epsilon_table"])  # as CheckpointLoader does
    assert restored.values == table.values and restored.num_passes == 1 and restored.default == 0.1
    with pytest.raises(ValueError, match="2 ε values for 1 image ids"):
        table.update(["a"], [0.1, 0.2])


def test_adaptive_loss_uses_each_images_own_eps_whatever_the_batch_order():
    table = EpsilonTable(default=0.0)
    table.update(["m/a.png", "m/b.png", "m/c.png"], [0.5, 0.0, 0.25])
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8)
    target = (torch.rand(3, 1, 8, 8) > 0.5).float()
    loss = AdaptivePolyDiceLoss(table, reduction="none")
    for order in ([0, 1, 2], [2, 0, 1]):  # a shuffled batch
        names = [["m/a.png", "m/b.png", "m/c.png"][i] for i in order]
        labelled = MetaTensor(target[order], meta={"filename_or_obj": names})
        expected = PolyDiceLoss(reduction="none")(logits[order], target[order],
                                                  eps=torch.tensor([[0.5, 0.0, 0.25][i] for i in order]))
        torch.testing.assert_close(loss(logits[order], labelled), expected)
    with pytest.raises(ValueError, match="filename_or_obj"):
        loss(logits, target)
    with pytest.raises(ValueError, match="takes its eps from the table"):
        AdaptivePolyDiceLoss(table, eps=0.2)
