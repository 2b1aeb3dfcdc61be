"""The linear head on frozen backbone features: read it off a model, extend it with new classes,
refit it in seconds with L-BFGS, and put it back on a copy of the model."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from labelloop.ml.embeddings import head_module

logger = logging.getLogger(__name__)

# A class the head has never seen starts at a prior of 5 %: "off" under any sensible threshold,
# so adding a class to the label config does not flood the annotators with suggestions of it
# before a single example has been labelled, yet not so far off that the first few positives
# cannot move it.
NEW_CLASS_PRIOR = 0.05


NEW_CLASS_BIAS = float(np.log(NEW_CLASS_PRIOR / (1.0 - NEW_CLASS_PRIOR)))


@dataclass(frozen=True, eq=False)
class Head:
    """Weights of a head Linear as arrays: `weight` (n_classes, d), `bias` (n_classes,).

    eq=False: generated equality would compare arrays elementwise and then fail on truthiness.
    """

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        weight = np.ascontiguousarray(self.weight, dtype=np.float32)
        bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if weight.ndim != 2:
            raise ValueError(f"head weight must be 2-D (n_classes, d), got shape {weight.shape}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"head bias must have shape ({weight.shape[0]},) to match the weight, "
                f"got {bias.shape}"
            )
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])


def head_of(model: nn.Module) -> Head:
    linear = head_module(model)[2]
    weight = linear.weight.detach().cpu().numpy().copy()
    bias = (
        linear.bias.detach().cpu().numpy().copy()
        if linear.bias is not None
        else np.zeros(linear.out_features, np.float32)
    )
    return Head(weight, bias)


def extend_head(head: Head, old_classes: Sequence[str], new_classes: Sequence[str]) -> Head:
    """The head for `new_classes`: rows taken from `head` by class name, new classes off.

    Matching by name keeps what was learnt when classes are reordered or appended; classes not
    in `new_classes` are dropped; a new class gets zero weights and the bias `NEW_CLASS_BIAS`.
    """
    if len(old_classes) != head.n_classes:
        raise ValueError(
            f"the head has {head.n_classes} rows but {len(old_classes)} old class names were given"
        )
    for label, names in (("old", old_classes), ("new", new_classes)):
        duplicates = sorted({n for n in names if list(names).count(n) > 1})
        if duplicates:
            raise ValueError(f"{label} classes name {duplicates} more than once")
    row_of = {name: i for i, name in enumerate(old_classes)}
    weight = np.zeros((len(new_classes), head.dim), np.float32)
    bias = np.full(len(new_classes), NEW_CLASS_BIAS, np.float32)
    for j, name in enumerate(new_classes):
        i = row_of.get(name)
        if i is not None:
            weight[j] = head.weight[i]
            bias[j] = head.bias[i]
    added = [n for n in new_classes if n not in row_of]
    dropped = sorted(set(old_classes) - set(new_classes))
    if added or dropped:
        logger.info("Head extended: new classes %s, dropped %s", added, dropped)
    return Head(weight, bias)


def fit_head(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    init: Head | None = None,
    pos_weight: np.ndarray | None = None,
    l2: float = 1e-3,
    max_iter: int = 100,
    anchor: float = 0.0,
    sample_weight: np.ndarray | None = None,
) -> Head:
    """Fit the head on fixed features: full-batch L-BFGS with a strong-Wolfe line search.

    Objective, per class summed and over samples averaged (so each class is its own logistic
    regression, whose penalty does not depend on how many other classes there are)::

        mean_i s_i sum_c BCEWithLogits(pos_weight_c) + l2 * ||W||^2 + anchor * ||W - W_init||^2

    `sample_weight` (s_i, default 1) counts some samples more: the trainer weights a project's
    own annotations up against the replayed offline data. Weights are normalised to mean 1, so
    `l2` means the same whatever their scale.

    The bias is not penalised. `anchor` keeps the solution near `init` when the new labels are
    few; it needs `init`. Features are used as they are (no standardisation) so the result can
    be written back into the network. Without `init` the start is W = 0 and the bias at each
    class's log-odds, so the fit involves no randomness at all.
    """
    x, y = check_training_data(features, targets)
    n_classes, dim = y.shape[1], x.shape[1]
    if init is not None and (init.n_classes, init.dim) != (n_classes, dim):
        raise ValueError(
            f"init head is {init.n_classes} classes x {init.dim} features but the data are "
            f"{n_classes} classes x {dim} features; use extend_head to match the classes"
        )
    if anchor < 0 or l2 < 0:
        raise ValueError(f"l2 and anchor must be >= 0, got l2={l2}, anchor={anchor}")
    if anchor > 0 and init is None:
        raise ValueError("anchor > 0 pulls the weights toward init, so init must be given")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    pw = _check_pos_weight(pos_weight, n_classes)
    sw = None
    if sample_weight is not None:
        sw = np.asarray(sample_weight, dtype=np.float32)
        if sw.shape != (x.shape[0],) or not np.all(np.isfinite(sw)) or (sw < 0).any():
            raise ValueError(
                f"sample_weight must be {x.shape[0]} finite non-negative numbers, got shape "
                f"{sw.shape}"
            )
        if sw.sum() <= 0:
            raise ValueError("sample_weight sums to 0: nothing to fit")
        sw = sw / sw.mean()

    start = init if init is not None else _prior_head(y, dim)
    # A caller may sit inside inference_mode or no_grad; L-BFGS needs autograd, and tensors
    # made under inference_mode could not take part in it.
    with torch.inference_mode(False), torch.enable_grad():
        head, n_iter, loss = _lbfgs(x, y, start, pw, sw, l2=l2, anchor=anchor, max_iter=max_iter)
    logger.debug("fit_head: %d L-BFGS iterations, objective %.6f", n_iter, loss)
    return head


def _lbfgs(
    features: np.ndarray,
    targets: np.ndarray,
    start: Head,
    pos_weight: np.ndarray | None,
    sample_weight: np.ndarray | None,
    *,
    l2: float,
    anchor: float,
    max_iter: int,
) -> tuple[Head, int, float]:
    """The fitted head, the iterations taken and the final objective."""
    x, y = torch.from_numpy(features), torch.from_numpy(targets)
    pw = torch.from_numpy(pos_weight) if pos_weight is not None else None
    sw = torch.from_numpy(sample_weight)[:, None] if sample_weight is not None else None
    weight = torch.tensor(start.weight, requires_grad=True)
    bias = torch.tensor(start.bias, requires_grad=True)
    anchor_to = torch.tensor(start.weight)

    def objective() -> torch.Tensor:
        logits = torch.addmm(bias, x, weight.T)
        loss = F.binary_cross_entropy_with_logits(
            logits, y, weight=sw, pos_weight=pw, reduction="sum"
        )
        loss = loss / x.shape[0] + l2 * weight.square().sum()
        if anchor > 0:
            loss = loss + anchor * (weight - anchor_to).square().sum()
        return loss

    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    n_iter = int(optimizer.state[weight]["n_iter"])
    with torch.no_grad():
        final = float(objective())
    return Head(weight.detach().numpy(), bias.detach().numpy()), n_iter, final


def check_training_data(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(targets, dtype=np.float32)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"features must be (n, d) and targets (n, n_classes); got shapes {x.shape} and "
            f"{y.shape}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} target rows")
    if x.shape[0] == 0:
        raise ValueError("no training examples: features and targets are empty")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if ((y < 0) | (y > 1)).any():
        raise ValueError("targets must lie in [0, 1]")
    return x, y


def _check_pos_weight(pos_weight: np.ndarray | None, n_classes: int) -> np.ndarray | None:
    if pos_weight is None:
        return None
    pw = np.asarray(pos_weight, dtype=np.float32)
    if pw.shape != (n_classes,):
        raise ValueError(f"pos_weight must have shape ({n_classes},), got {pw.shape}")
    if not (np.isfinite(pw).all() and (pw > 0).all()):
        raise ValueError("pos_weight must be finite and positive")
    return pw


def _prior_head(targets: np.ndarray, dim: int) -> Head:
    """W = 0 and each bias at its class's (smoothed) log-odds: the best start that ignores x."""
    rate = (targets.sum(axis=0) + 0.5) / (targets.shape[0] + 1.0)
    return Head(np.zeros((targets.shape[1], dim), np.float32), np.log(rate / (1.0 - rate)))


