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
    UncertaintyDifficulty,
    boundary_band,
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


def _entropy64(p: np.ndarray) -> np.ndarray:
    """Binary entropy in float64, written out (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nan_to_num(p * np.log(p)) - np.nan_to_num((1 - p) * np.log(1 - p))


def _band64(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels with a pixel of the other class within Chebyshev distance ``width`` inside the image, by brute force."""
    h, w = mask.shape
    band = np.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            window = mask[max(i - width, 0):i + width + 1, max(j - width, 0):j + width + 1]
            band[i, j] = window.any() and not window.all()
    return band


def test_boundary_band_by_brute_force():
    rng = np.random.default_rng(4)
    masks = rng.random((3, 11, 13)) > 0.6
    masks[1] = False
    masks[1, 4:8, 0:5] = True  # touches the left edge: the frame's edge is no boundary
    masks[2] = True  # full: no boundary at all
    for width in (1, 2):
        band = boundary_band(torch.as_tensor(masks), width).numpy()
        np.testing.assert_array_equal(band, np.stack([_band64(m, width) for m in masks]))
    assert not boundary_band(torch.as_tensor(masks), 1)[2].any()
    assert not boundary_band(torch.as_tensor(masks[1:2]), 1)[0, 5, 0]  # inside the mask, at the frame's edge
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        boundary_band(torch.zeros(2, 1, 4, 4), 1)


@pytest.mark.parametrize("measure", ["mutual_information", "entropy"])
@pytest.mark.parametrize("region", ["label", "prediction", "boundary"])
def test_uncertainty_difficulty_against_float64(measure, region):
    rng = np.random.default_rng(5)
    samples = rng.random((6, 3, 12, 12))  # (N, B, H, W)
    samples[:, 1] = rng.random((6, 1, 1)) * 0.3  # image 1: nothing predicted
    mask = np.zeros((3, 12, 12), bool)
    mask[0, 3:9, 2:7] = True
    mask[1, 5:8, 5:8] = True
    # image 2: an empty label
    mean = samples.mean(0)
    u = _entropy64(mean) - (_entropy64(samples).mean(0) if measure == "mutual_information" else 0.0)
    regions = {"label": mask, "prediction": mean > 0.5,
               "boundary": np.stack([_band64(m, 2) for m in mask])}[region]
    expected = [u[b][regions[b]].mean() if regions[b].any() else 0.0 for b in range(3)]
    scorer = UncertaintyDifficulty(measure, region, band_width=2)
    got = scorer(torch.as_tensor(samples, dtype=torch.float32), torch.as_tensor(mask)[:, None]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    image_mean = UncertaintyDifficulty(measure, region, band_width=2, empty="image_mean")
    empty = [b for b in range(3) if not regions[b].any()]
    assert empty, "each region has an image where it is empty"
    got = image_mean(torch.as_tensor(samples, dtype=torch.float32), torch.as_tensor(mask)).numpy()
    np.testing.assert_allclose(got[empty], [u[b].mean() for b in empty], rtol=1e-4)


def test_uncertainty_difficulty_defaults_and_arguments():
    samples = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5
    thesis = UncertaintyDifficulty("mutual_information", "label")
    torch.testing.assert_close(thesis(samples, mask), MutualInformationDifficulty()(samples, mask))
    # the default, the entropy over the prediction, reads no label: any mask of the right shape gives the same D
    default = UncertaintyDifficulty()
    assert (default.measure, default.region) == ("entropy", "prediction")
    torch.testing.assert_close(default(samples, mask), default(samples, ~mask))
    for kwargs, message in (({"measure": "variance"}, "UncertaintyDifficulty measure must be one of "
                                                      "mutual_information, entropy"),
                            ({"region": "image"}, "UncertaintyDifficulty region must be one of label, prediction, "
                                                  "boundary"),
                            ({"band_width": 0}, "UncertaintyDifficulty band_width must be an integer >= 1")):
        with pytest.raises(InputError) as info:
            UncertaintyDifficulty(**kwargs)
        assert str(info.value).startswith(message), str(info.value)


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
    certainty = label_suspicion(d, error, "dice_error_certainty")
    torch.testing.assert_close(certainty, expected)
    # a sure model far from the label tops the list; an unsure one (the highest D) is hard, not mislabelled
    assert certainty.argmax() == 1 and certainty[3] == 0
    # the default: 1 - Dice alone, D not read
    torch.testing.assert_close(label_suspicion(d, error), error.double())
    torch.testing.assert_close(label_suspicion(d.flip(0), error), error.double())
    with pytest.raises(ValueError, match="one shape"):
        label_suspicion(d, error[:3])
    with pytest.raises(ValueError, match="ranking must be one of"):
        label_suspicion(d, error, "dice")


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
