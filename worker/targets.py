"""Where a job's run lives: one module for the CLI, the dashboard and the worker.

A run is named two ways: ``--run NAME`` (resolved under each worker's
``--save_root``, since Macs mount the shared folder at different paths) or
``--save_dir PATH`` (one absolute path). Its registry key (``run:NAME`` or
``dir:PATH``) identifies it across machines.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Optional

from tlm.config import RUN_DATA, default_save_dir


MAX_NAME = 200  # bytes of a run name: a directory name (255 on most filesystems), with room for trials


class TargetError(ValueError):
    """A run name or directory that cannot be used; the message is one line."""


TRIAL = "trial-"  # a sweep's trial runs: <sweep folder>/trial-<n> (tlm_worker.sweeps.trial_run)


def data_folder(save_dir: str | Path) -> Path:
    """Where a run's data is prepared: ``<save_dir>/datasets``, except that a sweep's trials
    share their sweep folder's (one copy of PTB, not one per trial; the data cache's lock keeps
    trials that prepare it at once apart)."""
    save_dir = Path(save_dir)
    return (save_dir.parent if save_dir.name.startswith(TRIAL) else save_dir) / RUN_DATA


def run_target(run: Optional[str], save_dir: Optional[str]) -> tuple[dict[str, str], str]:
    """Job params that locate the run, and the key that identifies it across machines."""
    if run is not None and save_dir is not None:
        raise TargetError("give --run or --save_dir, not both")
    if "" in (run, save_dir) or (run is not None and not run.strip()):
        raise TargetError(f"--{'run' if run is not None else 'save_dir'} is empty")
    if run:
        if "/" in run or run.startswith("."):
            raise TargetError(f"--run {run!r}: a plain name, resolved under each worker's --save_root")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in run):
            raise TargetError(f"--run {run[:40]!r}: no control characters (newlines, escapes) in a run name")
        try:
            run.encode("utf-8")
        except UnicodeEncodeError:
            raise TargetError(f"--run {run[:40]!r}: not UTF-8 text (a run name is shared by every Mac)") from None
        if len(run.encode("utf-8", "surrogateescape")) > MAX_NAME or "\x00" in run:
            raise TargetError(f"--run {run[:40]!r}...: a run name is a directory on every worker: at most "
                              f"{MAX_NAME} bytes, no NUL")
        return {"run": run}, f"run:{run}"
    path = str(Path(save_dir or default_save_dir()).expanduser().resolve())
    return {"save_dir": path}, f"dir:{path}"


def target_of(key: str) -> dict[str, str]:
    """Job params that locate a run, from its registry key."""
    kind, _, name = key.partition(":")
    if "\x00" in name or len(name.encode("utf-8", "surrogateescape")) > 4096:
        raise TargetError(f"not a run key: {key[:60]!r}: no NUL, at most 4096 bytes")
    if kind == "run" and name:
        return {"run": name}
    if kind == "dir" and name:
        return {"save_dir": name}
    raise TargetError(f"not a run key: {key!r}")


def resolve_save_dir(params: dict[str, Any], save_root: Optional[str]) -> str:
    """The run's directory on this machine: a run name under this machine's save root. A record
    planted in the queue points nowhere else: a name never climbs out of the save root, and a
    path is absolute (a relative one would follow each worker's working directory)."""
    name, path = params.get("run"), params.get("save_dir")
    if name and (name.startswith("/") or "\x00" in name or ".." in Path(name).parts):
        raise TargetError(f"run {name[:60]!r}: a run name stays inside the save root (no '..', not absolute)")
    if not name and (not path or not Path(path).is_absolute()):
        raise TargetError(f"save_dir {str(path)[:60]!r}: not an absolute path")
    if params.get("run"):
        root = Path(save_root) if save_root else Path(default_save_dir()).parent / "runs"
        return str(root / params["run"])
    return params["save_dir"]


MARKS = ".tlm-lab"  # <save root>/.tlm-lab/<token>: the mark that this folder is a lab's shared folder


def save_root_of(save_root: Optional[str]) -> Path:
    """The folder where ``--run`` names resolve on this machine."""
    return Path(resolve_save_dir({"run": "x"}, save_root)).parent


class OtherLab(TargetError):
    """The save root is marked as another lab's shared folder (refused at worker start)."""


def lab_marks(root: Path) -> list[str]:
    """The tokens of the labs whose mark this folder carries."""
    try:
        return sorted(p.name for p in (root / MARKS).iterdir() if p.is_file())
    except OSError:
        return []


def check_save_root(registry, save_root: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """The lab's token and None if this worker's save root is the lab's shared folder, else
    the token (None if none yet) and why not (one line). OtherLab if it is another lab's.

    The first worker to serve a lab marks its save root (a file named by a token that the
    registry keeps from then on); every later worker finds that file in its save root, or is
    not looking at the lab's shared folder (not mounted on this Mac). A lab with no token yet
    never takes over a folder another lab has marked: two labs on one folder would each
    schedule its runs without seeing the other's.
    """
    root = save_root_of(save_root)
    token = registry.store.value("save_root")
    for _ in range(30):  # a worker of this lab starting beside this one may be between its mark and
        if token is not None or not lab_marks(root):  # the registry's record of it: wait for that
            break
        time.sleep(0.1)
        token = registry.store.value("save_root")
    marks = lab_marks(root)
    others = [m for m in marks if m != token]
    if others and token not in marks:
        raise OtherLab(f"{root} is the shared folder of another lab (its mark {MARKS}/{others[0][:12]}): "
                       f"give this lab its own --save_root, or, if that lab is gone (or was this one "
                       f"before its queue was emptied), remove {root / MARKS} and start the worker again")
    if token is None:
        mine = uuid.uuid4().hex
        try:
            (root / MARKS).mkdir(parents=True, exist_ok=True)
            (root / MARKS / mine).touch()
        except OSError as e:
            return None, f"{root} cannot be marked as the lab's shared folder: {e.strerror or e}"
        token = registry.store.first_value("save_root", mine)
        if token != mine:  # another worker marked first: its folder, maybe this one
            (root / MARKS / mine).unlink(missing_ok=True)
    if (root / MARKS / token).is_file():
        return token, None
    return token, f"{root} is not this lab's shared folder: is it mounted? (tlm-worker --save_root)"


def canonical(registry, params: dict[str, Any], run_key: str) -> tuple[dict[str, Any], str]:
    """A run named by a path inside the lab's shared folder (through any symlink) is the run of
    that name there: one key, so one trainer, however it is named; its params name it so, and
    each worker finds it under its own mount of the folder."""
    token = registry.store.value("save_root") if run_key.startswith("dir:") else None
    if token is None:
        return params, run_key
    path = Path(run_key[len("dir:"):])
    for root in path.parents:
        if (root / MARKS / token).is_file():
            name = path.relative_to(root).as_posix()
            return {**{k: v for k, v in params.items() if k != "save_dir"}, "run": name}, f"run:{name}"
    return params, run_key
