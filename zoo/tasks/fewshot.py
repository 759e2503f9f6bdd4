"""Few-shot linear evaluation (the V-MoE paper's protocol): ``eval.py --fewshot``.

Frozen pre-logits features (``ModelOutput.features [B, D]``) of ``k`` training images per class, a closed-form
L2-regularised least-squares fit to one-hot targets in {-1, +1}, accuracy of its argmax on the test split. As in
the official few-shot evaluator (big_vision / vmoe), the features are whitened with the shots' own mean and std,
a constant feature of 100 stands in for the bias (so the bias is almost unregularised), and one eigendecomposition
of the Gram matrix serves every regulariser of the grid.

Unlike the official evaluator, which picks the regulariser on the test split, here it is chosen by cross-validation
on the training shots themselves (stratified folds over each class's shots); with one shot per class there is
nothing to hold out, so the 1-shot regulariser is chosen on the 2-shot set of the same draw (the 1-shot image plus
the next image of each class's draw). Each draw takes a seeded per-class permutation of the train split and the
first ``k`` images of it, so the shot sets of one draw are nested; results are the mean and spread over draws.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_DRAWS = 5
# 2^-10 .. 2^19, the official evaluator's grid.
DEFAULT_L2_GRID = tuple(2.0**i for i in range(-10, 20))
# The bias enters as a constant feature this large, so its weight is barely shrunk by the regulariser.
BIAS_FEATURE = 100.0
MAX_FOLDS = 5


@dataclass
class RidgeSolutions:
    """Closed-form ridge fits of one training set for every regulariser of ``l2_grid``.

    ``mean``/``std`` [D]: the whitening of the training features; ``weights`` [L, D+1, C] (last input row: the
    constant bias feature); ``l2_grid`` [L]."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    l2_grid: np.ndarray

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``features`` [N, D] -> class scores [L, N, C] (one row of scores per regulariser)."""
        return np.einsum("nd,ldc->lnc", design_matrix(features, self.mean, self.std), self.weights)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """[N, D] -> predicted classes [L, N]."""
        return self.scores(features).argmax(-1)


def design_matrix(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Whitened features plus the constant bias column: [N, D] -> [N, D+1] (float64)."""
    x = (np.asarray(features, dtype=np.float64) - mean) / std
    return np.concatenate([x, np.full((x.shape[0], 1), BIAS_FEATURE)], axis=1)


