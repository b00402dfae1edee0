"""
DualThreshold(d) (tubular.md §2): the one labelling pass against the spec's iteration done literally, against
skimage's hysteresis threshold where the two mean the same, its types, meta data and config use, its errors, and
its benchmark at toy size.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from conftest import run_benchmark
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import AsDiscreted
from scipy import ndimage

from scripts.errors import InputError
from scripts.transforms import DualThreshold, DualThresholdd


def literal_dti(u: np.ndarray, low: float, high: float, connectivity: int | None = None) -> np.ndarray:
    """The spec, step by step: V = {u > high}; add every pixel > low with a neighbour in V; repeat until V stops
    changing. Neighbours: the offsets in {-1, 0, 1}^d with 1 to ``connectivity`` (default d) non-zero entries."""
    hops = connectivity or u.ndim
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=u.ndim) if 0 < np.abs(o).sum() <= hops]
    weak, v = u > low, u > high
    while True:
        padded, near = np.pad(v, 1), np.zeros_like(v)
        for o in offsets:
            near |= padded[tuple(slice(1 + k, 1 + k + n) for k, n in zip(o, v.shape))]
        grown = v | (near & weak)
        if np.array_equal(grown, v):
            return v
        v = grown


def random_map(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Probabilities in [0, 1]: white noise, a smooth field, thin ridges (vessel-like) or values on a 0.1 grid
    (float64, so that pixels equal to 0.3 and 0.5 exactly test the strict comparisons)."""
    if kind == "noise":
        return rng.random(shape, dtype=np.float32)
    if kind == "grid":
        return rng.integers(0, 11, shape) / 10
    g = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    if kind == "ridges":
        g = np.exp(-((g / (0.3 * g.std() + 1e-12)) ** 2)) * rng.uniform(0.3, 1.0, shape)
    return ((g - g.min()) / (np.ptp(g) + 1e-12)).astype(np.float32)


SHAPES = [(1, 1), (1, 9), (9, 1), (2, 2), (7, 5), (16, 16), (23, 41), (64, 48)]
THRESHOLDS = [(0.3, 0.5), (0.2, 0.8), (0.5, 0.5), (0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.3, 0.3), (0.45, 0.55)]


def cases(seed: int = 0):
    """(u, low, high) for every shape, kind and threshold pair, two random maps each, plus random thresholds."""
    rng = np.random.default_rng(seed)
    for shape, kind, rep in itertools.product(SHAPES, ("noise", "smooth", "ridges", "grid"), range(2)):
        u = random_map(rng, shape, kind)
        for low, high in THRESHOLDS + [tuple(sorted(rng.random(2)))]:
            yield u, float(low), float(high)


def test_matches_the_iteration():
    grew = dropped = 0
    for u, low, high in cases():
        out = DualThreshold(low, high)(u[None])
        expected = literal_dti(u, low, high)
        assert out.shape == (1, *u.shape) and out.dtype == u.dtype
        np.testing.assert_array_equal(out[0].astype(bool), expected, err_msg=f"{u.shape}, low {low}, high {high}")
        grew += expected.sum() > (u > high).sum()  # weak pixels were added
        dropped += expected.sum() < (u > low).sum()  # weak components without a seed were left out
    assert grew > 100 and dropped > 100  # the cases exercise both halves of the definition


@pytest.mark.parametrize("connectivity", [1, 2, 3])
def test_matches_the_iteration_3d(connectivity):
    rng = np.random.default_rng(connectivity)
    for kind in ("noise", "smooth", "grid"):
        u = random_map(rng, (9, 11, 13), kind)
        out = DualThreshold(connectivity=connectivity)(torch.as_tensor(u)[None])[0].bool().numpy()
        np.testing.assert_array_equal(out, literal_dti(u, 0.3, 0.5, connectivity))


