"""Checkpoints that never lose work: SHA1-named, atomically published, verified on load.

A checkpoint is a pair of files in the save directory:

* ``<sha1>.safetensors``: the model weights. ``<sha1>`` is the SHA1 of the
  file's bytes, and its safetensors header records the SHA1 of the metadata
  file, so the name verifies both files.
* ``<sha1>.metadata``: the training state, also a safetensors file (never a
  pickle): tensors hold the optimizer state and the batch permutation; the header's ``tlm`` entry holds JSON (format version, config,
  model args, vocabulary, dataset, step, data position, best validation loss).

Publishing renames the metadata first and the weights last, so a visible
``.safetensors`` always has its metadata beside it, and readers only ever list
``*.safetensors``. This is the only module that writes into a save directory's
checkpoints; it relies on nothing but rename within one directory, which is
atomic on local disks and on SMB/NFS shares alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import mlx.core as mx
from mlx.utils import tree_flatten
from safetensors import safe_open

from tlm.vocab import Tokenizer
from tlm import files
from tlm.files import file_digest
from tlm.model import Model, ModelArgs
from tlm.optimizer import cooling

FORMAT = "tlm-checkpoint"
VERSION = 1
STALE_SECONDS = 600  # a temporary file this old belongs to a writer that died
T = TypeVar("T")
SHA1_NAME = re.compile(r"^[0-9a-f]{40}\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found or verified."""


@dataclass
class Checkpoint:
    """A verified checkpoint on disk: its identifier and recorded state."""

    identifier: str
    directory: Path
    state: dict[str, Any]  # the JSON part of the metadata

    @property
    def weights_path(self) -> Path:
        return self.directory / f"{self.identifier}.safetensors"

    @property
    def metadata_path(self) -> Path:
        return self.directory / f"{self.identifier}.metadata"

    @property
    def step(self) -> int:
        return self.state["step"]

    def load_weights(self) -> dict[str, mx.array]:
        return mx.load(str(self.weights_path))

    def load_model(self) -> Model:
        """The model, rebuilt from the recorded configuration, with these weights."""
        model = Model(ModelArgs(**self.state["model_args"]))
        model.load_weights(list(self.load_weights().items()), strict=True)
        mx.eval(model.parameters())  # read now (MLX loads lazily): the files may go once it returns
        model.eval()
        return model

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_dict(self.state["tokenizer"])

    def load_tensors(self) -> dict[str, mx.array]:
        """Optimizer state (``optimizer.*``) and the epoch's batch permutation ``perm``."""
        return mx.load(str(self.metadata_path), format="safetensors")


def _sha1(path: Path) -> str:
    return file_digest(path, "sha1")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some network filesystems cannot open directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _header(path: Path) -> dict[str, str]:
    if not path.is_file():  # a FIFO or device planted under a checkpoint's name would block the open
        raise CheckpointError(f"{path} is not a regular file")
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata() or {}


def _write_verified(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> str:
    """Write a safetensors file, fsync it, read it back, and return its SHA1."""
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays, metadata=metadata)
        f.flush()
        os.fsync(f.fileno())
    back = mx.load(str(path), format="safetensors")
    if set(back) != set(arrays) or any(back[k].shape != arrays[k].shape for k in arrays):
        raise CheckpointError(f"{path.name} did not read back as written")
    return _sha1(path)


def save(directory: str | Path, weights: dict[str, mx.array], tensors: dict[str, mx.array],
         state: dict[str, Any], before_publish: Callable[[], None] = lambda: None) -> Checkpoint:
    """Write and atomically publish one checkpoint; return it.

    ``before_publish`` runs after both files are durable and before they become
    visible; it may raise to refuse publication (a worker that lost its lease).
    On any error the temporary files are removed and earlier checkpoints are untouched.
    """
    directory = Path(directory)
    tmp = f".tmp-{uuid.uuid4().hex[:12]}"
    meta_new = directory / f"{tmp}.metadata.new"
    weights_new = directory / f"{tmp}.safetensors.new"
    try:
        state = {**state, "format": FORMAT, "version": VERSION, "created": time.time()}
        meta_sha1 = _write_verified(meta_new, tensors, {"tlm": json.dumps(state)})
        identifier = _write_verified(weights_new, weights, {
            "format": FORMAT, "metadata_sha1": meta_sha1, "step": str(state["step"])})
        before_publish()
        os.replace(meta_new, directory / f"{identifier}.metadata")
        os.replace(weights_new, directory / f"{identifier}.safetensors")
        _fsync_dir(directory)
    finally:
        meta_new.unlink(missing_ok=True)
        weights_new.unlink(missing_ok=True)
    return Checkpoint(identifier, directory, state)


