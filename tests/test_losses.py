import numpy as np
import pytest
import torch
from monai.losses import DiceLoss, LogHausdorffDTLoss

from scripts.losses import PolyDiceLoss, WeightedSumLoss, theta_squared

B, H, W = 4, 16, 16


def _data(dtype=torch.float64, seed=0, empty=()):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, 2, H, W, generator=g, dtype=dtype)
    mask = (torch.rand(B, 1, H, W, generator=g) < 0.3).to(dtype)
    mask[:, :, 0, 0] = 1.0  # non-empty unless asked otherwise
    for i in empty:
        mask[i] = 0.0
    return logits, mask


def _monai_dice(logits, mask, **smooth):
    # MONAI's to_onehot_y makes a float32 target, which caps its float64 accuracy at ~1e-7 (|y|^2 is
    # rounded in float32); for float64 pass the equivalent one-hot target in float64 instead.
    onehot = logits.dtype != torch.float64
    ref = DiceLoss(
        squared_pred=True, batch=False, include_background=False, to_onehot_y=onehot, softmax=True,
        reduction="none", **smooth,
    )
    return ref(logits, mask if onehot else torch.cat([1 - mask, mask], 1)).reshape(-1)


def _numpy_reference(logits, mask, eps, order, smooth_nr, smooth_dr):
    """Direct float64 evaluation of the method.md formula (arccos, explicit K-term sum)."""
    z = logits.detach().double().numpy()
    e = np.exp(z - z.max(1, keepdims=True))
    p = (e[:, 1] / e.sum(1)).reshape(B, -1)
    y = mask.double().numpy().reshape(B, -1)
    eps = np.broadcast_to(np.asarray(eps, dtype=np.float64), (B,))
    out = []
    for i in range(B):
        np_, ny = np.linalg.norm(p[i]), np.linalg.norm(y[i])
        s = (2 * np_ * ny + smooth_nr) / (np_**2 + ny**2 + smooth_dr)
        cos = p[i] @ y[i] / (np_ * ny) if ny > 0 else 1.0  # theta = 0 on an empty mask
        th = np.arccos(np.clip(cos, -1.0, 1.0))
        if order is None:
            poly = (1 - cos) + eps[i] * th**2
        else:
            poly = (0.5 + eps[i]) * th**2
            for k in range(2, order + 1):
                poly += (-1) ** (k - 1) / np.prod(np.arange(1, 2 * k + 1, dtype=np.float64)) * th ** (2 * k)
        out.append((1 - s) + s * poly)
    return np.array(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_untruncated_equals_monai_dice(dtype, tol):
    logits, mask = _data(dtype)
    loss = PolyDiceLoss(order=None, eps=0.0, smooth_nr=0.0, smooth_dr=0.0, reduction="none")(logits, mask)
    ref = _monai_dice(logits, mask, smooth_nr=0.0, smooth_dr=0.0)
    assert loss.shape == (B,) and loss.dtype == dtype
    torch.testing.assert_close(loss, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("order", [1, 2, 3, None])
@pytest.mark.parametrize("eps", [0.0, -0.3, 1.0, "per_item"])
@pytest.mark.parametrize("smooth", [0.0, 1e-5])
def test_value_against_numpy(order, eps, smooth):
    logits, mask = _data(torch.float64, seed=1, empty=(2,) if smooth else ())
    eps_val = torch.tensor([0.0, 0.5, -0.2, 2.0], dtype=torch.float64) if eps == "per_item" else eps
    loss_fn = PolyDiceLoss(order=order, smooth_nr=smooth, smooth_dr=smooth, reduction="none")
    loss = loss_fn(logits, mask, eps=eps_val)
    ref = _numpy_reference(logits, mask, np.asarray(eps_val), order, smooth, smooth)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_constructor_eps_and_float32():
    logits, mask = _data(torch.float32, seed=2)
    loss = PolyDiceLoss(eps=0.7, order=2, reduction="none")(logits, mask)
    ref = _numpy_reference(logits, mask, 0.7, 2, 1e-5, 1e-5)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("order", [1, None])
@pytest.mark.parametrize("near_perfect", [False, True])
def test_gradcheck(order, near_perfect):
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 1, 5, 5, generator=g) < 0.4).double()
    mask[:, :, 0, 0] = 1.0
    logits = torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64)
    if near_perfect:  # puts 1 - cos(theta) in the small-x series branch
        logits = logits * 0.3 + 4.0 * torch.cat([1 - 2 * mask, 2 * mask - 1], 1)
    eps = torch.tensor([0.25, -0.1], dtype=torch.float64)
    loss_fn = PolyDiceLoss(order=order, reduction="sum")
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, mask, eps=eps), (logits,))


@pytest.mark.parametrize("order", [1, 3, None])
@pytest.mark.parametrize("two_channels", [False, True])
def test_finite_grad_at_perfect_prediction(order, two_channels):
    _, mask = _data(torch.float64, seed=4, empty=(1,))  # image 1: p = y = 0
    prob = mask.clone().requires_grad_(True)
    inp = torch.cat([1 - prob, prob], 1) if two_channels else prob
    loss = PolyDiceLoss(order=order, softmax=False, reduction="none")(inp, mask)
    loss.sum().backward()
    assert torch.isfinite(prob.grad).all()
    np.testing.assert_allclose(loss.detach().numpy(), 0.0, atol=1e-9)


