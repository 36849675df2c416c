"""Tests of simclr_kit.augment: exactness against torchvision, distributions, keyed randomness.

Tolerance: every operation is compared with ``torchvision.transforms.v2.functional`` on the same
float image (uint8 / 255). Both compute in float32 with the same formulas (the crop uses the exact
weights of PyTorch's antialiased bilinear resize on the same integer box), so the only differences
are float32 rounding: ATOL = 1e-5 on the [0, 1] scale, 390x tighter than one uint8 step (1/255).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from simclr_kit.augment import (SimCLRAugment, blur_kernel_size, channel_stats, keyed_uniforms,
                                normalize, save_view_grid)
from simclr_kit.config import AugmentConfig

ATOL = 1e-5
ALL_ON = AugmentConfig(jitter_strength=1.0, blur_p=0.5, solarize_p=0.3)


def make_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, h, w): smooth colour fields plus noise, with many exact channel ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g)
    base = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear")
    noise = 0.15 * torch.randn(n, 3, height, width, generator=g)
    images = ((base + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    images[0, :, : height // 2] = 128  # grey pixels: zero chroma
    images[0, 0, height // 2:] = images[0, 1, height // 2:]  # r == g ties for hue precedence
    return images


def identity_params(n: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """Parameters under which every operation leaves the image unchanged."""
    return {"crop": torch.tensor([[0, 0, height, width]]).repeat(n, 1),
            "flip": torch.zeros(n, dtype=torch.bool), "jitter": torch.zeros(n, dtype=torch.bool),
            "brightness": torch.ones(n), "contrast": torch.ones(n), "saturation": torch.ones(n),
            "hue": torch.zeros(n), "order": torch.arange(4).repeat(n, 1),
            "grayscale": torch.zeros(n, dtype=torch.bool), "blur": torch.zeros(n, dtype=torch.bool),
            "sigma": torch.ones(n), "solarize": torch.zeros(n, dtype=torch.bool)}


def raw_aug(size: int, config: AugmentConfig = ALL_ON, seed: int = 0) -> SimCLRAugment:
    """An augmenter whose output stays on the [0, 1] scale (mean 0, std 1)."""
    return SimCLRAugment(config, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), seed=seed)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:.3g}"


# --- each operation against torchvision, for fixed parameters ------------------------------------

@pytest.mark.parametrize("height,width,size",
                         [(32, 32, 32), (32, 32, 12), (20, 36, 16), (8, 8, 24)])
def test_resized_crop_matches_torchvision(height: int, width: int, size: int) -> None:
    n = 24
    g = torch.Generator().manual_seed(1)
    h = torch.randint(1, height + 1, (n,), generator=g)
    w = torch.randint(1, width + 1, (n,), generator=g)
    top = (torch.rand(n, generator=g) * (height - h + 1)).long()
    left = (torch.rand(n, generator=g) * (width - w + 1)).long()
    images = make_images(n, height, width)
    params = identity_params(n, height, width)
    params["crop"] = torch.stack([top, left, h, w], 1)
    params["flip"] = torch.rand(n, generator=g) < 0.5
    out = raw_aug(size).apply(images, params)
    for k in range(n):
        ref = TF.resized_crop(images[k].float() / 255, *params["crop"][k].tolist(), [size, size],
                              antialias=True)
        ref = TF.horizontal_flip(ref) if params["flip"][k] else ref
        assert_close(out[k], ref)


def _one_op(images: torch.Tensor, size: int, **overrides: torch.Tensor) -> torch.Tensor:
    params = identity_params(len(images), *images.shape[2:])
    params.update(overrides)
    return raw_aug(size).apply(images, params)


def test_horizontal_flip_matches_torchvision() -> None:
    images = make_images(8, 16, 16)
    out = _one_op(images, 16, flip=torch.tensor([True, False] * 4))
    for k in range(8):
        ref = images[k].float() / 255
        assert_close(out[k], TF.horizontal_flip(ref) if k % 2 == 0 else ref)


@pytest.mark.parametrize("name,op,tv", [
    ("brightness", 0, TF.adjust_brightness), ("contrast", 1, TF.adjust_contrast),
    ("saturation", 2, TF.adjust_saturation), ("hue", 3, TF.adjust_hue)])
def test_color_ops_match_torchvision(name: str, op: int, tv) -> None:
    n = 16
    images = make_images(n, 16, 16, seed=op)
    g = torch.Generator().manual_seed(op)
    if name == "hue":
        edges = torch.tensor([-0.5, 0.5, 0.0, 1 / 6])
        values = torch.cat([edges, torch.rand(n - 4, generator=g) - 0.5])
    else:
        values = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(n - 2, generator=g) * 2.5])
    order = torch.tensor([op] + [o for o in range(4) if o != op]).repeat(n, 1)
    out = _one_op(images, 16, jitter=torch.ones(n, dtype=torch.bool), order=order, **{name: values})
    for k in range(n):
        assert_close(out[k], tv(images[k].float() / 255, values[k].item()))


def test_grayscale_matches_torchvision() -> None:
    images = make_images(6, 16, 16)
    on = torch.tensor([True, False, True, True, False, True])
    out = _one_op(images, 16, grayscale=on)
    for k in range(6):
        ref = images[k].float() / 255
        assert_close(out[k], TF.rgb_to_grayscale(ref, num_output_channels=3) if on[k] else ref)


def test_gaussian_blur_matches_torchvision() -> None:
    size, n = 64, 8
    ksize = blur_kernel_size(size)
    assert (ksize, blur_kernel_size(224), blur_kernel_size(32)) == (7, 23, 3)
    images = make_images(n, size, size)
    sigma = torch.tensor([0.1, 2.0, 0.5, 1.0, 1.5, 0.3, 0.8, 1.9])
    on = torch.tensor([True, True, True, False, True, True, False, True])
    out = _one_op(images, size, blur=on, sigma=sigma)
    for k in range(n):
        ref = images[k].float() / 255
        if on[k]:
            ref = TF.gaussian_blur(ref, [ksize, ksize], [sigma[k].item()] * 2)
        assert_close(out[k], ref)


def test_solarize_matches_torchvision() -> None:
    images = make_images(4, 16, 16)
    on = torch.tensor([True, False, True, True])
    out = _one_op(images, 16, solarize=on)
    for k in range(4):
        ref = images[k].float() / 255
        assert_close(out[k], TF.solarize(ref, 0.5) if on[k] else ref)


def _reference_view(image: torch.Tensor, p: dict[str, torch.Tensor], k: int,
                    aug: SimCLRAugment) -> torch.Tensor:
    """One sample's view through torchvision's functional ops, in SimCLR's order."""
    x = TF.resized_crop(image.float() / 255, *p["crop"][k].tolist(), [aug.image_size] * 2,
                        antialias=True)
    x = TF.horizontal_flip(x) if p["flip"][k] else x
    if p["jitter"][k]:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        names = ["brightness", "contrast", "saturation", "hue"]
        for o in p["order"][k].tolist():
            x = ops[o](x, p[names[o]][k].item())
    x = TF.rgb_to_grayscale(x, num_output_channels=3) if p["grayscale"][k] else x
    if p["blur"][k]:
        x = TF.gaussian_blur(x, [aug.blur_kernel_size] * 2, [p["sigma"][k].item()] * 2)
    x = TF.solarize(x, aug.config.solarize_threshold) if p["solarize"][k] else x
    return TF.normalize(x, list(aug.mean), list(aug.std))


