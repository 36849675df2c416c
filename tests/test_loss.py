"""NT-Xent against an independent NumPy transcription of the paper (Chen et al. 2020, Alg. 1)."""

from __future__ import annotations

import numpy as np
import torch

from simclr_kit.models.loss import NTXentLoss, nt_xent


def numpy_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """Algorithm 1 verbatim: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), averaged
    over all 2N ordered positive pairs; z_{2k-1}, z_{2k} are the two views of image k."""
    n = z1.shape[0]
    z = np.empty((2 * n, z1.shape[1]))
    z[0::2], z[1::2] = z1, z2
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T

    def l(i: int, j: int) -> float:
        num = np.exp(s[i, j] / tau)
        den = sum(np.exp(s[i, k] / tau) for k in range(2 * n) if k != i)
        return -np.log(num / den)

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    for n, d, tau in ((4, 8, 0.1), (7, 3, 0.5), (16, 32, 0.07)):
        z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        ours = nt_xent(torch.tensor(z1), torch.tensor(z2), tau)
        assert abs(float(ours) - numpy_nt_xent(z1, z2, tau)) < 1e-5


def test_gradient_matches_numerical_gradient_of_reference():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    t1 = torch.tensor(z1, dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor(z2, dtype=torch.float64, requires_grad=True)
    nt_xent(t1, t2, 0.2).backward()
    eps = 1e-6
    for ours, base, which in ((t1.grad, z1, 0), (t2.grad, z2, 1)):
        num = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args_p = (plus, z2) if which == 0 else (z1, plus)
            args_m = (minus, z2) if which == 0 else (z1, minus)
            num[idx] = (numpy_nt_xent(*args_p, 0.2) - numpy_nt_xent(*args_m, 0.2)) / (2 * eps)
        np.testing.assert_allclose(ours.numpy(), num, atol=1e-6)


def test_perfect_views_give_low_loss_and_fp16_logits_do_not_overflow():
    z = torch.nn.functional.one_hot(torch.arange(8), 16).float()
    loss = NTXentLoss(0.1)(z, z)
    assert float(loss) < 1e-3
    # At T=0.01, exp(s/T) = e^100 overflows fp16; cross_entropy subtracts the max instead.
    big = NTXentLoss(0.01)(z.half(), z.half())
    assert torch.isfinite(big)