def signed_one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[N] class ids -> [N, C] targets: +1 for the class, -1 elsewhere (the official evaluator's targets)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    targets = -np.ones((labels.shape[0], num_classes))
    targets[np.arange(labels.shape[0]), labels] = 1.0
    return targets


def fit_ridge(features: np.ndarray, labels: np.ndarray, num_classes: int,
              l2_grid: Sequence[float] = DEFAULT_L2_GRID) -> RidgeSolutions:
    """``argmin_W |X W - Y|^2 + l2 |W|^2`` for each ``l2`` of the grid, X = whitened ``features`` [N, D] plus the
    bias column, Y = :func:`signed_one_hot` ``labels`` [N].

    One symmetric eigendecomposition serves the whole grid: of X^T X [D+1, D+1] when N >= D+1
    (W = Q diag(1 / (e + l2)) Q^T X^T Y), else of X X^T [N, N] (W = X^T Q diag(1 / (e + l2)) Q^T Y), whichever
    is smaller. Float64 throughout."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != len(labels) or features.shape[0] == 0:
        raise ValueError(f"features must be [N, D] with N = len(labels) > 0, got {features.shape} and "
                         f"{len(labels)} labels")
    l2 = np.asarray(l2_grid, dtype=np.float64)
    if l2.ndim != 1 or l2.size == 0 or (l2 <= 0).any():
        raise ValueError(f"l2_grid must be a non-empty list of positive regularisers, got {list(l2_grid)}")
    mean = features.mean(axis=0)
    # The same small floor as the official evaluator, so a constant feature does not divide by zero.
    std = features.std(axis=0) + 1e-5
    x = design_matrix(features, mean, std)
    y = signed_one_hot(labels, num_classes)
    n, d = x.shape
    if n >= d:
        eigs, q = np.linalg.eigh(x.T @ x)
        left, right = q, q.T @ (x.T @ y)  # [D+1, D+1], [D+1, C]
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        left, right = x.T @ q, q.T @ y  # [D+1, N], [N, C]
    inverse = 1.0 / (eigs[None, :] + l2[:, None])  # [L, K]
    weights = np.einsum("dk,lk,kc->ldc", left, inverse, right)
    return RidgeSolutions(mean=mean, std=std, weights=weights, l2_grid=l2)


def cross_validation_folds(labels: np.ndarray, max_folds: int = MAX_FOLDS) -> list[np.ndarray]:
    """Stratified folds over a shot set: with ``m`` shots of the rarest class, ``min(m, max_folds)`` folds, the
    ``j``-th shot of each class (in the order given) going to fold ``j mod folds``. Returns the held-out index
    arrays; every fold keeps at least one shot of every class for fitting. Needs >= 2 shots per class."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        raise ValueError(f"cross-validation needs >= 2 shots of every class, class {classes[counts.argmin()]} has "
                         f"{counts.min()}")
    folds = min(int(counts.min()), max_folds)
    position = np.empty(len(labels), dtype=np.int64)
    for c in classes:
        where = np.flatnonzero(labels == c)
        position[where] = np.arange(len(where))
    return [np.flatnonzero(position % folds == f) for f in range(folds)]


def choose_l2(features: np.ndarray, labels: np.ndarray, num_classes: int,
              l2_grid: Sequence[float] = DEFAULT_L2_GRID) -> tuple[float, np.ndarray]:
    """The regulariser with the best cross-validated accuracy on this shot set (ties: the larger one, i.e. the
    simpler fit), and the cross-validated accuracy of every regulariser [L]."""
    correct = np.zeros(len(l2_grid))
    total = 0
    for held_out in cross_validation_folds(labels):
        fit = np.setdiff1d(np.arange(len(labels)), held_out)
        solutions = fit_ridge(features[fit], labels[fit], num_classes, l2_grid)
        correct += (solutions.predict(features[held_out]) == labels[held_out][None]).sum(axis=1)
        total += len(held_out)
    accuracy = correct / total
    best = max(np.flatnonzero(accuracy == accuracy.max()), key=lambda i: l2_grid[i])
    return float(l2_grid[best]), accuracy