@pytest.mark.parametrize("height,width,size",
                         [(32, 32, 32), (40, 28, 24), (16, 16, 40), (64, 64, 48)])
def test_whole_pipeline_matches_torchvision(height: int, width: int, size: int) -> None:
    aug = SimCLRAugment(ALL_ON, size, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), seed=3)
    n = 20
    images = make_images(n, height, width)
    params = aug.sample_params(torch.arange(n), epoch=2, view=1, height=height, width=width)
    assert params["jitter"].any() and params["blur"].any() and params["solarize"].any()
    out = aug.apply(images, params)
    assert out.shape == (n, 3, size, size) and out.dtype == torch.float32
    for k in range(n):
        assert_close(out[k], _reference_view(images[k], params, k, aug), atol=ATOL / 0.2)


# --- parameter distributions ----------------------------------------------------------------------

def _within_3se(freq: float, p: float, n: int) -> bool:
    return abs(freq - p) <= 3 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_crop_params_within_configured_ranges() -> None:
    cfg = AugmentConfig(crop_scale_min=0.2, crop_scale_max=0.7, crop_ratio_min=0.5,
                        crop_ratio_max=1.5)
    aug = raw_aug(32, cfg)
    box = aug.sample_params(torch.arange(20000), 0, 0, 1000, 1000)["crop"].double()
    top, left, h, w = box.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 1000).all() and (left + w <= 1000).all()
    # Rounding the sides to whole pixels moves area and ratio by < 0.5 %: slack 0.005.
    area = h * w / 1e6
    assert area.min() >= 0.2 * 0.995 and area.max() <= 0.7 * 1.005
    log_ratio = torch.log(w / h)
    assert log_ratio.min() >= math.log(0.5) - 0.005 and log_ratio.max() <= math.log(1.5) + 0.005
    assert area.max() > 0.69 and area.min() < 0.21  # the whole range is used