def test_edge_cases_and_strict_thresholds():
    dti = DualThreshold(0.3, 0.5)
    np.testing.assert_array_equal(dti(np.full((1, 4, 5), 0.2)), 0)  # all below τ_L
    np.testing.assert_array_equal(dti(np.full((1, 4, 5), 0.4)), 0)  # all weak, no seed
    np.testing.assert_array_equal(dti(np.full((1, 4, 5), 0.9)), 1)  # all above τ_H
    np.testing.assert_array_equal(dti(np.full((1, 4, 5), 0.5)), 0)  # u = τ_H seeds nothing
    line = np.array([[[0.6, 0.3, 0.4, 0.4, 0.6, 0.31, 0.31]]])  # u = τ_L is not grown into
    np.testing.assert_array_equal(dti(line)[0, 0], [1, 0, 1, 1, 1, 1, 1])
    diagonal = np.array([[[0.6, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, 0.4]]])  # 8-neighbours, not 4
    np.testing.assert_array_equal(dti(diagonal)[0], np.eye(3))
    np.testing.assert_array_equal(DualThreshold(connectivity=1)(diagonal)[0], np.diag([1, 0, 0]))
    u = np.random.default_rng(0).random((1, 20, 20))  # τ_L = τ_H: the plain threshold u > τ
    np.testing.assert_array_equal(DualThreshold(0.5, 0.5)(u), u > 0.5)
    np.testing.assert_array_equal(DualThreshold(0.0, 1.0)(u), 0)  # nothing is above 1


def test_skimage_hysteresis():
    """
    ``skimage.filters.apply_hysteresis_threshold(u, low, high)`` (0.26) keeps the components of ``u > low`` that
    hold a pixel ``u > high`` (both strict, as here), labelled by ``ndimage.label`` with its default structure:
    4-connected in 2-D (6 in 3-D), i.e. ``connectivity=1``; it also clips ``low`` to ``high`` where we refuse
    ``low > high``. So: equal to ``DualThreshold(connectivity=1)`` on every map; the default (8-connected) result
    contains skimage's, and equals it whenever the 4- and 8-connected components of ``u > low`` coincide (the
    same count: each 8-connected component is a union of 4-connected ones).
    """
    filters = pytest.importorskip("skimage.filters")
    same = differ = 0
    for u, low, high in cases(seed=1):
        ours = DualThreshold(low, high)(u[None])[0].astype(bool)
        theirs = filters.apply_hysteresis_threshold(u, low, high)
        np.testing.assert_array_equal(DualThreshold(low, high, connectivity=1)(u[None])[0].astype(bool), theirs)
        assert not (theirs & ~ours).any()
        weak = u > low
        if ndimage.label(weak)[1] == ndimage.label(weak, np.ones((3, 3)))[1]:
            np.testing.assert_array_equal(ours, theirs)
            same += 1
        else:
            differ += not np.array_equal(ours, theirs)
    assert same > 100 and differ > 10


def test_types_meta_and_channels():
    rng = np.random.default_rng(0)
    u = random_map(rng, (30, 20), "ridges")
    mask = literal_dti(u, 0.3, 0.5)
    probs = np.stack([1 - u, u])
    dti = DualThreshold()
    for x in (u[None], probs, np.concatenate([probs, rng.random((3, 30, 20), dtype=np.float32)])):  # channel 0 or 1
        out = dti(x)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_array_equal(out, mask[None])
    out = dti(torch.as_tensor(probs, dtype=torch.float64))
    assert type(out) is torch.Tensor and out.dtype == torch.float64 and out.shape == (1, 30, 20)
    assert dti(u[None] > 0.5).dtype == np.float32  # not floating: float32
    meta = MetaTensor(torch.as_tensor(probs), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])),
                      meta={"filename_or_obj": "frame.png", "spatial_shape": (20, 30)})
    onehot = DualThreshold(to_onehot=True)(meta)
    assert isinstance(onehot, MetaTensor) and onehot.shape == (2, 30, 20)
    assert onehot.meta["filename_or_obj"] == "frame.png" and onehot.meta["spatial_shape"] == (20, 30)
    torch.testing.assert_close(onehot.affine, meta.affine)
    np.testing.assert_array_equal(onehot.numpy(), np.stack([~mask, mask]))
    np.testing.assert_array_equal(dti(torch.as_tensor(u).T[None]).numpy()[0], mask.T)  # (C, W, H) as well


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_tensor_comes_back_on_its_device():
    u = torch.rand(2, 30, 20, device="cuda")
    out = DualThreshold()(u)
    assert out.device == u.device and out.shape == (1, 30, 20)
    np.testing.assert_array_equal(out.cpu().numpy()[0], literal_dti(u[1].cpu().numpy(), 0.3, 0.5))


