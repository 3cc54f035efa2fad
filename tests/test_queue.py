"""The orchestrator end to end: real queues (SQLite and Redis), real tlm-worker processes."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tlm import checkpoint
from tlm_worker.queue import Queue, outage

from queue_helpers import TINY, RedisServer, Workers, free_port, registry, submit, tlm, wait_for

REDIS_DB = 15


def test_submit_run_status_logs(url, workers, save_dir):
    workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "20",
                    "--steps_per_eval", "10")
    assert len(job_id) == 12
    wait_for(url, job_id, ["succeeded"])
    status = json.loads(tlm("status", job_id, "--json", "--queue", url).stdout)
    assert status["state"] == "succeeded" and status["attempts"] == 1
    assert status["progress"]["step"] == 20 and status["checkpoint"]
    assert checkpoint.find(save_dir).identifier == status["checkpoint"]
    listing = json.loads(tlm("status", "--json", "--queue", url).stdout)
    assert [j["id"] for j in listing["jobs"]] == [job_id]
    assert listing["workers"][0]["device"] == "cpu"
    table = tlm("status", "--queue", url).stdout
    assert job_id in table and "succeeded" in table
    logs = tlm("logs", job_id, "--queue", url).stdout
    assert "iter 20/20" in logs and "succeeded at iteration 20" in logs


def test_cooperative_cancel_saves_and_a_resubmit_resumes(url, workers, save_dir):
    workers.start()
    args = ["train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
            "--steps_per_eval", "100000"]
    job_id = submit(url, *args)
    wait_for(url, job_id, ["running"], until=lambda j: j.progress.get("step", 0) >= 10)
    assert tlm("cancel", job_id, "--queue", url).returncode == 0
    job = wait_for(url, job_id, ["cancelled"])
    saved = checkpoint.find(save_dir)
    assert saved.identifier == job.checkpoint and saved.step == job.result["step"]
    again = submit(url, *args[:-4], "--num_iters", str(saved.step + 5))
    wait_for(url, again, ["succeeded"])
    assert f"resuming {saved.identifier[:12]} at iteration {saved.step}" in "\n".join(
        registry(url).logs(again)[0])


def test_forced_cancel_stops_now_and_keeps_the_last_checkpoint_valid(url, workers, save_dir):
    workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                    "--steps_per_eval", "5")
    wait_for(url, job_id, ["running"], until=lambda j: j.checkpoint)
    assert tlm("cancel", "--force", job_id, "--queue", url).returncode == 0
    job = wait_for(url, job_id, ["cancelled"], timeout=30)
    assert job.error == "cancelled with --force"
    warnings = []
    assert checkpoint.find(save_dir, warn=warnings.append) is not None and warnings == []


def test_cancelling_a_queued_job_removes_it_before_it_starts(url, workers, save_dir):
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "5")
    refused = tlm("submit", "train", "--save_dir", str(save_dir), "--queue", url)
    assert refused.returncode == 1
    assert f"already has a queued job {job_id} (one trainer per run)" in refused.stderr
    assert tlm("cancel", job_id, "--queue", url).returncode == 0
    workers.start()
    time.sleep(3)
    job = registry(url).get(job_id)
    assert job.state == "cancelled" and job.attempts == 0
    assert checkpoint.find(save_dir) is None


def test_clear_errors_for_bad_input(url, tmp_path):
    proc = tlm("submit", "train", "--dim", "100", "--num_heads", "3", "--queue", url)
    assert proc.returncode == 2 and "not divisible" in proc.stderr.splitlines()[-1]
    proc = tlm("status", "nosuchjob", "--queue", url)
    assert proc.returncode == 1 and "no job 'nosuchjob'" in proc.stderr
    port = free_port()
    proc = tlm("status", "--queue", f"redis://:s3cret@127.0.0.1:{port}/0",
               env={**__import__("os").environ, "TLM_QUEUE_RETRIES": "0"})
    assert proc.returncode == 1
    assert f"cannot reach the queue at redis://:***@127.0.0.1:{port}/0" in proc.stderr
    assert "s3cret" not in proc.stderr


def test_a_queue_file_kept_busy_is_waited_out_and_then_named_busy(tmp_path):
    """Issue 42: processes writing the embedded queue died with "database is locked" after
    SQLite's 30 s wait. A command now waits longer (BUSY_TRIES tries), then says what it is."""
    url = f"sqlite://{tmp_path / 'queue.db'}"
    assert tlm("status", "--queue", url).returncode == 0  # the file and its tables exist
    holder = [sys.executable, "-c", "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], "
              "isolation_level=None); db.execute('BEGIN EXCLUSIVE'); print('held', flush=True); "
              "time.sleep(float(sys.argv[2]))", str(tmp_path / "queue.db")]
    with subprocess.Popen([*holder, "40"], stdout=subprocess.PIPE, text=True) as hold:
        assert hold.stdout.readline() == "held\n"
        waited = tlm("submit", "train", "--save_dir", str(tmp_path / "run"), *TINY, "--queue", url)
    assert waited.returncode == 0, waited.stderr
    assert [j.state for j in registry(url).jobs(None)] == ["queued"]
    assert outage(sqlite3.OperationalError("database is locked")) == (  # what a longer wait says
        "the queue file is busy: another process keeps it locked (tlm waited; try again)")


