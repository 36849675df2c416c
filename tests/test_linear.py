"""Linear probe on cached features: accuracy, standardisation, schedule, seeding."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from simclr_kit.evaluation.linear import (LinearProbeResult, _forward, probe_epochs,
                                          train_linear_probe)


def _separable(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs whose means are far apart relative to the noise: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = 8.0 * torch.randn(c, d, generator=(torch.Generator().manual_seed(123)))
    labels = torch.randint(0, c, (n,), generator=g)
    return centres[labels] + torch.randn(n, d, generator=g), labels


def test_separable_features_reach_99_percent_with_defaults() -> None:
    x_train, y_train = _separable(1000, 32, 10, seed=0)
    x_val, y_val = _separable(500, 32, 10, seed=1)
    result = train_linear_probe(x_train, y_train, x_val, y_val, num_classes=10)
    assert isinstance(result, LinearProbeResult)
    assert result.train_accuracy >= 99.0
    assert result.val_accuracy >= 99.0
    assert result.val_predictions.shape == (500,)
    assert result.val_predictions.dtype == torch.int64
    acc = 100.0 * (result.val_predictions == y_val).float().mean().item()
    assert acc == pytest.approx(result.val_accuracy)


def test_digits_matches_sklearn_logistic_regression() -> None:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from threadpoolctl import threadpool_limits

    x, y = load_digits(return_X_y=True)  # raw pixels in 0..16, not 0..255
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    # One BLAS thread: multithreaded BLAS on a busy 2-core machine takes 20x longer here.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning would only mean "use more iters"
        reference = 100.0 * LogisticRegression(max_iter=1000).fit(x_tr, y_tr).score(x_te, y_te)
    # 1,347 rows give 6 steps per epoch at batch 256: 600 Adam steps at lr 1e-3 underfit
    # (~92%, train ~94%). lr 1e-2 converges in the same 100 epochs (train ~99%).
    result = train_linear_probe(torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr),
                                torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te),
                                num_classes=10, lr=1e-2)
    assert reference > 93.0
    assert abs(result.val_accuracy - reference) <= 2.0, (result.val_accuracy, reference)


def test_standardisation_stored_and_applied() -> None:
    x_train, y_train = _separable(600, 6, 3, seed=2)
    x_train = x_train * torch.tensor([1.0, 100.0, 0.01, 1.0, 5.0, 1.0]) + 40.0
    x_train[:, 3] = 7.0  # a constant dimension must not blow up val rows that differ from it
    x_val, y_val = x_train[:100].clone(), y_train[:100]
    x_val[:, 3] = -3.0
    result = train_linear_probe(x_train, y_train, x_val, y_val, 3, epochs=5)
    torch.testing.assert_close(result.mean, x_train.mean(0))
    expected_std = x_train.std(0, unbiased=False)
    expected_std[3] = 1.0
    torch.testing.assert_close(result.std, expected_std)
    logits = result.head((x_val - result.mean) / result.std)
    torch.testing.assert_close(result.logits(x_val), logits.detach(), rtol=1e-4, atol=1e-4)
    assert torch.equal(result.val_predictions, logits.argmax(1))
    assert logits.abs().max() < 1e4


def test_history_and_cosine_schedule() -> None:
    x_train, y_train = _separable(1000, 8, 4, seed=3)
    result = train_linear_probe(x_train, y_train, x_train[:50], y_train[:50], 4, epochs=4,
                                lr=0.01, batch_size=300,  # 4 steps per epoch, last one partial
                                min_steps=0)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    total = 16
    for h in result.history:  # lr logged at each epoch's last step, a cosine over all steps
        step = 4 * h["epoch"] - 1
        assert h["lr"] == pytest.approx(0.005 * (1 + math.cos(math.pi * step / total)))
    assert result.history[-1]["lr"] < 1e-3 * 0.01 * 16
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_seeded_and_independent_of_global_rng() -> None:
    x_train, y_train = _separable(500, 8, 3, seed=4)
    x_val, y_val = _separable(100, 8, 3, seed=5)
    runs = []
    for global_seed, probe_seed in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(global_seed)
        runs.append(train_linear_probe(x_train, y_train, x_val, y_val, 3, epochs=3,
                                       seed=probe_seed, min_steps=0))
    torch.testing.assert_close(runs[0].head.weight, runs[1].head.weight, rtol=0, atol=0)
    assert not torch.allclose(runs[0].head.weight, runs[2].head.weight)
    state = torch.get_rng_state()
    train_linear_probe(x_train, y_train, x_val, y_val, 3, epochs=1, min_steps=0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("threads, during", [(1, 1), (2, 1), (4, 2), (5, 2)])
def test_cpu_training_takes_half_of_torchs_threads(threads, during, monkeypatch) -> None:
    from simclr_kit.evaluation import linear

    seen: list[int] = []
    real = linear._forward
    monkeypatch.setattr(linear, "_forward",
                        lambda head, x: seen.append(torch.get_num_threads()) or real(head, x))
    x, y = _separable(64, 4, 2, seed=6)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train_linear_probe(x, y, x, y, 2, epochs=1, min_steps=0)
        assert torch.get_num_threads() == threads  # restored after
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {during}


def test_thread_count_restored_and_bad_inputs() -> None:
    x_train, y_train = _separable(100, 4, 2, seed=6)
    threads = torch.get_num_threads()
    train_linear_probe(x_train, y_train, x_train, y_train, 2, epochs=1, min_steps=0)
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="labels span"):
        train_linear_probe(x_train, y_train + 2, x_train, y_train, 2)
    with pytest.raises(ValueError, match="feature dims differ"):
        train_linear_probe(x_train, y_train, x_train[:, :2], y_train, 2)
    empty = train_linear_probe(x_train, y_train, x_train[:0], y_train[:0], 2, epochs=1,
                               min_steps=0)
    assert math.isnan(empty.val_accuracy) and empty.val_predictions.shape == (0,)


def test_training_forward_is_the_linear_layer() -> None:
    # The loop computes head(x) in a transposed layout for speed; it must be the same function,
    # gradients included.
    head = torch.nn.Linear(12, 5)
    x = torch.randn(9, 12)
    torch.testing.assert_close(_forward(head, x), head(x))
    grads = []
    for fn in (_forward, lambda h, v: h(v)):
        head.zero_grad()
        (fn(head, x) ** 2).sum().backward()
        grads.append((head.weight.grad.clone(), head.bias.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])


def test_min_steps_adds_epochs_and_history_stays_bounded() -> None:
    x_train, y_train = _separable(40, 4, 2, seed=7)
    result = train_linear_probe(x_train, y_train, x_train, y_train, 2, epochs=3, batch_size=16,
                                min_steps=100)  # 3 steps per epoch: 34 epochs, 102 steps
    assert (result.epochs, result.steps) == (34, 102)
    assert probe_epochs(40, 3, 16, 100) == 34 and probe_epochs(40, 50, 16, 100) == 50
    assert result.history[-1]["epoch"] == 34 and len(result.history) <= 50
    long = train_linear_probe(x_train, y_train, x_train, y_train, 2, epochs=1, batch_size=64,
                              min_steps=130)  # 130 one-step epochs: every 3rd + the last
    assert [h["epoch"] for h in long.history] == [*range(3, 130, 3), 130]
    with pytest.raises(ValueError, match="min_steps"):
        train_linear_probe(x_train, y_train, x_train, y_train, 2, min_steps=-1)


def test_min_steps_default_trains_small_label_subsets_to_convergence() -> None:
    """10% of digits' labels is 135 rows: one step per epoch. 100 epochs (the plain recipe)
    are 100 Adam steps and leave the probe far from converged; EvalConfig's 2000-step floor
    does not, which is why it is the default."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from simclr_kit.evaluation.fractions import stratified_fraction

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    x_tr, y_tr = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr)
    idx = stratified_fraction(y_tr, 0.1, seed=0)
    args = (x_tr[idx], y_tr[idx], torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te), 10)
    starved = train_linear_probe(*args, min_steps=0)
    floor = train_linear_probe(*args)
    assert starved.steps == 100 and floor.steps == 2000
    assert starved.val_accuracy < 80.0 < 85.0 < floor.val_accuracy, (starved.val_accuracy,
                                                                     floor.val_accuracy)


