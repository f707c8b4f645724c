"""Text data for BiSSL: token-id tensors for the pretext stream and the downstream splits.

Pipeline (all deterministic):

1. Read the raw texts (:mod:`bissl.data.text_sources`): the labelled task ``name`` and the pretext
   corpus ``pretext_name`` (default: the task's own training split, labels dropped).
2. :func:`clean_text`: Unicode NFKC, lower case, whitespace runs collapsed to one space. The
   polarity snippets are lower-cased at the source; doing it everywhere keeps a small vocabulary
   from spending entries on case variants.
3. Split the labelled texts into train/val/test with :func:`bissl.data.splits.stratified_split`
   (exact sizes ``round(N·fraction)``, stratified, fixed by ``split_seed``; the training seeds
   never change the split). Tasks whose texts are passages of larger works (``shakespeare_genre``:
   plays) are split by work with :func:`group_split`, so val and test hold only unseen works;
   their default pretext corpus is the full text of the training works.
   Or, with ``folds = k``, stratified k-fold (:func:`kfold_split`): fold ``fold`` is the test
   split and validation is carved from the other folds, so running ``fold = 0..k-1`` tests every
   labelled text exactly once; each ``split_seed`` is one repeat (another partition).
4. Tokenizer: loaded from ``tokenizer_path`` when that file exists (a resumed run keeps its
   tokenizer), else trained on the cleaned pretext documents (:mod:`bissl.data.tokenizer`) and
   saved there.
5. Pretext: every document is encoded and followed by ``<EOS>``; the stream is cut into
   non-overlapping ``seq_len``-token rows (the remainder is dropped): ``(N_p, seq_len)``.
6. Downstream: each text's first ``max_length`` tokens, right-padded with ``<PAD>``:
   ``(N, max_length)`` int64, labels ``(N,)`` int64.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bissl.data.splits import kfold_assignment, stratified_split
from bissl.data.text_sources import LABELLED_TASKS, read_labelled_task, read_pretext_corpus
from bissl.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

#: Downstream text datasets accepted as ``data.name`` with ``task: text``.
TEXT_DATASETS: tuple[str, ...] = tuple(sorted(LABELLED_TASKS))


def clean_text(text: str) -> str:
    """NFKC-normalised, lower-cased text with every whitespace run replaced by one space."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).lower()).strip()


