"""Chaos: faults mixed over a queue of short jobs on two workers, with a redis-server of the
test's own (restarted with and without its data), workers SIGKILLed and SIGSTOPped past their
lease, and the runs' disk full for a moment. Every job ends exactly once, every checkpoint
hashes to its name, metrics.jsonl reads one record per step and kind, and no two job
processes of one run write at once for longer than one heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tlm import checkpoint, metrics

from queue_helpers import TINY, RedisServer, Workers, job_pid, registry, submit, until, wait_for
from test_faults import assert_one_record_per_step_and_newest_fence

LEASE = 4.0
HEARTBEAT = max(0.2, min(5.0, LEASE / 4))  # tlm_worker.process.Worker._heartbeat_loop's interval
JOB = [*TINY, "--num_iters", "40", "--steps_per_eval", "10"]


def test_chaos_every_job_ends_once_and_no_two_trainers_overlap(tmp_path, ptb_cache):
    server = RedisServer(tmp_path)
    url = server.url
    workers = Workers(url, tmp_path)
    mnt = tmp_path / "disk"
    mnt.mkdir()
    tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mnt)],
                           capture_output=True).returncode == 0  # else: the full disk is left out
    try:
        procs = [workers.start(lease=LEASE), workers.start(lease=LEASE)]
        runs, ids = [], []

        def add(n: int) -> None:
            for _ in range(n):
                run = mnt / f"run{len(runs)}"
                run.mkdir()
                (run / "datasets").symlink_to(ptb_cache)
                runs.append(run)
                ids.append(submit(url, "train", "--save_dir", str(run), *JOB))

        # 1. Redis restarted without its data while two jobs run: both re-registered.
        add(2)
        for job_id in ids:
            wait_for(url, job_id, ["running"], until=lambda j: j.checkpoint, timeout=120)
        server.restart(keep_data=False)
        # Both jobs put back by their workers' heartbeats (up to a minute on a loaded machine).
        until(lambda: len(registry(url).find(ids)) == 2, timeout=60, what="both jobs re-registered")
        add(18)
        reg = registry(url)

        def training():
            """A job training now, and the live worker that holds it."""
            for j in reg.find(ids):
                if j.state == "running" and j.progress.get("step", 0) > 0:
                    for p in procs:
                        if p.poll() is None and f"tlm-worker {j.worker}:" in workers.log(p):
                            return j, p
            return None

        # 2. Redis restarted with its data (down for three seconds).
        until(training, timeout=120, what="a job trains")
        server.restart(down=3)
        # 3. Three times, a worker SIGKILLed while it trains a job; a new one starts.
        for _ in range(3):
            _, proc = until(training, timeout=120, what="a job trains")
            proc.kill()
            proc.wait()
            procs.append(workers.start(lease=LEASE))
        # 4. A worker and its job process SIGSTOPped past the lease (a Mac asleep), then woken.
        sleeper, proc = until(training, timeout=120, what="a job trains")
        stopped = [proc.pid, job_pid(workers.log(proc), sleeper.id)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(3 * LEASE)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        # 5. The runs' disk full for a few seconds.
        if tmpfs:
            ballast = mnt / "ballast"
            subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=1M"], capture_output=True)
            time.sleep(4)
            ballast.unlink()

        ended = {job_id: wait_for(url, job_id, ["succeeded", "failed", "cancelled"], timeout=600)
                 for job_id in ids}
        assert all(j.state == "succeeded" and j.result["step"] == 40 for j in ended.values()), \
            {i: (j.state, j.error) for i, j in ended.items() if j.state != "succeeded"}
        for job_id in ids:  # ended exactly once: one final line in its log
            log = reg.logs(job_id)[0]
            assert sum("succeeded at iteration" in line for line in log) == 1, "\n".join(log)
        for run in runs:
            for path in run.glob("*.safetensors"):
                checkpoint.verify(run, path.stem)  # raises unless it hashes to its name
            assert checkpoint.find(run).step == 40
            assert_one_record_per_step_and_newest_fence(run)
        worst = max(metrics.stale_writes(metrics.raw(run)) for run in runs)
        print(f"\nchaos: {len(ids)} jobs, largest stale-holder overlap {worst:.3f}s "
              f"(heartbeat {HEARTBEAT:.1f}s)")
        assert worst <= HEARTBEAT, worst
        assert sum(p.poll() is None for p in procs) == 2  # all but the killed ones
    finally:
        workers.stop_all()
        server.kill()
        if tmpfs:
            subprocess.run(["umount", "-l", str(mnt)])
