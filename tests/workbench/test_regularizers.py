"""Tests for sdelip.workbench.regularizers: effects checked against independent float64 computations."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from sdelip.workbench.data import Normalization, load_dataset, make_loader
from sdelip.workbench.regularizers import (
    PRESETS,
    CorruptedLabels,
    NoisyGradient,
    RegularizerConfig,
    autoaugment_transform,
    draw_mixup,
    fgsm_perturb,
    get_preset,
    make_optimizer,
    per_sample_loss,
    with_label_corruption,
)


def _linear_model(d_in=12, c=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, c)).double()


def _np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_ce(logits, y, eps=0.0):
    """(1 - eps) * CE + eps * mean_k(-log p_k), by hand."""
    lp = _np_log_softmax(logits)
    nll = -lp[np.arange(len(y)), np.asarray(y)]
    return (1 - eps) * nll + eps * (-lp.mean(axis=1))


# --------------------------------------------------------------------------- config


def test_presets_match_table3():
    assert PRESETS["mixup"].mixup_alpha == 0.4
    assert PRESETS["label_smoothing"].label_smoothing == 0.1
    assert PRESETS["fgsm"].fgsm_eps == 0.03
    assert PRESETS["weight_decay"].weight_decay == 1e-3
    assert PRESETS["autoaugment"].autoaugment and PRESETS["dropout"].dropout and PRESETS["batchnorm"].batchnorm
    assert PRESETS["none"] == RegularizerConfig() and PRESETS["none"].active() == []
    assert set(PRESETS) == {"none", "batchnorm", "dropout", "weight_decay", "mixup", "label_smoothing",
                            "autoaugment", "fgsm"}
    for name, cfg in PRESETS.items():
        assert name == "none" or len(cfg.active()) == 1
    assert get_preset("weight-decay") is PRESETS["weight_decay"]
    with pytest.raises(ValueError, match="valid presets"):
        get_preset("cutout")


@pytest.mark.parametrize(
    "field,value",
    [
        ("mixup_alpha", 0.0), ("mixup_alpha", -1.0), ("label_smoothing", 1.5), ("label_smoothing", -0.1),
        ("fgsm_eps", 0.0), ("weight_decay", -1e-3), ("weight_decay", float("nan")), ("noisy_gradient_rho", 1.2),
        ("noisy_gradient_noise", "laplace"), ("label_corruption", 2.0), ("autoaugment", 1),
    ],
)
def test_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        RegularizerConfig(**{field: value})


# --------------------------------------------------------------------------- label smoothing


def test_label_smoothing_equals_hand_formula():
    model = _linear_model()
    x = torch.randn(9, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (9,))
    for eps in (0.0, 0.1, 0.7):
        losses, logits = per_sample_loss(model, x, y, RegularizerConfig(label_smoothing=eps))
        assert losses.shape == (9,) and losses.dtype == torch.float64
        expected = _np_ce(logits.detach().numpy(), y.numpy(), eps)
        np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(logits.detach().numpy(), model(x).detach().numpy(), rtol=0, atol=0)


# --------------------------------------------------------------------------- mixup


def test_mixup_loss_is_explicit_convex_combination():
    model = _linear_model()
    x = torch.randn(16, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    cfg = RegularizerConfig(mixup_alpha=0.4, label_smoothing=0.1)
    gen = torch.Generator().manual_seed(11)
    replay = torch.Generator()
    replay.set_state(gen.get_state())
    lam, perm = draw_mixup(16, 0.4, replay)
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(16)) and perm.tolist() != list(range(16))
    losses, logits = per_sample_loss(model, x, y, cfg, gen)
    assert torch.equal(gen.get_state(), replay.get_state())  # the same draws were consumed
    W = model[1].weight.detach().numpy()
    b = model[1].bias.detach().numpy()
    xn, p = x.numpy(), perm.numpy()
    z = (lam * xn + (1 - lam) * xn[p]) @ W.T + b
    expected = lam * _np_ce(z, y.numpy(), 0.1) + (1 - lam) * _np_ce(z, y.numpy()[p], 0.1)
    np.testing.assert_allclose(logits.detach().numpy(), z, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-12, atol=1e-13)
    # a different generator gives a different lambda / permutation
    other, _ = per_sample_loss(model, x, y, cfg, torch.Generator().manual_seed(12))
    assert not torch.allclose(other, losses)


def test_mixup_lambda_is_beta_04_04():
    gen = torch.Generator().manual_seed(0)
    lams = np.array([draw_mixup(4, 0.4, gen)[0] for _ in range(20000)])
    assert np.all((lams > 0) & (lams < 1))
    a = 0.4
    var = a * a / ((2 * a) ** 2 * (2 * a + 1))  # Beta(a, a): mean 1/2, variance 0.1389 (uniform: 0.0833)
    assert abs(lams.mean() - 0.5) < 5 * math.sqrt(var / lams.size)
    assert abs(lams.var() / var - 1) < 0.04
    # U-shaped: P(lam < 0.1) = I_0.1(0.4, 0.4) = 0.2461..., far from uniform's 0.1
    assert abs((lams < 0.1).mean() - 0.2461) < 0.015


# --------------------------------------------------------------------------- FGSM


def test_fgsm_step_is_eps_in_pixel_units_along_the_input_gradient_sign():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    torch.manual_seed(1)
    norm = Normalization((0.5, 0.4, 0.3), (0.25, 0.5, 0.2))
    pixels = 0.2 + 0.6 * torch.rand(8, 3, 4, 4, dtype=torch.float64)  # interior: no clipping at 0.03
    mean, std = norm.as_tensors(torch.float64)
    x = (pixels - mean) / std
    y = torch.randint(0, 5, (8,))
    eps = 0.03
    losses, _ = per_sample_loss(model, x, y, RegularizerConfig(fgsm_eps=eps), normalization=norm)
    assert all(p.grad is None for p in model.parameters())  # the attack leaves no parameter gradients

    x_adv = fgsm_perturb(model, x, lambda z: nn.functional.cross_entropy(z, y, reduction="none"), eps, norm)
    delta_pixels = (x_adv - x) * std
    assert not x_adv.requires_grad
    np.testing.assert_allclose(delta_pixels.abs().numpy(), eps, rtol=1e-12)
    # independent input gradient of CE for a linear softmax model: W^T (p - e_y)
    W = model[1].weight.detach().numpy()
    z = x.flatten(1).numpy() @ W.T + model[1].bias.detach().numpy()
    p = np.exp(_np_log_softmax(z))
    p[np.arange(8), y.numpy()] -= 1
    grad = (p @ W).reshape(8, 3, 4, 4)
    np.testing.assert_array_equal(np.sign(delta_pixels.numpy()), np.sign(grad))
    # the loss that is trained on is the loss at x_adv, and it is larger than the clean one
    clean, _ = per_sample_loss(model, x, y)
    adv_direct = nn.functional.cross_entropy(model(x_adv), y, reduction="none")
    torch.testing.assert_close(losses, adv_direct, rtol=1e-12, atol=1e-12)
    assert torch.all(losses > clean)


def test_fgsm_units_without_normalisation_and_clipping_with_it():
    model = _linear_model(d_in=3, c=4)
    x = torch.randn(6, 3, 1, 1, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    ce = lambda z: nn.functional.cross_entropy(z, y, reduction="none")  # noqa: E731
    x_adv = fgsm_perturb(model, x, ce, 0.1)
    np.testing.assert_allclose((x_adv - x).abs().numpy(), 0.1, rtol=1e-12)
    # pixels at the boundary stay inside [0, 1]
    norm = Normalization((0.5,) * 3, (0.5,) * 3)
    at_edges = (torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1).repeat(6, 1, 1, 1) - 0.5) / 0.5
    adv_pixels = fgsm_perturb(model, at_edges, ce, 0.1, norm) * 0.5 + 0.5
    assert adv_pixels.min() >= 0 and adv_pixels.max() <= 1
    assert torch.all((adv_pixels[:, 2] - 0.5).abs() > 0.1 - 1e-12)


def test_fgsm_with_convnet_and_mixup_runs_per_sample():
    from sdelip.workbench.models import build_model

    model = build_model("convnet", batchnorm=True, seed=0).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    cfg = RegularizerConfig(fgsm_eps=0.03, mixup_alpha=0.4)
    losses, logits = per_sample_loss(model, x, y, cfg, torch.Generator().manual_seed(0), Normalization((0.5,) * 3, (0.25,) * 3))
    assert losses.shape == (4,) and logits.shape == (4, 10)
    assert all(p.grad is None for p in model.parameters())
    losses.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- weight decay


def test_weight_decay_changes_the_sgd_update_by_minus_lr_lambda_theta():
    lr, wd = 0.05, 1e-3
    base = _linear_model()
    decayed = _linear_model()
    x = torch.randn(7, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    theta0 = [p.detach().clone() for p in base.parameters()]
    for model, cfg in ((base, RegularizerConfig()), (decayed, PRESETS["weight_decay"])):
        opt = make_optimizer(model.parameters(), lr, cfg)
        assert opt.defaults["momentum"] == 0 and opt.defaults["weight_decay"] == cfg.weight_decay
        per_sample_loss(model, x, y, cfg)[0].mean().backward()
        opt.step()
    for t0, pb, pd in zip(theta0, base.parameters(), decayed.parameters()):
        torch.testing.assert_close(pd - pb, -lr * wd * t0, rtol=1e-9, atol=1e-15)
        assert (pd - pb).abs().max() > 0


# --------------------------------------------------------------------------- noisy gradient


def _grads(model, x, y, noisy=None):
    model.zero_grad(set_to_none=True)
    losses, _ = per_sample_loss(model, x, y)
    if noisy is not None:
        losses = noisy.scale_losses(losses)
    losses.mean().backward()
    if noisy is not None:
        noisy.inject(model.parameters())
    return [p.grad.detach().clone() for p in model.parameters()]


def test_noisy_gradient_rho_one_and_zero_noise():
    model = _linear_model()
    x = torch.randn(10, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (10,))
    clean = _grads(model, x, y)
    same = _grads(model, x, y, NoisyGradient(1.0, "gaussian", torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(clean, same))
    scaled = _grads(model, x, y, NoisyGradient(0.36, "zero"))
    for a, b in zip(clean, scaled):
        torch.testing.assert_close(b, 0.6 * a, rtol=1e-12, atol=1e-15)
    losses, _ = per_sample_loss(model, x, y)
    torch.testing.assert_close(NoisyGradient(0.36, "zero").scale_losses(losses), 0.6 * losses)


@pytest.mark.parametrize("noise,var_n", [("gaussian", 1.0), ("uniform", 1 / 12)])
def test_noisy_gradient_injected_variance(noise, var_n):
    rho = 0.75
    noisy = NoisyGradient(rho, noise, torch.Generator().manual_seed(3))
    assert noisy.noise_variance == pytest.approx((1 - rho) * var_n)
    p = nn.Parameter(torch.zeros(200_000, dtype=torch.float64))
    p.grad = torch.zeros_like(p)
    added = noisy.inject([p])
    n = p.grad.numpy()
    np.testing.assert_array_equal(n, added[0].numpy())
    target = (1 - rho) * var_n
    # sample variance of 200k iid draws: relative sd sqrt(2/N) (gaussian), less for uniform
    assert abs(n.var() / target - 1) < 5 * math.sqrt(2 / n.size)
    assert abs(n.mean()) < 5 * math.sqrt(target / n.size)
    if noise == "uniform":
        assert np.abs(n).max() <= math.sqrt(1 - rho) * 0.5
    # the same seed reproduces the noise; the generator advances between steps
    again = NoisyGradient(rho, noise, torch.Generator().manual_seed(3)).sample(p.shape, torch.float64)
    np.testing.assert_allclose(again.numpy() * math.sqrt(1 - rho), n, rtol=1e-15)
    assert not torch.equal(noisy.inject([p])[0], added[0])


def test_noisy_gradient_validation_and_config():
    assert NoisyGradient(0.5, "zero").noise_variance == 0.0
    with pytest.raises(ValueError, match="rho"):
        NoisyGradient(-0.1)
    with pytest.raises(ValueError, match="laplace"):
        NoisyGradient(0.5, "laplace")
    assert NoisyGradient.from_config(RegularizerConfig()) is None
    ng = NoisyGradient.from_config(RegularizerConfig(noisy_gradient_rho=0.25, noisy_gradient_noise="uniform"))
    assert ng.rho == 0.25 and ng.noise == "uniform" and ng.loss_scale == 0.5
    p = nn.Parameter(torch.ones(3))
    assert ng.inject([p]) == [None] and p.grad is None  # parameters without a gradient are skipped


# --------------------------------------------------------------------------- label corruption


class _Labelled(Dataset):
    def __init__(self, n, c, with_targets=True):
        self.x = torch.arange(n, dtype=torch.float32)
        labels = torch.arange(n) % c
        if with_targets:
            self.targets = labels.tolist()
        self._labels = labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self._labels[i])


def test_label_corruption_rates_and_determinism():
    n, c, eps = 20_000, 10, 0.3
    base = _Labelled(n, c)
    ds = CorruptedLabels(base, eps, c, seed=4)
    frac_redrawn = ds.corrupted_mask.double().mean().item()
    assert abs(frac_redrawn - eps) < 5 * math.sqrt(eps * (1 - eps) / n)
    changed = ds.changed_mask.double().mean().item()
    q = eps * (1 - 1 / c)  # a redrawn label equals the old one with probability 1/C
    assert abs(changed - q) < 5 * math.sqrt(q * (1 - q) / n)
    assert torch.all(ds.corrupted_mask[ds.changed_mask])  # only redrawn labels change
    labels = torch.tensor([ds[i][1] for i in range(n)])
    assert torch.equal(labels, ds.targets)
    assert torch.equal(ds.original_targets, torch.arange(n) % c)
    assert all(ds[i][0] == base[i][0] for i in range(0, n, 997))
    assert torch.equal(torch.tensor([ds[i][1] for i in range(100)]), labels[:100])  # fixed once
    assert torch.equal(CorruptedLabels(base, eps, c, seed=4).targets, ds.targets)
    assert not torch.equal(CorruptedLabels(base, eps, c, seed=5).targets, ds.targets)
    assert torch.equal(ds.corrupted_indices, ds.corrupted_mask.nonzero().flatten())


def test_label_corruption_extremes():
    n, c = 20_000, 10
    base = _Labelled(n, c, with_targets=False)
    intact = CorruptedLabels(base, 0.0, c, seed=0)
    assert torch.equal(intact.targets, torch.arange(n) % c) and not intact.corrupted_mask.any()
    full = CorruptedLabels(base, 1.0, c, seed=0)
    assert full.corrupted_mask.all()
    # independence from the original label: the C x C contingency table is flat
    table = torch.zeros(c, c)
    table.index_put_((full.original_targets, full.targets), torch.ones(n), accumulate=True)
    expected = n / c**2
    chi2 = ((table - expected) ** 2 / expected).sum().item()
    dof = (c - 1) ** 2
    assert chi2 < dof + 5 * math.sqrt(2 * dof)
    agree = (full.targets == full.original_targets).double().mean().item()
    assert abs(agree - 1 / c) < 5 * math.sqrt(0.09 / n)


def test_label_corruption_through_loader_and_dataset_info():
    info = load_dataset("mnist-embedded", train=False)
    assert with_label_corruption(info, 0.0) is info
    corrupted = with_label_corruption(info, 0.5, seed=1)
    assert "eps=0.5" in corrupted.source and corrupted.num_classes == 10
    ds = corrupted.dataset
    x, y = next(iter(make_loader(corrupted, 1000, seed=0, shuffle=False)))
    assert torch.equal(y, ds.targets)
    torch.testing.assert_close(x[3], info.dataset[3][0])
    assert 0.35 < ds.changed_mask.double().mean().item() < 0.55
    with pytest.raises(ValueError, match="1.5"):
        CorruptedLabels(info.dataset, 1.5, 10)


# --------------------------------------------------------------------------- AutoAugment


def test_autoaugment_policies_and_effect_on_uint8_images():
    from torchvision.transforms import AutoAugmentPolicy

    assert autoaugment_transform("cifar10").policy == AutoAugmentPolicy.CIFAR10
    # torchvision has no CIFAR100 policy (Table 3 names one); the CIFAR-10 policy is used
    assert autoaugment_transform("cifar100").policy == AutoAugmentPolicy.CIFAR10
    assert autoaugment_transform("cifar-standin").policy == AutoAugmentPolicy.CIFAR10
    with pytest.raises(ValueError, match="mnist"):
        autoaugment_transform("mnist")
    aug = autoaugment_transform("cifar10")
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    outs = [aug(img) for _ in range(40)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.uint8 for o in outs)
    assert sum(not torch.equal(o, img) for o in outs) >= 10  # an identity transform gives 0


def test_autoaugment_on_the_standin_dataset():
    torch.manual_seed(0)
    aug = load_dataset("cifar-standin", train=False, transform=autoaugment_transform("cifar-standin"))
    plain = load_dataset("cifar-standin", train=False)
    pairs = [(aug.dataset[i], plain.dataset[i]) for i in range(0, 1000, 50)]
    assert all(a[0].shape == (3, 32, 32) and a[0].dtype == torch.float32 and a[1] == p[1] for a, p in pairs)
    assert sum(not torch.equal(a[0], p[0]) for a, p in pairs) >= len(pairs) // 2
