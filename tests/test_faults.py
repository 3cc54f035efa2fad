"""Faults a lab meets over months, with the real things: a redis-server of the test's own
restarted with and without its data, stopped (SIGSTOP) and killed; workers and job processes
stopped and killed; a tmpfs filled up and made read-only."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tlm import checkpoint, metrics

from queue_helpers import (TINY, RedisServer, Workers, alive, job_pid, registry, submit, tlm, until,
                           wait_for)

REDIS_DB = 11
LONG = [*TINY, "--steps_per_eval", "25"]


def assert_one_record_per_step_and_newest_fence(save_dir: Path) -> None:
    """metrics.read keeps one record per (kind, step), and never a stale holder's."""
    kept = metrics.read(save_dir)
    assert len({(r["kind"], r["step"]) for r in kept}) == len(kept)
    newest: dict = {}
    for rec in metrics.raw(save_dir):
        key = (rec["kind"], rec["step"], rec.get("job"))
        newest[key] = max(newest.get(key, 0), rec.get("fence", 0))
    for rec in kept:
        assert rec.get("fence", 0) == newest[(rec["kind"], rec["step"], rec.get("job"))], rec


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path)
    yield s
    s.kill()


def test_redis_restarted_without_its_data_keeps_every_worker_and_job(server, tmp_path, save_dir):
    """The registry forgets; the run does not: the worker puts the job it holds back, and it
    ends as if nothing happened."""
    workers = Workers(server.url, tmp_path)
    try:
        worker = workers.start(lease=4)
        job_id = submit(server.url, "train", "--save_dir", str(save_dir), *LONG, "--num_iters", "300")
        wait_for(server.url, job_id, ["running"], until=lambda j: j.checkpoint)
        server.restart(keep_data=False)  # a fresh container, a wiped volume
        until(lambda: registry(server.url).find([job_id]), timeout=30, what="the worker puts the job back")
        job = wait_for(server.url, job_id, ["succeeded"], timeout=240)
        assert worker.poll() is None, workers.log(worker)
        assert job.result["step"] == 300 and job.attempts == 1
        log = workers.log(worker)
        assert f"job {job_id} was missing from the registry" in log and "Traceback" not in log, log
        assert any("the registry had forgotten this job" in line for line in registry(server.url).logs(job_id)[0])
        assert checkpoint.find(save_dir).step == 300
        status = tlm("status", "--queue", server.url)
        assert status.returncode == 0 and job_id in status.stdout
    finally:
        workers.stop_all()


def test_a_job_that_ends_before_its_worker_puts_it_back_puts_itself_back(server, tmp_path, save_dir):
    """Redis restarted without its data, and the job ends before its worker's next heartbeat
    (here the worker is stopped): its own process puts the record back and ends it (before, it
    took the missing record for a lost lease and left, and the job was gone from the lab)."""
    workers = Workers(server.url, tmp_path)
    try:
        worker = workers.start(lease=120)  # its job process keeps going 30 s unconfirmed
        job_id = submit(server.url, "train", "--save_dir", str(save_dir), *LONG, "--num_iters", "150")
        wait_for(server.url, job_id, ["running"], until=lambda j: j.checkpoint)
        pid = job_pid(workers.log(worker), job_id)
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            server.restart(keep_data=False)
            until(lambda: not alive(pid), timeout=120, what="the job process ends")
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        job = registry(server.url).get(job_id)
        assert (job.state, (job.result or {}).get("step")) == ("succeeded", 150), job
        assert any("the registry had forgotten this job" in line for line in registry(server.url).logs(job_id)[0])
    finally:
        workers.stop_all()