def save_retrying(directory: str | Path, snapshot: tuple[dict, dict, dict], retries: int,
                  log: Callable[[str], None], before_publish: Callable[[], None] = lambda: None) -> Checkpoint:
    """``save`` a snapshot (weights, tensors, state), retrying with back-off up to ``retries``
    times while the old checkpoint stays intact; a folder no retry can help (read-only,
    deleted, not ours) is a CheckpointError at once."""
    for attempt in itertools.count():
        try:
            return save(directory, *snapshot, before_publish=before_publish)
        except OSError as e:
            if e.errno in files.SETUP:
                raise CheckpointError(f"cannot save a checkpoint in {directory}: {e.strerror or e}") from None
            if attempt >= retries:
                if files.transient(e):  # the disk may be fine on another machine, or later
                    e.filename = e.filename or f"saving a checkpoint in {directory}"
                    raise
                raise CheckpointError(f"could not save a checkpoint in {directory} "
                                      f"after {attempt + 1} attempts: {e}") from None
            delay = min(2**attempt, 30)
            log(f"checkpoint save failed ({e.strerror or e}); the previous checkpoint is "
                f"intact; retrying in {delay}s (Ctrl+C twice to give up)")
            time.sleep(delay)


def verify(directory: str | Path, identifier: str) -> Checkpoint:
    """Check that a pair hashes to its name and parses; raise CheckpointError if not."""
    directory = Path(directory)
    weights = directory / f"{identifier}.safetensors"
    metadata = directory / f"{identifier}.metadata"
    try:
        if _sha1(weights) != identifier:
            raise CheckpointError("weights do not hash to their name")
        header = _header(weights)
        if header.get("format") != FORMAT:
            raise CheckpointError("not a tlm checkpoint")
        if not metadata.exists():
            raise CheckpointError("metadata file is missing")
        if _sha1(metadata) != header.get("metadata_sha1"):
            raise CheckpointError("metadata does not match the weights' record of it")
        state = json.loads(_header(metadata)["tlm"])
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
            raise CheckpointError(f"unsupported metadata version "
                                  f"{state.get('version') if isinstance(state, dict) else None!r}")
        check_contents(state, _shapes(weights))
    except CheckpointError:
        raise
    except Exception as e:  # unreadable, truncated or not safetensors at all
        raise CheckpointError(f"unreadable ({type(e).__name__}: {e})") from None
    return Checkpoint(identifier, directory, state)


# What a checkpoint's recorded state must hold, and of which types (a bool is no number).
STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "config": (dict,), "model_args": (dict,), "tokenizer": (dict,), "dataset": (str,),
    "step": (int,), "elapsed": (int, float)}
MAX_STEP = 2**53  # far beyond any run; larger is a damaged or hand-made record
POSITIVE_ARGS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    with safe_open(str(path), framework="numpy") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_fields(state: dict[str, Any]) -> None:
    """The recorded state holds each of STATE_FIELDS, of its type, step and elapsed in range;
    CheckpointError naming the first problem."""
    for key, types in STATE_FIELDS.items():
        value = state.get(key)
        if value is None:
            raise CheckpointError(f"its metadata has no {key!r}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise CheckpointError(f"its metadata's {key!r} is {type(value).__name__}, "
                                  f"not {' or '.join(t.__name__ for t in types)}")
    if not 0 <= state["step"] <= MAX_STEP or not 0 <= state["elapsed"] < float("inf"):
        raise CheckpointError(f"its metadata's step {state['step']} or elapsed {state['elapsed']} "
                              "is out of range")


def check_contents(state: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """The recorded state makes sense and the weights are the ones its model arguments
    describe (every tensor, each of its shape); CheckpointError naming the first problem.
    Hashes only prove the files are as written: this proves what was written can be used."""
    check_fields(state)
    context = state["config"].get("context_size")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise CheckpointError(f"its configuration's context_size is not usable: {context!r}")
    known = {f.name: f.type for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(state["model_args"]) - set(known))
    if unknown:
        raise CheckpointError(f"unknown model argument {unknown[0]!r} (written by a newer tlm?)")
    try:
        args = ModelArgs(**state["model_args"])
        for k, v in dataclasses.asdict(args).items():
            if isinstance(v, bool) != (known[k] in (bool, "bool")) or not isinstance(v, (int, float)) \
                    or not 0 <= v < float("inf") or (k in POSITIVE_ARGS and v < 1):
                raise CheckpointError(f"model argument {k!r} is not usable: {v!r}")
        if args.hidden_size % args.num_attention_heads:
            raise CheckpointError(f"model argument 'hidden_size' ({args.hidden_size}) is not a multiple "
                                  f"of 'num_attention_heads' ({args.num_attention_heads})")
        expected = {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}
        Tokenizer.from_dict(state["tokenizer"])
    except CheckpointError:
        raise
    except Exception as e:  # TypeError, ValueError, KeyError from a damaged record
        raise CheckpointError(f"its model arguments or tokenizer do not load ({type(e).__name__}: {e})") \
            from None
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointError(f"tensor {name!r} is missing")
        if shapes[name] != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(shapes[name])}, "
                                  f"its model arguments say {list(shape)}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise CheckpointError(f"tensor {extra[0]!r} is not in the model its arguments describe")


