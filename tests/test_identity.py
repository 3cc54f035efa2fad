"""A run's identity and the lab's shared folder (issue 30): a worker whose --save_root is not the
lab's shared folder takes no job that reads a run by name, and a job whose checkpoint a worker
cannot see never starts over as a new model there."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tlm_worker.kinds import Job

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


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_a_job_whose_recorded_checkpoint_was_replaced_by_a_newer_one_resumes_the_newer(url, workers, tmp_path,
                                                                                       mirror):
    """A worker killed between a save and its record leaves the record naming a checkpoint that
    retention deleted: the run's newer checkpoint is there, so the job resumes it (CI's chaos run)."""
    lab = tmp_path / "lab"
    lab.mkdir()
    job, ckpt = trained_to_a_checkpoint(url, workers, lab)
    registry(url).update(job, checkpoint="f" * 40)  # the record one save behind the folder
    workers.start("--save_root", str(lab))
    until(lambda: f"resuming {ckpt[:12]}" in "\n".join(registry(url).logs(job)[0]), 120, "the resume")
    assert "is not in" not in (registry(url).get(job).error or "")


def test_a_second_trainer_of_a_run_named_another_way_is_refused_again_at_claim(url, workers, tmp_path):
    """A record naming the run by its path (queued by a Mac that could not see the shared folder,
    or an older tlm) is refused by the worker that resolves both to one directory."""
    lab = tmp_path / "lab"
    lab.mkdir()
    workers.start("--save_root", str(lab))
    first = submit(url, "train", "--run", "k3", *LONG).split()[0]
    wait_for(url, first, ["running"], until=lambda j: j.progress.get("step", 0) > 0, timeout=180)
    reg = registry(url)
    now = reg.now()
    flags = {f.lstrip("-"): int(v) if v.isdigit() else v for f, v in zip(LONG[::2], LONG[1::2])}
    planted = Job(id="d0" * 6, kind="train", params={**flags, "save_dir": str(lab / "k3")},
                  run=f"dir:{lab / 'k3'}", created=now, enqueued=now)
    assert reg.store.insert(planted.to_record(), exclusive=True) is None  # another key: not busy there
    reg.queue.push(planted.id, "train")
    workers.start("--save_root", str(lab))
    ended = wait_for(url, planted.id, ["succeeded", "failed"], timeout=120)
    assert ended.state == "failed" and f"which running job {first} trains (one trainer per run)" in ended.error, \
        ended.error
    assert reg.get(first).state == "running"
    assert not any(r.get("job") == planted.id for r in map(json.loads, (lab / "k3" / "metrics.jsonl").open()))


def test_a_run_named_by_a_path_in_the_shared_folder_is_the_run_of_that_name(url, workers, tmp_path):
    """--save_dir ROOT/x, a relative path to it, a symlink to it, and --run x: one run, one trainer."""
    lab = tmp_path / "lab"
    lab.mkdir()
    w = workers.start("--save_root", str(lab), "--burst")  # marks the folder, then leaves
    w.wait(60)
    first = submit(url, "train", "--run", "k3", *LONG).split()[0]
    (tmp_path / "link").symlink_to(lab)
    for given in (str(lab / "k3"), str(tmp_path / "link" / "k3")):
        proc = tlm("submit", "train", "--save_dir", given, *LONG, "--queue", url)
        assert proc.returncode == 1 and f"k3 already has a queued job {first}" in proc.stderr, proc.stderr
    proc = tlm("submit", "train", "--save_dir", "k3", *LONG, "--queue", url, cwd=str(lab))
    assert proc.returncode == 1 and "(one trainer per run)" in proc.stderr, proc.stderr
    registry(url).cancel(first)
    again = submit(url, "train", "--save_dir", str(tmp_path / "link" / "k3"), *LONG).split()[0]
    job = registry(url).get(again)
    assert job.run == "run:k3" and job.params.get("run") == "k3" and "save_dir" not in job.params
    outside = submit(url, "train", "--save_dir", str(tmp_path / "elsewhere"), *LONG).split()[0]
    assert registry(url).get(outside).run == f"dir:{tmp_path / 'elsewhere'}"


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_a_run_a_worker_keeps_under_its_save_root_is_found_by_name(url, workers, tmp_path, mirror):
    """`tlm inspect --run shk` after a worker started with --save_root trained it (before: "neither
    a directory nor a run under ~/.local/share/tlm/runs", while `tlm sample --run` found it)."""
    import os
    root = tmp_path / "root"
    done = tlm("train", "--save_dir", str(root / "shk"), *TINY, "--dataset", "shakespeare", "--num_iters", "2")
    assert done.returncode == 0, done.stderr
    from tlm.data import load_dataset  # the sample after a save starts from whole words (was "GREMI ...")
    data = load_dataset("shakespeare", root / "shk" / "datasets", mirror)
    prompt = done.stderr.split("sample: ", 1)[1].split(" ...", 1)[0]
    assert prompt.split() == data.tokenizer.decode([int(t) for t in data.valid[:64]]).split()[:8], prompt
    w = workers.start("--save_root", str(root))
    until(lambda: registry(url).workers(), 60, "the worker's heartbeat")
    proc = tlm("inspect", "--run", "shk", env={**os.environ, "TLM_QUEUE": url})
    assert proc.returncode == 0 and "iteration:      2 of 2" in proc.stdout, proc.stderr
    w.kill()


def test_a_sweep_that_reuses_a_pruned_sweeps_name_trains_in_fresh_folders(url, tmp_path):
    """Before: a new sweep `k2` resumed the earlier k2's checkpoints once its record was pruned."""
    from tlm_worker import sweeps
    spec = sweeps.SweepSpec(name="k2", search={"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                                 "log": True}},
                            base={"dim": 32, "num_heads": 2, "num_blocks": 1, "context_size": 16,
                                  "steps_per_eval": 5}, trials=1, parallel=1, budget="20", prune="none")
    reg = registry(url)
    first = sweeps.submit(reg, spec)
    reg.cancel(first.id)
    sweeps.reconcile(reg, first.id)
    assert reg.get(first.id).state == "cancelled" and reg.prune(0) == 2
    again = sweeps.submit(reg, spec)
    runs = [sweeps.trials(reg, s)[0].run for s in (again,)] + [f"run:{sweeps.trial_run(spec, first.id, 0)}"]
    assert runs[0] != runs[1] and runs[0].startswith("run:k2-") and runs[0].endswith("/trial-000")


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_tlm_worker_reads_tlm_save_root_as_every_command_does(url, workers, tmp_path, monkeypatch):
    lab = tmp_path / "lab"
    lab.mkdir()
    monkeypatch.setenv("TLM_SAVE_ROOT", str(lab))  # the worker's environment (it inherits ours)
    workers.start()
    until(lambda: registry(url).workers(), 60, "the worker's heartbeat")
    assert registry(url).workers()[0]["save_root"] == str(lab) and (lab / ".tlm-lab").is_dir()