def test_a_gang_whose_record_redis_forgot_is_put_back_with_all_its_members(server, tmp_path, save_dir):
    """Two workers training one model: a member's worker re-registers the gang as it holds it
    (before, the members saw the gang gone and killed their ranks, and the job was lost); it
    ends in one attempt (its ranks may have stopped and saved during the restart: an
    interruption, and the gang gathers again)."""
    workers = Workers(server.url, tmp_path)
    try:
        procs = [workers.start(lease=4), workers.start(lease=4)]
        job_id = submit(server.url, "train", "--save_dir", str(save_dir), *LONG, "--num_iters", "300",
                        "--nodes", "2")
        wait_for(server.url, job_id, ["running"], until=lambda j: j.checkpoint, timeout=180)
        server.restart(keep_data=False)
        until(lambda: registry(server.url).find([job_id]), timeout=30, what="the gang put back")
        job = wait_for(server.url, job_id, ["succeeded"], timeout=300)
        assert (job.attempts, job.result["step"], job.nodes) == (1, 300, 2), job.error
        assert all(p.poll() is None for p in procs)
        logs = "".join(workers.log(p) for p in procs)
        assert f"job {job_id} was missing from the registry" in logs and "Traceback" not in logs, logs
        assert checkpoint.find(save_dir).step == 300
    finally:
        workers.stop_all()


def test_a_sweep_redis_forgot_leaves_its_running_trial_an_ordinary_job_and_no_journal_made_again(
        server, tmp_path):
    """Redis restarted empty mid-sweep: the running trial's record is put back and it trains to
    its budget as an ordinary job (before, it failed ``JobNotFound``), and the sweep's Optuna
    journal is not written again under the lost sweep's name (where no prune would find it)."""
    import redis as redis_lib
    root = tmp_path / "root"
    root.mkdir()
    workers = Workers(server.url, tmp_path)
    try:
        workers.start("--save_root", str(root))
        proc = tlm("sweep", "submit", "--name", "forgot", "--flag", "dataset=shakespeare",
                   *[f for k, v in zip(LONG[::2], LONG[1::2]) for f in ("--flag", f"{k[2:]}={v}")],
                   "--flag", "steps_per_eval=5", "--search", "learning_rate=log:1e-4:1e-2",
                   "--trials", "2", "--parallel", "1", "--budget", "150", "--prune", "asha-stop",
                   "--queue", server.url)
        assert proc.returncode == 0, proc.stderr
        trial_id = f"{proc.stdout.strip()[:7]}t0000"
        wait_for(server.url, trial_id, ["running"], until=lambda j: j.progress.get("step", 0) >= 10)
        server.restart(keep_data=False)
        until(lambda: registry(server.url).find([trial_id]), timeout=30, what="the trial put back")
        job = wait_for(server.url, trial_id, ["succeeded"], timeout=180)
        assert job.result["step"] == 150, job
        assert redis_lib.Redis.from_url(server.url).keys("tlm:optuna:*") == []
        assert any("training on as an ordinary job" in line for line in registry(server.url).logs(trial_id)[0])
    finally:
        workers.stop_all()


def test_redis_killed_five_times_mid_sweep_spends_no_trial_attempt(server, tmp_path):
    """Five ``kill -9``s of a Redis that keeps every write (AOF always), two workers, two trials
    training: every trial ends in one attempt (outages are interruptions, never crashes)."""
    root = tmp_path / "root"
    root.mkdir()
    workers = Workers(server.url, tmp_path)
    try:
        procs = [workers.start("--save_root", str(root)) for _ in range(2)]
        proc = tlm("sweep", "submit", "--name", "kills", "--flag", "dataset=shakespeare",
                   *[f for k, v in zip(LONG[::2], LONG[1::2]) for f in ("--flag", f"{k[2:]}={v}")],
                   "--flag", "steps_per_eval=20", "--search", "learning_rate=log:1e-4:1e-2",
                   "--trials", "3", "--parallel", "2", "--budget", "400", "--prune", "none",
                   "--queue", server.url)
        assert proc.returncode == 0, proc.stderr
        sweep_id = proc.stdout.strip()
        wait_for(server.url, f"{sweep_id[:7]}t0001", ["running"], until=lambda j: j.progress.get("step", 0) >= 5,
                 timeout=180)
        for _ in range(5):
            server.restart(down=1.0)
            time.sleep(3)
        wait_for(server.url, sweep_id, ["succeeded"], timeout=400)
        reg = registry(server.url)
        tries = {j.id: (j.attempts, j.interruptions, j.state) for j in reg.jobs(None) if j.sweep}
        assert len(tries) == 3 and all(a == 1 and s == "succeeded" for a, _, s in tries.values()), tries
        assert all(p.poll() is None for p in procs)
    finally:
        workers.stop_all()


