"""The vessel metrics of docs/tubular.md §1 (scripts/metrics.py) and their Ignite handlers, against hand numbers."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import CHASE, needs
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import from_engine
from monai.metrics import compute_dice, compute_roc_auc
from monai.transforms import Activationsd, AsDiscreted, Compose, CopyItemsd
from scipy import ndimage
from scipy.stats import rankdata
from skimage.morphology import skeletonize

from scripts.errors import InputError
from scripts.handlers import BettiError, ClDice, ComponentRatio, FieldOfViewConfusionMatrix, FieldOfViewROCAUC
from scripts.metrics import (BettiErrorMetric, ClDiceMetric, ComponentRatioMetric, FieldOfViewConfusionMatrixMetric,
                             FieldOfViewROCAUCMetric, betti_numbers, roc_auc, topology_defects)
from scripts.figures import TOPOLOGY_COLOURS, topology_overlay
from scripts.reports import AtomicMetricsSaver


def broken_line():
    """G: a 1-pixel line of 10; P: the same with a 2-pixel gap."""
    g = np.zeros((7, 12), bool)
    g[3, 1:11] = True
    p = g.copy()
    p[3, 5:7] = False
    return p, g


def ring():
    """G: the 16-pixel border of a 5×5 square (one hole); P: the same with the middle of its right side cut out."""
    g = np.zeros((9, 9), bool)
    g[2:7, 2:7] = True
    g[3:6, 3:6] = False
    p = g.copy()
    p[4, 6] = False
    return p, g


def tree():
    """G: a T (bar of 11, trunk of 8); P: its trunk cut (2 pixels) and a spurious 3×3 ring."""
    g = np.zeros((12, 13), bool)
    g[2, 1:12] = True
    g[3:11, 6] = True
    p = g.copy()
    p[6:8, 6] = False
    p[8:11, 1:4] = True
    p[9, 2] = False
    return p, g


def thick_bar():
    """G: a bar 3 pixels thick and 12 long; P: its 1-pixel middle line."""
    g = np.zeros((9, 14), bool)
    g[3:6, 1:13] = True
    p = np.zeros_like(g)
    p[4, 1:13] = True
    return p, g


def batch(*masks) -> torch.Tensor:
    """(B, 1, H, W) float tensor of equally sized 2-D masks."""
    return torch.as_tensor(np.stack(masks)[:, None], dtype=torch.float32)


def one_hot(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([1 - x, x], dim=1)


def score(metric, p, g, mask=None) -> float:
    """The one (image, class) value of ``metric`` on 2-D masks."""
    return float(metric(batch(p), batch(g), mask=None if mask is None else batch(mask))[0, 0])


def test_skeletons_the_hand_numbers_assume():
    # thin (1-pixel) curves are their own skeletons, the 5×5 ring loses its 4 corners, the thick bar keeps a middle
    # line of 10 and one pixel bent up at its end, the 3×3 ring becomes a 4-pixel diamond
    for shape in (broken_line, tree):
        assert (skeletonize(shape()[1]) == shape()[1]).all()
    p, g = tree()
    s = skeletonize(p)
    assert s.sum() == 21 and (s & g).sum() == 17 and s[8:11, 1:4].sum() == 4
    s = skeletonize(ring()[1])
    assert s.sum() == 12 and s[4, 6]
    s = skeletonize(thick_bar()[1])
    assert s.sum() == 11 and s[4, 1:11].all() and s[3, 11]


@pytest.mark.parametrize("shape, expected", [
    # S(P) = P, 8 pixels all in G: Tprec = 1; S(G) = G, 8 of its 10 pixels in P: Tsens = 0.8; 2·0.8/1.8 = 8/9
    (broken_line, 8 / 9),
    # S(P) ⊂ P ⊂ G: Tprec = 1; S(G) has 12 pixels, the cut one among them: Tsens = 11/12; 2·(11/12)/(23/12) = 22/23
    (ring, 22 / 23),
    # |S(P)| = 11 + 3 + 3 (the T in two pieces) + 4 (diamond, not in G): Tprec = 17/21; S(G) = G, 19 pixels, 17 in
    # P: Tsens = 17/19; 2·(17/21)(17/19) / (17/21 + 17/19) = 2·17 / (19 + 21) = 0.85
    (tree, 34 / 40),
    # S(P) = P, all in G: Tprec = 1; S(G) = 11 pixels, the 10 of row 4 in P: Tsens = 10/11; 2·(10/11)/(21/11) = 20/21
    (thick_bar, 20 / 21),
])
def test_cldice_by_hand(shape, expected):
    p, g = shape()
    assert score(ClDiceMetric(), p, g) == pytest.approx(expected, abs=1e-12)


def test_cldice_against_the_set_formula():
    # Tprec, Tsens as sets of pixel coordinates on random blobs: another path to the same definition
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, g = (ndimage.binary_dilation(rng.random((24, 24)) > 0.93) for _ in range(2))
        sp, sg = (set(zip(*np.nonzero(skeletonize(x)))) for x in (p, g))
        ps, gs = set(zip(*np.nonzero(p))), set(zip(*np.nonzero(g)))
        t_prec, t_sens = len(sp & gs) / len(sp), len(sg & ps) / len(sg)
        expected = 2 * t_prec * t_sens / (t_prec + t_sens) if t_prec + t_sens else 0.0
        assert score(ClDiceMetric(), p, g) == pytest.approx(expected, abs=1e-12)


def test_cldice_empty_cases_follow_dice_metric():
    empty, (line, _) = np.zeros((7, 12), bool), broken_line()
    assert math.isnan(score(ClDiceMetric(), line, empty))
    assert math.isnan(score(ClDiceMetric(), empty, empty))
    assert score(ClDiceMetric(ignore_empty=False), empty, empty) == 1.0
    assert score(ClDiceMetric(ignore_empty=False), line, empty) == 0.0
    assert score(ClDiceMetric(), empty, line) == 0.0
    disjoint = np.roll(line, 2, axis=0)
    assert score(ClDiceMetric(), disjoint, line) == 0.0


@pytest.mark.parametrize("shape, vca, b0, b1", [
    (broken_line, 2 / 1, 1, 0),  # P: 2 pieces, G: 1; no holes
    (ring, 1 / 1, 0, 1),  # one piece each; G has a hole, the cut P none
    (tree, 3 / 1, 2, 1),  # P: T top, trunk end, 3×3 ring (its hole); G: 1 piece, no hole
    (thick_bar, 1 / 1, 0, 0),
])
def test_component_ratio_and_betti_errors_by_hand(shape, vca, b0, b1):
    p, g = shape()
    assert score(ComponentRatioMetric(), p, g) == vca
    assert score(BettiErrorMetric(0), p, g) == b0
    assert score(BettiErrorMetric(1), p, g) == b1


def test_betti_numbers_against_scipy_labelling():
    # β0: 8-connected foreground components; β1: 4-connected background components that do not reach the border
    # (label the padded background: the outside is one component). A diagonal ring closes for 8-connectivity.
    diamond = np.zeros((5, 5), bool)
    diamond[[1, 2, 2, 3], [2, 1, 3, 2]] = True
    assert betti_numbers(diamond) == (1, 1)
    framed = np.ones((5, 5), bool)
    framed[1:4, 1:4] = False  # a ring on the image border still has its hole
    assert betti_numbers(framed) == (1, 1)
    rng = np.random.default_rng(1)
    for _ in range(200):
        x = rng.random((10, 10)) < rng.uniform(0.2, 0.8)
        b0 = ndimage.label(x, structure=np.ones((3, 3)))[1]
        b1 = ndimage.label(np.pad(~x, 1, constant_values=True))[1] - 1
        assert betti_numbers(x) == (b0, b1)


def test_topology_empty_cases():
    empty, (line, _) = np.zeros((7, 12), bool), broken_line()
    assert math.isnan(score(ComponentRatioMetric(), line, empty))
    assert score(ComponentRatioMetric(), empty, line) == 0.0
    assert score(BettiErrorMetric(0), empty, empty) == 0.0
    assert score(BettiErrorMetric(0), line, empty) == 2.0


def test_pixels_outside_the_fov_change_no_metric():
    rng = np.random.default_rng(2)
    probability = rng.random((12, 13))
    for shape in (broken_line, ring, tree, thick_bar):
        p, g = shape()
        fov = np.zeros_like(g)
        fov[1:-1, 1:-1] = True  # every shape lies inside
        noisy_p, noisy_g = p | (~fov & (rng.random(p.shape) > 0.5)), g | (~fov & (rng.random(g.shape) > 0.5))
        for metric in (ClDiceMetric(), ComponentRatioMetric(), BettiErrorMetric(0), BettiErrorMetric(1)):
            assert score(metric, noisy_p, noisy_g, fov) == score(metric, p, g), (shape.__name__, metric)
    # the noise does change the unmasked values (so the check above can fail)
    p, g = broken_line()
    fov = np.zeros_like(g)
    fov[1:-1, 1:-1] = True
    noisy_p = p.copy()
    noisy_p[0, ::3] = True  # 4 isolated pixels outside
    assert score(ComponentRatioMetric(), noisy_p, g) == 6.0 and score(ComponentRatioMetric(), noisy_p, g, fov) == 2.0
    assert score(ClDiceMetric(), noisy_p, g) < score(ClDiceMetric(), noisy_p, g, fov)
    # AUC: scores and labels outside the FOV are not pixels of the image
    g = tree()[1]
    fov = np.zeros_like(g)
    fov[1:-1, 1:-1] = True
    noisy = np.where(fov, probability, 1.0)  # outside: positives (below) with the top score
    assert score(FieldOfViewROCAUCMetric(), noisy, g | ~fov, fov) == score(FieldOfViewROCAUCMetric(), probability[1:-1,
                                                                             1:-1], g[1:-1, 1:-1])
    assert score(FieldOfViewROCAUCMetric(), noisy, g | ~fov) != score(FieldOfViewROCAUCMetric(), noisy, g | ~fov, fov)


def test_confusion_matrix_counts_only_fov_pixels():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:40, :50]
    fovs = [(yy - 20) ** 2 + (xx - 25) ** 2 < 18 ** 2, (yy - 20) ** 2 + (xx - 25) ** 2 < 12 ** 2]
    p, g = rng.random((2, 40, 50)) > 0.7, rng.random((2, 40, 50)) > 0.8
    expected = {"sensitivity": [], "specificity": [], "accuracy": [], "f1 score": []}
    for i, fov in enumerate(fovs):
        tp, fp = (p[i] & g[i] & fov).sum(), (p[i] & ~g[i] & fov).sum()
        tn, fn = (~p[i] & ~g[i] & fov).sum(), (~p[i] & g[i] & fov).sum()
        assert tp + fp + tn + fn == fov.sum()
        expected["sensitivity"].append(tp / (tp + fn))
        expected["specificity"].append(tn / (tn + fp))
        expected["accuracy"].append((tp + tn) / fov.sum())
        expected["f1 score"].append(2 * tp / (2 * tp + fp + fn))
    y_pred, y, mask = one_hot(batch(*p)), one_hot(batch(*g)), batch(*fovs)
    for name, values in expected.items():
        metric = FieldOfViewConfusionMatrixMetric(include_background=False, metric_name=name, compute_sample=True)
        metric(y_pred, y, mask=mask)
        per_image = metric.aggregate(reduction="none")[0]
        np.testing.assert_allclose(per_image[:, 0].numpy(), values, rtol=1e-6)
        assert float(metric.aggregate()[0]) == pytest.approx(np.mean(values), rel=1e-6)
    # Dice inside the FOV is Dice of the masks zeroed outside it; specificity of zeroed masks is not restricted
    np.testing.assert_allclose(expected["f1 score"], compute_dice(y_pred * mask, y * mask, include_background=False)
                               [:, 0].numpy(), rtol=1e-6)
    whole = FieldOfViewConfusionMatrixMetric(include_background=False, metric_name="specificity", compute_sample=True)
    whole(y_pred * mask, y * mask)
    assert not np.allclose(whole.aggregate(reduction="none")[0][:, 0].numpy(), expected["specificity"], rtol=1e-3)


def mann_whitney_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """U / (n1 n0), U = (sum of the positives' mid-ranks) − n1 (n1 + 1) / 2: ties count one half."""
    ranks = rankdata(scores)
    n1, n0 = labels.sum(), (~labels).sum()
    return (ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def test_auc_by_hand_and_against_mann_whitney():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of the 4 pairs ordered, AUC 0.75. The row outside the FOV,
    # a positive and a negative both scored 0, would make it (2 + 3 + 1/2 for the tie) / (3 · 3) = 11/18
    scores = np.array([[0.1, 0.4], [0.35, 0.8], [0.0, 0.0]])
    labels = np.array([[0, 0], [1, 1], [1, 0]], bool)
    fov = np.array([[1, 1], [1, 1], [0, 0]], bool)
    assert score(FieldOfViewROCAUCMetric(), scores, labels, fov) == 0.75
    assert score(FieldOfViewROCAUCMetric(), scores, labels, fov | True) == pytest.approx(11 / 18, abs=1e-12)
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:30, :30]
    fovs = [(yy - 15) ** 2 + (xx - 15) ** 2 < r ** 2 for r in (14, 9)]
    g = rng.random((2, 30, 30)) > 0.75
    prob = np.round(np.clip(0.3 * g + rng.random((2, 30, 30)) * 0.8, 0, 1), 1)  # rounded: many ties
    metric = FieldOfViewROCAUCMetric(include_background=False)
    # the softmax's two channels (background first), with a one-hot label
    values = metric(torch.as_tensor(np.stack([1 - prob, prob], 1)), one_hot(batch(*g)), mask=batch(*fovs))
    expected = [mann_whitney_auc(prob[i][fovs[i]], g[i][fovs[i]]) for i in range(2)]
    np.testing.assert_allclose(values[:, 0].numpy(), expected, rtol=1e-12)
    assert values.dtype == torch.float64
    with pytest.warns(UserWarning, match="can not be all"):
        assert math.isnan(score(FieldOfViewROCAUCMetric(), scores, np.zeros_like(labels)))


def monai_auc(scores, labels) -> float:
    """MONAI's ``compute_roc_auc`` of 1-D scores and 0/1 labels, as the metric called it before :func:`roc_auc`."""
    return float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(labels, dtype=torch.float64)))