def _candidates(directory: Path) -> list[tuple[int, float, str]]:
    """(recorded step, mtime, identifier) of every published weights file, newest first.

    One whose header cannot be read sorts first, so that ``find`` reports it.
    """
    out = []
    for path in directory.glob("*.safetensors"):
        if not SHA1_NAME.match(path.name):
            continue
        try:
            step = int(_header(path).get("step", -1))
            out.append((step, path.stat().st_mtime, path.name[: -len(".safetensors")]))
        except Exception:
            out.append((2**63, 0.0, path.name[: -len(".safetensors")]))
    return sorted(out, reverse=True)


def newest_name(directory: str | Path) -> Optional[str]:
    """The identifier ``find`` would try first, from file names and headers only (no hashing)."""
    directory = Path(directory)
    candidates = _candidates(directory) if directory.is_dir() else []
    return candidates[0][2] if candidates else None


def listed(directory: str | Path) -> list[tuple[int, str]]:
    """(recorded step, identifier) of every published checkpoint, newest first, from file names
    and headers only (no hashing: for pages that list runs, never for loading)."""
    directory = Path(directory)
    return [(step, ident) for step, _, ident in _candidates(directory)] if directory.is_dir() else []


def peek_state(directory: str | Path) -> Optional[dict[str, Any]]:
    """The newest checkpoint's recorded state, read without hashing (for listings of many runs:
    not verified, so never for loading)."""
    name = newest_name(directory)
    return _peek(Path(directory), name) if name else None


def _peek(directory: Path, identifier: str) -> Optional[dict[str, Any]]:
    """A checkpoint's recorded state from its header, unverified; None if unreadable or partial."""
    try:
        return json.loads(_header(directory / f"{identifier}.metadata")["tlm"])
    except Exception:
        return None


def find(directory: str | Path, identifier: Optional[str] = None,
         warn: Callable[[str], None] = lambda m: None) -> Optional[Checkpoint]:
    """The named checkpoint, or the latest valid one (None if there is none).

    A corrupt or half-written pair is skipped with a warning and the next
    older one is tried; a named one that fails verification is an error, and so
    is a directory whose checkpoints all fail (it is a run, not a new model).
    """
    directory = Path(directory)
    if not directory.is_dir():
        if identifier:
            raise CheckpointError(f"no checkpoint {identifier!r}: {directory} does not exist")
        return None
    candidates = _candidates(directory)
    if identifier:
        matches = [c for c in candidates if c[2].startswith(identifier)]
        if len(matches) != 1:
            what = "no" if not matches else f"{len(matches)} checkpoints match"
            raise CheckpointError(f"{what} checkpoint {identifier!r} in {directory}")
        return verify(directory, matches[0][2])
    problems = []
    for _, _, ident in candidates:
        try:
            return verify(directory, ident)
        except CheckpointError as e:
            warn(f"skipping checkpoint {ident[:12]}: {e}")
            problems.append(f"{ident[:12]} ({e})")
    if problems:  # a run with checkpoints never silently becomes a new model
        raise CheckpointError(f"no readable checkpoint in {directory}: {'; '.join(problems[:3])}"
                              f"{' and more' if len(problems) > 3 else ''}; set them aside with "
                              "--new_model (moved into replaced-<time>/) or move them away")
    return None


def read(directory: str | Path, identifier: Optional[str], use: Callable[[Checkpoint], T],
         warn: Callable[[str], None] = lambda m: None, tries: int = 5) -> tuple[Optional[Checkpoint], Optional[T]]:
    """Find the named or latest checkpoint and ``use`` it (load it whole): a reader of a run that
    trains on never loses to retention, which may delete the checkpoint it found while it
    reads (the run has a newer one by then, which it reads instead). (None, None): none."""
    for attempt in range(tries):
        newest = newest_name(directory)
        try:
            with pinned(directory, identifier or newest):
                ckpt = find(directory, identifier, warn)
                return (ckpt, use(ckpt)) if ckpt is not None else (None, None)
        except Exception:
            if identifier or attempt == tries - 1 or newest_name(directory) == newest:
                raise
            warn("the checkpoint was replaced while it was read (the run trains on): reading the newest")
    raise AssertionError("unreachable")