def test_an_outage_past_the_lease_is_an_interruption_and_never_two_trainers(server, tmp_path, save_dir):
    """Redis gone for two leases and more under two workers: the holder saves and stops within a
    quarter lease, both workers say so once and say when it is back, and the job resumes
    once, counted as an interruption."""
    workers = Workers(server.url, tmp_path)
    try:
        procs = [workers.start(lease=4), workers.start(lease=4)]
        job_id = submit(server.url, "train", "--save_dir", str(save_dir), *LONG, "--num_iters", "600")
        wait_for(server.url, job_id, ["running"], until=lambda j: j.checkpoint)
        holder = next(p for p in procs if "started train job" in workers.log(p))
        pid = job_pid(workers.log(holder), job_id)
        server.kill()
        until(lambda: not alive(pid), timeout=30, what="the holder's job process stops")
        time.sleep(8)  # past the lease: the old behaviour re-queued it as a crash
        server.start()
        job = wait_for(server.url, job_id, ["succeeded"], timeout=300)
        assert (job.attempts, job.interruptions) == (1, 1), job
        for p in procs:
            said = [line for line in workers.log(p).splitlines() if line.startswith("tlm-worker")]
            assert p.poll() is None, said
            assert sum("queue unreachable" in line for line in said) == 1, said
            assert sum("queue back after" in line for line in said) == 1, said
        assert "re-queued" in "\n".join(registry(server.url).logs(job_id)[0])
        assert_one_record_per_step_and_newest_fence(save_dir)
    finally:
        workers.stop_all()


@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_a_worker_stopped_past_its_lease_loses_the_job_and_its_process_stops(url, workers, save_dir):
    """A Mac asleep: the worker and its job process stopped past the lease; another worker
    takes the job over; once they wake, the old job process stops at its next look and
    the readers of metrics.jsonl keep the new holder's records."""
    first = workers.start(lease=4)
    job_id = submit(url, "train", "--save_dir", str(save_dir), *LONG, "--num_iters", "400")
    held = wait_for(url, job_id, ["running"], until=lambda j: j.checkpoint)
    pid = job_pid(workers.log(first), job_id)
    for p in (first.pid, pid):
        os.kill(p, signal.SIGSTOP)
    second = workers.start(lease=4)
    wait_for(url, job_id, ["running"], until=lambda j: j.fence > held.fence and j.worker != held.worker
             and j.progress.get("step", 0) > held.progress.get("step", 0))
    for p in (first.pid, pid):
        os.kill(p, signal.SIGCONT)
    until(lambda: not alive(pid), timeout=30, what="the stale job process stops")
    job = wait_for(url, job_id, ["succeeded"], timeout=240)
    assert job.result["step"] == 400
    assert first.poll() is None and "Traceback" not in workers.log(first), workers.log(first)
    assert f"job {job_id}: no longer this worker's" in workers.log(first) or \
        f"job {job_id}: lease lost" in workers.log(first), workers.log(first)
    assert_one_record_per_step_and_newest_fence(save_dir)
    assert second.poll() is None


@pytest.mark.parametrize("outage,signals", [("killed", [signal.SIGTERM]), ("hung", [signal.SIGINT]),
                                             ("hung", [signal.SIGINT, signal.SIGINT])])
def test_interrupts_end_a_worker_whose_queue_is_gone(server, tmp_path, outage, signals):
    workers = Workers(server.url, tmp_path)
    try:
        worker = workers.start(lease=60)
        until(lambda: "serving" in workers.log(worker), what="the worker starts")
        server.pause() if outage == "hung" else server.kill()
        until(lambda: "queue unreachable" in workers.log(worker), timeout=30, what="the outage is seen")
        for sig in signals:
            worker.send_signal(sig)
            time.sleep(0.3)
        worker.wait(timeout=30)  # it used to go on "retrying" until SIGKILL
        assert "stopped" in workers.log(worker).splitlines()[-1]
    finally:
        server.resume() if outage == "hung" and server.proc.poll() is None else None
        workers.stop_all()