def test_a_pickle_payload_in_the_queue_is_rejected_without_running(url, workers, save_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    Queue(url).storage.enqueue(pickle.dumps(Payload()))
    worker = workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "5")
    wait_for(url, job_id, ["succeeded"])
    assert "rejected a queue entry: not a JSON queue entry" in workers.log(worker)
    assert not marker.exists()


def reference_weights(save_dir: Path, tmp_path: Path, flags: list[str]) -> dict:
    """Weights of the same training run done in one go, in this process."""
    from tlm.config import TrainConfig
    from tlm.data import load_dataset
    from tlm.train import Trainer

    ref = tmp_path / "reference"
    shutil.copytree(save_dir / "datasets", ref / "datasets")
    given = {flags[i][2:]: flags[i + 1] for i in range(0, len(flags), 2)}
    types = {k: type(getattr(TrainConfig(), k)) for k in given}
    config = TrainConfig(save_dir=str(ref), **{k: types[k](v) for k, v in given.items()})
    Trainer(config, load_dataset("ptb", ref / "datasets")).run()
    return checkpoint.find(ref).load_weights()


def test_a_killed_worker_s_job_is_finished_elsewhere_with_identical_weights(url, workers, save_dir,
                                                                            tmp_path):
    flags = [*TINY, "--num_iters", "200", "--steps_per_eval", "20", "--dropout", "0.1"]
    first = workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *flags)
    wait_for(url, job_id, ["running"], until=lambda j: j.checkpoint)
    first.send_signal(signal.SIGKILL)
    first.wait()
    workers.start()
    job = wait_for(url, job_id, ["succeeded"], timeout=180)
    # Its job process outlived it: saved, put the job back itself (an interruption), and ended.
    assert (job.attempts, job.interruptions) == (1, 1)
    logs = "\n".join(registry(url).logs(job_id)[0])
    assert "its worker is gone: finishing the step and saving" in logs
    assert "re-queued: its worker died; saved at iteration" in logs and "resuming" in logs
    final = checkpoint.find(save_dir).load_weights()
    expected = reference_weights(save_dir, tmp_path, flags)
    for name, value in expected.items():
        assert np.array(final[name]).tobytes() == np.array(value).tobytes(), name


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_worker_signal_saves_requeues_and_another_worker_resumes(url, workers, save_dir, sig):
    first = workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                    "--steps_per_eval", "100000")
    wait_for(url, job_id, ["running"], until=lambda j: j.progress.get("step", 0) >= 10)
    first.send_signal(sig)
    assert first.wait(timeout=60) == 0
    job = wait_for(url, job_id, ["interrupted"])
    saved = checkpoint.find(save_dir)
    assert saved is not None and job.checkpoint == saved.identifier
    assert job.attempts == 0 and job.interruptions == 1  # a stop is not an attempt
    workers.start()
    wait_for(url, job_id, ["running"], until=lambda j: j.started > job.started)
    assert tlm("cancel", job_id, "--queue", url).returncode == 0
    wait_for(url, job_id, ["cancelled"])
    assert f"resuming {saved.identifier[:12]}" in "\n".join(registry(url).logs(job_id)[0])


