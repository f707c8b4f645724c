"""Tokenizers for text BiSSL that need no download: byte-level BPE trained here, or raw bytes.

Both put the two special tokens first: ``<PAD>`` = 0 (right padding of downstream texts) and
``<EOS>`` = 1 (the separator between documents of the pretext stream).

* :class:`BPETokenizer`: byte-level BPE (GPT-2's pre-tokenisation and byte alphabet) trained with
  the ``tokenizers`` library on the pretext corpus. Training is deterministic (same texts and
  vocabulary size give the identical merges; tested), and every string round-trips through
  ``decode(encode(s))`` because the 256 byte symbols are always in the vocabulary.
* :class:`ByteTokenizer`: id ``= byte + 2`` for the UTF-8 bytes of the text; vocabulary 258.

``save(path)`` writes one JSON file (for BPE the ``tokenizers`` format, readable by
``tokenizers.Tokenizer.from_file``); :func:`load_tokenizer` reads either kind back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

# Upper case on purpose: tokenizers matches special tokens inside input text, and the text
# pipeline lower-cases everything (bissl.data.text.clean_text), so data can never produce them.
PAD, EOS = "<PAD>", "<EOS>"
PAD_ID, EOS_ID = 0, 1
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS)
#: Smallest BPE vocabulary: the specials plus the 256 byte symbols of the initial alphabet.
MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + 256
_BYTES_KIND = "bissl-bytes"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``id = byte + 2`` (0 and 1 are ``<PAD>`` and ``<EOS>``)."""

    kind = "bytes"
    pad_id, eos_id = PAD_ID, EOS_ID
    vocab_size = len(SPECIAL_TOKENS) + 256

    def encode(self, text: str) -> list[int]:
        return [b + len(SPECIAL_TOKENS) for b in text.encode("utf-8")]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes of the non-special ids, decoded as UTF-8 (invalid sequences replaced)."""
        n = len(SPECIAL_TOKENS)
        return bytes(i - n for i in ids if i >= n).decode("utf-8", errors="replace")

    def to_str(self) -> str:
        return json.dumps({"kind": _BYTES_KIND, "specials": list(SPECIAL_TOKENS)})

    def save(self, path: str | Path) -> None:
        _write_atomic(Path(path), self.to_str())


class BPETokenizer:
    """Byte-level BPE; build with :meth:`train` or :func:`load_tokenizer`.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose first two ids are ``<PAD>`` and ``<EOS>``.
    """

    kind = "bpe"
    pad_id, eos_id = PAD_ID, EOS_ID

    def __init__(self, tokenizer) -> None:
        for token, want in zip(SPECIAL_TOKENS, (PAD_ID, EOS_ID)):
            got = tokenizer.token_to_id(token)
            if got != want:
                raise ValueError(f"BPETokenizer: {token} must have id {want}, got {got}")
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges on ``texts`` until the vocabulary has ``vocab_size`` entries.

        The result can be smaller when the corpus runs out of pairs seen at least twice.

        Raises:
            ValueError: ``vocab_size`` below :data:`MIN_BPE_VOCAB` (258).
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"BPE vocab_size must be >= {MIN_BPE_VOCAB} (2 specials + 256 bytes), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            # All 256 byte symbols up front: any text (any language, emoji) stays encodable.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def to_str(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        _write_atomic(Path(path), self.to_str())


Tokenizer = ByteTokenizer | BPETokenizer


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """``"bpe"``: :meth:`BPETokenizer.train` on ``texts``; ``"bytes"``: :class:`ByteTokenizer`."""
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    if kind == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {kind!r}; choose 'bpe' or 'bytes'")


def tokenizer_from_str(text: str) -> Tokenizer:
    """Inverse of ``tokenizer.to_str()`` for either kind."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not a tokenizer JSON: {err}") from None
    if isinstance(raw, dict) and raw.get("kind") == _BYTES_KIND:
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(text))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by ``save``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a tokenizer of either kind.
    """
    path = Path(path)
    try:
        return tokenizer_from_str(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