def pack_stream(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> Tensor:
    """Documents, each followed by ``eos_id``, cut into ``(N, seq_len)`` rows (remainder dropped).

    Raises:
        ValueError: the stream is shorter than one row.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for next-token prediction, got {seq_len}")
    stream = [t for doc in docs for t in (*doc, eos_id)]
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"the pretext corpus has {len(stream)} tokens, fewer than one sequence of seq_len={seq_len}")
    return torch.tensor(stream[: rows * seq_len], dtype=torch.int64).view(rows, seq_len)


def pad_right(seqs: Sequence[Sequence[int]], max_length: int, pad_id: int) -> Tensor:
    """First ``max_length`` ids of each sequence, right-padded with ``pad_id``: ``(N, max_length)``.

    Raises:
        ValueError: a sequence is empty (it would pool to nothing).
    """
    out = torch.full((len(seqs), max_length), pad_id, dtype=torch.int64)
    for i, seq in enumerate(seqs):
        if len(seq) == 0:
            raise ValueError(f"text {i} encodes to no tokens")
        ids = list(seq[:max_length])
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


@dataclass
class TextData:
    """Token tensors of one text experiment.

    Attributes:
        pretext_x: ``(N_p, seq_len)`` int64 pretext rows (no padding).
        train_x, val_x, test_x: ``(N, max_length)`` int64, right-padded with ``pad_id``.
        train_y, val_y, test_y: ``(N,)`` int64 labels in ``[0, num_classes)``.
        num_classes, class_names: of the downstream task.
        tokenizer: the tokenizer used (``tokenizer.vocab_size``, ``.pad_id``, ``.decode``).
        name, pretext_name: dataset and corpus names.
    """

    pretext_x: Tensor
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    class_names: list[str]
    tokenizer: Tokenizer
    name: str
    pretext_name: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id


def group_split(
    groups: Sequence[str], labels: np.ndarray, fractions: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test indices of texts such that every group (e.g. a play) lies in one part.

    Groups are stratified by their label (a group's texts must share one label): of the ``n_c``
    groups of class ``c``, ``round(n_c·val_fraction)`` go to val and ``round(n_c·test_fraction)``
    to test (at least one each when the fraction is positive), the rest to train; which ones is
    decided by ``numpy.random.default_rng(seed)`` over the sorted group names.

    Returns:
        ``(train_idx, val_idx, test_idx)``, int64 text indices, ascending.

    Raises:
        ValueError: a group with several labels, bad fractions, or a class with too few groups to
            leave one for training.
    """
    val_fraction, test_fraction = fractions
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val/test fractions must be >= 0 with sum < 1, got {fractions}")
    labels = np.asarray(labels)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups but {len(labels)} labels")
    group_label: dict[str, int] = {}
    for g, y in zip(groups, labels.tolist()):
        if group_label.setdefault(g, y) != y:
            raise ValueError(f"group {g!r} has texts of labels {group_label[g]} and {y}")
    rng = np.random.default_rng(seed)
    part_of: dict[str, int] = {}
    for c in sorted(set(group_label.values())):
        members = sorted(g for g, y in group_label.items() if y == c)
        n_val = max(1, round(len(members) * val_fraction)) if val_fraction > 0 else 0
        n_test = max(1, round(len(members) * test_fraction)) if test_fraction > 0 else 0
        if n_val + n_test >= len(members):
            raise ValueError(
                f"class {c} has {len(members)} groups: too few for {n_val} val and "
                f"{n_test} test groups and at least one for training"
            )
        order = rng.permutation(len(members))
        for rank, i in enumerate(order):
            part_of[members[i]] = 1 if rank < n_val else 2 if rank < n_val + n_test else 0
    parts = np.asarray([part_of[g] for g in groups])
    train, val, test = (np.flatnonzero(parts == k).astype(np.int64) for k in range(3))
    return train, val, test


def kfold_split(
    labels: np.ndarray, groups: Sequence[str] | None, folds: int, fold: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test indices of fold ``fold`` of a stratified k-fold partition.

    Without groups, texts are assigned to folds by :func:`bissl.data.splits.kfold_assignment`
    (stratified, sizes within one of each other) and validation is
    :func:`~bissl.data.splits.stratified_split` of the other folds (``round(n·val_fraction)`` of
    their ``n`` texts). With groups (plays), whole groups are assigned to folds, stratified by the
    groups' labels, and validation takes whole groups of the other folds (:func:`group_split`).
    The partition depends on ``seed`` only, so the folds of one seed are disjoint and cover
    every text; validation never contains a test text.

    Returns:
        ``(train_idx, val_idx, test_idx)``, int64, ascending.

    Raises:
        ValueError: ``fold`` outside ``0..folds-1``, too few texts or groups for ``folds``.
    """
    labels = np.asarray(labels)
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1} for {folds} folds, got {fold}")
    if groups is None:
        fold_of = kfold_assignment(labels, folds, seed)
        rest = np.flatnonzero(fold_of != fold)
        train_rel, val_rel = stratified_split(labels[rest], (val_fraction,), seed=seed)
        train, val = rest[train_rel], rest[val_rel]
    else:
        names = sorted(set(groups))
        group_label = {g: int(y) for g, y in zip(groups, labels.tolist())}
        group_fold = kfold_assignment(np.asarray([group_label[g] for g in names]), folds, seed)
        fold_by_name = dict(zip(names, group_fold.tolist()))
        fold_of = np.asarray([fold_by_name[g] for g in groups])
        rest = np.flatnonzero(fold_of != fold)
        train_rel, val_rel, _ = group_split([groups[i] for i in rest.tolist()], labels[rest], (val_fraction, 0.0), seed)
        train, val = rest[train_rel], rest[val_rel]
    test = np.flatnonzero(fold_of == fold)
    return np.sort(train).astype(np.int64), np.sort(val).astype(np.int64), test.astype(np.int64)


def _tokenizer_for(kind: str, vocab_size: int, docs: list[str], path: Path | None) -> Tokenizer:
    if path is not None and path.exists():
        tok = load_tokenizer(path)
        if tok.kind != kind or (kind == "bpe" and tok.vocab_size > vocab_size):
            raise ValueError(
                f"{path} holds a {tok.kind} tokenizer of {tok.vocab_size} tokens but "
                f"the config asks for {kind!r} with vocab_size {vocab_size}"
            )
        return tok
    tok = train_tokenizer(kind, docs, vocab_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(path)
    return tok


def load_text_data(
    name: str,
    *,
    pretext_name: str | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = 2048,
    seq_len: int = 64,
    max_length: int = 64,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
    tokenizer_path: str | Path | None = None,
) -> TextData:
    """Load a labelled text task and a pretext corpus as token tensors (see the module docstring).

    Args:
        name: downstream task (:data:`TEXT_DATASETS`: ``"polarity"``, ``"newsgroups"``,
            ``"shakespeare_genre"``).
        pretext_name: pretext corpus (``"news"``, ``"wiki"``, ``"shakespeare"``, or several joined
            with ``+``); ``None`` uses the task's training texts (for ``shakespeare_genre``: the
            full dialogue of the training plays).
        tokenizer: ``"bpe"`` or ``"bytes"``.
        vocab_size: BPE vocabulary size (specials included; ignored for bytes).
        seq_len: tokens per pretext row.
        max_length: downstream truncation/padding length.
        val_fraction, test_fraction, split_seed: the fixed split (:func:`stratified_split`).
        folds, fold: k-fold instead (:func:`kfold_split`): the test split is fold ``fold`` of
            ``folds``; ``test_fraction`` is not used.
        tokenizer_path: where the tokenizer is read from if it exists, else saved to.

    Raises:
        ValueError: unknown names, bad lengths, or a saved tokenizer that disagrees with the
            arguments.
        FileNotFoundError: the package holding the data is not installed.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if folds is None and fold != 0:
        raise ValueError(f"fold {fold} given without folds (k-fold is off)")
    task = read_labelled_task(name)
    texts = [clean_text(t) for t in task.texts]
    if folds is not None:
        train_idx, val_idx, test_idx = kfold_split(task.labels, task.groups, folds, fold, val_fraction, split_seed)
    elif task.groups is None:
        train_idx, val_idx, test_idx = stratified_split(task.labels, (val_fraction, test_fraction), seed=split_seed)
    else:
        train_idx, val_idx, test_idx = group_split(task.groups, task.labels, (val_fraction, test_fraction), split_seed)
    if pretext_name is None and task.group_texts is not None and task.groups is not None:
        # The whole text of the training works (uncapped), never a val/test work.
        train_groups = sorted({task.groups[i] for i in train_idx.tolist()})
        pretext_docs = [clean_text(task.group_texts[g]) for g in train_groups]
    elif pretext_name is None:
        pretext_docs = [texts[i] for i in train_idx]
    else:
        if task.groups is not None and name.startswith("shakespeare") and "shakespeare" in pretext_name.split("+"):
            raise ValueError(
                f"pretext corpus {pretext_name!r} contains the val/test plays of "
                f"{name!r}; leave data.pretext_name unset to pretrain on the "
                f"training plays only"
            )
        pretext_docs = [clean_text(d) for d in read_pretext_corpus(pretext_name)]
    path = Path(tokenizer_path) if tokenizer_path is not None else None
    tok = _tokenizer_for(tokenizer, vocab_size, pretext_docs, path)

    ids = tok.encode_batch(texts)
    x = pad_right(ids, max_length, tok.pad_id)
    y = torch.from_numpy(np.asarray(task.labels, dtype=np.int64))

    def part(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        index = torch.from_numpy(idx)
        return x[index].contiguous(), y[index].contiguous()

    (train_x, train_y), (val_x, val_y) = part(train_idx), part(val_idx)
    test_x, test_y = part(test_idx)
    return TextData(
        pretext_x=pack_stream(tok.encode_batch(pretext_docs), seq_len, tok.eos_id),
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(task.class_names),
        class_names=list(task.class_names),
        tokenizer=tok,
        name=name,
        pretext_name=pretext_name or f"{name}:train",
    )