def test_a_second_worker_signal_kills_requeues_and_exits_at_once(url, workers, save_dir):
    first = workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                    "--steps_per_eval", "100000")
    wait_for(url, job_id, ["running"], until=lambda j: j.progress.get("step", 0) >= 10)
    first.send_signal(signal.SIGINT)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 130
    log = workers.log(first)
    assert "SIGTERM again: killing running jobs" in log
    job_pid = int(re.search(rf"started train job {job_id} .*pid (\d+)", log).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(job_pid, 0)  # killed and reaped, not left training
    job = wait_for(url, job_id, ["interrupted"])
    assert "was stopped" in job.error
    assert not registry(url).workers()  # it signed off


def test_many_small_jobs_on_two_workers_run_exactly_once(url, workers, save_dir):
    tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "2")
    workers.start()
    workers.start()
    ids = [submit(url, "eval", "--save_dir", str(save_dir), "--tokens", "2000") for _ in range(8)]
    for job_id in ids:
        job = wait_for(url, job_id, ["succeeded"], timeout=180)
        assert job.attempts == 1 and job.result["step"] == 2
    reg = registry(url)
    assert all(sum("valid loss" in l for l in reg.logs(j)[0]) == 1 for j in ids)
    ran_on = {reg.get(j).worker for j in ids}
    assert len(ran_on) == 2  # both workers took jobs


def test_redis_restart_mid_job_loses_nothing(tmp_path, save_dir):
    server = RedisServer(tmp_path)
    url = server.url
    workers = Workers(url, tmp_path)
    try:
        workers.start(lease=30)
        job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "1000",
                        "--steps_per_eval", "250")
        (tmp_path / "elsewhere").mkdir()
        queued = submit(url, "eval", "--save_dir", str(tmp_path / "elsewhere"))
        wait_for(url, job_id, ["running"], until=lambda j: j.progress.get("step", 0) >= 10)
        server.restart(down=2)
        job = wait_for(url, job_id, ["succeeded"], timeout=300)
        assert job.attempts == 1 and job.result["step"] == 1000
        # The job queued before the restart is still there (and fails: no checkpoint there).
        assert wait_for(url, queued, ["failed"]).error.startswith("CheckpointError")
        assert tlm("status", "--queue", url).returncode == 0
    finally:
        workers.stop_all()
        server.kill()


def test_ctrl_c_in_submit_wait_cancels_cooperatively_and_follows_until_saved(tmp_path, save_dir):
    url = f"sqlite://{tmp_path / 'queue.db'}"
    workers = Workers(url, tmp_path)
    try:
        workers.start()
        from conftest import tlm_cmd
        proc = subprocess.Popen(tlm_cmd("submit", "train", "--save_dir", str(save_dir), *TINY,
                                        "--num_iters", "100000", "--steps_per_eval", "100000",
                                        "--wait", "--queue", url),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        job_id = proc.stdout.readline().strip()
        wait_for(url, job_id, ["running"], until=lambda j: j.progress.get("step", 0) >= 10)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "cancelling: the job finishes its step and saves" in err
        assert f"job {job_id} cancelled" in err.splitlines()[-1]
        assert "saved " in err  # it kept following until the save
        job = registry(url).get(job_id)
        assert job.state == "cancelled" and checkpoint.find(save_dir).identifier == job.checkpoint
    finally:
        workers.stop_all()


def test_a_burst_worker_runs_the_queue_dry_and_reports_failures(tmp_path, save_dir):
    url = f"sqlite://{tmp_path / 'queue.db'}"
    ok = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "3")
    (tmp_path / "no-checkpoints").mkdir()
    bad = submit(url, "eval", "--save_dir", str(tmp_path / "no-checkpoints"))
    proc = subprocess.run([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--burst"],
                          capture_output=True, text=True, timeout=300)
    reg = registry(url)
    assert reg.get(ok).state == "succeeded" and reg.get(bad).state == "failed"
    assert proc.returncode == 1 and "1 job(s) failed" in proc.stderr
    assert "queue empty: exiting (--burst)" in proc.stderr


def test_a_job_whose_entry_was_taken_by_a_dying_worker_still_runs(url, workers, save_dir):
    """The fault between dequeue and claim: the entry is gone, the record says queued."""
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "3")
    assert Queue(url).pop("train") == job_id  # as a worker killed right after its dequeue
    workers.start(lease=2)
    wait_for(url, job_id, ["succeeded"], timeout=120)


