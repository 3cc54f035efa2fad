"""Values a stranger (another tlm, a script, `redis-cli hset`) planted in a shared lab: every
reader survives them, and no worker dies of one. Records are checked to their nested fields
once (``Job.decode``); metrics files and probe files are read as regular, bounded files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from queue_helpers import TINY, Workers, registry, tlm

REDIS_DB = 7

# (field, value): each planted over a job record through the store, as `redis-cli hset` would.
PLANTED = [
    ("needs", {"memory": "24G"}),
    ("needs", {"labels": "room"}),
    ("members", [1]),
    ("members", [{"worker": "w"}]),
    ("sweep", {"trial": "x"}),
    ("followers", [3]),
    ("result", {"samples": "abc"}),
    ("params", {"prompt": 5, "sampling": {}}),  # a kind's params hold what its params class says
    ("params", {"sampling": {}}),
]
ODD_PROGRESS = [{"step": 5}, {"step": 5, "total": 9, "train_loss": "abc"}, {"best_valid": "x", "elapsed": "x"},
                {"step": "5", "val_metric": 3.0}, {"counts": {"a": "b"}, "best": {"loss": "x"}}]


@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_planted_fields_fail_one_job_and_every_reader_survives(url, tmp_path):
    reg = registry(url)
    bad = []
    for field, value in PLANTED:
        job = reg.create("sample", {"prompt": "x", "sampling": {}, "save_dir": str(tmp_path)},
                         f"dir:{tmp_path}", needs={"memory": 1})
        reg.store.set_fields(job.id, {field: value})
        bad.append(job.id)
    odd = []
    for progress in ODD_PROGRESS:
        job = reg.create("train", {"save_dir": str(tmp_path / f"r{len(odd)}")}, f"dir:{tmp_path}/r{len(odd)}")
        reg.cancel(job.id)
        reg.store.set_fields(job.id, {"progress": progress})
        odd.append(job.id)
    # Readers: the registry, the claim, `tlm status` (table, one job, --all), `tlm runs`.
    listed = {j.id for j in reg.jobs(limit=None)}
    assert set(odd) <= listed and not set(bad) & listed, "odd progress is read; bad fields are skipped"
    assert "memory" in str(reg.skipped[bad[0]]) and "labels" in str(reg.skipped[bad[1]])
    assert reg.claim_next("interactive", "w", {"memory_available": 2**40}) is None
    for args in (["status"], ["status", "--all"], ["status", odd[1]], ["runs"]):
        proc = tlm(*args, "--queue", url)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert f"{odd[0]}" in tlm("status", "--all", "--queue", url).stdout
    # A worker fails each bad record in one line (and lives on).
    workers = Workers(url, tmp_path)
    try:
        w = workers.start("--burst")
        w.wait(timeout=120)
        log = workers.log(w)
        assert "Traceback" not in log, log
        for job_id in bad:
            assert f"failed job record {job_id!r}" in log, log
    finally:
        workers.stop_all()


def test_odd_metrics_files_never_hang_or_break_a_listing(tmp_path):
    root = tmp_path / "root"
    lines = ['{"kind": "valid", "step": 1, "loss": "x"}', '{"kind": "valid", "step": 2, "loss": null}',
             '{"kind": "valid", "step": 3, "loss": 2.5, "elapsed": "x"}', "[" * 30000,
             '{"kind": "valid", "step": 4, "loss": 2.0}']
    (root / "text").mkdir(parents=True)
    (root / "text" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (root / "folder" / "metrics.jsonl").mkdir(parents=True)
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "metrics.jsonl")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "metrics.jsonl").write_text(lines[-1] + "\n")
    os.mkfifo(root / "ckpt" / ("a" * 40 + ".safetensors"))
    proc = subprocess.run([sys.executable, "-m", "tlm_cli.main", "runs", "--json", "--save_root", str(root),
                           "--queue", f"sqlite://{tmp_path / 'q.db'}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = {r["run"]: r for r in json.loads(proc.stdout)}
    assert rows["text"]["best_valid"] == 2.0 and rows["ckpt"]["best_valid"] == 2.0


@pytest.mark.parametrize("seam,value,message", [
    ("TLM_FAKE_CAPABILITIES", "{not json", "TLM_FAKE_CAPABILITIES is not JSON"),
    ("TLM_FAKE_CAPABILITIES", '{"memory_available": "lots"}', "memory_available is str, not int"),
    ("TLM_FAKE_CAPABILITIES", "[1]", "is list, not an object"),
])
def test_a_garbage_capabilities_seam_is_one_line_naming_it(seam, value, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tlm_worker.main", "--queue", f"sqlite://{tmp_path / 'q.db'}",
                           "--burst"], capture_output=True, text=True, timeout=60, env={**os.environ, seam: value})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last and "queue" not in last, proc.stderr


@pytest.mark.parametrize("content", ['{"on_battery": "maybe", "idle_seconds": true}', "/dev/zero", "fifo", "[1]"])
def test_a_garbage_power_probe_reads_as_no_probe(content, tmp_path):
    from tlm_worker.power import FileProbe
    path = tmp_path / "probe.json"
    if content == "/dev/zero":
        path = "/dev/zero"
    elif content == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(content)
    probe = FileProbe(str(path))
    assert probe.on_battery() is None and probe.idle_seconds() is None


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_a_burst_worker_exits_naming_what_the_jobs_left_need(url, tmp_path):
    from queue_helpers import submit
    job = submit(url, "train", *TINY, "--num_iters", "2", "--save_dir", str(tmp_path / "r"),
                 "--needs", "memory=1000T").split()[0]
    proc = subprocess.run([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--burst"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (f"nothing left this worker can run: 1 job(s) wait for another worker (job {job} needs "
            "1,000.0 TiB of memory): exiting (--burst)") in proc.stderr, proc.stderr
    assert registry(url).get(job).state == "queued"


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_then_export_onto_a_folder_of_the_users_fails_and_leaves_it_alone(url, tmp_path, mirror):
    from queue_helpers import submit, wait_for
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text('{"mine": true}')
    train = submit(url, "train", *TINY, "--dataset", "shakespeare", "--num_iters", "2",
                   "--save_dir", str(tmp_path / "r"), "--then", f"export:{busy}").split()[0]
    workers = Workers(url, tmp_path)
    try:
        workers.start("--burst").wait(timeout=300)
    finally:
        workers.stop_all()
    reg = registry(url)
    export = reg.get(train).followers[0]
    ended = wait_for(url, export, ["failed"], timeout=10)
    assert "is not empty and not an earlier export" in ended.error
    assert (busy / "config.json").read_text() == '{"mine": true}'