def test_a_given_head_is_redrawn_from_the_seed_and_folds_into_its_first_layer() -> None:
    """train-classifier hands its own head (linear or mlp) to the same trainer: the head's
    init comes from the probe's seed, not from how it was built, and the saved head (the
    standardisation folded into its first layer) computes what the probe scored."""
    x_train, y_train = _separable(300, 6, 3, seed=8)
    x_train = x_train * torch.tensor([1.0, 50.0, 0.1, 1.0, 3.0, 1.0]) + 20.0
    x_val, y_val = x_train[:60] + 0.5, y_train[:60]
    args = (x_train, y_train, x_val, y_val, 3)

    def mlp() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(inplace=True),
                                   torch.nn.Linear(16, 3))

    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(train_linear_probe(*args, epochs=3, min_steps=0, head=mlp()))
    for p, q in zip(runs[0].head.parameters(), runs[1].head.parameters()):
        assert torch.equal(p, q)
    result = runs[0]
    folded = result.folded_head()
    with torch.no_grad():
        expected = result.head((x_val - result.mean) / result.std)
        torch.testing.assert_close(folded(x_val), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(folded(x_val).argmax(1), result.val_predictions)
    # A linear head handed in trains to the very numbers of the default one.
    given = train_linear_probe(*args, epochs=3, min_steps=0, head=torch.nn.Linear(6, 3))
    default = train_linear_probe(*args, epochs=3, min_steps=0)
    assert torch.equal(given.head.weight, default.head.weight)
    assert torch.equal(given.val_predictions, default.val_predictions)