def test_dictionary_version_replaces_asdiscreted():
    """With τ_L = τ_H = 0.5 it is the decision it replaces: argmax of [1 − p, p], ties (p = 0.5) to background."""
    rng = np.random.default_rng(0)
    p = torch.as_tensor(random_map(rng, (40, 40), "grid"), dtype=torch.float32)
    data = {"pred": MetaTensor(torch.stack([1 - p, p])), "label": torch.ones(1, 40, 40)}
    out = DualThresholdd("pred", 0.5, 0.5, to_onehot=True)(data)
    expected = AsDiscreted("pred", argmax=True, to_onehot=2)(data)["pred"]
    torch.testing.assert_close(out["pred"].as_tensor(), expected.as_tensor())
    assert out["label"] is data["label"]
    dti = DualThresholdd(["pred", "other"], allow_missing_keys=True)(data)["pred"]
    np.testing.assert_array_equal(dti.numpy()[0], literal_dti(p.numpy(), 0.3, 0.5))


def test_config_swaps_it_in():
    """The validation postprocessing with DTI in place of AsDiscreted(argmax): logits -> softmax -> one-hot."""
    parser = ConfigParser({"post": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "scripts.transforms.DualThresholdd", "keys": "pred", "low": 0.3, "high": 0.5, "to_onehot": True},
        {"_target_": "AsDiscreted", "keys": "label", "to_onehot": 2}]}})
    logits = torch.randn(2, 24, 24)
    out = parser.get_parsed_content("post")({"pred": MetaTensor(logits), "label": torch.zeros(1, 24, 24)})
    u = torch.softmax(logits, 0)[1].numpy()
    assert out["pred"].shape == out["label"].shape == (2, 24, 24)
    np.testing.assert_array_equal(out["pred"][1].numpy(), literal_dti(u, 0.3, 0.5))


@pytest.mark.parametrize("kwargs, message", [
    ({"low": -0.1}, r"low \(τ_L\) must be a number in \[0.0, 1.0\], got -0.1"),
    ({"low": 0.6}, r"high \(τ_H, at least low = 0.6\) must be a number in \[0.6, 1.0\], got 0.5"),
    ({"high": 1.5}, r"high .* must be a number in \[0.3, 1.0\], got 1.5"),
    ({"low": "0.3"}, r"low \(τ_L\) must be a number .* got '0.3' \(str\)"),
    ({"high": True}, r"high .* got True \(bool\)"),
    ({"connectivity": 0}, r"connectivity must be an integer >= 1, got 0"),
    ({"to_onehot": "yes"}, r"to_onehot must be true or false, got 'yes'"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        DualThreshold(**kwargs)
    with pytest.raises(InputError, match=message):
        DualThresholdd("pred", **kwargs)


def test_bad_input():
    with pytest.raises(InputError, match=r"channel-first \(C, H, W\[, D\]\) probability map, got \(20, 30\)"):
        DualThreshold()(np.zeros((20, 30)))
    with pytest.raises(InputError, match="connectivity must be at most the spatial rank 2, got 3"):
        DualThreshold(connectivity=3)(np.zeros((1, 20, 30)))
    with pytest.raises(InputError, match=r"expects probabilities in \[0, 1\], got values in .*Activationsd\(softmax"):
        DualThreshold()(torch.randn(2, 20, 30) * 5)  # logits


def test_benchmark_toy_size(monkeypatch, capsys):
    """benchmarks/dti.py at toy size: it exits 0, the three agree, the figures are positive, and both vessel
    networks, as the configs build them, are timed."""
    out = run_benchmark("dti.py", ["--quick"], monkeypatch, capsys)
    for row in ("exact DTI", "max-pool loop", "raster loop"):
        assert float(re.search(rf"^\| {row} .*?\|.*?\|\s+>?(\S+) \|", out, re.MULTILINE).group(1)) > 0, out
    assert float(re.search(r"^max-pool loop / exact: (\S+)x", out, re.MULTILINE).group(1)) > 0
    assert "agree: exact = max-pool loop: yes; exact = raster loop: yes" in out
    for row, params in (("U-Net (configs/vessel/unet.yaml)", "838,802"), ("FR U-Net (configs/vessel/frunet.yaml)",
                                                                         "536,994")):
        assert float(re.search(rf"^\| {re.escape(row)}\s+\|\s+{params} \|\s+(\S+) \|", out, re.MULTILINE).group(1)) > 0