def test_a_running_job_saves_on_ctrl_c_with_the_queue_gone_and_an_orphan_saves_too(server, tmp_path, save_dir):
    """Ctrl+C with Redis down: the job saves within the lease and the worker exits. Then a job
    whose worker is SIGKILLed while Redis is down saves and exits by itself."""
    workers = Workers(server.url, tmp_path)
    try:
        worker = workers.start(lease=60)
        job_id = submit(server.url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                        "--steps_per_eval", "100000")
        wait_for(server.url, job_id, ["running"], until=lambda j: j.progress.get("step", 0) >= 10)
        server.kill()
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=60)
        saved = checkpoint.find(save_dir)
        assert saved is not None and saved.step > 0, workers.log(worker)

        server.start()  # the job is still "running" in the registry: its worker could not say
        other = save_dir.parent / "other"
        other.mkdir()
        os.symlink(save_dir / "datasets", other / "datasets")
        worker = workers.start(lease=60)
        second = submit(server.url, "train", "--save_dir", str(other), *TINY, "--num_iters", "100000",
                        "--steps_per_eval", "100000")
        wait_for(server.url, second, ["running"], until=lambda j: j.progress.get("step", 0) >= 10)
        pid = job_pid(workers.log(worker), second)
        server.kill()
        worker.kill()
        worker.wait()
        until(lambda: not alive(pid), timeout=30, what="the orphaned job process exits")
        assert checkpoint.find(other) is not None  # it saved what it held
    finally:
        workers.stop_all()


@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_a_sample_given_up_with_ctrl_c_stops_at_once_and_never_runs_again(url, workers, save_dir):
    from conftest import tlm_cmd
    assert tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "5").returncode == 0
    worker = workers.start()
    waiting = subprocess.Popen(tlm_cmd("sample", "--save_dir", str(save_dir), "--prompt", "the",
                                       "--max_tokens", "100000000", "--queue", url),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reg = registry(url)
    long = until(lambda: next((j.id for j in reg.jobs(None) if j.kind == "sample" and j.state == "running"),
                              None), what="the sample runs")
    waiting.send_signal(signal.SIGINT)
    assert "gave up waiting" in waiting.communicate(timeout=60)[1]
    job = wait_for(url, long, ["cancelled"], timeout=60)
    assert "nothing to save" in job.error
    short = tlm("sample", "--save_dir", str(save_dir), "--prompt", "the", "--max_tokens", "3", "--queue", url)
    assert short.returncode == 0 and short.stdout.strip(), short.stderr
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)
    assert reg.get(long).state == "cancelled"


# -- a real filesystem that fills up and goes read-only -----------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or 'not root'})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill a filesystem up but for ``leave`` bytes; the file to delete to free it."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    os.truncate(ballast, max(ballast.stat().st_size - leave, 0))
    return ballast


def training_on(tmpfs: Path, url: str, workers, ptb_cache: Path, *job_args: str,
                worker_args: tuple[str, ...] = ()):
    """A run on the tmpfs, a worker, and its training job once it has saved a checkpoint."""
    run = tmpfs / "run"
    run.mkdir()
    os.symlink(ptb_cache, run / "datasets")
    worker = workers.start(*worker_args, lease=30)
    job_id = submit(url, "train", "--save_dir", str(run), *LONG, *job_args)
    wait_for(url, job_id, ["running"], until=lambda j: j.checkpoint)
    return run, worker, job_id


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)  # the queue plays no part
def test_a_disk_full_for_a_moment_is_ridden_out(url, workers, tmpfs, ptb_cache):
    """The run's disk full for a few seconds: the metrics and checkpoint writes retry with
    back-off, and the job ends succeeded, in one attempt."""
    run, worker, job_id = training_on(tmpfs, url, workers, ptb_cache, "--num_iters", "300")
    ballast = fill(tmpfs)
    until(lambda: "(No space left on device)" in "\n".join(registry(url).logs(job_id)[0]),
          timeout=60, what="a write meets the full disk")
    time.sleep(3)  # a few retries
    ballast.unlink()
    job = wait_for(url, job_id, ["succeeded"], timeout=240)
    assert job.attempts == 1 and job.interruptions == 0
    assert "Traceback" not in workers.log(worker)
    assert_one_record_per_step_and_newest_fence(run)