PINS = ".tlm-readers"  # a run's pins: one empty file per live reader, named <checkpoint>.<host>.<pid>.<n>
PIN_SECONDS = 600.0  # a pin older than this is a dead reader's: retention no longer keeps its checkpoint


@contextlib.contextmanager
def pinned(directory: str | Path, identifier: Optional[str]) -> Iterator[None]:
    """Retention keeps the checkpoint ``identifier`` (or the ones it prefixes) while this reader
    reads it, on any machine: a pin file in the run directory, removed after. A folder this
    reader may not write to is read unpinned (``read``'s retries cover it)."""
    pin = Path(directory) / PINS / f"{identifier}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        if identifier:
            pin.parent.mkdir(exist_ok=True)
            pin.touch()
    except OSError:
        identifier = None
    try:
        yield
    finally:
        if identifier:
            with contextlib.suppress(OSError):
                pin.unlink()


def _pinned(directory: Path) -> list[str]:
    """The checkpoints (or prefixes of them) live readers pin; a dead reader's pins are removed."""
    pins, now = [], time.time()
    for pin in (directory / PINS).glob("*") if (directory / PINS).is_dir() else []:
        with contextlib.suppress(OSError):
            if now - pin.stat().st_mtime < PIN_SECONDS:
                pins.append(pin.name.split(".")[0])
            else:
                pin.unlink()
    return pins


def list_checkpoints(directory: str | Path) -> list[Checkpoint]:
    """Every valid checkpoint, newest first (corrupt ones left out)."""
    out = []
    for _, _, ident in _candidates(Path(directory)):
        try:
            out.append(verify(directory, ident))
        except CheckpointError:
            pass
    return out


def set_aside(directory: str | Path) -> Optional[Path]:
    """Move a directory's checkpoints and metrics into ``replaced-<time>/`` beside them, so a
    new model's run starts clean (its retention and resume see only its own checkpoints)
    and nothing of the old run is lost. Returns where they went, or None if nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    names = [p for p in directory.iterdir() if SHA1_NAME.match(p.name)]
    names += [p.with_suffix(".metadata") for p in names if p.with_suffix(".metadata").exists()]
    names += [p for p in (directory / "metrics.jsonl",) if p.exists()]
    if not names:
        return None
    aside = directory / time.strftime("replaced-%Y%m%d-%H%M%S")
    aside.mkdir(exist_ok=True)
    for p in names:
        os.replace(p, aside / p.name)
    _fsync_dir(directory)
    return aside


def adopt(source: str | Path, identifier: str, directory: str | Path) -> None:
    """Make ``source``'s checkpoint ``identifier`` the only one of ``directory``, so the run
    there resumes exactly where that one stood (weights, optimizer, data position): population
    based training's exploit. Copied pinned, by temporary files renamed metadata first as
    ``save`` publishes; then the directory's other checkpoints are deleted. Idempotent: a copy
    already in place is not made again, so a copier that died halfway is simply run again."""
    source, directory = Path(source), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{identifier}.safetensors"
    if not target.exists():
        with pinned(source, identifier):
            verify(source, identifier)  # a damaged or vanished source is an error, not a copy
            tmp = f".tmp-{uuid.uuid4().hex[:12]}"
            try:
                for suffix in (".metadata", ".safetensors"):
                    shutil.copyfile(source / f"{identifier}{suffix}", directory / f"{tmp}{suffix}.new")
                for suffix in (".metadata", ".safetensors"):
                    os.replace(directory / f"{tmp}{suffix}.new", directory / f"{identifier}{suffix}")
            finally:
                for suffix in (".metadata", ".safetensors"):
                    (directory / f"{tmp}{suffix}.new").unlink(missing_ok=True)
        _fsync_dir(directory)
    for _, _, other in _candidates(directory):
        if other != identifier:
            _unpublish(directory, other)


def _unpublish(directory: Path, identifier: str) -> None:
    """Delete a checkpoint's pair, weights first: never a visible weights file without metadata."""
    (directory / f"{identifier}.safetensors").unlink(missing_ok=True)
    (directory / f"{identifier}.metadata").unlink(missing_ok=True)


