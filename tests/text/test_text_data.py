"""Text sources (sizes, labels, no label leak), fixed splits, packing/padding, tokenizer reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bissl.data.text import TEXT_DATASETS, clean_text, load_text_data, pack_stream, pad_right
from bissl.data.text_sources import (
    read_labelled_task,
    read_pretext_corpus,
    strip_newsgroup_post,
    wiki_markup_to_text,
)
from bissl.data.tokenizer import load_tokenizer
from bissl.extras import describe_missing

# Skipped (with the reason) without the [text] extra; CI sets BISSL_REQUIRE_ALL=1, where a skip fails.
pytestmark = pytest.mark.skipif(bool(describe_missing("text")), reason=describe_missing("text"))


def test_labelled_tasks_sizes_and_labels():
    assert TEXT_DATASETS == ("newsgroups", "polarity", "shakespeare_genre")
    pol = read_labelled_task("polarity")
    assert pol.class_names == ["neg", "pos"] and len(pol.texts) == 200
    assert np.bincount(pol.labels).tolist() == [100, 100]
    assert pol.texts[0] == "simplistic , silly and tedious ."
    assert any("—" in t for t in pol.texts)  # Windows-1252 0x97 decoded as an em dash
    ng = read_labelled_task("newsgroups")
    assert ng.class_names == ["alt.atheism", "sci.space"] and len(ng.texts) == 200
    assert np.bincount(ng.labels).tolist() == [100, 100]
    # Headers name the newsgroup: they must be gone.
    for text in ng.texts:
        assert text and "Newsgroups:" not in text and "Path:" not in text[:200]
        assert not any(line.lstrip().startswith(">") for line in text.splitlines())


def test_newsgroup_post_stripping():
    post = (
        "From: a@b\nNewsgroups: sci.space\nSubject: orbits\n\nIn article <1@x> c@d writes:\n"
        "> quoted line\nThe shuttle launch slipped.\n\n-- \n--\nJohn, signature"
    )
    assert strip_newsgroup_post(post) == "The shuttle launch slipped."


def test_pretext_corpora():
    news = read_pretext_corpus("news")
    assert len(news) == 300 and news[0].startswith("Hundreds of people have been forced")
    wiki = read_pretext_corpus("wiki")
    assert len(wiki) == 106 and wiki[1].startswith("Autism is a neurodevelopmental disorder")
    assert all("{{" not in a and "[[" not in a and "<ref" not in a for a in wiki)
    plays = read_pretext_corpus("shakespeare")
    assert len(plays) == 42 and all(len(p) > 1000 for p in plays)
    assert len(read_pretext_corpus("news+wiki")) == 406
    with pytest.raises(ValueError, match=r"unknown text corpus 'newz'.*news, shakespeare, wiki"):
        read_pretext_corpus("newz")
    with pytest.raises(ValueError, match="unknown text dataset 'imdb'"):
        read_labelled_task("imdb")


def test_wiki_markup():
    markup = (
        "'''Albedo''' is [[light|the light]] {{cite|x={{y}}}} reflected<ref>Smith</ref>.\n"
        "==History==\n[[File:A.png|thumb|a [[b]] c]]Measured by [[NASA]]."
    )
    want = "Albedo is the light reflected .\nHistory\n Measured by NASA."
    assert wiki_markup_to_text(markup) == want


def test_clean_pack_pad():
    assert clean_text("  Ａ\tBig\n\nDog ") == "a big dog"  # NFKC folds the full-width letter
    rows = pack_stream([[5, 6, 7], [8]], seq_len=3, eos_id=1)
    assert rows.tolist() == [[5, 6, 7], [1, 8, 1]]
    assert pack_stream([[5, 6], [8, 9, 4]], seq_len=4, eos_id=1).tolist() == [[5, 6, 1, 8]]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_stream([[5]], seq_len=4, eos_id=1)
    padded = pad_right([[3, 4, 5, 6], [7]], max_length=3, pad_id=0)
    assert padded.tolist() == [[3, 4, 5], [7, 0, 0]] and padded.dtype == torch.int64
    with pytest.raises(ValueError, match="text 1 encodes to no tokens"):
        pad_right([[3], []], 3, 0)


@pytest.mark.parametrize("name", ["polarity", "newsgroups"])
def test_fixed_stratified_splits(name):
    kw = dict(tokenizer="bytes", seq_len=32, max_length=40, val_fraction=0.2, test_fraction=0.3)
    a = load_text_data(name, **kw)
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (100, 40, 60)
    for y, n in ((a.train_y, 50), (a.val_y, 20), (a.test_y, 30)):
        assert torch.bincount(y).tolist() == [n, n]
    assert a.train_x.shape == (100, 40) and a.train_x.dtype == torch.int64
    assert bool((a.train_x[:, 0] != a.pad_id).all())  # right padding: every text starts at 0
    # Same arguments, same split; the split never depends on anything but split_seed.
    b = load_text_data(name, **kw)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    c = load_text_data(name, **{**kw, "split_seed": 1})
    assert not torch.equal(a.test_x, c.test_x)
    rows = {tuple(r) for r in torch.cat([a.train_x, a.val_x, a.test_x]).tolist()}
    assert len(rows) >= 195  # disjoint parts (a few texts share their first 40 bytes at most)
    # Default pretext: the training texts, packed.
    assert a.pretext_x.shape[1] == 32 and a.pretext_name == f"{name}:train"


def test_tokenizer_saved_and_reused(tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    kw = dict(pretext_name="news", tokenizer="bpe", vocab_size=300, seq_len=16, max_length=16)
    first = load_text_data("polarity", tokenizer_path=path, **kw)
    assert path.exists() and load_tokenizer(path).to_str() == first.tokenizer.to_str()
    again = load_text_data("polarity", tokenizer_path=path, **kw)
    assert torch.equal(first.pretext_x, again.pretext_x) and torch.equal(first.test_x, again.test_x)
    assert first.vocab_size == 300 and int(first.pretext_x.max()) < 300
    with pytest.raises(ValueError, match="holds a bpe tokenizer of 300 tokens"):
        load_text_data("polarity", tokenizer_path=path, **{**kw, "tokenizer": "bytes"})