def draw_shots(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """One draw: a seeded permutation of each class's indices in ``labels`` [N], first ``per_class`` of each.
    Returns [C, per_class] indices (row c: class c in draw order)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(num_classes):
        where = np.flatnonzero(labels == c)
        if len(where) < per_class:
            raise ValueError(f"class {c} has {len(where)} training images, fewer than the {per_class} a draw needs "
                             "(lower the largest --fewshot-shots)")
        rows.append(rng.permutation(where)[:per_class])
    return np.stack(rows)


def fewshot_evaluate(train_labels: np.ndarray, features_of: Callable[[np.ndarray], np.ndarray],
                     test_features: np.ndarray, test_labels: np.ndarray, num_classes: int,
                     shots: Sequence[int] = DEFAULT_SHOTS, draws: int = DEFAULT_DRAWS, seed: int = 0,
                     l2_grid: Sequence[float] = DEFAULT_L2_GRID) -> dict[str, Any]:
    """The protocol on precomputed test features; ``features_of(indices [M]) -> [M, D]`` gives the features of
    train images (only the drawn ones are ever computed).

    Returns ``{"shots": {k: {"accuracy_mean", "accuracy_std" (over draws, ddof 1), "accuracies" [draws],
    "l2" [draws] (chosen), "selection_shots" (shots per class the regulariser was chosen on)}}, "draws", ...}``."""
    shots = sorted({int(k) for k in shots})
    if not shots or shots[0] < 1:
        raise ValueError(f"shots must be positive counts per class, got {shots}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    train_labels = np.asarray(train_labels)
    per_class = max(shots[-1], 2)
    drawn = [draw_shots(train_labels, num_classes, per_class, seed + r) for r in range(draws)]
    needed = np.unique(np.concatenate([d.ravel() for d in drawn]))
    needed_features = np.asarray(features_of(needed), dtype=np.float64)
    row_of = {int(i): r for r, i in enumerate(needed)}

    results: dict[int, dict[str, Any]] = {k: {"accuracies": [], "l2": []} for k in shots}
    for draw in drawn:
        for k in shots:
            selection = max(k, 2)
            select_idx = draw[:, :selection].T.ravel()  # shot-major: fold assignment follows draw order
            select_x = needed_features[[row_of[int(i)] for i in select_idx]]
            l2, _ = choose_l2(select_x, train_labels[select_idx], num_classes, l2_grid)
            fit_idx = draw[:, :k].T.ravel()
            fit_x = needed_features[[row_of[int(i)] for i in fit_idx]]
            solution = fit_ridge(fit_x, train_labels[fit_idx], num_classes, [l2])
            accuracy = float((solution.predict(test_features)[0] == test_labels).mean())
            results[k]["accuracies"].append(accuracy)
            results[k]["l2"].append(l2)
            results[k]["selection_shots"] = selection
    for k, r in results.items():
        acc = np.asarray(r["accuracies"])
        r["accuracy_mean"] = float(acc.mean())
        r["accuracy_std"] = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
    return {"shots": {str(k): results[k] for k in shots}, "draws": draws, "seed": seed,
            "l2_grid": [float(v) for v in l2_grid], "num_classes": num_classes,
            "n_train_pool": int(len(train_labels)), "n_test": int(len(test_labels)),
            "n_features_computed": int(len(needed)), "feature_dim": int(needed_features.shape[1])}


# ------------------------------------------------------------------------------------------------- features
def dataset_labels(dataset: Dataset) -> np.ndarray:
    """[N] labels of an image-classification dataset (its ``targets`` when it has them, else read one by one)."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(torch.as_tensor(targets), dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


@torch.no_grad()
def prelogit_features(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device | str = "cpu",
                      indices: Optional[np.ndarray] = None) -> np.ndarray:
    """Frozen pre-logits features ``model(images).features`` [N, D] of ``dataset`` (rows ``indices`` if given), in
    eval mode, batches of ``batch_size`` in order (MoE groups are batch-relative, as in ``eval.py``)."""
    subset = dataset if indices is None else Subset(dataset, [int(i) for i in indices])
    was_training = model.training
    model.eval()
    out = []
    try:
        for images, _ in DataLoader(subset, batch_size=batch_size, shuffle=False):
            output = model(images.to(device))
            features = getattr(output, "features", None)
            if features is None:
                raise ValueError(f"{type(model).__name__} returns no pre-logits features (ModelOutput.features); "
                                 "few-shot evaluation needs an image-classification model that does")
            out.append(features.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------------- eval.py
def add_fewshot_args(parser: argparse.ArgumentParser) -> None:
    """``eval.py``'s few-shot options."""
    group = parser.add_argument_group("few-shot linear evaluation (--fewshot)")
    group.add_argument("--fewshot", action="store_true",
                       help="few-shot linear evaluation of the frozen pre-logits features instead of the test metrics")
    group.add_argument("--fewshot-shots", default=",".join(map(str, DEFAULT_SHOTS)), metavar="K,K,...",
                       help="training images per class (default: %(default)s)")
    group.add_argument("--fewshot-draws", type=int, default=DEFAULT_DRAWS,
                       help="random shot draws (default: %(default)s)")
    group.add_argument("--fewshot-seed", type=int, default=0, help="seed of the first draw (draw r uses seed + r)")


def _parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--fewshot-shots expects comma-separated integers such as 1,5,10,25, got {text!r}") from None
    if not shots or min(shots) < 1:
        raise ValueError(f"--fewshot-shots expects positive integers, got {text!r}")
    return shots


def _load_task_and_data(args: argparse.Namespace) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The model and datamodule ``eval.py`` would evaluate (checkpoint, or --model/--pretrained) + a description."""
    from zoo.tasks.datamodule_factory import build_datamodule, datamodule_of_checkpoint, parse_data_args

    overrides = parse_data_args(args.data_arg)
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.model is not None or args.pretrained is not None:
        from zoo.tasks.classification import ImageClassificationTask

        if args.model is None or args.pretrained is None:
            raise ValueError("--model and --pretrained go together: e.g. eval.py --model vmoe_small_mnist "
                             "--pretrained --fewshot")
        task = ImageClassificationTask(model=args.model, pretrained=args.pretrained)
        info = getattr(task.model, "pretrained_cfg", None) or {}
        recorded = info.get("data")
        if not (args.data or recorded):
            raise ValueError(f"the weights of {args.model} do not record their datamodule; pass --data")
        recorded = recorded or {}
        dm = build_datamodule(recorded.get("class_path"), recorded.get("init_args"), data=args.data,
                              overrides=overrides)
        threads = args.num_threads or (recorded or {}).get("num_threads")
        source = {"model": args.model, "pretrained": info.get("tag", args.pretrained)}
    else:
        from zoo.tasks.base import TRAINER_KEY, task_class_of
        from zoo.tasks.checkpoints import load_training_checkpoint
        from zoo.tasks.cli import default_checkpoint

        ckpt_path = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.root)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"no checkpoint at {ckpt_path}: pass --checkpoint PATH (or run train.py first)")
        checkpoint = load_training_checkpoint(ckpt_path)  # one clear error for a corrupt or foreign file
        task = task_class_of(checkpoint).load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
        dm = datamodule_of_checkpoint(checkpoint, args.data, overrides)
        threads = args.num_threads or (checkpoint.get(TRAINER_KEY) or {}).get("num_threads")
        source = {"checkpoint": str(ckpt_path.resolve()), "model": task.hparams.get("model")}
    if threads and int(threads) < torch.get_num_threads():
        torch.set_num_threads(int(threads))
    return task, dm, source


def evaluate_fewshot(args: argparse.Namespace) -> dict[str, Any]:
    """``eval.py --fewshot``: the protocol on the datamodule's train split (shots) and ``--split`` (test by
    default), frozen features of the checkpoint's or the published model. One JSON-ready dict."""
    shots = _parse_shots(args.fewshot_shots)
    started = time.time()
    task, dm, source = _load_task_and_data(args)
    task.set_eval_overrides(capacity_factor=args.eval_capacity_factor, top_k=args.eval_top_k,
                            dropless=True if args.eval_dropless else None)
    if hasattr(dm, "augment"):
        dm.augment = False  # the shots are frozen-feature inputs, not training batches: no augmentation
    dm.setup("fit")
    device = torch.device("cuda" if args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
                          else "cpu")
    model = task.model.to(device)
    eval_set = dm.test_set if args.split == "test" else dm.val_set
    test_features = prelogit_features(model, eval_set, dm.batch_size, device)
    train_set = dm.train_set
    result = fewshot_evaluate(
        dataset_labels(train_set),
        lambda idx: prelogit_features(model, train_set, dm.batch_size, device, idx),
        test_features, dataset_labels(eval_set), int(dm.num_classes), shots=shots, draws=args.fewshot_draws,
        seed=args.fewshot_seed)
    out = {**source, "protocol": "fewshot_linear", "split": args.split,
           "datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}", **result,
           "seconds": round(time.time() - started, 1)}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
    return out
