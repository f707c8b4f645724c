"""Tokenizers: round trip, deterministic BPE training, save/load, the special ids."""

from __future__ import annotations

import json

import pytest

from bissl.data.text import clean_text
from bissl.data.text_sources import read_news
from bissl.data.tokenizer import (
    EOS_ID,
    MIN_BPE_VOCAB,
    PAD_ID,
    BPETokenizer,
    ByteTokenizer,
    load_tokenizer,
    train_tokenizer,
)
from bissl.extras import describe_missing

# Skipped (with the reason) without the [text] extra; CI sets BISSL_REQUIRE_ALL=1, where a skip fails.
pytestmark = pytest.mark.skipif(bool(describe_missing("text")), reason=describe_missing("text"))

SAMPLES = [
    "the bushfire moved towards hill top .",
    "Ünïcode — émoji ✓ and 中文",
    "  leading and trailing spaces  ",
    "a",
    "numbers 1,234.5 and tabs\tnewlines\n",
]


@pytest.fixture(scope="module")
def news_docs() -> list[str]:
    return [clean_text(d) for d in read_news()[:120]]


@pytest.fixture(scope="module")
def bpe(news_docs) -> BPETokenizer:
    return BPETokenizer.train(news_docs, 512)


def test_bpe_round_trip_and_compression(bpe, news_docs):
    assert bpe.vocab_size == 512
    for text in SAMPLES + news_docs[:5]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert all(0 <= i < bpe.vocab_size for i in ids)
    # Merges learnt on the corpus compress it: fewer tokens than bytes.
    doc = news_docs[0]
    assert len(bpe.encode(doc)) < 0.6 * len(doc.encode())


def test_bytes_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 258
    for text in SAMPLES:
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8"))
        assert min(ids) >= 2 and tok.decode(ids) == text
    assert tok.decode([PAD_ID, *tok.encode("ab"), EOS_ID]) == "ab"  # specials are dropped


def test_special_ids(bpe):
    for tok in (bpe, ByteTokenizer()):
        assert (tok.pad_id, tok.eos_id) == (0, 1)
    # Cleaned (lower-cased) text never contains a special token's upper-case spelling.
    assert bpe.encode(clean_text("<PAD> <EOS>")).count(PAD_ID) == 0
    assert EOS_ID not in bpe.encode(clean_text("<PAD> <EOS>"))
    assert bpe.decode([PAD_ID, EOS_ID]) == ""


def test_bpe_training_is_deterministic(bpe, news_docs):
    again = BPETokenizer.train(news_docs, 512)
    assert again.to_str() == bpe.to_str()
    other = BPETokenizer.train(news_docs[:60], 512)
    assert other.to_str() != bpe.to_str()


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_save_load(tmp_path, kind, news_docs):
    tok = train_tokenizer(kind, news_docs, 400)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = load_tokenizer(path)
    assert back.kind == kind and back.vocab_size == tok.vocab_size
    for text in SAMPLES:
        assert back.encode(text) == tok.encode(text)
    json.loads(path.read_text())  # a plain JSON file
    if kind == "bpe":
        from tokenizers import Tokenizer  # the standard tokenizers format

        assert Tokenizer.from_file(str(path)).encode(SAMPLES[0]).ids == tok.encode(SAMPLES[0])


def test_errors(tmp_path, news_docs):
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        BPETokenizer.train(news_docs, MIN_BPE_VOCAB - 1)
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'"):
        train_tokenizer("wordpiece", news_docs, 512)
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match=r"bad\.json: not a tokenizer JSON"):
        load_tokenizer(bad)
