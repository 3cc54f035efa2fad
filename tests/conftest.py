"""Shared fixtures: the offline data mirror and a cached PTB dataset."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from tlm.hooks import TrainingHooks

ROOT = Path(__file__).resolve().parent.parent
SANDBOX = Path(__file__).resolve().parent / "sandbox"

# Every process the suite starts loads tests/sandbox/sitecustomize.py (port 6379 firewalled), and
# none reads a user's lab: no TLM_QUEUE or TLM_SAVE_ROOT of theirs, no default queue or runs of theirs.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SANDBOX), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(SANDBOX))
import sitecustomize  # noqa: E402,F401  (this folder's: the firewall, in pytest too)
for _name in ("TLM_QUEUE", "TLM_SAVE_ROOT"):
    os.environ.pop(_name, None)
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="tlm-test-home-")
# A suite started in the background (`nohup ... &`) inherits SIGINT ignored, and so would every
# process it starts: the Ctrl+C tests would wait forever. A handler here is reset to the default
# in each child, which then turns SIGINT into KeyboardInterrupt as a terminal's would.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
MIRROR = Path(os.environ.get("TLM_DATA_MIRROR") or ROOT.parent / "shared" / "data")
if MIRROR.is_dir():
    os.environ["TLM_DATA_MIRROR"] = str(MIRROR)  # for the processes tests start too


@pytest.fixture(autouse=True)
def own_home(tmp_path_factory, monkeypatch) -> None:
    """Each test its own default queue and runs folder (XDG_DATA_HOME, which the processes it
    starts inherit): a lab's shared folder belongs to one lab, so tests never share one."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def mirror() -> str:
    if not (MIRROR / "ptb" / "ptb.train.txt").exists():
        pytest.skip(f"no offline data mirror at {MIRROR}")
    return str(MIRROR)


@pytest.fixture(scope="session")
def ptb_cache(tmp_path_factory, mirror) -> Path:
    """A datasets/ directory with PTB downloaded and tokenized once per session."""
    import tlm  # noqa: F401
    from tlm.data import load_dataset

    root = tmp_path_factory.mktemp("datasets-cache")
    load_dataset("ptb", root, mirror)
    return root


@pytest.fixture
def save_dir(tmp_path, ptb_cache) -> Path:
    """A fresh save directory whose datasets/ already holds tokenized PTB."""
    shutil.copytree(ptb_cache, tmp_path / "run" / "datasets")
    return tmp_path / "run"


@pytest.fixture(params=["sqlite", "redis"])
def url(request, tmp_path) -> str:
    """A fresh queue of each backend (a test picks one with indirect parametrize); the
    module's REDIS_DB keeps modules that run at once apart."""
    from queue_helpers import backend_url
    return backend_url(request.param, tmp_path, request.module.REDIS_DB)


@pytest.fixture
def workers(url, tmp_path):
    """tlm-worker processes against ``url``, killed after the test."""
    from queue_helpers import Workers
    w = Workers(url, tmp_path)
    yield w
    w.stop_all()


def tlm_cmd(*args: str) -> list[str]:
    """The installed ``tlm`` entry point, run with this interpreter."""
    return [sys.executable, "-m", "tlm_cli.main", *args]


class Collect(TrainingHooks):
    """Trainer hooks for tests: every event kept in ``events``; ``stop()`` asked after each step."""

    def __init__(self, stop=lambda: False):
        self.events, self.stop = [], stop

    def on_progress(self, progress) -> None:
        self.events.append(progress)

    def should_stop(self) -> bool:
        return self.stop()


# The slowest files first (by their tests' time in a whole run, 2026-12-03), so the test
# processes of pyproject's ``-n`` end together instead of one waiting on a long file handed out
# last: xdist's ``--dist loadfile`` gives out whole files in collection order.
SLOWEST_FIRST = ("test_gang.py", "test_faults.py", "test_queue.py", "test_sweep.py", "test_dashboard.py",
                 "test_placement.py", "test_checkpoint.py", "test_hardening.py", "test_chaos.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = len(SLOWEST_FIRST)
    items.sort(key=lambda item: SLOWEST_FIRST.index(item.path.name) if item.path.name in SLOWEST_FIRST else last)