@pytest.mark.parametrize("height,width", [(32, 32), (8, 64)])
def test_crop_distribution_matches_torchvision(height: int, width: int) -> None:
    n_ours, n_tv = 20000, 3000
    box = raw_aug(32).sample_params(torch.arange(n_ours), 0, 0, height, width)["crop"].double()
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    ref = torch.tensor([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n_tv)], dtype=torch.float64)

    def stats(b: torch.Tensor) -> torch.Tensor:  # area fraction, log aspect, centre row, centre col
        return torch.stack([b[:, 2] * b[:, 3] / (height * width), torch.log(b[:, 3] / b[:, 2]),
                            b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)

    a, r = stats(box), stats(ref)
    se = torch.sqrt(a.var(0) / n_ours + r.var(0) / n_tv)
    z = (a.mean(0) - r.mean(0)).abs() / se.clamp(min=1e-12)
    assert (z < 4).all(), f"z-scores {z.tolist()} (area, log ratio, centre y, centre x)"


def test_crop_fallback_is_torchvisions_central_crop() -> None:
    # No draw of area >= 0.5 fits a 4x100 image at ratio <= 4/3: torchvision falls back.
    cfg = AugmentConfig(crop_scale_min=0.5)
    box = raw_aug(32, cfg).sample_params(torch.arange(50), 0, 0, 4, 100)["crop"]
    expected = RandomResizedCrop.get_params(torch.zeros(3, 4, 100), [0.5, 1.0], [3 / 4, 4 / 3])
    assert (box == torch.tensor(expected)).all()


def test_flag_frequencies_match_probabilities() -> None:
    cfg = AugmentConfig(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.1)
    n = 20000
    params = raw_aug(96, cfg).sample_params(torch.arange(n), 3, 0, 96, 96)
    for name, p in [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5),
                    ("solarize", 0.1)]:
        freq = params[name].double().mean().item()
        assert _within_3se(freq, p, n), f"{name}: {freq:.4f} vs {p}"


def test_jitter_factors_and_order_follow_the_config() -> None:
    n = 20000
    aug = raw_aug(32, AugmentConfig())  # strength 0.5 at 32 px: (0.4, 0.4, 0.4, 0.1)
    assert aug.config.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1)) and aug.config.blur_p == 0.0
    params = aug.sample_params(torch.arange(n), 0, 1, 32, 32)
    for name, lo, hi in [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                         ("saturation", 0.6, 1.4), ("hue", -0.1, 0.1), ("sigma", 0.1, 2.0)]:
        x = params[name].double()
        assert x.min() >= lo and x.max() <= hi, name
        se = (hi - lo) / math.sqrt(12 * n)
        assert abs(x.mean().item() - (lo + hi) / 2) <= 3 * se, name
        assert abs(x.std().item() - (hi - lo) / math.sqrt(12)) <= 0.02 * (hi - lo), name
    order = params["order"]
    assert (order.sort(1).values == torch.arange(4)).all()  # a permutation per sample
    for op in range(4):
        for pos in range(4):
            assert _within_3se((order[:, pos] == op).double().mean().item(), 0.25, n)


def test_strength_one_and_blur_above_64_px() -> None:
    cfg = raw_aug(96, AugmentConfig()).config
    assert cfg.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2)) and cfg.blur_p == 0.5


def test_every_sample_draws_its_own_parameters() -> None:
    params = raw_aug(32).sample_params(torch.arange(64), 0, 0, 32, 32)
    assert len({tuple(b) for b in params["crop"].tolist()}) > 50
    for name in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert len(set(params[name].tolist())) == 64, name
    for name in ("flip", "jitter", "grayscale"):
        assert 0 < params[name].sum() < 64, name
    assert len({tuple(o) for o in params["order"].tolist()}) > 10


