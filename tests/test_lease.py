"""The run directory holds its own trainer (issue 41): a lease file in the run's folder, so one
trainer per run holds across labs, mounts and names; real processes, files and workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tlm import metrics
from tlm.lease import NAME, LeaseLost, RunHeld, RunLease

from queue_helpers import TINY, Workers, submit, tlm, until, wait_for

REDIS_DB = 5
HOLD = """
import sys, time
from tlm.lease import RunLease, LeaseLost
lease = RunLease(sys.argv[1], {"job": "holder"}, ttl=float(sys.argv[2])).take()
print("held", flush=True)
while True:
    time.sleep(0.1)
    try:
        lease.check()
    except LeaseLost as e:
        print("lost:", e, flush=True)
        sys.exit(3)
"""


def holder(directory: Path, ttl: float = 1.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), str(ttl)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_waited_for_then_refused_and_a_dead_one_on_this_host_is_taken_at_once(tmp_path):
    proc = holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(RunHeld, match="being trained by job holder on .* one trainer per run"):
            RunLease(tmp_path, ttl=1).take(wait=2.5)
        assert time.monotonic() - start >= 2.5  # watched it renew for the whole wait
        proc.kill()
        proc.wait()
        start = time.monotonic()
        with RunLease(tmp_path, {"job": "next"}, ttl=1).take(wait=30):
            assert time.monotonic() - start < 1.5  # its process is gone: no ttl to wait out
            assert json.loads((tmp_path / NAME).read_text())["job"] == "next"
        assert json.loads((tmp_path / NAME).read_text())["released"] is True
    finally:
        proc.kill()


def test_a_stopped_holder_is_taken_over_after_its_ttl_and_stops_writing_when_it_wakes(tmp_path):
    """A Mac asleep: its lease stops changing; after its ttl another takes the run, and the
    sleeper, awake, finds the lease gone at its next check (exit 3 here) instead of writing."""
    proc = holder(tmp_path, ttl=1)
    try:
        proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        lease = RunLease(tmp_path, {"job": "taker"}, ttl=1).take(wait=30)
        assert 1.0 <= time.monotonic() - start < 10
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=30) == 3
        assert "now held by job taker" in proc.stdout.read()
        lease.check()  # still the taker's
        lease.release()
    finally:
        proc.kill()


def test_another_machines_lease_is_judged_by_its_changes_on_our_clock_not_its_timestamps(tmp_path):
    """A holder on another Mac (a host name not ours, a clock far off): unchanged for its ttl it
    is gone, whatever time it wrote; rewritten while we watch it is alive."""
    far = {"holder": "x", "host": "other-mac", "pid": 1, "job": "elsewhere", "ttl": 1, "beat": 0,
           "written": time.time() + 86400}
    (tmp_path / NAME).write_text(json.dumps(far))
    RunLease(tmp_path, ttl=1).take(wait=30).release()
    (tmp_path / NAME).write_text(json.dumps(far))
    stop = threading.Event()

    def renew():
        beat = 0
        while not stop.wait(0.2):
            beat += 1
            (tmp_path / NAME).write_text(json.dumps({**far, "beat": beat, "written": 0}))

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        with pytest.raises(RunHeld, match="job elsewhere on other-mac"):
            RunLease(tmp_path, ttl=1).take(wait=3)
    finally:
        stop.set()
        thread.join()


def test_a_holder_whose_lease_was_replaced_publishes_nothing(tmp_path):
    lease = RunLease(tmp_path, ttl=5).take()
    (tmp_path / NAME).write_text(json.dumps({"holder": "someone", "job": "other", "ttl": 5}))
    with pytest.raises(LeaseLost, match="now held by job other"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / NAME).read_text())["holder"] == "someone"  # theirs, left alone


LONG = [*TINY, "--dataset", "shakespeare", "--num_iters", "100000", "--steps_per_eval", "20"]


def test_two_labs_reaching_one_run_by_two_paths_train_it_once(tmp_path, mirror):
    """Issue 41, items 1 and 2: a SQLite lab and a Redis lab, each with its own save root, given one
    folder by two paths (a symlink here; a bind mount or a case-insensitive volume alike): the
    second trainer waits out the first's lease, then fails in one line; metrics.jsonl holds one
    job's records; and a worker of the second lab pointed at the first's save root is refused."""
    from queue_helpers import backend_url
    ext = tmp_path / "ext"
    ext.mkdir()
    (tmp_path / "alias").symlink_to(ext)
    urls = [backend_url("sqlite", tmp_path, REDIS_DB), backend_url("redis", tmp_path, REDIS_DB)]
    labs = [Workers(u, tmp_path / f"lab{i}") for i, u in enumerate(urls)]
    roots = [tmp_path / "root0", tmp_path / "root1"]
    for lab, root in zip(labs, roots):
        lab.tmp.mkdir()
        root.mkdir()
    try:
        labs[0].start("--save_root", str(roots[0]))
        first = submit(urls[0], "train", "--save_dir", str(ext / "X"), *LONG)
        wait_for(urls[0], first, ["running"], until=lambda j: j.checkpoint, timeout=180)
        labs[1].start("--save_root", str(roots[1]))
        second = submit(urls[1], "train", "--save_dir", str(tmp_path / "alias" / "X"), *LONG)
        failed = wait_for(urls[1], second, ["failed"], timeout=120)
        assert "one trainer per run" in failed.error and failed.attempts == 1, failed.error
        assert wait_for(urls[0], first, ["running"]).error is None
        jobs = {r.get("job") for r in metrics.read(ext / "X")}
        assert jobs == {first}, jobs
        other = subprocess.run([sys.executable, "-m", "tlm_worker.main", "--queue", urls[1],
                                "--save_root", str(roots[0]), "--burst"],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "is the shared folder of another lab" in other.stderr, other.stderr
        assert len(other.stderr.strip().splitlines()) == 1, other.stderr
    finally:
        for lab in labs:
            lab.stop_all()


def test_tlm_train_refuses_a_run_a_live_trainer_holds(tmp_path, mirror):
    proc = holder(tmp_path / "run", ttl=1)
    try:
        out = tlm("train", "--save_dir", str(tmp_path / "run"), *TINY, "--dataset", "shakespeare",
                  "--num_iters", "5")
        assert out.returncode != 0 and "one trainer per run" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
    finally:
        proc.kill()


def test_a_run_reached_through_a_bind_mount_is_held_by_its_trainer(tmp_path, mirror):
    """Issue 41, item 2: the same folder mounted twice (``mount --bind``: two paths whose
    ``realpath`` differ, which no comparison of names can join) is held by the lease in it."""
    (tmp_path / "ext" / "X").mkdir(parents=True)
    (tmp_path / "bind").mkdir()
    mounted = subprocess.run(["mount", "--bind", str(tmp_path / "ext"), str(tmp_path / "bind")],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount --bind is not allowed here: {mounted.stderr.strip()}")
    proc = holder(tmp_path / "ext" / "X", ttl=1)
    try:
        assert os.path.realpath(tmp_path / "bind" / "X") != os.path.realpath(tmp_path / "ext" / "X")
        out = tlm("train", "--save_dir", str(tmp_path / "bind" / "X"), *TINY, "--dataset", "shakespeare",
                  "--num_iters", "5")
        assert out.returncode != 0 and "one trainer per run" in out.stderr, out.stderr
    finally:
        proc.kill()
        subprocess.run(["umount", str(tmp_path / "bind")], check=True)