@pytest.mark.parametrize("levels", [256, 2, None], ids=["8-bit", "binary", "continuous"])
def test_roc_auc_is_monais_number(levels):
    # 8-bit scores (an 8-bit probability map) tie in long runs, binary ones in two; continuous ones hardly ever
    rng = np.random.default_rng(5)
    for n, prevalence in ((2, 0.5), (7, 0.3), (500, 0.1), (20000, 0.12), (20000, 0.9)):
        labels = rng.random(n) < prevalence
        labels[:2] = True, False  # both classes
        scores = np.clip(0.25 * labels + rng.random(n) * 0.8, 0, 1)
        if levels:
            scores = np.round(scores * (levels - 1)) / (levels - 1)
        expected = monai_auc(scores, labels)
        # 2U and 2 n1 n0 are exact integers and MONAI's float64 sums of halves are exact: the same bits, not ~1e-12
        assert roc_auc(scores, labels) == expected, n
        assert roc_auc(torch.as_tensor(scores), torch.as_tensor(labels, dtype=torch.float64)) == expected
        assert roc_auc(scores.astype(np.float32), labels.astype(np.int64)) == monai_auc(scores.astype(np.float32),
                                                                                         labels)
        if n > 2:  # a score order reversed is 1 - AUC; a shuffle changes nothing
            assert roc_auc(-scores, labels) == pytest.approx(1 - expected, abs=1e-12)
            order = rng.permutation(n)
            assert roc_auc(scores[order], labels[order]) == expected
    assert np.isclose(expected, mann_whitney_auc(scores, labels), rtol=1e-12)


