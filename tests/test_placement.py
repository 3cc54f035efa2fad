"""Jobs that know what they need: placement, priorities, chains, foreign records and the
macOS power policy, with real registries and real tlm-worker processes on both backends."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from tlm_worker import power
from tlm_worker.placement import RULES, parse_needs, unmet, waiting_reason
from tlm_worker.queue import Queue
from tlm_worker.registry import Registry

from queue_helpers import TINY, plant, registry, submit, tlm, wait_for

REDIS_DB = 10
FAST = [*TINY, "--num_iters", "10", "--steps_per_eval", "10"]


def fake(**caps) -> dict:
    return {"TLM_FAKE_CAPABILITIES": json.dumps(caps)}


def started_with(workers, *args, env=None):
    """A worker whose capabilities are faked through the test seam (its environment)."""
    import os
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        return workers.start(*args)
    finally:
        os.environ.clear()
        os.environ.update(old)


# -- the rules, as pure functions ------------------------------------------------------------

def test_each_rule_says_what_is_missing():
    caps = {"device": "cpu", "memory_available": 2 * 2**30, "host": "air", "labels": {"room": "office"}}
    assert unmet({}, caps) is None
    assert unmet({"gpu": True}, caps) == "needs gpu"
    assert unmet({"memory": 3 * 2**30}, caps) == "needs 3.0 GiB of memory"
    assert unmet({"memory": 2**30, "labels": {"room": "office"}, "host": "air"}, caps) is None
    assert unmet({"labels": {"room": "lab"}}, caps) == "needs room=lab"
    assert unmet({"host": "studio"}, caps) == "needs host studio"
    assert {r.need for r in RULES} == {"gpu", "memory", "host", "labels", "lab_root"}
    assert unmet({"lab_root": True}, {**caps, "lab_root": False}) == \
        "needs the lab's shared folder (its worker's --save_root)"
    workers = [{"capabilities": caps}, {"capabilities": {**caps, "device": "gpu"}, "stopping": True}]
    assert waiting_reason({"gpu": True}, workers) == "waiting: needs gpu; no live worker has it"
    assert waiting_reason({}, []) == "waiting: no live worker (start one: tlm-worker)"
    assert waiting_reason({}, workers) is None
    assert waiting_reason({"gpu": True}, workers[:1] + [{"capabilities": {**caps, "device": "gpu"}}]) is None
    assert parse_needs(("memory=24G",), ("room=office", "host=studio"), gpu=True) == {
        "gpu": True, "memory": 24 * 2**30, "labels": {"room": "office"}, "host": "studio"}
    for bad in (("memory=lots",), ("cores=8",)):
        with pytest.raises(ValueError, match="--needs"):
            parse_needs(bad, ())
    with pytest.raises(ValueError, match="--on"):
        parse_needs((), ("room",))


def test_bad_placement_flags_are_one_line_errors(url):
    for args, says in ((["--needs", "memory=lots"], "give a size such as 24G"), (["--on", "nolabel"], "key=value"),
                       (["--priority", "urgent"], "'urgent' is not one of"),
                       (["--then", "deploy"], "--then 'deploy': give eval[:SPLIT] | sample:PROMPT | export:DIR"),
                       (["--then", "eval:train"], "no split 'train'"), (["--then", "export:"], "give the directory"),
                       (["--after", "nope"], "no job 'nope'")):
        proc = tlm("submit", "train", "--run", "x", *args, "--queue", url)
        assert proc.returncode != 0 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--label", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--label 'x'" in proc.stderr


# -- the claim chooses: priority, then age, among jobs whose needs a worker meets ---------

def test_the_claim_takes_the_highest_priority_then_the_oldest_it_can_run(url):
    reg = Registry(Queue(url))
    normal = [reg.create("eval", {}, f"run:n{i}") for i in range(3)]
    high = reg.create("eval", {}, "run:h", priority=10)
    low = reg.create("eval", {}, "run:l", priority=-10)
    gpu = reg.create("eval", {}, "run:g", priority=10, needs={"gpu": True})
    cpu = {"device": "cpu", "memory_available": 2**34}
    order = [reg.claim_next("interactive", "w", cpu).id for _ in range(5)]
    assert order == [high.id] + [j.id for j in normal] + [low.id]
    assert reg.claim_next("interactive", "w", cpu) is None  # only the GPU job is left
    assert reg.claim(gpu.id, "w", cpu) is None and reg.get(gpu.id).state == "queued"
    assert reg.claim_next("interactive", "w2", {**cpu, "device": "gpu"}).id == gpu.id
    assert reg.claim_next("train", "w", cpu) is None  # lanes stay apart


def test_a_gpu_job_waits_with_its_reason_while_a_cpu_job_runs(url, workers, save_dir, tmp_path):
    root = tmp_path / "root"  # the lab's shared folder: every worker of the lab is started with it
    (root / "needs-gpu").mkdir(parents=True)
    (root / "needs-gpu" / "datasets").symlink_to(save_dir / "datasets")
    workers.start("--save_root", str(root))
    gpu_job = submit(url, "train", "--run", "needs-gpu", "--gpu", *FAST)
    cpu_job = submit(url, "train", "--save_dir", str(save_dir), *FAST)
    wait_for(url, cpu_job, ["succeeded"])
    assert registry(url).get(gpu_job).state == "queued"
    listing = json.loads(tlm("status", "--json", "--queue", url).stdout)
    shown = next(j for j in listing["jobs"] if j["id"] == gpu_job)
    assert shown["waiting"] == "waiting: needs gpu; no live worker has it" and shown["needs"]["gpu"]
    assert "needs gpu; no live worker has it" in tlm("status", "--queue", url).stdout.replace("\n", " ") \
        or "needs gpu" in tlm("status", "--queue", url).stdout
    # A worker that reports a GPU (faked through the test seam) takes it; it trains on the CPU here.
    started_with(workers, "--save_root", str(root), env=fake(device="gpu"))
    job = wait_for(url, gpu_job, ["succeeded"])
    gpu_worker = next(w for w in registry(url).workers() if w["capabilities"]["device"] == "gpu")
    assert job.worker == gpu_worker["id"]


def test_memory_and_labels_place_jobs_on_the_workers_that_fit(url, workers, tmp_path, save_dir):
    root = tmp_path / "root"
    for name in ("big", "office", "any"):
        (root / name).mkdir(parents=True)
        (root / name / "datasets").symlink_to(save_dir / "datasets")
    small = started_with(workers, "--save_root", str(root), "--label", "room=lab",
                         env=fake(memory_available=3 * 2**30))
    large = started_with(workers, "--save_root", str(root), "--label", "room=office",
                         env=fake(memory_available=64 * 2**30))
    deadline = time.time() + 60
    while len(registry(url).workers()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    by_pid = {w["pid"]: w["id"] for w in registry(url).workers()}
    big = submit(url, "train", "--run", "big", *FAST, "--needs", "memory=32G")
    office = submit(url, "train", "--run", "office", *FAST, "--on", "room=office")
    anywhere = submit(url, "train", "--run", "any", *FAST)
    for job_id in (big, office, anywhere):
        wait_for(url, job_id, ["succeeded"], timeout=180)
    reg = registry(url)
    assert reg.get(big).worker == by_pid[large.pid] and reg.get(office).worker == by_pid[large.pid]
    assert reg.get(big).needs["memory"] == 32 * 2**30
    assert reg.get(anywhere).needs["memory"] > 0  # estimated from the shape (tlm.memory)
    status = json.loads(tlm("status", "--json", "--queue", url).stdout)
    caps = {w["pid"]: w["capabilities"] for w in status["workers"]}
    assert caps[small.pid]["labels"] == {"room": "lab"} and caps[small.pid]["cores"] >= 1
    assert {"device", "memory_total", "memory_available", "os", "mlx", "tlm"} <= set(caps[small.pid])


MEASURE = """
import json, sys
import tlm
import mlx.core as mx
from tlm.run import train
train(json.loads(sys.argv[1]))
print(mx.get_peak_memory())
"""


@pytest.mark.parametrize("shape", [
    dict(dataset="ptb", dim=64, num_blocks=1, num_heads=2, context_size=16, batch_size=8),
    dict(dataset="shakespeare", dim=128, num_blocks=2, num_heads=4, context_size=256, batch_size=32),
])
def test_the_memory_estimate_is_within_a_quarter_of_the_measured_peak(shape, tmp_path, mirror):
    from tlm.memory import EVAL_TOKENS, estimate
    run = {**shape, "save_dir": str(tmp_path), "num_iters": 3, "steps_per_eval": 3,
           "eval_tokens": EVAL_TOKENS, "data_mirror": mirror}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(run)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.split()[-1])
    assert 0.75 < estimate(shape) / peak < 1.25, (estimate(shape), peak)


def test_a_high_job_queued_after_three_normal_ones_runs_first(url, workers, tmp_path, save_dir):
    root = tmp_path / "root"
    names = ["busy", "n1", "n2", "n3", "hi"]
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "datasets").symlink_to(save_dir / "datasets")
    workers.start("--save_root", str(root))
    busy = submit(url, "train", "--run", "busy", *TINY, "--num_iters", "100000", "--steps_per_eval", "100000")
    wait_for(url, busy, ["running"])
    normal = [submit(url, "train", "--run", n, *FAST) for n in names[1:4]]
    high = submit(url, "train", "--run", "hi", *FAST, "--priority", "high")
    tlm("cancel", busy, "--queue", url)
    for job_id in normal + [high]:
        wait_for(url, job_id, ["succeeded"], timeout=180)
    reg = registry(url)
    order = sorted(normal + [high], key=lambda j: reg.get(j).started)
    assert order == [high] + normal
    assert reg.get(high).priority == 10


# -- chains ---------------------------------------------------------------------------------

def test_chains_start_after_success_skip_after_failure_and_cancel_with_their_parent(url):
    reg = Registry(Queue(url))
    parent = reg.create("train", {}, "run:a")
    evals = reg.create("eval", {"split": "test"}, "run:a", after=parent.id)
    sample = reg.create("sample", {"prompt": "x", "sampling": {}}, "run:a", after=evals.id)
    assert reg.get(parent.id).followers == [evals.id] and evals.state == "waiting"
    assert reg.claim_next("interactive", "w", {}) is None  # waiting jobs are not claimable
    held = reg.claim(parent.id, "w")
    reg.finish(parent.id, "succeeded", held.fence, checkpoint="c" * 40)
    queued = reg.get(evals.id)
    assert queued.state == "queued" and queued.params["identifier"] == "c" * 40  # pinned
    assert reg.get(sample.id).state == "waiting"
    held = reg.claim(evals.id, "w")
    reg.finish(evals.id, "failed", held.fence, error="boom")
    skipped = reg.get(sample.id)
    assert skipped.state == "skipped" and skipped.error == f"skipped: eval job {evals.id} failed"
    late = reg.create("eval", {}, "run:a", after=evals.id)  # after a parent already failed
    assert late.state == "skipped"
    # Cancel cascades: what waits on a job is cancelled with it.
    second = reg.create("train", {}, "run:b")
    child = reg.create("eval", {}, "run:b", after=second.id)
    grandchild = reg.create("export", {"out": "/tmp/x"}, "run:b", after=child.id)
    assert reg.cancel(second.id) is True
    assert [reg.get(j.id).state for j in (child, grandchild)] == ["cancelled", "cancelled"]


def test_train_then_eval_export_and_sample_in_one_command(url, workers, save_dir, tmp_path):
    workers.start()
    out = tmp_path / "exported"
    proc = tlm("submit", "train", "--save_dir", str(save_dir), *FAST, "--then", "eval:test",
               "--then", f"export:{out}", "--then", "sample:the", "--queue", url)
    assert proc.returncode == 0, proc.stderr
    train_id = proc.stdout.split()[0]
    follower_ids = proc.stdout.split()[1:]
    assert len(follower_ids) == 3 and proc.stderr.count(f"after {train_id}") == 3
    reg = registry(url)
    for job_id in follower_ids:
        wait_for(url, job_id, ["succeeded"], timeout=180)
    trained = reg.get(train_id)
    evals, export, sample = (reg.get(j) for j in follower_ids)
    assert evals.result["split"] == "test" and evals.result["checkpoint"] == trained.checkpoint
    assert export.result["checkpoint"] == trained.checkpoint and sample.result["samples"][0].strip()
    eval_log = tlm("logs", evals.id, "--queue", url).stdout  # the metric in words, not only a loss
    assert f"test loss {evals.result['loss']:.4f}, perplexity {evals.result['perplexity']:.2f}" in eval_log
    sample_log = tlm("logs", sample.id, "--queue", url).stdout  # a chained sample's text, in its log
    first_line = ("the" + sample.result["samples"][0]).splitlines()[0]
    assert f"  {first_line}" in sample_log and "sampled 1 from checkpoint" in sample_log, sample_log
    status = tlm("status", train_id, "--queue", url).stdout  # readable; --json for scripts
    assert f"waiting on it: eval job {evals.id} (succeeded)" in status
    assert f"train job {train_id} of " in status and "  state      succeeded" in status
    assert f"  checkpoint {trained.checkpoint}" in status and "1 attempt(s)" in status
    assert f"waited for: train job {train_id} (succeeded)" in tlm("status", evals.id, "--queue", url).stdout
    from mlx_lm import load
    model, tokenizer = load(str(out))
    assert tokenizer.encode("the") and model is not None
    # A failed parent leaves its followers skipped.
    bad = tlm("submit", "train", "--save_dir", str(tmp_path / "nodata"), "--dataset",
              str(tmp_path / "missing.txt"), "--then", "eval", "--queue", url)
    assert bad.returncode != 0  # refused at submit: nothing queued, nothing to skip
    failing = submit(url, "train", "--save_dir", str(save_dir), *FAST, "--learning_rate", "1e9",
                     "--num_iters", "200", "--new_model")
    follower = submit(url, "eval", "--save_dir", str(save_dir), "--after", failing)
    wait_for(url, failing, ["failed"], timeout=180)
    skipped = wait_for(url, follower, ["skipped"], timeout=30)
    assert skipped.error.startswith(f"skipped: train job {failing} failed")


# -- records a stranger wrote ---------------------------------------------------------------

def test_records_a_stranger_wrote_never_stop_a_worker_or_status(url, workers, save_dir, tmp_path):
    reg = registry(url)
    planted = plant(url, reg)
    proc = tlm("status", "--queue", url)
    assert proc.returncode == 0
    assert "skipped job record 'bad000000002' has an unknown kind 'deploy'" in proc.stderr
    workers.start()
    job_id = submit(url, "train", "--save_dir", str(save_dir), *FAST)
    wait_for(url, job_id, ["succeeded"])
    proc = tlm("status", "--queue", url)
    assert proc.returncode == 0 and job_id in proc.stdout
    listed = json.loads(tlm("status", "--json", "--queue", url).stdout)
    assert job_id in {j["id"] for j in listed["jobs"]}
    deadline = time.time() + 30  # the worker's sweep (every lease/2) fails them with a reason
    while time.time() < deadline and workers.log(workers.procs[0]).count("failed job record") < 4:
        time.sleep(0.5)
    log = workers.log(workers.procs[0])
    assert "failed job record 'bad000000001' field 'params' is list, not dict" in log
    assert "has an unknown kind 'deploy'" in log and "has no 'run'" in log
    assert "field 'progress' that is not JSON" in log or "is not a JSON object" in log
    assert workers.procs[0].poll() is None  # still serving
    assert "bad000000002" not in tlm("status", "--queue", url).stderr  # failed and said: not again
    second = submit(url, "train", "--save_dir", str(save_dir), *FAST, "--num_iters", "12")
    wait_for(url, second, ["succeeded"])
    assert set(planted) & {j["id"] for j in listed["jobs"]} == set()


# -- a Mac that works only while its owner is away ----------------------------------------------

def test_the_power_policy_decides_from_idle_time_and_power_source():
    away, back = 600.0, 5.0
    idle = power.Policy(when_idle=5)
    assert power.pause_reason(idle, away, False) is None
    assert "the user is active" in power.pause_reason(idle, back, False)
    assert power.pause_reason(idle, None, None) is None  # no probe (Linux): never pauses
    battery = power.Policy(on_battery="pause")
    assert power.pause_reason(battery, back, True) == "on battery power (--on_battery pause)"
    assert power.pause_reason(battery, back, False) is None
    assert not power.Policy().active and power.pause_reason(power.Policy(), 0, True) is None
    assert power.keep_awake(1) is None  # Linux: no caffeinate, nothing held
    assert power.Probe().idle_seconds() is None and power.Probe().on_battery() is None


def test_a_returning_user_interrupts_training_without_using_an_attempt(url, workers, save_dir, tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"idle_seconds": 3600, "on_battery": False}))
    started_with(workers, "--when_idle", "10", env={"TLM_POWER_PROBE": str(probe)})
    job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                    "--steps_per_eval", "100000")
    wait_for(url, job_id, ["running"], until=lambda j: j.progress.get("step", 0) >= 5)
    probe.write_text(json.dumps({"idle_seconds": 2, "on_battery": False}))  # the user is back
    job = wait_for(url, job_id, ["interrupted"], timeout=60)
    assert job.attempts == 0 and job.interruptions == 1 and "paused" in job.error
    assert job.checkpoint  # it saved before going back to the queue
    time.sleep(6)
    assert registry(url).get(job_id).state == "interrupted"  # not taken while the user is active
    worker = registry(url).workers()[0]
    assert "the user is active" in worker["paused"]
    probe.write_text(json.dumps({"idle_seconds": 3600, "on_battery": False}))  # away again
    wait_for(url, job_id, ["running"], timeout=60)
    tlm("cancel", job_id, "--queue", url)
    job = wait_for(url, job_id, ["cancelled"], timeout=60)
    assert job.attempts == 1 and job.interruptions == 1


def test_entries_left_in_a_redis_list_by_an_older_tlm_move_into_the_priority_lane(tmp_path):
    from queue_helpers import backend_url

    url = backend_url("redis", tmp_path, REDIS_DB)
    key = Queue(url).lanes["train"].queue_key
    client = redis.Redis.from_url(url)
    client.delete(key)
    for job_id in ("old1", "old2"):  # huey's RedisStorage: LPUSH, oldest on the right
        client.lpush(key, json.dumps({"job": job_id}))
    queue = Queue(url)
    queue.ping()
    assert client.type(key) == b"zset"
    queue.push("new", "train", priority=10)
    assert [queue.pop("train") for _ in range(4)] == ["new", "old1", "old2", None]