def _before_cooldown(states: list[tuple[str, dict[str, Any]]]) -> Optional[str]:
    """Of (identifier, recorded state) pairs, newest first: the newest taken before the run's
    ``--lr_cooldown`` began, if the newest is in its cooldown (None otherwise)."""
    def cooled(state: dict[str, Any]) -> bool:
        return cooling(state["config"], state["step"], state.get("elapsed", 0.0))
    if not states or not cooled(states[0][1]):
        return None
    return next((ident for ident, state in states if not cooled(state)), None)


def branch_point(directory: str | Path) -> Optional[Checkpoint]:
    """Where training a run in (or past) its cooldown on goes on from: its newest checkpoint
    before the cooldown began, chosen from the headers (no hashing) and then verified; if that
    one is damaged, chosen again among the valid ones. None if the run is not cooling down."""
    directory = Path(directory)
    headers = [(ident, state) for _, _, ident in _candidates(directory)
               if _fields_ok(state := _peek(directory, ident))]
    ident = _before_cooldown(headers)
    try:
        return verify(directory, ident) if ident else None
    except CheckpointError:
        valid = list_checkpoints(directory)
        ident = _before_cooldown([(c.identifier, c.state) for c in valid])
        return next((c for c in valid if c.identifier == ident), None)


def _fields_ok(state: Optional[dict[str, Any]]) -> bool:
    """Whether an unverified header's state can be read for a choice (a damaged or hand-made
    one is passed over, as an unreadable one is: the choice is verified after)."""
    try:
        check_fields(state)
        return True
    except (CheckpointError, AttributeError, TypeError):  # None, or not a record at all
        return False


def branch(directory: str | Path, ckpt: Checkpoint) -> Optional[Path]:
    """Train on from an older checkpoint ``ckpt`` of the run: its newer checkpoints and the
    metrics records past its step move into ``replaced-<time>/`` (nothing is deleted), so
    retention and a later resume follow the branch instead of the newer ones. Where they went,
    or None when ``ckpt`` is the newest."""
    directory = Path(directory)
    newer = [ident for step, _, ident in _candidates(directory) if step > ckpt.step]
    if not newer:
        return None
    aside = directory / time.strftime("replaced-%Y%m%d-%H%M%S")
    aside.mkdir(exist_ok=True)
    for ident in newer:  # weights first: never a visible pair without its metadata
        for suffix in (".safetensors", ".metadata"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(directory / f"{ident}{suffix}", aside / f"{ident}{suffix}")
    log = directory / "metrics.jsonl"
    if log.exists():
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        past = [line for line in lines if _step_of(line) > ckpt.step]
        (aside / "metrics.jsonl").write_text("".join(past), encoding="utf-8")
        kept = "".join(line for line in lines if _step_of(line) <= ckpt.step)
        files.replace(log, lambda tmp: tmp.write_text(kept, encoding="utf-8"))
    _fsync_dir(directory)
    return aside


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):
        return -1.0


def retain(directory: str | Path, keep_last: int = 1) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints, the best one and, in a run past its
    cooldown's start, the last one before it; return what went.

    Also removes temporary and orphaned files older than ``STALE_SECONDS``
    (left by writers that died; younger ones may belong to a live writer on
    another machine).
    """
    directory = Path(directory)
    valid = list_checkpoints(directory)
    keep = {c.identifier for c in valid[:keep_last]}
    scored = [c for c in valid if c.state.get("val_loss") is not None]
    if scored:
        keep.add(min(scored, key=lambda c: c.state["val_loss"]).identifier)
    stable = _before_cooldown([(c.identifier, c.state) for c in valid])
    if stable is not None:  # where the run can be trained on beyond its cooldown (``branch_point``)
        keep.add(stable)
    pins = _pinned(directory)  # what a sample, eval or export reads now stays until it is read
    removed = []
    for c in valid:
        if c.identifier not in keep and not any(c.identifier.startswith(p) for p in pins):
            _unpublish(directory, c.identifier)
            removed.append(c.identifier)
    now = time.time()
    for path in list(directory.glob(".tmp-*.new")) + list(directory.glob("*.metadata")):
        orphan = path.suffix == ".new" or not path.with_suffix(".safetensors").exists()
        try:
            if orphan and now - path.stat().st_mtime > STALE_SECONDS:
                path.unlink()
        except FileNotFoundError:
            pass
    return removed


def flatten(tree: Any, prefix: str) -> dict[str, mx.array]:
    """A nested tree of arrays as flat safetensors entries ``prefix.path``."""
    return {f"{prefix}.{k}": v for k, v in tree_flatten(tree)}


def unflatten_prefix(tensors: dict[str, mx.array], prefix: str) -> list[tuple[str, mx.array]]:
    n = len(prefix) + 1
    return [(k[n:], v) for k, v in tensors.items() if k.startswith(prefix + ".")]

