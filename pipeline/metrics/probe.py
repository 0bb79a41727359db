"""Linear probe: how linearly decodable class labels are from given feature vectors.

Used to check that features survive a round trip (e.g. DINOv2 features vs FAE
reconstructions of them): the same probe recipe is trained on each feature set
and the held-out top-1 accuracies are compared. The recipe is fixed and
deterministic so two runs on the same features give the same number:

- features are standardised with the training split's mean/std only;
- multinomial logistic regression (one linear layer + cross-entropy) with an L2
  penalty on the weights, starting from zeros (no random init);
- full-batch L-BFGS with strong-Wolfe line search for a fixed iteration budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fae_pipe.errors import UserError


def fixed_split(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, holdout_idx), both sorted int64, from a seeded permutation.

    The holdout gets round(n * holdout_fraction) samples, at least 1 and leaving at least 1 for training.
    """
    if n < 2:
        raise UserError(f"a train/holdout split needs at least 2 samples; got {n}")
    if not 0.0 < holdout_fraction < 1.0:
        raise UserError(f"holdout_fraction must be in (0, 1); got {holdout_fraction}")
    n_hold = min(max(int(round(n * holdout_fraction)), 1), n - 1)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    return np.sort(order[n_hold:]).astype(np.int64), np.sort(order[:n_hold]).astype(np.int64)


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe: accuracies in [0, 1] and the sizes they come from."""

    test_accuracy: float
    train_accuracy: float
    num_train: int
    num_test: int
    num_classes: int


def _as_inputs(features, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert (features (N, D), labels (N,)) to float32 / int64 tensors."""
    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    x = x.detach().to("cpu", torch.float32)
    y = y.detach().to("cpu")
    if x.ndim != 2:
        raise UserError(f"probe features must be 2-D (samples, dims); pool tokens first; got {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UserError(f"probe labels must be 1-D with one label per sample; got {tuple(y.shape)} for {x.shape[0]}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or (y.numel() and int(y.min()) < 0):
        raise UserError("probe labels must be non-negative integers (class indices)")
    if not torch.isfinite(x).all():
        raise UserError("probe features contain NaN or Inf")
    return x, y.long()


def _as_index(idx, n: int, name: str) -> torch.Tensor:
    """Index array -> int64 tensor, checked to be non-empty and within [0, n)."""
    t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    if t.ndim != 1 or t.numel() == 0:
        raise UserError(f"{name} indices must be a non-empty 1-D array")
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise UserError(f"{name} indices must lie in [0, {n}); got range [{int(t.min())}, {int(t.max())}]")
    return t


def linear_probe(
    features,
    labels,
    train_idx,
    test_idx,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    device: torch.device | str = "cpu",
) -> ProbeResult:
    """Train the fixed logistic-regression probe on ``train_idx`` and score ``test_idx``.

    ``weight_decay`` multiplies 0.5 * |W|^2 (bias not penalised); ``max_iter`` is the
    L-BFGS iteration budget. ``num_classes`` defaults to max(label) + 1.
    """
    x, y = _as_inputs(features, labels)
    n = x.shape[0]
    train = _as_index(train_idx, n, "train")
    test = _as_index(test_idx, n, "test")
    classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if classes < 2 or int(y.max()) >= classes:
        raise UserError(f"num_classes={classes} must be >= 2 and exceed every label (max label {int(y.max())})")
    if weight_decay < 0 or max_iter < 1:
        raise UserError(f"weight_decay must be >= 0 and max_iter >= 1; got {weight_decay}, {max_iter}")

    device = torch.device(device)
    x_train = x[train]
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False).clamp_min(1e-6)
    x_train = ((x_train - mean) / std).to(device)
    x_test = ((x[test] - mean) / std).to(device)
    y_train, y_test = y[train].to(device), y[test].to(device)

    weight = torch.zeros(classes, x.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(x_train, weight, bias), y_train)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_acc = (F.linear(x_train, weight, bias).argmax(dim=1) == y_train).double().mean()
        test_acc = (F.linear(x_test, weight, bias).argmax(dim=1) == y_test).double().mean()
    return ProbeResult(
        test_accuracy=float(test_acc), train_accuracy=float(train_acc),
        num_train=int(train.numel()), num_test=int(test.numel()), num_classes=classes,
    )
