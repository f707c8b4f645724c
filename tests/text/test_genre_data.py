"""Shakespeare genre task: First Folio labels, split by play, sizes, pretext without test plays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bissl.data.text import group_split, load_text_data
from bissl.data.text_sources import (
    FIRST_FOLIO_GENRE,
    GENRES,
    play_dialogue,
    read_labelled_task,
    read_shakespeare_genre,
)
from bissl.extras import describe_missing

# Skipped (with the reason) without the [text] extra; CI sets BISSL_REQUIRE_ALL=1, where a skip fails.
pytestmark = pytest.mark.skipif(bool(describe_missing("text")), reason=describe_missing("text"))

KW = dict(tokenizer="bytes", seq_len=64, max_length=48, val_fraction=0.2, test_fraction=0.3)


def test_first_folio_table():
    counts = {g: sum(v == g for v in FIRST_FOLIO_GENRE.values()) for g in GENRES}
    # Folio catalogue: 14 comedies, 10 histories, 11 tragedies, plus Troilus and Cressida.
    assert counts == {"comedy": 14, "history": 10, "tragedy": 12}
    assert FIRST_FOLIO_GENRE["cymbeline"] == "tragedy"
    assert FIRST_FOLIO_GENRE["winters_tale"] == FIRST_FOLIO_GENRE["tempest"] == "comedy"
    assert "pericles" not in FIRST_FOLIO_GENRE and "sonnets" not in FIRST_FOLIO_GENRE


def test_passages_labels_and_sizes():
    task = read_labelled_task("shakespeare_genre")
    assert task.class_names == ["comedy", "history", "tragedy"]
    assert len(task.texts) == 36 * 60 and np.bincount(task.labels).tolist() == [840, 600, 720]
    for text, y, play in zip(task.texts, task.labels, task.groups):
        assert GENRES[y] == FIRST_FOLIO_GENRE[play]
        assert len(text.split()) == 40 and "[" not in text
    assert set(task.group_texts) == set(FIRST_FOLIO_GENRE)
    small = read_shakespeare_genre(words_per_passage=10, passages_per_play=3)
    assert len(small.texts) == 36 * 3 and all(len(t.split()) == 10 for t in small.texts)
    with pytest.raises(ValueError, match="passages_per_play must be >= 1"):
        read_shakespeare_genre(passages_per_play=0)


def test_play_dialogue_drops_headings_directions_and_persons():
    raw = (
        "HAMLET\n\nPERSONS REPRESENTED.\nClaudius, King of Denmark.\n\nACT I.\n\n"
        "Scene I. Elsinore.\n\n[Enter Bernardo.]\n\nBer.\nWho's there?\n\nFIRST LORD.\n"
        "Stand, ho! [Aside.] Who is there?\n"
    )
    assert play_dialogue(raw) == "Who's there?\nStand, ho!   Who is there?"


def test_group_split_rules():
    groups = ["a", "a", "b", "c", "c", "d", "e", "f"]
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    tr, va, te = group_split(groups, labels, (0.34, 0.34), seed=3)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(8))
    parts = [{groups[i] for i in p} for p in (tr, va, te)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    with pytest.raises(ValueError, match="group 'a' has texts of labels 0 and 1"):
        group_split(["a", "a"], np.array([0, 1]), (0.2, 0.2), seed=0)
    with pytest.raises(ValueError, match="too few"):
        group_split(["a", "b"], np.array([0, 0]), (0.3, 0.3), seed=0)


def test_split_by_play_disjoint_stratified_deterministic():
    a = load_text_data("shakespeare_genre", **KW)
    b = load_text_data("shakespeare_genre", **KW)
    for name in ("train_x", "train_y", "val_x", "test_x", "test_y", "pretext_x"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    # 14/10/12 plays per genre -> val 3/2/2, test 4/3/4, train 7/5/6 plays of 60 passages.
    assert [torch.bincount(y).tolist() for y in (a.train_y, a.val_y, a.test_y)] == [
        [420, 300, 360],
        [180, 120, 120],
        [240, 180, 240],
    ]
    assert a.train_x.shape == (1080, 48) and a.num_classes == 3
    other = load_text_data("shakespeare_genre", **{**KW, "val_fraction": 0.2}, split_seed=1)
    assert not torch.equal(other.test_x, a.test_x)  # the split seed picks the plays


def test_test_plays_never_in_pretext_or_train():
    task = read_labelled_task("shakespeare_genre")
    tr, va, te = group_split(task.groups, task.labels, (0.2, 0.3), seed=0)
    train_plays = {task.groups[i] for i in tr}
    held_out = {task.groups[i] for i in np.concatenate([va, te])}
    assert len(train_plays) == 18 and len(held_out) == 18 and not train_plays & held_out
    data = load_text_data("shakespeare_genre", **KW)
    # Default pretext = full dialogue of the training plays: as many bytes (+ one EOS each) as
    # those plays' cleaned text.
    from bissl.data.text import clean_text

    n_bytes = sum(len(clean_text(task.group_texts[p]).encode()) + 1 for p in sorted(train_plays))
    assert data.pretext_x.numel() == n_bytes // 64 * 64
    with pytest.raises(ValueError, match="contains the val/test plays"):
        load_text_data("shakespeare_genre", pretext_name="news+shakespeare", **KW)