def test_roc_auc_edge_cases_as_monai():
    scores = np.array([0.2, 0.7, 0.7, 0.1])
    assert roc_auc(np.full(4, 0.3), np.array([0, 1, 1, 0])) == 0.5  # all scores tied
    assert roc_auc(scores, np.array([0, 1, 0, 0])) == monai_auc(scores, [0, 1, 0, 0]) == 5 / 6  # a tie across classes
    assert roc_auc(scores[[0, 3]], np.array([1, 0])) == 1.0 and roc_auc(scores[[0, 3]], np.array([0, 1])) == 0.0
    # one class only, labels other than 0/1, no pixel: NaN with MONAI's own warning
    for labels in ([0.0] * 4, [1.0] * 4, [0.0, 1.0, 2.0, 1.0], [2.0] * 4, []):
        x = scores[:len(labels)]
        with pytest.warns(UserWarning) as mine:
            assert math.isnan(roc_auc(x, np.array(labels)))
        with pytest.warns(UserWarning) as monais:
            assert math.isnan(monai_auc(x, labels))
        assert [str(w.message) for w in mine] == [str(w.message) for w in monais], labels
    with pytest.raises(ValueError, match="1-D of the same length"):
        roc_auc(scores, np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="1-D of the same length"):
        roc_auc(scores.reshape(2, 2), np.array([[0, 1], [0, 1]]))


