"""Nothing lost at the lab's edges (issue 41): unreadable checkpoints, readers racing retention,
a Redis that refuses writes, planted records. Real workers, queues, files and redis-servers."""

from __future__ import annotations

import os
import time

import pytest
import redis

from tlm import checkpoint

from queue_helpers import TINY, RedisServer, Workers, registry, submit, tlm, wait_for

REDIS_DB = 4
SHAKES = [*TINY, "--dataset", "shakespeare"]


def corrupt(run) -> list:
    """Random bytes over every checkpoint's weights (their names stay)."""
    paths = sorted(run.glob("*.safetensors"))
    for p in paths:
        p.write_bytes(os.urandom(p.stat().st_size))
    return paths


@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_a_run_whose_checkpoints_are_all_unreadable_never_becomes_a_new_model(url, workers, tmp_path, mirror):
    """Item 3: the resubmitted job fails in one line naming the files and how to set them aside;
    metrics.jsonl keeps one history; --new_model then starts afresh with the old files set aside."""
    run = tmp_path / "run"
    workers.start("--save_root", str(tmp_path))
    first = submit(url, "train", "--save_dir", str(run), *SHAKES, "--num_iters", "10")
    wait_for(url, first, ["succeeded"], timeout=180)
    workers.stop_all()
    again = submit(url, "train", "--save_dir", str(run), *SHAKES, "--more", "10")
    bad = corrupt(run)  # after the submit, which reads them too (and now refuses: below)
    records = (run / "metrics.jsonl").read_text()
    workers.start("--save_root", str(tmp_path))
    job = wait_for(url, again, ["failed"], timeout=120)
    assert "no readable checkpoint in" in job.error and bad[0].name[:12] in job.error, job.error
    assert "--new_model" in job.error and job.attempts == 1
    assert (run / "metrics.jsonl").read_text() == records  # nothing of a second history
    for out in (tlm("train", "--save_dir", str(run), *SHAKES, "--num_iters", "10"),
                tlm("submit", "train", "--save_dir", str(run), *SHAKES, "--more", "10", "--queue", url)):
        assert out.returncode != 0 and "no readable checkpoint" in out.stderr and "Traceback" not in out.stderr
    fresh = submit(url, "train", "--save_dir", str(run), *SHAKES, "--num_iters", "10", "--new_model")
    wait_for(url, fresh, ["succeeded"], timeout=180)
    assert list(run.glob("replaced-*/*.safetensors")) and checkpoint.find(run).step == 10


@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_samples_in_a_loop_never_lose_to_retention_while_the_run_trains(url, workers, tmp_path, mirror):
    """Item 4: retention of one checkpoint and a save every two steps; samples queued one after
    another all answer, none fails on a file retention deleted while it loaded."""
    run = tmp_path / "run"
    workers.start("--save_root", str(tmp_path))
    trainer = submit(url, "train", "--save_dir", str(run), *SHAKES, "--num_iters", "100000",
                     "--steps_per_eval", "2", "--eval_tokens", "64", "--keep_last", "1")
    wait_for(url, trainer, ["running"], until=lambda j: j.checkpoint, timeout=180)
    first = registry(url).get(trainer).checkpoint
    for _ in range(8):
        proc = tlm("sample", "--save_dir", str(run), "--prompt", "ROMEO:", "--max_tokens", "5",
                   "--queue", url)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert registry(url).get(trainer).checkpoint != first  # the run moved on while it was sampled
    tlm("cancel", trainer, "--queue", url)
    wait_for(url, trainer, ["cancelled"], timeout=120)


def test_a_redis_that_refuses_writes_is_an_outage_not_a_crash(tmp_path, mirror):
    """Item 6: Redis at its maxmemory (noeviction) for a while under a training job: the worker
    says so once and that it is back, stays up, and the job ends in one attempt."""
    server = RedisServer(tmp_path)
    workers = Workers(server.url, tmp_path)
    try:
        proc = workers.start("--save_root", str(tmp_path), lease=6)
        job_id = submit(server.url, "train", "--save_dir", str(tmp_path / "run"), *SHAKES,
                        "--num_iters", "150", "--steps_per_eval", "25")
        wait_for(server.url, job_id, ["running"], until=lambda j: j.checkpoint, timeout=180)
        r = redis.Redis(port=server.port)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")
        time.sleep(8)
        r.config_set("maxmemory", "0")
        job = wait_for(server.url, job_id, ["succeeded"], timeout=240)
        log = workers.log(proc)
        said = [line for line in log.splitlines() if line.startswith("tlm-worker")]
        assert proc.poll() is None and "Traceback" not in log, log
        assert sum("queue unreachable" in line for line in said) == 1, said
        assert sum("queue back after" in line for line in said) == 1, said
        assert job.attempts == 1 and job.result["step"] == 150, job
    finally:
        workers.stop_all()
        server.kill()


