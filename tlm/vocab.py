"""Tokenizers: word, character, byte and BPE, each JSON-serialisable for checkpoints.

Encoding whole corpora is vectorised (NumPy for characters and bytes, C-level
``map`` over a dict for words, Hugging Face ``tokenizers`` for BPE), so even
WikiText-103's 100M+ tokens never go through a per-token Python loop body.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Optional

import numpy as np

KINDS = ("word", "char", "byte", "bpe")
EOS, UNK = "<eos>", "<unk>"


class _Index(dict):
    """word -> id, with unknown words mapping to ``<unk>`` (lookups stay in C)."""

    def __init__(self, vocab: list[str]):
        super().__init__((w, i) for i, w in enumerate(vocab))
        self.unk = self.get(UNK)

    def __missing__(self, key: str) -> Optional[int]:
        return self.unk


class Tokenizer:
    """Text <-> token ids. ``eos`` is the end-of-line token of word-level data, ``unk``
    its unknown-word token; None for other kinds."""

    kind = ""
    eos: Optional[int] = None
    unk: Optional[int] = None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def unknown(self, text: str) -> list[str]:
        """Pieces of ``text`` outside the vocabulary (they become ``<unk>`` or are dropped)."""
        return []

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Tokenizer":
        kind = data["kind"]
        if kind == "word":
            return WordTokenizer(data["vocab"])
        if kind == "char":
            return CharTokenizer(data["vocab"])
        if kind == "byte":
            return ByteTokenizer()
        if kind in ("bpe", "hf"):
            return BPETokenizer(data["json"], kind)
        raise ValueError(f"unknown tokenizer kind {kind!r}")


class WordTokenizer(Tokenizer):
    """Whitespace-separated words, ``<eos>`` at each line end (the PTB/WikiText convention)."""

    kind = "word"

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.index = _Index(vocab)
        self.eos = self.index.get(EOS)

    @staticmethod
    def words(text: str) -> list[str]:
        return text.replace("\n", f" {EOS} ").split()

    @classmethod
    def fit(cls, chunks: Iterable[str]) -> "WordTokenizer":
        """Most frequent first, ties alphabetical: the same vocabulary in every process."""
        counts: Counter = Counter()
        for chunk in chunks:
            counts.update(cls.words(chunk))
        counts.setdefault(UNK, 0)
        return cls(sorted(counts, key=lambda w: (-counts[w], w)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_array(self, text: str) -> np.ndarray:
        words = self.words(text)
        return np.fromiter(map(self.index.__getitem__, words), dtype=np.int32, count=len(words))

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by spaces, ``<eos>`` as a line break (``encode`` reads it back)."""
        out: list[str] = []
        for i in ids:
            word = self.vocab[i]
            out.append("\n" if word == EOS else word if not out or out[-1] == "\n" else " " + word)
        return "".join(out)

    @property
    def unk(self) -> Optional[int]:
        return self.index.unk

    def unknown(self, text: str) -> list[str]:
        return [w for w in text.split() if w not in self.index]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": self.vocab}


class CharTokenizer(Tokenizer):
    """One token per Unicode character, vocabulary sorted by code point."""

    kind = "char"

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.codes = np.array([ord(c) for c in vocab], dtype=np.uint32)
        self.index = {c: i for i, c in enumerate(vocab)}

    @staticmethod
    def _codepoints(text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)

    @classmethod
    def fit(cls, chunks: Iterable[str]) -> "CharTokenizer":
        codes = np.unique(np.concatenate([np.unique(cls._codepoints(c)) for c in chunks]))
        return cls([chr(c) for c in codes])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_array(self, text: str) -> np.ndarray:
        codes = self._codepoints(text)
        ids = np.searchsorted(self.codes, codes)
        known = self.codes[np.minimum(ids, len(self.codes) - 1)] == codes
        return ids[known].astype(np.int32)  # characters never seen are left out

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def unknown(self, text: str) -> list[str]:
        return [c for c in text if c not in self.index]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": self.vocab}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, 256 tokens: any text, no unknowns (enwik8's convention)."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode_array(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        # Incomplete UTF-8 at the end is left out until its remaining bytes arrive.
        return bytes(ids).decode("utf-8", errors="ignore")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer: byte-level BPE trained locally (kind
    "bpe"), or the ``tokenizer.json`` of an imported model (kind "hf")."""

    def __init__(self, spec: str, kind: str = "bpe"):
        from tokenizers import Tokenizer as HFTokenizer  # tokenizers

        self.spec, self.kind = spec, kind
        self.hf = HFTokenizer.from_str(spec)

    @classmethod
    def fit(cls, chunks: Iterable[str], vocab_size: int = 4096) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers  # tokenizers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(chunks, trainer=trainer)
        return cls(hf.to_str())

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode_array(self, text: str) -> np.ndarray:
        lines = text.splitlines(keepends=True) or [""]
        encoded = self.hf.encode_batch(lines, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encoded])

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "json": self.spec}