def vesselness(photo: np.ndarray) -> np.ndarray:
    """A deterministic score map of a fundus photograph: its green channel inverted, less its local mean (vessels
    are dark, thin lines), as an 8-bit probability map stores it (256 levels: ties)."""
    green = 255.0 - photo[..., 1].astype(np.float64)
    u = ndimage.gaussian_filter(green, 1.0) - ndimage.gaussian_filter(green, 8.0)
    return np.round(np.clip((u + 10) / 30, 0, 1) * 255) / 255


@needs(CHASE)
def test_roc_auc_on_a_chase_db1_image():
    from PIL import Image

    from scripts.data import field_of_view

    # the disc's top edge in Image_01L (a 320x320 crop, 31 % of it outside the FOV), to keep MONAI's loop short
    box = (slice(0, 320), slice(100, 420))
    photo = np.asarray(Image.open(CHASE / "Image_01L.jpg"))
    fov = field_of_view(photo)[box]
    vessels = np.asarray(Image.open(CHASE / "Image_01L_1stHO.png")) > 0
    u, g = vesselness(photo)[box], vessels[box]
    assert 0.2 < 1 - fov.mean() < 0.5 and 0.05 < g[fov].mean() < 0.2
    expected = monai_auc(u[fov], g[fov])
    assert 0.8 < expected < 1  # a map that ranks vessels, with the ties of 8-bit levels
    assert len(np.unique(u[fov])) < 256 < fov.sum()
    assert roc_auc(u[fov], g[fov]) == expected
    value = FieldOfViewROCAUCMetric()(batch(u), batch(g), mask=batch(fov))
    assert float(value[0, 0]) == expected