# --- keyed randomness ----------------------------------------------------------------------------

def test_views_do_not_depend_on_batching_or_order() -> None:
    aug = SimCLRAugment(ALL_ON, 24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), seed=7)
    images = make_images(64, 24, 24)
    ids = torch.arange(1000, 1064)
    v1, v2 = aug(images, ids, epoch=5)
    halves = [aug(images[s:s + 32], ids[s:s + 32], epoch=5) for s in (0, 32)]
    assert torch.equal(v1, torch.cat([h[0] for h in halves]))
    assert torch.equal(v2, torch.cat([h[1] for h in halves]))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    s1, s2 = aug(images[perm], ids[perm], epoch=5)
    assert torch.equal(s1, v1[perm]) and torch.equal(s2, v2[perm])


def test_views_do_not_depend_on_cpu_chunking() -> None:
    # At 32 px, 300 samples span three CPU chunks; batches of 100 split them differently.
    aug = SimCLRAugment(ALL_ON, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), seed=1)
    images = make_images(300, 32, 32)
    ids = torch.arange(300)
    whole = aug(images, ids, 0)
    parts = [aug(images[s:s + 100], ids[s:s + 100], 0) for s in range(0, 300, 100)]
    for view in range(2):
        assert torch.equal(whole[view], torch.cat([p[view] for p in parts]))


def test_views_differ_across_epochs_views_and_seeds() -> None:
    images = make_images(16, 16, 16)
    ids = torch.arange(16)
    aug = raw_aug(16)
    a1, a2 = aug(images, ids, 0)
    b1, _ = aug(images, ids, 1)
    c1, _ = raw_aug(16, seed=1)(images, ids, 0)
    for other in (a2, b1, c1):
        differs = (a1 - other).flatten(1).abs().amax(1) > 1e-3
        assert differs.all()
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(aug(images, ids, 0)[0], a1)


def test_keyed_uniforms_are_uniform_and_keyed() -> None:
    u = keyed_uniforms(torch.arange(50000), seed=0, epoch=0, views=(0,), slots=4)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    se = math.sqrt(1 / 12 / 50000)
    assert (u.mean(0) - 0.5).abs().max() <= 3 * se
    assert abs(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1].item()) < 0.02
    both = keyed_uniforms(torch.tensor([5, 9]), 0, 0, (0, 1), 4)
    assert torch.equal(both[:2], keyed_uniforms(torch.tensor([5, 9]), 0, 0, (0,), 4))
    assert torch.equal(both[2:], keyed_uniforms(torch.tensor([5, 9]), 0, 0, (1,), 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_views() -> None:
    aug = SimCLRAugment(ALL_ON, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), seed=2)
    images = make_images(64, 32, 32)
    ids = torch.arange(64)
    p_cpu = aug.sample_params(ids, 3, 0, 32, 32)
    p_gpu = aug.sample_params(ids.cuda(), 3, 0, 32, 32)
    for name in p_cpu:
        assert torch.equal(p_cpu[name], p_gpu[name].cpu()), name
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 crops differ by up to ~1e-3
    try:
        cpu, gpu = aug(images, ids, 3), aug(images.cuda(), ids.cuda(), 3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        assert_close(a, b.cpu(), atol=ATOL / 0.25)


# --- evaluation helpers ---------------------------------------------------------------------------

def test_normalize_matches_numpy() -> None:
    images = make_images(5, 12, 10)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    out = normalize(images, mean, std)
    ref = (images.numpy() / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert out.dtype == torch.float32 and out.shape == images.shape
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)


def test_channel_stats_matches_numpy() -> None:
    images = make_images(37, 9, 11)
    mean, std = channel_stats(images, batch_size=8)
    x = images.numpy().astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-9, atol=1e-12)
    assert channel_stats(images, batch_size=4096) == (mean, std)  # exact sums: chunking-free


def test_rejects_bad_input() -> None:
    aug = raw_aug(16)
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 3, 16, 16), torch.arange(2), 0)  # float, not uint8
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 1, 16, 16, dtype=torch.uint8), torch.arange(2), 0)
    with pytest.raises(ValueError):
        SimCLRAugment(AugmentConfig(), 16, (0.5, 0.5), (0.2, 0.2))


def test_save_view_grid_writes_png(tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "grid" / "views.png"
    save_view_grid(make_images(3, 20, 20), raw_aug(16), path, epoch=1)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 100 and png.height > 100