def test_a_queued_sample_answers_while_the_only_worker_trains_that_run(url, workers, save_dir):
    workers.start()
    train = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                   "--steps_per_eval", "20")
    wait_for(url, train, ["running"], until=lambda j: j.checkpoint)
    proc = tlm("sample", "--save_dir", str(save_dir), "--prompt", "the", "--max_tokens", "5",
               "--queue", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    step = registry(url).get(train).progress["step"]
    job = wait_for(url, train, ["running"], until=lambda j: j.progress["step"] > step)
    assert job.attempts == 1 and job.interruptions == 0  # training went on meanwhile
    assert tlm("cancel", train, "--queue", url).returncode == 0
    wait_for(url, train, ["cancelled"])


def test_a_relative_dataset_file_travels_with_the_job(url, workers, tmp_path):
    """Submitted from one directory, trained by a worker started in another."""
    here, root = tmp_path / "submitter", tmp_path / "shared-runs"
    here.mkdir()
    text = "".join(f"line {i} of my own text, with words that repeat.\n" for i in range(3000))
    (here / "mine.txt").write_text(text)
    proc = tlm("submit", "train", "--run", "mine", "--save_root", str(root), "--dataset",
               "mine.txt", *TINY, "--num_iters", "5", "--queue", url, cwd=here)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    params = registry(url).get(job_id).params
    copy = root / "mine" / params["dataset"]
    assert params["dataset"].startswith("inputs/mine-") and copy.read_text() == text
    other = submit(url, "train", "--run", "other", "--save_root", str(root), "--dataset",
                   str(here / "mine.txt"), *TINY, "--num_iters", "5")
    tampered = root / "other" / registry(url).get(other).params["dataset"]
    tampered.write_text(text + "changed on the share\n")
    (here / "mine.txt").write_text("edited after submitting\n")  # the job keeps what it was given
    workers.start("--save_root", str(root))
    job = wait_for(url, job_id, ["succeeded"])
    assert checkpoint.find(root / "mine").identifier == job.checkpoint
    failed = wait_for(url, other, ["failed"])
    assert failed.error == f"DataError: {tampered} changed since it was submitted (SHA1 differs)"


def test_a_dataset_that_cannot_be_carried_is_refused_at_submit(url, tmp_path):
    (tmp_path / "mine.txt").write_text("some text\n" * 100)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run directory should be")
    proc = tlm("submit", "train", "--save_dir", str(blocked / "run"), "--dataset",
               str(tmp_path / "mine.txt"), "--queue", url)
    assert proc.returncode == 1
    assert f"cannot copy --dataset {tmp_path / 'mine.txt'} into {blocked / 'run' / 'inputs'}" \
        in proc.stderr.splitlines()[-1]
    assert registry(url).jobs(None) == []


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_an_idle_interactive_process_gives_its_memory_back_and_the_next_sample_starts_one(url, workers,
                                                                                           save_dir):
    from queue_helpers import alive, job_pid, until
    trained = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "2")
    assert trained.returncode == 0, trained.stderr
    w = workers.start("--interactive_idle", "1")
    for _ in range(2):  # each sample after the last one's process was closed
        proc = tlm("sample", "--save_dir", str(save_dir), "--prompt", "the", "--max_tokens", "3", "--queue", url)
        assert proc.returncode == 0, proc.stderr
        job = registry(url).jobs(None)[-1]
        pid = job_pid(workers.log(w), job.id)
        until(lambda: not alive(pid), 30, "the idle interactive process closed")
    until(lambda: workers.log(w).count("interactive process idle for 1s: closed, its memory given back") == 2,
          10, "each closing said (the worker says it once the process has ended)")


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_an_idle_worker_is_one_process_and_its_first_job_starts_the_interactive_one(url, workers, save_dir):
    """Issue 42: an idle worker was three processes (itself, multiprocessing's resource tracker,
    its interactive process). Its interactive process now starts with its first job of any
    kind, so a sample during training still finds MLX imported (issue 32)."""
    import re

    from queue_helpers import job_pid, until
    w = workers.start()
    until(lambda: "serving" in workers.log(w), 60, "the worker serving")
    time.sleep(2)
    assert Path(f"/proc/{w.pid}/task/{w.pid}/children").read_text().split() == []
    trained = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "2")
    ready = until(lambda: re.search(r"interactive process ready \(pid (\d+), ", workers.log(w)), 120,
                  "the interactive process ready")
    wait_for(url, trained, ["succeeded"], timeout=120)  # its checkpoint saved (a loaded machine is slow)
    proc = tlm("sample", "--save_dir", str(save_dir), "--prompt", "the", "--max_tokens", "3", "--queue", url)
    assert proc.returncode == 0, proc.stderr
    assert job_pid(workers.log(w), registry(url).jobs(None)[-1].id) == int(ready.group(1))