def test_inputs_one_hot_single_channel_lists_and_aggregation():
    (p, g), perfect = tree(), tree()[1]
    p, g = batch(p, perfect), batch(g, perfect)  # VCA 3 and 1
    fov = torch.ones_like(g)
    for metric_type in (ClDiceMetric, ComponentRatioMetric):
        single = metric_type()(p, g)
        assert single.shape == (2, 1)
        torch.testing.assert_close(metric_type(include_background=False)(one_hot(p), one_hot(g), mask=fov), single)
        torch.testing.assert_close(metric_type(include_background=False)(one_hot(p), g), single)
        as_list = metric_type()(list(p), list(g), mask=list(fov))
        torch.testing.assert_close(as_list, single)
    both = ComponentRatioMetric(include_background=True)(one_hot(p), one_hot(g))
    assert both.shape == (2, 2)
    metric = ComponentRatioMetric(get_not_nans=True)
    metric(p, g)
    metric(p[:1], torch.zeros_like(g[:1]))  # empty label: NaN, left out of the mean
    value, not_nans = metric.aggregate()
    assert float(value) == pytest.approx((3 + 1) / 2) and float(not_nans) == 2


def test_bad_input_is_refused():
    p, g = broken_line()
    with pytest.raises(InputError, match="binary"):
        ClDiceMetric()(batch(p) * 0.7, batch(g))
    with pytest.raises(InputError, match="binary"):
        FieldOfViewConfusionMatrixMetric(metric_name="accuracy")(batch(p), batch(g) * 0.7)
    with pytest.raises(InputError, match="reduction"):
        ComponentRatioMetric(reduction="average")
    with pytest.raises(InputError, match="dimension"):
        BettiErrorMetric(dimension=2)
    with pytest.raises(InputError, match="dimension"):
        BettiError(dimension="1")
    with pytest.raises(InputError, match="metric_name"):
        FieldOfViewConfusionMatrix(metric_name="sensitivty")
    with pytest.raises(ValueError, match="FOV mask"):
        ClDiceMetric()(batch(p), batch(g), mask=batch(p)[:, :, :3])
    with pytest.raises(ValueError, match="same shape"):
        ClDiceMetric()(one_hot(batch(p)), batch(g))  # with the background, 2 channels against 1