def test_a_disk_full_while_text_is_tokenized_is_ridden_out(tmpfs, tmp_path):
    """The token cache's write retries too: freed during the back-off, the run trains."""
    from conftest import tlm_cmd

    text = tmp_path / "own.txt"
    text.write_text("a small corpus of plain words, said again and again. " * 2000)
    ballast = fill(tmpfs, leave=8192)  # room for the lock file and the text's stamp, not its tokens
    proc = subprocess.Popen(tlm_cmd("train", "--dataset", str(text), "--save_dir", str(tmpfs / "run"), *TINY,
                                    "--num_iters", "5"),
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "writing the token cache" in line and "(No space left on device); retrying" in line:
            ballast.unlink()
            break
    rest = proc.communicate(timeout=300)[1]
    assert ballast.exists() is False, "".join(seen)  # the cache's write met the full disk
    assert proc.returncode == 0, "".join(seen) + rest
    assert "Traceback" not in rest and checkpoint.find(tmpfs / "run").step == 5
    assert not [p.name for p in (tmpfs / "run").rglob("*tmp*")]  # no temporary left behind


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_a_disk_that_stays_full_fails_the_job_after_its_attempts(url, workers, tmpfs, ptb_cache):
    """Each attempt retries with back-off and goes back to the queue (another Mac may have room);
    counted as an attempt, not an interruption, so a disk that stays full ends the job, in one line."""
    run, worker, job_id = training_on(tmpfs, url, workers, ptb_cache, "--num_iters", "100000",
                                        "--save_retries", "2", worker_args=("--max_attempts", "2"))
    fill(tmpfs)
    job = wait_for(url, job_id, ["failed"], timeout=180)
    assert (job.attempts, job.interruptions) == (2, 0), job
    assert re.match(r"No space left on device: (writing|saving a checkpoint in) \S+/run", job.error) and job.error.endswith(
        "(still failing after the retries) (attempt 2 of 2)") and "\n" not in job.error, job.error
    assert "Traceback" not in workers.log(worker), workers.log(worker)
    checkpoint.verify(run, checkpoint.find(run).identifier)  # the last good checkpoint is intact


@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_a_run_directory_made_read_only_fails_in_one_line(url, workers, tmpfs, ptb_cache):
    run, worker, job_id = training_on(tmpfs, url, workers, ptb_cache, "--num_iters", "100000")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    job = wait_for(url, job_id, ["failed"], timeout=120)
    assert "Read-only file system" in job.error and "\n" not in job.error
    assert "Traceback" not in workers.log(worker), workers.log(worker)
    assert checkpoint.find(run) is not None  # the last good checkpoint is still there


# -- Macs whose clocks disagree --------------------------------------------------------------

@pytest.mark.parametrize("url", ["redis"], indirect=True)  # SQLite's workers share one clock
def test_workers_whose_clocks_are_a_minute_apart_agree_on_every_lease(url, workers, save_dir):
    """One Mac 30 s ahead, one 30 s behind, a 4 s lease: heartbeats are stamped and read by
    the queue's clock, so neither takes the other's running job for a dead worker's."""
    ahead, behind = workers.start(lease=4, clock=30), workers.start(lease=4, clock=-30)
    ids = [submit(url, "train", "--save_dir", str(save_dir / f"run{i}"), *TINY, "--num_iters", "200",
                  "--steps_per_eval", "100") for i in range(2)]
    until(lambda: all(j.state == "running" for j in registry(url).find(ids)), timeout=120,
          what="both jobs running, one on each worker")
    jobs = [wait_for(url, job_id, ["succeeded", "failed"], timeout=300) for job_id in ids]
    assert [(j.state, j.attempts, j.interruptions) for j in jobs] == [("succeeded", 1, 0)] * 2, \
        [j.error for j in jobs]
    assert len({j.worker for j in jobs}) == 2  # each held one: a lease read across both skews
    for proc, word in ((ahead, "ahead of"), (behind, "behind")):
        log = workers.log(proc)
        assert "stopped heartbeating" not in log and "Traceback" not in log, log
        assert re.search(rf"this machine's clock is (29|30|31)s {word} the queue's", log), log

