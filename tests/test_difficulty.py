"""Difficulty, its normalisation, the map to ε, the ε table, and the loss that reads it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scripts.audit import label_suspicion
from scripts.difficulty import (
    DiceErrorDifficulty,
    EpsilonMap,
    EpsilonTable,
    MutualInformationDifficulty,
    dice_error,
    epsilon_from_difficulty,
    image_difficulty,
    normalise_difficulty,
)
from scripts.errors import InputError
from scripts.losses import AdaptivePolyDiceLoss, PolyDiceLoss
from scripts.uncertainty import uncertainty_maps


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


def test_scorers_score_a_batch_of_samples():
    samples = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # (N, B, H, W)
    mask = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    mi = uncertainty_maps(samples.double())["mutual_information"].numpy()
    expected = [mi[b][mask[b, 0].numpy()].mean() for b in range(3)]  # float64, by hand
    np.testing.assert_allclose(MutualInformationDifficulty()(samples, mask).numpy(), expected, rtol=1e-4)
    torch.testing.assert_close(DiceErrorDifficulty()(samples, mask), dice_error(samples.mean(0), mask))
    with pytest.raises(InputError, match="MutualInformationDifficulty empty must be one of zero, image_mean"):
        MutualInformationDifficulty(empty="skip")


def test_epsilon_map_is_the_normalisation_and_sigmoid_and_checks_its_arguments():
    d = torch.tensor([0.2, 0.05, 0.4, 0.1, 0.3], dtype=torch.float64)
    ranked = EpsilonMap(eps_min=0.1, eps_max=0.4, slope=3.0, percentile=50)
    torch.testing.assert_close(ranked(d, epoch=7), epsilon_from_difficulty(normalise_difficulty(d, 50), 0.1, 0.4, 3.0))
    shuffled = EpsilonMap(eps_min=0.1, eps_max=0.4, slope=3.0, percentile=50, assignment="shuffled", seed=3)
    a, b = shuffled(d, epoch=7), shuffled(d, epoch=7)
    torch.testing.assert_close(a, b)  # the same order in every process
    torch.testing.assert_close(a.sort().values, ranked(d).sort().values)
    assert not torch.equal(a, ranked(d)) and not torch.equal(a, shuffled(d, epoch=8))
    for kwargs, message in (({"eps_min": 0.4, "eps_max": 0.1}, "--eps_min (0.4) must not exceed --eps_max (0.1)."),
                            ({"percentile": 101}, "EpsilonMap percentile must be a number in [0.0, 100.0], got 101"),
                            ({"slope": "2"}, "EpsilonMap slope must be a number in [0.0, inf], got '2' (str)."),
                            ({"assignment": "random"}, "EpsilonMap assignment must be one of ranked, shuffled")):
        with pytest.raises(InputError) as info:
            EpsilonMap(**kwargs)
        assert str(info.value).startswith(message)


def test_label_suspicion_by_hand():
    d = torch.tensor([0.3, 0.1, 0.1, 0.5])
    error = torch.tensor([0.5, 1.0, 0.2, 0.8])
    # ranks of D (ties averaged) 3, 1.5, 1.5, 4 -> q = (rank - 1) / 3 = 2/3, 1/6, 1/6, 1
    expected = torch.tensor([0.5 / 3, 1.0 * 5 / 6, 0.2 * 5 / 6, 0.0], dtype=torch.float64)
    torch.testing.assert_close(label_suspicion(d, error), expected)
    # a sure model far from the label tops the list; an unsure one (the highest D) is hard, not mislabelled
    assert label_suspicion(d, error).argmax() == 1 and label_suspicion(d, error)[3] == 0
    with pytest.raises(ValueError, match="one shape"):
        label_suspicion(d, error[:3])


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