def read_raw(path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {row["filename"]: float(row["class0"]) for row in csv.DictReader(f)}


def test_handlers_in_a_supervised_evaluator_write_per_image_rows(tmp_path):
    # the "network" passes the image through: images are logits, +4 on P, −4 elsewhere, in channel 1
    items = []
    # both in 9×12, for one batch: the line 1 row down, the ring as it is
    for name, (p, g) in {"line": broken_line(), "ring": ring()}.items():
        p, g = (np.pad(x, ((0, 9 - x.shape[0]), (0, 12 - x.shape[1]))) for x in (p, g))
        fov = np.zeros_like(g)
        fov[1:-1, 1:-1] = True
        p = p | (~fov & (np.indices(p.shape).sum(0) % 3 == 0))  # pieces outside the FOV, which must not count
        logit = torch.as_tensor(np.where(p, 4.0, -4.0), dtype=torch.float32)
        image = MetaTensor(torch.stack([torch.zeros_like(logit), logit]), meta={"filename_or_obj": f"{name}.png"})
        items.append({"image": image, "label": batch(g)[0], "fov": batch(fov)[0]})
    postprocessing = Compose([
        Activationsd(keys="pred", softmax=True),
        CopyItemsd(keys="pred", names="prob"),
        CopyItemsd(keys="fov", names="pred_fov"),  # the FOV into the output, where the metrics read
        AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[2, 2]),
    ])
    masked = from_engine(["pred", "label", "pred_fov"])
    metrics = {
        "cldice": ClDice(include_background=False, output_transform=masked),
        "cldice_whole": ClDice(include_background=False, output_transform=from_engine(["pred", "label"])),
        "vca": ComponentRatio(include_background=False, output_transform=masked),
        "betti1": BettiError(dimension=1, include_background=False, output_transform=masked),
        "specificity": FieldOfViewConfusionMatrix(include_background=False, metric_name="specificity",
                                                  compute_sample=True, output_transform=masked),
        "auc": FieldOfViewROCAUC(include_background=False, output_transform=from_engine(["prob", "label", "pred_fov"])),
    }
    saver = AtomicMetricsSaver(save_dir=str(tmp_path), metrics="*", metric_details="*",
                               batch_transform=lambda x: [xx["image"].meta for xx in x])
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(items, batch_size=2),
                                    network=torch.nn.Identity(), postprocessing=postprocessing,
                                    key_val_metric={"cldice": metrics.pop("cldice")}, additional_metrics=metrics,
                                    val_handlers=[saver])
    evaluator.run()
    raw = {name: read_raw(tmp_path / f"{name}_raw.csv") for name in ("cldice", "cldice_whole", "vca", "betti1",
                                                                     "specificity", "auc")}
    # clDice 8/9 and 22/23, VCA 2 and 1, β1 error 0 and 1 (the hand numbers above)
    assert raw["cldice"] == pytest.approx({"line.png": round(8 / 9, 4), "ring.png": round(22 / 23, 4)}, abs=1e-9)
    assert raw["vca"] == {"line.png": 2.0, "ring.png": 1.0}
    assert raw["betti1"] == {"line.png": 0.0, "ring.png": 1.0}
    # AUC: inside the FOV the positives of P score high, its cut pixels tie with all negatives (low): the line
    # (8 + 2/2) / 10 = 0.9, the ring (15 + 1/2) / 16 = 0.96875
    assert raw["auc"] == pytest.approx({"line.png": 0.9, "ring.png": 0.96875}, abs=1e-4)
    assert raw["cldice_whole"]["line.png"] < raw["cldice"]["line.png"]
    # specificity inside the FOV: P has no false positive there
    assert raw["specificity"] == {"line.png": 1.0, "ring.png": 1.0}
    state = evaluator.state.metrics
    assert state["cldice"] == pytest.approx((8 / 9 + 22 / 23) / 2) and state["vca"] == pytest.approx(1.5)
    with open(tmp_path / "metrics.csv") as f:
        assert dict(line.strip().split(",") for line in f)["betti1"] == "0.5"


