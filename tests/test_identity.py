"""A run's identity and the lab's shared folder (issue 30): a worker whose --save_root is not the
lab's shared folder takes no job that reads a run by name, and a job whose checkpoint a worker
cannot see never starts over as a new model there."""

from __future__ import annotations

import signal
import time

import pytest

from queue_helpers import TINY, registry, submit, tlm, until, wait_for

REDIS_DB = 6
LONG = [*TINY, "--dataset", "shakespeare", "--num_iters", "100000", "--steps_per_eval", "10"]


def trained_to_a_checkpoint(url, workers, root):
    """A --run job trained by a worker of ``root`` to a checkpoint, then stopped (back in the queue)."""
    first = workers.start("--save_root", str(root))
    job = submit(url, "train", "--run", "r1", *LONG).split()[0]
    wait_for(url, job, ["running"], until=lambda j: j.checkpoint, timeout=180)
    first.send_signal(signal.SIGTERM)
    first.wait(60)
    held = wait_for(url, job, ["interrupted"], timeout=30)
    return job, held.checkpoint


def test_a_worker_whose_shared_folder_is_missing_takes_no_run_and_says_why(url, workers, tmp_path, mirror):
    lab, elsewhere = tmp_path / "lab", tmp_path / "not-mounted"
    lab.mkdir()
    elsewhere.mkdir()
    job, ckpt = trained_to_a_checkpoint(url, workers, lab)
    other = workers.start("--save_root", str(elsewhere))
    until(lambda: "is not this lab's shared folder" in workers.log(other), 60, "the refusal at start")
    assert f"{elsewhere} is not this lab's shared folder: is it mounted?" in workers.log(other)
    time.sleep(3)  # several polls: it never takes the job (before: "new model" over a fresh directory)
    assert registry(url).get(job).state == "interrupted" and not (elsewhere / "r1").exists()
    status = tlm("status", "--queue", url).stdout
    assert "needs the lab's shared folder" in status, status
    workers.start("--save_root", str(lab))  # the Mac with the folder mounted resumes it
    until(lambda: f"resuming {ckpt[:12]}" in "\n".join(registry(url).logs(job)[0]), 120, "the resume")


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_a_job_whose_checkpoint_is_not_visible_goes_back_and_fails_after_its_attempts(url, workers, tmp_path,
                                                                                       mirror):
    lab = tmp_path / "lab"
    lab.mkdir()
    job, ckpt = trained_to_a_checkpoint(url, workers, lab)
    for f in (lab / "r1").glob("*.safetensors"):
        f.unlink()  # the run's files gone from this Mac's copy (a stale sync, a folder half-mounted)
    w = workers.start("--save_root", str(lab), "--max_attempts", "2", "--burst")
    w.wait(180)
    ended = registry(url).get(job)
    assert ended.state == "failed" and f"its checkpoint {ckpt[:12]} is not in" in ended.error, ended.error
    assert "(attempt 2 of 2)" in ended.error and "\n".join(registry(url).logs(job)[0]).count("new model") == 1
