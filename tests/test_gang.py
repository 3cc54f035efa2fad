"""Gang jobs: one model trained by several workers at once (real workers, the real ring backend)."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tlm import checkpoint, metrics

from queue_helpers import TINY, Workers, job_pid, registry, submit, tlm, until, wait_for

REDIS_DB = 11
FLAGS = [*TINY, "--num_iters", "40", "--steps_per_eval", "20"]


def trained_here(tmp_path: Path, save_dir: Path, *flags: str) -> Path:
    """The same training by ``tlm train`` on this machine (one process, or local ranks)."""
    one = tmp_path / "here"
    shutil.copytree(save_dir / "datasets", one / "datasets")
    proc = tlm("train", "--save_dir", str(one), *flags)
    assert proc.returncode == 0, proc.stderr
    return one


def assert_same_weights(ours: Path, theirs: Path, exact: bool = False) -> None:
    a, b = checkpoint.find(ours).load_weights(), checkpoint.find(theirs).load_weights()
    for name, value in b.items():  # across process counts, gradients are summed in another order
        tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-3, "atol": 1e-5}
        np.testing.assert_allclose(np.array(a[name]), np.array(value), **tolerance)


def worker_of(workers: Workers, worker_id: str):
    """The worker process behind a worker id (``host-pid-xxxx``)."""
    pid = int(worker_id.split("-")[-2])
    return next(p for p in workers.procs if p.pid == pid)


def test_two_workers_train_one_model_as_one_process_would(url, workers, save_dir, tmp_path):
    for _ in range(2):
        workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *FLAGS, "--nodes", "2")
    job = wait_for(url, job_id, ["succeeded"], timeout=180)
    assert len({m["worker"] for m in job.members}) == 2 and job.worker == job.members[0]["worker"]
    status = tlm("status", "--queue", url)
    assert ", ".join(m["worker"] for m in job.members) in status.stdout.replace("\n", "")
    single = trained_here(tmp_path, save_dir, *FLAGS)
    ranked, alone = metrics.read(save_dir), metrics.read(single)
    assert [(r["kind"], r["step"]) for r in ranked] == [(r["kind"], r["step"]) for r in alone]
    for a, b in zip(ranked, alone):  # every reported loss: the same mathematics
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
    assert_same_weights(save_dir, single)


@pytest.mark.parametrize("url", ["redis"], indirect=True)
def test_a_members_worker_stopped_mid_run_requeues_the_gang_which_resumes_to_the_same_weights(
        url, workers, save_dir, tmp_path):
    flags = [*TINY, "--num_iters", "200", "--steps_per_eval", "20"]
    for _ in range(2):
        workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *flags, "--nodes", "2")
    job = wait_for(url, job_id, ["running"], until=lambda j: j.checkpoint, timeout=180)
    member = worker_of(workers, job.members[1]["worker"])
    member.send_signal(signal.SIGTERM)  # rank 1's Mac is being shut down: it saves and leaves
    assert member.wait(timeout=60) == 0
    job = wait_for(url, job_id, ["interrupted"], timeout=60)
    assert job.interruptions == 1 and job.attempts == 0
    saved = checkpoint.find(save_dir)
    assert 0 < saved.step < 200
    workers.start()  # a second member again: the gang gathers and resumes
    job = wait_for(url, job_id, ["succeeded"], timeout=180)
    assert f"resuming {saved.identifier[:12]} at iteration {saved.step}" in "\n".join(
        registry(url).logs(job_id)[0])
    # bit for bit what an uninterrupted pair of ranks trains (same arithmetic, exact resume)
    assert_same_weights(save_dir, trained_here(tmp_path, save_dir, *flags, "--nodes", "2"), exact=True)


@pytest.mark.parametrize("url", ["redis"], indirect=True)
def test_two_gangs_on_three_workers_both_complete(url, workers, save_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        (run / "datasets").symlink_to(save_dir / "datasets")
        runs.append(run)
    ids = [submit(url, "train", "--save_dir", str(run), *FLAGS, "--nodes", "2") for run in runs]
    for _ in range(3):
        workers.start()
    for job_id in ids:
        job = wait_for(url, job_id, ["succeeded"], timeout=240)
        assert job.attempts == 1 and len(job.members) == 2


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_a_gang_that_cannot_gather_gives_its_places_up_to_other_jobs(url, workers, save_dir, tmp_path):
    runs = {}
    for name in ("long", "gang", "short"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "datasets").symlink_to(save_dir / "datasets")
    for _ in range(3):
        workers.start(lease=2)  # a waiting member gives its place up after 4 s
    long = submit(url, "train", "--save_dir", str(runs["long"]), *TINY, "--num_iters", "100000",
                  "--steps_per_eval", "100000")
    wait_for(url, long, ["running"])
    gang = submit(url, "train", "--save_dir", str(runs["gang"]), *FLAGS, "--batch_size", "12",
                  "--nodes", "3")
    wait_for(url, gang, ["queued"], until=lambda j: len(j.members) == 2, timeout=30)
    short = submit(url, "train", "--save_dir", str(runs["short"]), *TINY, "--num_iters", "10")
    wait_for(url, short, ["succeeded"], timeout=60)  # a place given up ran it
    assert registry(url).get(long).state == "running"
    assert tlm("cancel", long, "--queue", url).returncode == 0
    job = wait_for(url, gang, ["succeeded"], timeout=180)
    assert len({m["worker"] for m in job.members}) == 3 and job.attempts == 1


@pytest.mark.parametrize("url", ["redis"], indirect=True)
def test_cancel_stops_every_rank_after_a_save(url, workers, save_dir):
    for _ in range(2):
        workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                    "--steps_per_eval", "100000", "--nodes", "2")
    job = wait_for(url, job_id, ["running"], until=lambda j: j.progress.get("step"), timeout=180)
    assert tlm("cancel", job_id, "--queue", url).returncode == 0
    job = wait_for(url, job_id, ["cancelled"], timeout=60)
    saved = checkpoint.find(save_dir)
    assert saved is not None and saved.identifier == job.checkpoint and saved.step > 0
    deadline = time.time() + 10
    while any(_ranks(workers, p) for p in workers.procs) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_ranks(workers, p) for p in workers.procs)


@pytest.mark.parametrize("url", ["redis"], indirect=True)
def test_a_member_killed_with_its_worker_stops_the_gang_and_it_resumes_elsewhere(
        url, workers, save_dir):
    for _ in range(2):
        workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "200",
                    "--steps_per_eval", "20", "--nodes", "2")
    job = wait_for(url, job_id, ["running"], until=lambda j: j.checkpoint, timeout=180)
    survivor = worker_of(workers, job.members[0]["worker"])
    victim = worker_of(workers, job.members[1]["worker"])
    rank = job_pid(workers.log(victim), job_id)
    victim.kill()  # the Mac lost power: no save, no goodbye, from its worker or its rank
    os.kill(rank, signal.SIGKILL)
    victim.wait()
    job = wait_for(url, job_id, ["interrupted"], timeout=60)
    assert job.attempts == 1 and "rank" in job.error or "stopped heartbeating" in job.error
    deadline = time.time() + 30
    while _ranks(workers, survivor) and time.time() < deadline:
        time.sleep(0.2)
    assert not _ranks(workers, survivor)  # rank 0 is not left waiting in a collective
    workers.start()
    wait_for(url, job_id, ["succeeded"], timeout=180)
    assert checkpoint.find(save_dir).step == 200


@pytest.mark.parametrize("url", ["redis"], indirect=True)
def test_a_collective_that_makes_no_progress_stops_every_rank_and_requeues(url, tmp_path, save_dir):
    os.environ["TLM_COLLECTIVE_TIMEOUT"] = "4"  # the workers' ranks inherit it
    try:
        workers = Workers(url, tmp_path)
        for _ in range(2):
            workers.start()
    finally:
        del os.environ["TLM_COLLECTIVE_TIMEOUT"]
    try:
        job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "200",
                        "--steps_per_eval", "20", "--nodes", "2")
        job = wait_for(url, job_id, ["running"], until=lambda j: j.progress.get("step"),
                       timeout=180)
        member = worker_of(workers, job.members[1]["worker"])
        os.kill(_ranks(workers, member)[0], signal.SIGSTOP)  # rank 1 hangs: rank 0 waits in a collective
        # the job is interrupted, then claimed again at once (a wake-up): read its log, not its state
        until(lambda: "stopped (no progress for 4s): the gang stops" in "\n".join(registry(url).logs(job_id)[0]),
              60, "the gang's stop")
        wait_for(url, job_id, ["succeeded"], timeout=180)
    finally:
        workers.stop_all()


def _ranks(workers, worker) -> list[int]:
    """A worker's live job processes: its children that its log says it started for a job
    (not its interactive process, which starts with its first job)."""
    started = {int(p) for p in re.findall(r"started \w+ job \w+ \(.*?pid (\d+)\)", workers.log(worker))}
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
    return [int(c) for c in children if int(c) in started]


def test_rendezvous_for_each_backend_is_built_from_the_members(tmp_path):
    from tlm.config import ConfigError
    from tlm.ranks import rank_env

    members = [{"address": "10.0.0.1", "port": 47100, "rdma": {"10.0.0.2": "rdma_en3"}},
               {"address": "10.0.0.2", "port": 47105, "rdma": {"10.0.0.1": "rdma_en5"}}]
    ring = rank_env("ring", members, 1, tmp_path)
    assert ring["MLX_RANK"] == "1"
    assert json.loads(Path(ring["MLX_HOSTFILE"]).read_text()) == [["10.0.0.1:47100"], ["10.0.0.2:47105"]]
    assert rank_env("nccl", members, 0, tmp_path) == {
        "MLX_RANK": "0", "NCCL_HOST_IP": "10.0.0.1", "NCCL_PORT": "47100", "MLX_WORLD_SIZE": "2"}
    jaccl = rank_env("jaccl", members, 0, tmp_path)
    assert jaccl["MLX_JACCL_COORDINATOR"] == "10.0.0.1:47100"
    assert json.loads(Path(jaccl["MLX_IBV_DEVICES"]).read_text()) == [[None, "rdma_en3"], ["rdma_en5", None]]
    members[1]["rdma"] = {}
    with pytest.raises(ConfigError, match="no RDMA device from 10.0.0.2 to 10.0.0.1"):
        rank_env("jaccl", members, 0, tmp_path)


def test_clear_errors_for_gang_settings(tmp_path):
    proc = tlm("train", "--save_dir", str(tmp_path / "r"), *TINY, "--nodes", "2", "--backend", "mpi")
    assert proc.returncode == 2 and "--backend mpi: its ranks are started by mpirun" in proc.stderr
    url = f"sqlite://{tmp_path / 'q.db'}"
    worker = [sys.executable, "-m", "tlm_worker.main", "--queue", url, "--burst"]
    proc = subprocess.run([*worker, "--address", "192.0.2.1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "192.0.2.1 is not an address of this machine" in proc.stderr
    proc = subprocess.run([*worker, "--ports", "47200-47100"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a range of ports" in proc.stderr