# ---- where a mask breaks (scripts.metrics.topology_defects, scripts.figures.topology_overlay) -----------------


def test_a_gap_between_two_pieces_is_a_break_and_a_small_piece_a_fragment():
    p, g = broken_line()
    defects = topology_defects(p, g, fragment_size=4)
    assert defects["count"] == {"breaks": 1, "fragments": 0}  # each piece has 4 pixels: not < 4
    np.testing.assert_array_equal(np.argwhere(defects["breaks"]), [[3, 5], [3, 6]])  # the gap
    np.testing.assert_array_equal(defects["missed"], g & ~p)
    defects = topology_defects(p, g, fragment_size=5)
    assert defects["count"]["fragments"] == 2 and defects["fragments"].sum() == 8
    assert topology_defects(p)["missed"] is None and topology_defects(p)["count"]["breaks"] == 0  # no label


def test_a_missed_tip_or_a_cut_that_leaves_one_piece_is_not_a_break():
    p, g = broken_line()
    p[:] = g
    p[3, 8:11] = False  # the line's last three pixels: a missed tip
    assert topology_defects(p, g)["count"]["breaks"] == 0
    p, g = ring()  # the ring cut once is still one piece
    assert topology_defects(p, g)["count"]["breaks"] == 0 and topology_defects(p, g)["missed"].sum() == 1


def test_a_cut_branch_of_a_tree_is_one_break_and_the_small_pieces_fragments():
    p, g = tree()
    defects = topology_defects(p, g, fragment_size=9)
    assert defects["count"] == {"breaks": 1, "fragments": 2}  # the spurious ring (8 px), the cut trunk's end (3 px)
    np.testing.assert_array_equal(np.argwhere(defects["breaks"]), [[6, 6], [7, 6]])
    np.testing.assert_array_equal(defects["fragments"][8:11, :7], p[8:11, :7])
    assert defects["fragments"].sum() == 11


def test_the_overlay_paints_breaks_fragments_misses_and_false_positives():
    p, g = tree()
    p[2, 1] = False  # a missed pixel that is no break (the bar's tip)
    p[0, 12] = True  # a false positive, a one-pixel fragment
    image = np.full(g.shape, 0.5)
    out = topology_overlay(image, topology_defects(p, g, fragment_size=2), p, g, radius=1)
    assert out.shape == g.shape + (3,) and out.dtype == np.uint8
    colours = {k: tuple(v) for k, v in TOPOLOGY_COLOURS.items()}
    assert tuple(out[2, 5]) == colours["vessel"]
    assert tuple(out[6, 6]) == colours["break"] and tuple(out[2, 1]) == colours["missed"]
    assert tuple(out[0, 12]) == colours["fragment"]  # the fragment's colour over the false positive's
    assert tuple(out[11, 0]) == (75, 75, 75)  # the photograph, dimmed


def test_the_break_picture_names_a_ground_truth_of_another_size_and_a_missing_folder(tmp_path):
    from types import SimpleNamespace

    from monai.data import MetaTensor
    from PIL import Image

    from scripts.reports import TopologyOverlaySaver

    with pytest.raises(InputError, match=f"--label_dir {tmp_path / 'nowhere'} is not a folder"):
        TopologyOverlaySaver(tmp_path / "out", label_dir=tmp_path / "nowhere")
    (tmp_path / "truths").mkdir()
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "truths" / "eye_1stHO.png")
    saver = TopologyOverlaySaver(tmp_path / "out", label_dir=tmp_path / "truths")
    meta = {"filename_or_obj": "/photos/eye.jpg"}
    item = {"pred": MetaTensor(torch.zeros(50, 30), meta=meta), "image": MetaTensor(torch.zeros(3, 50, 30))}
    engine = SimpleNamespace(state=SimpleNamespace(output=[item]))
    saver._start(engine)
    with pytest.raises(InputError) as info:
        saver(engine)
    assert str(info.value) == (f"ground truth {tmp_path / 'truths' / 'eye_1stHO.png'} is 40×30 (W×H) but its image "
                               "/photos/eye.jpg is 50×30.")