@pytest.mark.parametrize("order", [1, 2, None])
def test_empty_ground_truth(order):
    logits, mask = _data(torch.float64, seed=5, empty=(0, 3))
    logits.requires_grad_(True)
    loss = PolyDiceLoss(order=order, eps=0.4, reduction="none")(logits, mask)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = _monai_dice(ref_logits, mask)  # default smoothing, as in PolyDiceLoss
    torch.testing.assert_close(loss[[0, 3]], ref[[0, 3]], rtol=1e-12, atol=1e-14)
    loss[[0, 3]].sum().backward()
    ref[[0, 3]].sum().backward()
    assert torch.isfinite(logits.grad).all()
    # MONAI gets |p|^2 via |p|^2 + |y|^2 - |p - y|^2 (polarization), so its gradient carries ~1e-9 relative noise
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-7, atol=0)
    # on probabilities: the gradient is nonzero and positive, i.e. gradient descent pushes p towards 0
    prob = torch.rand(B, 1, H, W, dtype=torch.float64).clamp_min(0.01).requires_grad_(True)
    PolyDiceLoss(order=order, softmax=False, reduction="sum")(prob, torch.zeros_like(prob)).backward()
    assert torch.isfinite(prob.grad).all() and (prob.grad > 0).all()


def test_theta_squared_matches_arccos():
    x = np.logspace(-12, 0, 2001)
    x = np.concatenate([x, [0.05 * (1 - 1e-9), 0.05, 0.05 * (1 + 1e-9), 1.5, 2.0]])
    got = theta_squared(torch.from_numpy(x)).numpy()
    via_asin = (2 * np.arcsin(np.sqrt(x / 2))) ** 2  # cancellation-free reference for all x
    np.testing.assert_allclose(got, via_asin, rtol=1e-12, atol=0)
    big = x >= 1e-3  # 1 - x is exact enough here for arccos to be a valid reference
    np.testing.assert_allclose(got[big], np.arccos(1 - x[big]) ** 2, rtol=1e-12, atol=0)
    # the x^3 coefficient is 4/45 (not 8/45): acos(0.9)^2
    assert abs(theta_squared(torch.tensor(0.1, dtype=torch.float64)).item() - 0.2034251849591) < 1e-12


def test_theta_squared_derivative_at_zero():
    for x0 in [0.0, 1e-300, 1e-12]:
        x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(theta_squared(x), x)
        assert abs(grad.item() - 2.0) < 1e-11
    x = torch.tensor([0.0, 1e-3, 0.05, 0.5], dtype=torch.float32, requires_grad=True)
    theta_squared(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_argument_validation():
    logits, mask = _data(torch.float32)
    with pytest.raises(ValueError, match="order"):
        PolyDiceLoss(order=0)
    with pytest.raises(ValueError, match="order"):
        PolyDiceLoss(order=1.5)
    with pytest.raises(ValueError, match="eps"):
        PolyDiceLoss()(logits, mask, eps=torch.zeros(B + 1))
    with pytest.raises(ValueError, match="eps"):
        PolyDiceLoss()(logits, mask, eps=torch.zeros(B, 1))
    with pytest.raises(ValueError, match="target"):
        PolyDiceLoss()(logits, mask[:, :, :8])
    with pytest.raises(ValueError, match="target"):
        PolyDiceLoss()(logits, mask[:2])
    with pytest.raises(ValueError, match="target"):
        PolyDiceLoss()(logits, torch.cat([mask, mask], 1))
    with pytest.raises(ValueError, match="channels"):
        PolyDiceLoss(softmax=True)(logits[:, :1], mask)
    with pytest.raises(ValueError, match="channels"):
        PolyDiceLoss(softmax=False)(torch.rand(B, 3, H, W), mask)


def test_reductions_and_target_dtype():
    logits, mask = _data(torch.float32, seed=6)
    eps = torch.tensor([0.1, 0.2, 0.3, 0.4])
    per = PolyDiceLoss(order=2, reduction="none")(logits, mask, eps=eps)
    assert per.shape == (B,)
    torch.testing.assert_close(PolyDiceLoss(order=2, reduction="mean")(logits, mask, eps=eps), per.mean())
    torch.testing.assert_close(PolyDiceLoss(order=2, reduction="sum")(logits, mask, eps=eps), per.sum())
    torch.testing.assert_close(PolyDiceLoss(order=2, reduction="none")(logits, mask.long(), eps=eps), per)
    # single-channel probabilities are the foreground itself
    prob = torch.softmax(logits, 1)
    torch.testing.assert_close(PolyDiceLoss(softmax=False, reduction="none")(prob[:, 1:], mask),
                               PolyDiceLoss(reduction="none")(logits, mask))


def test_weighted_sum_is_the_weighted_sum_of_its_terms():
    logits, mask = _data(torch.float32)
    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, squared_pred=True)
    hausdorff = LogHausdorffDTLoss(include_background=False, to_onehot_y=True, softmax=True)
    expected = 1.0 * dice(logits, mask) + 0.3 * hausdorff(logits, mask)
    assert torch.allclose(WeightedSumLoss([dice, hausdorff], [1.0, 0.3])(logits, mask), expected)
    assert torch.allclose(WeightedSumLoss([dice])(logits, mask), dice(logits, mask))
    with pytest.raises(ValueError, match="one weight per loss"):
        WeightedSumLoss([dice, hausdorff], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        WeightedSumLoss([dice], [-1.0])
