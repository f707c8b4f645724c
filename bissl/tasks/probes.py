"""Reference read-outs beside the arms of a text run: what the labels alone and a linear model on
the same tokens reach, so a table shows how far above chance and above a bag of words the
pretrained GPT's arms are.

* ``majority``: every example gets the training split's most frequent class (ties: the lowest
  label); its loss is the cross-entropy of predicting the training class frequencies (add-one
  smoothed, so a class absent from training does not give an infinite loss).
* ``bag_of_tokens``: multinomial logistic regression (scikit-learn, L-BFGS, deterministic) on
  each text's token frequencies (counts of the non-pad tokens divided by their number, over the
  whole vocabulary); the inverse regularisation ``C`` is chosen on the validation split from
  :data:`BAG_OF_TOKENS_C` by accuracy, ties to the lower validation loss, and the test split is
  scored once with that model.

Both return the metrics dict of a fine-tuned arm (``test_acc``, ``val_acc``, ``test_loss``,
``val_loss``, ``test_pred``, ``test_correct``), so results.json, the paired statistics and
McNemar's test treat them like any arm.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

#: The ``C`` values the bag-of-tokens probe chooses from on the validation split.
BAG_OF_TOKENS_C = (0.1, 1.0, 10.0)
#: Arm names of the probes, in display order.
PROBE_ARMS = ("majority", "bag_of_tokens")


def _nll(prob: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of ``(N, K)`` class probabilities at the labels ``y``."""
    return float(-np.mean(np.log(np.clip(prob[np.arange(len(y)), y], 1e-12, None))))


def _metrics(val_prob: np.ndarray, val_y: np.ndarray, test_prob: np.ndarray, test_y: np.ndarray) -> dict[str, Any]:
    # argmax ties go to the lowest class (numpy's rule).
    test_pred = np.argmax(test_prob, axis=1)
    return {
        "test_acc": float(np.mean(test_pred == test_y)),
        "val_acc": float(np.mean(np.argmax(val_prob, axis=1) == val_y)),
        "test_loss": _nll(test_prob, test_y),
        "val_loss": _nll(val_prob, val_y),
        "test_pred": [int(v) for v in test_pred],
        "test_correct": [int(v) for v in (test_pred == test_y)],
    }


def majority_probe(train_y: Tensor, val_y: Tensor, test_y: Tensor, num_classes: int) -> dict[str, Any]:
    """The majority class of ``train_y`` as every prediction (see the module docstring).

    Args:
        train_y, val_y, test_y: ``(N,)`` int64 labels in ``[0, num_classes)``.
    """
    counts = np.bincount(train_y.numpy(), minlength=num_classes).astype(np.float64)
    freq = (counts + 1.0) / (counts.sum() + num_classes)
    val, test = val_y.numpy(), test_y.numpy()
    # freq is monotone in counts (ties kept), so its argmax is the majority class, lowest on ties.
    return _metrics(np.tile(freq, (len(val), 1)), val, np.tile(freq, (len(test), 1)), test)


def token_frequencies(x: Tensor, vocab_size: int, pad_id: int) -> np.ndarray:
    """``(N, T)`` right-padded token ids -> ``(N, vocab_size)`` float64 frequencies of the
    non-pad tokens (each row sums to 1).

    Raises:
        ValueError: a row with no token besides padding, or an id outside the vocabulary.
    """
    ids = x.numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    out = np.zeros((ids.shape[0], vocab_size), dtype=np.float64)
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    flat = ids.reshape(-1)
    keep = flat != pad_id
    np.add.at(out, (rows[keep], flat[keep]), 1.0)
    lengths = out.sum(axis=1, keepdims=True)
    if np.any(lengths == 0):
        raise ValueError(f"row {int(np.flatnonzero(lengths[:, 0] == 0)[0])} holds padding only")
    return out / lengths


def bag_of_tokens_probe(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    vocab_size: int,
    pad_id: int,
) -> dict[str, Any]:
    """Logistic regression on token frequencies, ``C`` chosen on validation (module docstring).

    Args:
        train, val, test: ``(x, y)``: ``(N, T)`` int64 right-padded ids, ``(N,)`` int64 labels.
        num_classes: classes of the task (columns of the probabilities even when the training
            split lacks one).
        vocab_size, pad_id: of the tokenizer.

    Returns:
        the arm metrics, plus ``"C"``: the chosen regularisation.
    """
    from sklearn.linear_model import LogisticRegression

    xs = [token_frequencies(x, vocab_size, pad_id) for x, _ in (train, val, test)]
    ys = [y.numpy() for _, y in (train, val, test)]
    best: tuple[float, float, float, Any, np.ndarray] | None = None
    for c in BAG_OF_TOKENS_C:
        model = LogisticRegression(C=c, max_iter=5000)
        model.fit(xs[0], ys[0])
        val_prob = _all_classes(model, model.predict_proba(xs[1]), num_classes)
        acc, loss = float(np.mean(np.argmax(val_prob, axis=1) == ys[1])), _nll(val_prob, ys[1])
        if best is None or (acc, -loss) > (best[0], -best[1]):
            best = (acc, loss, c, model, val_prob)
    assert best is not None
    _, _, c, model, val_prob = best
    test_prob = _all_classes(model, model.predict_proba(xs[2]), num_classes)
    return {**_metrics(val_prob, ys[1], test_prob, ys[2]), "C": c}


def _all_classes(model: Any, prob: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over every class (a class missing from training gets probability 0)."""
    full = np.zeros((prob.shape[0], num_classes), dtype=np.float64)
    full[:, model.classes_] = prob
    return full


def text_probes(data: Any) -> dict[str, dict[str, Any]]:
    """Both probes on a text run's data (:class:`bissl.trainer.builders.PipelineData`):
    ``{"majority": metrics, "bag_of_tokens": metrics}``."""
    pairs = ((data.train_x, data.train_y), (data.val_x, data.val_y), (data.test_x, data.test_y))
    splits = [(x.cpu(), y.cpu()) for x, y in pairs]
    return {
        "majority": majority_probe(splits[0][1], splits[1][1], splits[2][1], data.num_classes),
        "bag_of_tokens": bag_of_tokens_probe(
            splits[0], splits[1], splits[2], data.num_classes, data.vocab_size, data.pad_id
        ),
    }


__all__ = [
    "BAG_OF_TOKENS_C",
    "PROBE_ARMS",
    "bag_of_tokens_probe",
    "majority_probe",
    "text_probes",
    "token_frequencies",
]
