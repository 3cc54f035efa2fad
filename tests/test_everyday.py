"""The seed's own commands as it spells them, and budgets that mean what users mean."""

from __future__ import annotations

import json
import subprocess

from tlm import checkpoint, metrics

from conftest import tlm_cmd
from queue_helpers import TINY, registry, submit, tlm, wait_for

REDIS_DB = 8


def test_a_spent_budget_is_refused_at_once_and_more_trains_on(url, workers, save_dir):
    workers.start()
    args = ["train", "--save_dir", str(save_dir), *TINY, "--num_iters", "10", "--steps_per_eval", "10"]
    wait_for(url, submit(url, *args), ["succeeded"])
    again = tlm("submit", *args, "--queue", url)  # the same budget: nothing left to train
    assert again.returncode == 2 and "is at iteration 10 of --num_iters 10: nothing to train" in again.stderr
    assert "--more" in again.stderr and len(registry(url).jobs(None)) == 1  # nothing queued
    local = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "10")
    assert local.returncode == 2 and "nothing to train" in local.stderr and "valid loss" not in local.stderr
    more = submit(url, *args[:-4], "--more", "5")
    job = wait_for(url, more, ["succeeded"])
    assert job.result["step"] == 15 and checkpoint.find(save_dir).step == 15
    assert registry(url).get(more).params["num_iters"] == 15 and "more" not in job.params  # pinned
    bad = tlm("submit", *args[:-4], "--more", "soon", "--queue", url)
    assert bad.returncode == 2 and "--more 'soon': give minutes (2m) or steps (500)" in bad.stderr