def predict_features(features: np.ndarray, head: Head) -> np.ndarray:
    """Sigmoid probabilities (n, n_classes) of `head` on features (n, d)."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != head.dim:
        raise ValueError(f"features must be (n, {head.dim}) for this head, got shape {x.shape}")
    logits = torch.addmm(
        torch.from_numpy(head.bias), torch.from_numpy(x), torch.from_numpy(head.weight).T
    )
    return torch.sigmoid(logits).numpy()


def model_with_head(model: nn.Module, head: Head) -> nn.Module:
    """A copy of `model` carrying `head`, in eval mode; the backbone is untouched.

    Only the Linear is replaced, so a Dropout wrapper around it stays and the state dict keeps
    the layout the manifest's `dropout` describes.
    """
    model = copy.deepcopy(model)
    parent, attr, old = head_module(model)
    if head.dim != old.in_features:
        raise ValueError(
            f"the head takes {head.dim} features but the model's backbone gives {old.in_features}"
        )
    linear = nn.Linear(head.dim, head.n_classes, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(head.weight))
        linear.bias.copy_(torch.from_numpy(head.bias))
    setattr(parent, attr, linear)
    return model.eval()


def out_of_fold(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    *,
    init: Head,
    pos_weight: np.ndarray,
    folds: int,
) -> np.ndarray | None:
    """Each row predicted by a head fitted without it (k folds, fixed assignment); None when
    there are too few rows for `folds` folds of at least 2.

    Thresholds tuned on these predictions see every labelled image, not a 20 % validation
    share: at 200 labels that is 200 rows to tune on instead of 40 (docs/incremental-training.md).
    """
    n = len(x)
    if folds < 2 or n < 2 * folds:
        return None
    fold = np.random.default_rng(0).permutation(n) % folds
    probs = np.zeros(y.shape, dtype=np.float32)
    for k in range(folds):
        held = fold == k
        rest = ~held
        if not y[rest].any():
            continue
        head = fit_head(x[rest], y[rest], init=init, pos_weight=pos_weight, sample_weight=w[rest])
        probs[held] = predict_features(x[held], head)
    return probs