@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_planted_records_point_nowhere_outside_the_lab(url, workers, tmp_path, mirror):
    """Item 10: a run name that climbs out of the save root, a relative save_dir, an export to a
    relative folder, an eval split that is no split: each job fails in one line, nothing is
    written outside, and the worker lives on."""
    reg = registry(url)
    root = tmp_path / "root"
    planted = [reg.create("train", {"run": "../../escaped", "dataset": "shakespeare"}, "run:x"),
               reg.create("train", {"save_dir": "relative/run", "dataset": "shakespeare"}, "dir:y"),
               reg.create("eval", {"save_dir": str(tmp_path / "r"), "split": "../../etc/passwd"}, "dir:z"),
               reg.create("export", {"save_dir": str(tmp_path / "r"), "out": "out-here"}, "dir:w")]
    for job in planted:
        reg.queue.push(job.id, job.spec.lane)
    proc = workers.start("--save_root", str(root))
    errors = [wait_for(url, j.id, ["failed"], timeout=120).error for j in planted]
    assert "stays inside the save root" in errors[0] and "not an absolute path" in errors[1], errors
    assert "no split" in errors[2] or "no checkpoint" in errors[2], errors
    assert "not an absolute path" in errors[3], errors
    assert not (tmp_path / "escaped").exists() and not (root.parent.parent / "escaped").exists()
    assert proc.poll() is None and "Traceback" not in workers.log(proc), workers.log(proc)


def test_evaluating_a_split_that_is_no_split_is_one_line(tmp_path, mirror):
    from tlm.data import DataError
    from tlm.run import evaluate_checkpoint
    run = tmp_path / "run"
    assert tlm("train", "--save_dir", str(run), *SHAKES, "--num_iters", "2").returncode == 0
    with pytest.raises(DataError, match="no split '../../etc/passwd'"):
        evaluate_checkpoint(str(run), split="../../etc/passwd")


@pytest.mark.parametrize("name", ["a\nb", "red\x1b[31m", "tab\there", "bad\udcff"])
def test_run_names_with_control_characters_or_not_utf8_are_refused_in_one_line(tmp_path, name):
    """Item 9: a run name is printed by every command: no newlines or escape sequences in it."""
    proc = tlm("submit", "train", "--run", name, "--queue", f"sqlite://{tmp_path / 'q.db'}",
               env={**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "control characters" in proc.stderr or "not UTF-8" in proc.stderr, proc.stderr


@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_a_runs_page_after_prune_reads_its_curves_checkpoints_and_configuration_from_its_folder(
        url, workers, tmp_path, mirror):
    """Item 5: `tlm prune` forgets the jobs; the run page shows what the run's folder holds."""
    from tlm_cli.dashboard import Api
    from tlm_worker.lab import Lab
    root = tmp_path / "root"
    workers.start("--save_root", str(root))
    job = submit(url, "train", "--run", "kept", *SHAKES, "--num_iters", "20", "--steps_per_eval", "10")
    wait_for(url, job, ["succeeded"], timeout=180)
    before = Api(Lab(registry(url), str(root))).run("run:kept")
    assert tlm("prune", "--older_than", "0", "--queue", url).returncode == 0
    after = Api(Lab(registry(url), str(root))).run("run:kept")
    assert after["jobs"] == [] and after["config"]["dim"] == 32
    assert {(p["kind"], p["step"]) for p in after["points"]} == {(p["kind"], p["step"]) for p in before["points"]}
    assert [c["identifier"] for c in after["checkpoints"]] == [c.identifier for c in checkpoint.list_checkpoints(
        root / "kept")]