def test_an_attempt_that_saved_its_last_step_unpublished_is_finished_by_the_next(url, workers, save_dir):
    """A crash (or an outage) between the final save and its publication: the next attempt
    finds the budget spent and finishes the job instead of refusing it."""
    args = ["train", "--save_dir", str(save_dir), *TINY, "--num_iters", "10", "--steps_per_eval", "10"]
    job_id, reg = submit(url, *args), registry(url)
    held = reg.claim(job_id, "a-worker-that-died")  # the first attempt: it trains and saves...
    local = subprocess.run(tlm_cmd(*args), capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    assert reg.requeue(job_id, held.fence, "its worker died", interrupted=False).attempts == 1  # ...and dies
    workers.start()
    job = wait_for(url, job_id, ["succeeded", "failed"])
    assert (job.state, job.attempts, job.result["step"]) == ("succeeded", 2, 10), job.error
    assert job.checkpoint == checkpoint.find(save_dir).identifier


def test_more_minutes_count_from_where_the_run_stands(save_dir):
    base = ["train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000", "--steps_per_eval", "100000"]
    first = subprocess.run(tlm_cmd(*base, "--time_budget", "0.05"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    said = [line for line in first.stderr.splitlines() if "ended the run at iteration" in line]
    assert len(said) == 1 and "of --num_iters 100000" in said[0], first.stderr  # the cap said, once
    spent = checkpoint.find(save_dir)
    second = subprocess.run(tlm_cmd(*base, "--time_budget", "0.05"), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "has trained" in second.stderr and "nothing to train" in second.stderr
    third = subprocess.run(tlm_cmd(*base, "--more", "0.05m"), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    after = checkpoint.find(save_dir)
    assert after.step > spent.step and after.state["elapsed"] >= spent.state["elapsed"] + 2.5


def test_following_a_job_always_ends_with_its_final_line(url, workers, save_dir):
    workers.start()
    for i in range(3):
        job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", str(5 * (i + 1)),
                        "--steps_per_eval", "5")
        proc = tlm("logs", job_id, "--follow", "--queue", url)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1].split(" ", 1)[1].startswith(
            f"succeeded at iteration {5 * (i + 1)}, checkpoint "), proc.stdout[-500:]
    listed = json.loads(tlm("status", "--json", "--queue", url).stdout)
    assert all(j["state"] == "succeeded" for j in listed["jobs"])


def test_inspect_plot_and_eval_take_a_run_name_and_say_it_readably(save_dir, tmp_path):
    import os
    import signal

    root = save_dir.parent
    trained = subprocess.run(tlm_cmd("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "5"),
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    env = {**os.environ, "TLM_SAVE_ROOT": str(root)}
    shown = subprocess.run(tlm_cmd("inspect", "--run", save_dir.name), capture_output=True, text=True,
                           env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("identifier:     ") and "configuration:" in lines
    assert any(line.split() == ["--dim", "32"] for line in lines)  # one flag per line, aligned
    plotted = subprocess.run(tlm_cmd("plot", save_dir.name, "-o", str(tmp_path / "c.png")),
                             capture_output=True, text=True, env=env, timeout=120)
    assert plotted.returncode == 0 and (tmp_path / "c.png").stat().st_size > 0, plotted.stderr
    missing = subprocess.run(tlm_cmd("plot", "nosuchrun"), capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "neither a directory nor a run under" in missing.stderr
    evaluated = subprocess.run(tlm_cmd("eval", "--run", save_dir.name, "--tokens", "200"),
                               capture_output=True, text=True, env=env, timeout=120)
    assert evaluated.returncode == 0 and "valid loss" in evaluated.stdout, evaluated.stderr
    exported = subprocess.run(tlm_cmd("export", "--run", save_dir.name, "--out", str(tmp_path / "mlx")),
                              capture_output=True, text=True, env=env, timeout=120)
    assert exported.returncode == 0 and (tmp_path / "mlx" / "config.json").is_file(), exported.stderr
    sampled = subprocess.run(tlm_cmd("sample", "--run", save_dir.name, "--local", "--max_tokens", "5"),
                             capture_output=True, text=True, env=env, timeout=120)
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr
    both = subprocess.run(tlm_cmd("eval", "--run", save_dir.name, "--save_dir", str(save_dir)),
                          capture_output=True, text=True, env=env, timeout=60)
    assert both.returncode == 2 and "give --run or --save_dir, not both" in both.stderr
    # A queued sample with no worker alive says so at once, and Ctrl+C gives up on it.
    url = f"sqlite://{tmp_path / 'queue.db'}"
    proc = subprocess.Popen(tlm_cmd("sample", "--save_dir", str(save_dir), "--prompt", "the", "--queue", url),
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    said = [proc.stderr.readline() for _ in range(2)]
    assert "no worker is alive to answer it: start one (`tlm-worker`)" in said[1], said
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "gave up waiting" in err


def test_tlm_runs_lists_every_run_with_its_best_metric(url, workers, save_dir, tmp_path):
    workers.start()
    chars = tmp_path / "chars"
    for args in (["--save_dir", str(save_dir), "--num_iters", "10"],
                 ["--save_dir", str(chars), "--dataset", "shakespeare", "--num_iters", "10"]):
        wait_for(url, submit(url, "train", *args, *TINY, "--steps_per_eval", "5"), ["succeeded"])
    listed = json.loads(tlm("runs", "--json", "--queue", url).stdout)
    assert {r["run"] for r in listed} == {str(save_dir), str(chars)}
    row = next(r for r in listed if r["run"] == str(save_dir))
    best = min(r["loss"] for r in metrics.read(save_dir) if r["kind"] == "valid")
    assert row["best_valid"] == best and row["dataset"] == "ptb" and row["dim"] == 32 and row["steps"] == 10
    only = json.loads(tlm("runs", "--json", "--dataset", "shakespeare", "--queue", url).stdout)
    assert [r["run"] for r in only] == [str(chars)]
    csv_text = tlm("runs", "--csv", "--queue", url).stdout.splitlines()
    assert csv_text[0].startswith("run,dataset,dim") and len(csv_text) == 3
    table = tlm("runs", "--queue", url)
    assert table.returncode == 0 and "best valid" in table.stdout
