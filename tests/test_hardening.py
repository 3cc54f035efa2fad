"""Bad input gets a one-line answer at once; a diverging run publishes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

from tlm import checkpoint

from queue_helpers import TINY, Workers, free_port, submit, tlm, wait_for

BAD = [
    (["train", "--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
    (["train", "--seed", "99999999999999999999999"], "--seed must be in [0, 2^32)"),
    (["train", "--time_budget", "inf"], "--time_budget must be a finite number, got inf"),
    (["train", "--time_budget", "nan"], "--time_budget must be a finite number, got nan"),
    (["train", "--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["sample", "--local", "--temperature", "nan"], "'nan' is not a finite number"),
    (["sample", "--local", "--seed", "-1"], "--seed"),
    (["status", "--queue", "sqlite:///nonexistent/dir/q.db"], "no directory /nonexistent/dir"),
    (["status", "--queue", "redis://127.0.0.1:6379/abc"], "the database must be a number, not 'abc'"),
    (["status", "--queue", "redis://127.0.0.1:notaport/0"], "queue URL redis://127.0.0.1:notaport/0"),
    (["status", "--queue", "redis://127.0.0.1:6379/99"], "DB index is out of range"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_at_once(args, message, tmp_path):
    proc = tlm(*args, "--save_dir", str(tmp_path / "run")) if args[0] == "train" else tlm(*args)
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.safetensors"))


@pytest.mark.parametrize("args,message", [
    (["--lease", "nan"], "'nan' is not a finite number"),
    (["--gpu"], "no GPU backend (Metal or CUDA)"),
    (["--queue", "redis://127.0.0.1:6379/99"], "DB index is out of range"),
])
def test_worker_refuses_bad_settings_at_start(args, message):
    import mlx.core as mx
    if "--gpu" in args and mx.is_available(mx.gpu):
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "tlm_worker.main", *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_a_password_protected_redis_without_the_password_fails_at_once(tmp_path):
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--requirepass", "s3cret", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                redis.Redis(port=port, password="s3cret").ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        for url, why in ((f"redis://127.0.0.1:{port}/0", "Redis asks for a password"),
                         (f"redis://:hunter2@127.0.0.1:{port}/0", "wrong password")):
            proc = tlm("status", "--queue", url)  # before: 400 s of retries with no word
            assert proc.returncode == 1 and why in proc.stderr, proc.stderr
            assert "hunter2" not in proc.stderr
        assert tlm("status", "--queue", f"redis://:s3cret@127.0.0.1:{port}/0").returncode == 0
    finally:
        server.kill()


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_good_checkpoint(save_dir):
    ok = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "5")
    assert ok.returncode == 0, ok.stderr
    good = checkpoint.find(save_dir)
    proc = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "30",
               "--learning_rate", "1e30", "--steps_per_eval", "5")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "training diverged at step" in proc.stderr.strip().splitlines()[-1]
    assert checkpoint.find(save_dir).identifier == good.identifier


def test_a_diverging_queued_job_fails_with_the_reason_and_no_traceback(tmp_path, save_dir):
    url = f"sqlite://{tmp_path / 'queue.db'}"
    workers = Workers(url, tmp_path)
    worker = workers.start()
    try:
        job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "30",
                        "--learning_rate", "1e30", "--steps_per_eval", "5")
        job = wait_for(url, job_id, ["failed"])
        assert job["error"].startswith("Diverged: training diverged at step")
        assert job["attempts"] == 1  # a job's own failure is final, not retried
        missing = submit(url, "eval", "--save_dir", str(tmp_path / "nothing-here"))
        assert wait_for(url, missing, ["failed"])["error"].startswith("CheckpointError: no checkpoint")
    finally:
        workers.stop_all()
    assert "Traceback" not in workers.log(worker)
    assert checkpoint.find(save_dir) is None
    assert os.path.isdir(save_dir)
