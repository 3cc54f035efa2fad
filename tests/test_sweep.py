"""tlm sweep: Optuna over real queued training jobs, real workers, both backends, tiny models."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tlm import checkpoint, metrics

from queue_helpers import registry, tlm, until, wait_for

REDIS_DB = 9
TRIAL = ["--flag", "dataset=shakespeare", "--flag", "dim=32", "--flag", "num_heads=2",
         "--flag", "num_blocks=1", "--flag", "context_size=16", "--flag", "batch_size=8",
         "--flag", "eval_tokens=400", "--flag", "steps_per_eval=5", "--flag", "steps_per_report=5"]


def sweep(url: str, name: str, *args: str) -> str:
    proc = tlm("sweep", "submit", "--name", name, *TRIAL, "--queue", url, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def board(url: str, name: str) -> dict:
    proc = tlm("sweep", "status", name, "--json", "--queue", url)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def finished(url: str, sweep_id: str, timeout: float = 300) -> None:
    wait_for(url, sweep_id, ["succeeded", "cancelled", "failed"], timeout=timeout)


def test_an_asha_sweep_prunes_some_trials_and_its_best_command_reproduces_the_winner(url, workers, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for _ in range(2):
        workers.start("--save_root", str(root))
    sweep_id = sweep(url, "asha", "--search", "learning_rate=log:1e-4:3e-1", "--search", "dim=16,32",
                     "--trials", "8", "--parallel", "2", "--budget", "30", "--prune", "asha",
                     "--sampler", "random", "--seed", "3")
    finished(url, sweep_id)
    data = board(url, "asha")
    rows = data["trials"]
    assert data["sweep"]["state"] == "succeeded" and len(rows) == 8
    states = [r["state"] for r in rows]
    assert "pruned" in states and "succeeded" in states and set(states) <= {"pruned", "succeeded"}
    # The leaderboard's best is the best validation loss in the trials' own metrics files.
    best_in_files = min(r["loss"] for row in rows for r in metrics.read(root / row["run"])
                        if r["kind"] == "valid")
    assert rows[0]["best"] == pytest.approx(best_in_files, rel=1e-9)
    assert all(not (root / r["run"] / "datasets").exists() for r in rows)  # one prepared copy, shared
    assert len({(root / r["run"]).parent for r in rows}) == 1 and (root / rows[0]["run"]).parent.joinpath(
        "datasets").is_dir()
    pruned = next(r for r in rows if r["state"] == "pruned")
    assert checkpoint.find(root / pruned["run"]) is not None and pruned["steps"] < 30  # kept, stopped early
    # `tlm sweep best` prints a command that trains the winner's configuration.
    proc = tlm("sweep", "best", "asha", "--preset-out", str(tmp_path / "best.json"), "--queue", url)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().split()
    assert command[:3] == ["tlm", "submit", "train"]
    winner = checkpoint.find(root / rows[0]["run"]).state["config"]
    again = [a if a != "NAME" else "rerun" for a in command[3:]]
    rerun = tlm("submit", "train", *again, "--queue", url)
    assert rerun.returncode == 0, rerun.stderr
    wait_for(url, rerun.stdout.strip(), ["succeeded"], timeout=180)
    trained = checkpoint.find(root / "rerun").state["config"]
    for flag in ("learning_rate", "dim", "num_iters", "dataset", "steps_per_eval"):
        assert trained[flag] == winner[flag], flag
    preset = json.loads((tmp_path / "best.json").read_text())
    assert preset["learning_rate"] == winner["learning_rate"]
    listed = tlm("submit", "train", "--preset", str(tmp_path / "best.json"), "--run", "from-preset",
                 "--queue", url)
    assert listed.returncode == 0, listed.stderr


def test_promotion_asha_pauses_trials_at_rungs_and_resumes_the_best_from_their_checkpoints(url, workers, tmp_path):
    """--prune asha (the default): a trial at a rung that is not in the top third of those that
    reached it saves and pauses (the first always: it is alone there); once it is in the top
    third, its sweep queues it again and it resumes from its checkpoint; with nothing else to
    run, the leader trains on to the whole budget; the ones still paused when the sweep ends
    end pruned, their checkpoints kept. The grid's order for seed 1 puts the good rate first."""
    root = tmp_path / "root"
    root.mkdir()
    workers.start("--save_root", str(root))
    sweep_id = sweep(url, "promo", "--search", "learning_rate=3e-3,1e-5,2e-5", "--flag", "lr_warmup=1",
                     "--trials", "3", "--parallel", "1", "--budget", "45", "--sampler", "grid", "--seed", "1")
    finished(url, sweep_id)
    reg, rows = registry(url), board(url, "promo")["trials"]
    by_trial = {r["trial"]: r for r in rows}
    assert reg.get(sweep_id).state == "succeeded"
    assert [by_trial[n]["state"] for n in range(3)] == ["succeeded", "pruned", "pruned"], rows
    assert by_trial[0]["params"]["learning_rate"] == 0.003
    logs = {n: "\n".join(reg.logs(by_trial[n]["job"])[0]) for n in range(3)}
    assert "rung at step 5: 1 of 1, not in the top 1/3 (0 go on): saved, pausing" in logs[0]  # never first past the post
    assert "rung at step 5: 3 of 3, not in the top 1/3 (1 go on)" in logs[2], logs[2]
    said = "\n".join(reg.logs(sweep_id)[0])
    assert "trial 0 promoted past step 5\n" in said + "\n" and "trial 0 promoted past step 15 (the leader" in said
    assert logs[0].count("promoted: queued to resume") == 2 and logs[0].count("new model") == 1
    assert logs[0].count("resuming ") == 2 and "succeeded at iteration 45" in logs[0]
    steps = [r["step"] for r in metrics.read(root / by_trial[0]["run"]) if r["kind"] == "valid"]
    assert steps == list(range(5, 50, 5)), steps  # each evaluation once: resumed, never repeated
    for n in (1, 2):  # paused at the first rung when the sweep ended: pruned, their checkpoints kept
        assert by_trial[n]["steps"] == 5 and checkpoint.find(root / by_trial[n]["run"]).step == 5
    # Optuna learned from each pause as it happened (told pruned); each promotion went on as a
    # new Optuna trial of the same flags, the last one complete.
    from tlm_worker.sweeps import SweepSpec, study
    told = study(reg, sweep_id, SweepSpec.from_dict(reg.get(sweep_id).params)).get_trials(deepcopy=False)
    assert sorted(t.state.name for t in told) == ["COMPLETE"] + ["PRUNED"] * 4, told
    final = told[reg.get(by_trial[0]["job"]).sweep["number"]]
    assert final.state.name == "COMPLETE" and final.user_attrs["passed"] == 15 and final.params == {"learning_rate": 0.003}
    # The winner trained on from where it stands (its own run, its checkpoint), not from scratch.
    proc = tlm("sweep", "best", "promo", "--train-on", "15", "--queue", url)
    assert proc.returncode == 0, proc.stderr
    on = wait_for(url, proc.stdout.strip(), ["succeeded"], timeout=120)
    assert on.run == f"run:{by_trial[0]['run']}" and on.result["step"] == 60
    log = "\n".join(reg.logs(on.id)[0])
    assert "resuming " in log and "at iteration 45" in log and "new model" not in log, log
    bad = tlm("sweep", "best", "promo", "--train-on", "soon", "--queue", url)
    assert bad.returncode == 2 and "--more 'soon'" in bad.stderr, bad.stderr


def test_a_worker_killed_while_trials_pause_and_resume_loses_none_and_tells_optuna_each_once(url, workers, tmp_path):
    """Promotion ASHA under a SIGKILL: a worker dies while its trial trains between rungs and
    others sit paused; its trial is re-queued and resumes; every trial ends once (succeeded or
    pruned, none left paused or running), each tells Optuna once, and the paused ones' runs
    were never trained by two workers (one trainer per run: no evaluation step twice)."""
    from optuna.trial import TrialState
    from tlm_worker.sweeps import SweepSpec, study
    root = tmp_path / "root"
    root.mkdir()
    first = workers.start("--save_root", str(root), lease=3)
    workers.start("--save_root", str(root), lease=3)
    sweep_id = sweep(url, "kill", "--search", "learning_rate=log:1e-4:3e-2", "--flag", "lr_warmup=1",
                     "--trials", "6", "--parallel", "2", "--budget", "135", "--sampler", "random", "--seed", "5")
    reg = registry(url)
    until(lambda: any(j.state == "paused" for j in reg.jobs(None) if j.sweep), 120, "a paused trial")
    until(lambda: any(j.state == "running" and j.worker and j.progress.get("step", 0) > 5
                      for j in reg.jobs(None) if j.sweep), 120, "a trial training past a rung")
    first.send_signal(signal.SIGKILL)  # a Mac that died mid-trial, whatever it held
    first.wait()
    workers.start("--save_root", str(root), lease=3)
    finished(url, sweep_id, timeout=400)
    rows = board(url, "kill")["trials"]
    assert reg.get(sweep_id).state == "succeeded" and sorted(r["trial"] for r in rows) == list(range(6))
    assert {r["state"] for r in rows} <= {"succeeded", "pruned"} and "succeeded" in {r["state"] for r in rows}
    for row in rows:
        steps = [r["step"] for r in metrics.read(root / row["run"]) if r["kind"] == "valid"]
        assert steps == sorted(set(steps)), (row["trial"], steps)
    told = study(reg, sweep_id, SweepSpec.from_dict(reg.get(sweep_id).params)).get_trials(deepcopy=False)
    assert not [t for t in told if t.state == TrialState.RUNNING]
    by_number = {t.number: t.state for t in told}
    for row in rows:
        number = reg.get(row["job"]).sweep["number"]
        assert by_number[number] == (TrialState.COMPLETE if row["state"] == "succeeded" else TrialState.PRUNED)


def test_trials_added_and_a_cancel_while_trials_sit_paused(url, workers, tmp_path):
    """`tlm sweep add` while a trial is paused grows the sweep; `tlm sweep cancel` then ends the
    paused trials at once (cancelled, checkpoints kept) and the running ones after a save."""
    root = tmp_path / "root"
    root.mkdir()
    workers.start("--save_root", str(root))
    sweep_id = sweep(url, "hold", "--search", "learning_rate=log:1e-4:3e-2", "--trials", "3",
                     "--parallel", "1", "--budget", "100000", "--sampler", "random", "--seed", "2")
    reg = registry(url)
    until(lambda: any(j.state == "paused" for j in reg.jobs(None) if j.sweep), 120, "a paused trial")
    proc = tlm("sweep", "add", "hold", "2", "--queue", url)
    assert proc.returncode == 0 and "5 trials in all" in proc.stderr, proc.stderr
    until(lambda: sum(j.state == "paused" for j in reg.jobs(None) if j.sweep) >= 2, 120, "two paused trials")
    shown = tlm("status", "--queue", url).stdout
    assert "paused" in shown and "paused" in tlm("sweep", "status", "hold", "--queue", url).stdout, shown
    assert tlm("sweep", "cancel", "hold", "--queue", url).returncode == 0
    finished(url, sweep_id, timeout=120)
    rows = board(url, "hold")["trials"]
    assert reg.get(sweep_id).state == "cancelled" and {r["state"] for r in rows} == {"cancelled"}, rows
    for row in rows:
        assert checkpoint.find(root / row["run"]) is not None
    assert "cancelled: every trial saved and stopped" in "\n".join(reg.logs(sweep_id)[0])


def test_the_same_spec_and_seed_propose_the_same_parameters_in_the_same_order(url):
    args = ["--search", "learning_rate=log:1e-4:1e-1", "--search", "dropout=0:0.3",
            "--search", "num_blocks=1:3", "--trials", "4", "--parallel", "4", "--budget", "20",
            "--prune", "none", "--seed", "7"]
    proposals = []
    for name in ("same-a", "same-b", "other-seed"):
        extra = ["--seed", "8"] if name == "other-seed" else []
        sweep(url, name, *args, *extra)
        proposals.append([r["params"] for r in sorted(board(url, name)["trials"], key=lambda r: r["trial"])])
    assert proposals[0] == proposals[1] and len(proposals[0]) == 4
    assert proposals[0] != proposals[2]
    assert all(isinstance(p["num_blocks"], int) and 1 <= p["num_blocks"] <= 3 for p in proposals[0])


@pytest.mark.parametrize("args, says", [
    (["--search", "nope=1:2"], "'nope' is not a training flag"),
    (["--search", "learning_rate=0.1:0.01"], "the range is empty"),
    (["--search", "dim=wide,narrow"], "'wide' is not a int"),
    (["--search", "learning_rate=log:0:1"], "a log range must be above 0"),
    (["--search", "optimizer=0:1"], "--optimizer takes str, not a range"),
    (["--search", "learning_rate=1e-3:1e-2", "--budget", "3"], "reaches no evaluation before the end"),
    (["--search", "learning_rate=1e-3:1e-2", "--budget", "soon"], "give minutes (10m) or steps"),
    (["--search", "learning_rate=1e-3:1e-2", "--prune", "median"], "--prune 'median': choose from"),
    (["--search", "learning_rate=1e-3:1e-2", "--sampler", "grid"], "grid searches choices only"),
    (["--search", "dim=30,32"], "a trial's flags would be refused"),
    ([], "nothing to search"),
    (["--search", "dropout=0:inf"], "'inf' is not a finite number"),
    # Issue 40: one parser of flag values as text, one set of words for true and false.
    (["--search", "tie_embeddings=maybe,true"], "'maybe' is not a bool"),
    (["--search", "dropout=0:0.3", "--flag", "tie_embeddings=maybe"], "--flag tie_embeddings=maybe: expected bool"),
    (["--search", "dropout=0:5"], "(--dropout 5.0): --dropout must be in [0, 1)"),
    (["--search", "num_heads=1:7"], "(--num_heads 7): --dim 32 is not divisible by --num_heads 7"),
    (["--search", "optimizer=adamw,bogus"], "(--optimizer bogus): unknown --optimizer 'bogus'"),
    (["--search", "dropout=0:0.3", "--flag", "steps_per_eval=100000", "--flag", "num_iters=100000",
      "--flag", "time_budget=0.15"], "a trial (at most 100000 steps, or its time budget) reaches no evaluation"),
])
def test_a_spec_that_cannot_run_is_refused_in_one_line_and_queues_nothing(url, args, says):
    proc = tlm("sweep", "submit", "--name", "bad", *TRIAL, "--queue", url, *args)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert registry(url).jobs(None) == []


@pytest.mark.parametrize("line, says", [
    ('seed = "x"', "seed is str, not int"), ('trials = "many"', "trials is str, not int"),
    ("name = 123", "name is int, not str"), ("search = 5", "search is int, not a list"),
    ('flags = "x"', "flags is str, not an object"), ("trials = 100000", "--trials must be in [1, 10000]"),
    ("parallel = 1000000", "--parallel in [1, 1000]"),
])
def test_a_toml_spec_of_the_wrong_types_is_one_line(line, says, tmp_path):
    spec = tmp_path / "sweep.toml"
    given = dict(kv.split(" = ", 1) for kv in ['name = "t"', 'search = ["dropout=0:0.3"]', line])
    spec.write_text("".join(f"{k} = {v}\n" for k, v in given.items()))
    url = f"sqlite://{tmp_path / 'q.db'}"
    proc = tlm("sweep", "submit", str(spec), *TRIAL, "--queue", url)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert says in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_a_sweep_from_a_toml_file_and_a_name_used_twice(url, tmp_path):
    spec = tmp_path / "sweep.toml"
    spec.write_text('name = "from-file"\ntrials = 2\nparallel = 1\nbudget = "20"\nprune = "none"\n'
                    '[search]\nlearning_rate = "log:1e-4:1e-2"\n'
                    '[flags]\ndataset = "shakespeare"\ndim = 32\nnum_heads = 2\nnum_blocks = 1\n'
                    'context_size = 16\nbatch_size = 8\n')
    proc = tlm("sweep", "submit", str(spec), "--queue", url)
    assert proc.returncode == 0, proc.stderr
    rows = board(url, "from-file")["trials"]
    assert len(rows) == 1 and set(rows[0]["params"]) == {"learning_rate"}
    again = tlm("sweep", "submit", str(spec), "--queue", url)
    assert again.returncode == 1 and "a sweep named from-file exists already" in again.stderr
    status = tlm("status", "--queue", url)
    assert "trials of 2: 1 queued" in status.stdout
    table = tlm("sweep", "status", "from-file", "--queue", url).stdout
    assert "(running; 1 of 2 trials: 1 queued)" in table and "worker time" in table and "worker s " not in table


def test_cancel_stops_every_trial_after_a_save_and_starts_no_new_one(url, workers, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    workers.start("--save_root", str(root))
    sweep_id = sweep(url, "stop", "--search", "learning_rate=log:1e-4:1e-2", "--trials", "6",
                     "--parallel", "2", "--budget", "100000", "--prune", "none")
    reg = registry(url)
    running = wait_for(url, f"{sweep_id[:7]}t0000", ["running"], until=lambda j: j.checkpoint)
    proc = tlm("sweep", "cancel", "stop", "--queue", url)
    assert proc.returncode == 0, proc.stderr
    finished(url, sweep_id, timeout=120)
    rows = board(url, "stop")["trials"]
    assert len(rows) == 2 and {r["state"] for r in rows} == {"cancelled"}
    ended = reg.get(sweep_id)
    assert ended.state == "cancelled" and ended.error is None  # a cancel is not an error
    assert ended.progress["counts"] == {"cancelled": 2}  # its row says how it ended, not "2 running"
    assert checkpoint.find(root / rows[0]["run"]) is not None and running.id in {r["job"] for r in rows}
    time.sleep(3)
    assert len(board(url, "stop")["trials"]) == 2  # nothing new started


def test_workers_killed_and_stopped_mid_sweep_lose_no_trial_and_run_none_twice(url, workers, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    first = workers.start("--save_root", str(root), lease=3)
    second = workers.start("--save_root", str(root), lease=3)
    sweep_id = sweep(url, "faults", "--search", "learning_rate=log:1e-3:1e-2", "--trials", "6",
                     "--parallel", "2", "--budget", "200", "--prune", "none")
    reg = registry(url)

    def training() -> list:
        return [j for j in reg.jobs(None) if j.sweep and j.state == "running" and j.progress.get("step", 0) >= 5]
    deadline = time.time() + 120
    while len(training()) < 2 and time.time() < deadline:  # both workers mid-trial
        time.sleep(0.1)
    held = training()
    assert len(held) == 2
    pids = {w["id"]: w["pid"] for w in reg.workers()}
    victim = next(p for p in (first, second) if p.pid == pids[held[0].worker])
    stopped = second if victim is first else first
    victim.send_signal(signal.SIGKILL)  # a Mac that died mid-trial
    victim.wait()
    stopped.send_signal(signal.SIGTERM)  # a worker stopped: its trial saves and goes back to the queue
    stopped.wait(60)
    for _ in range(2):
        workers.start("--save_root", str(root), lease=3)
    finished(url, sweep_id, timeout=300)
    rows = board(url, "faults")["trials"]
    assert sorted(r["trial"] for r in rows) == list(range(6))  # every trial once, none lost
    assert {r["state"] for r in rows} == {"succeeded"}
    reg = registry(url)
    for row in rows:  # each trial trained to its budget, resumed where a fault stopped it
        assert checkpoint.find(root / row["run"]).step == 200 and row["steps"] == 200
    assert sum(reg.get(r["job"]).attempts + reg.get(r["job"]).interruptions for r in rows) > 6
    from optuna.trial import TrialState
    from tlm_worker.sweeps import SweepSpec, study
    told = study(reg, sweep_id, SweepSpec.from_dict(reg.get(sweep_id).params)).get_trials(
        states=(TrialState.COMPLETE,))
    assert sorted(t.number for t in told) == sorted(reg.get(r["job"]).sweep["number"] for r in rows)
    assert len(told) == 6  # each told once: none counted twice


def test_a_sweep_whose_study_is_gone_ends_failed_and_one_whose_spec_was_edited_still_cancels(url, workers, tmp_path):
    """The Optuna journal deleted mid-sweep (its Redis keys, or the file beside the SQLite
    queue): the sweep fails with its reason; a spec edited in the record: cancel still ends it."""
    import redis as redis_lib
    root = tmp_path / "root"
    root.mkdir()
    workers.start("--save_root", str(root))
    gone = sweep(url, "gone", "--search", "learning_rate=log:1e-4:1e-2", "--trials", "4",
                 "--parallel", "1", "--budget", "100000", "--prune", "none")
    if url.startswith("redis"):
        r = redis_lib.Redis.from_url(url)
        r.delete(*r.keys(f"tlm:optuna:{gone}:*"))
    else:
        (tmp_path / "queue.db.optuna" / f"{gone}.log").write_text("{not json\n")
    ended = wait_for(url, gone, ["failed"], timeout=120)
    assert "cannot drive the sweep" in ended.error, ended.error
    workers.stop_all()  # else a worker may read the edited spec first and fail the sweep before the cancel
    edited = sweep(url, "edited", "--search", "learning_rate=log:1e-4:1e-2", "--trials", "4",
                   "--parallel", "1", "--budget", "100000", "--prune", "none")
    reg = registry(url)
    reg.store.set_fields(edited, {"params": {**reg.get(edited).params, "seed": "x"}})
    proc = tlm("sweep", "cancel", "edited", "--queue", url)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    wait_for(url, edited, ["cancelled"], timeout=120)


def test_a_damaged_journal_fails_the_sweep_and_its_trial_trains_on_stops_at_one_signal_and_keeps_its_sweep(
        url, workers, tmp_path):
    """A journal entry missing (Redis: Optuna waits for it forever, deaf to signals) or not JSON
    (the file): the sweep fails with its reason, its running trial trains on as an ordinary job,
    ``tlm prune --older_than 0`` keeps the ended sweep while that trial lives, and one SIGINT
    to its worker saves and re-queues it."""
    import redis as redis_lib
    root = tmp_path / "root"
    root.mkdir()
    worker = workers.start("--save_root", str(root))
    sweep_id = sweep(url, "damaged", "--search", "learning_rate=log:1e-4:1e-2", "--trials", "2",
                     "--parallel", "1", "--budget", "100000", "--prune", "asha-stop")
    trial = wait_for(url, f"{sweep_id[:7]}t0000", ["running"], until=lambda j: j.progress.get("step", 0) >= 10)
    if url.startswith("redis"):
        redis_lib.Redis.from_url(url).incr(f"tlm:optuna:{sweep_id}:log_number")  # an entry never written
    else:
        with open(tmp_path / "queue.db.optuna" / f"{sweep_id}.log", "a") as f:
            f.write("{not json\n")
    ended = wait_for(url, sweep_id, ["failed"], timeout=120)
    assert "cannot drive the sweep" in ended.error, ended.error
    reg = registry(url)
    step = reg.get(trial.id).progress["step"]
    until(lambda: reg.get(trial.id).progress["step"] >= step + 20, timeout=60, what="the trial trains on")
    assert tlm("prune", "--older_than", "0", "--queue", url).returncode == 0
    assert reg.get(sweep_id).state == "failed"  # kept: its trial still belongs to it
    worker.send_signal(signal.SIGINT)
    assert worker.wait(60) == 0
    job = reg.get(trial.id)
    assert job.state == "interrupted" and job.checkpoint, job
    assert any("cannot be read" in line for line in reg.logs(trial.id)[0])


@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_parallel_is_never_exceeded_while_many_workers_drive_the_sweep(url, workers, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for _ in range(4):
        workers.start("--save_root", str(root), "--concurrency", "2", lease=2)
    sweep_id = sweep(url, "wide", "--search", "learning_rate=log:1e-4:1e-2", "--trials", "10",
                     "--parallel", "3", "--budget", "20", "--prune", "none")
    reg, most = registry(url), 0
    deadline = time.time() + 300
    while reg.get(sweep_id).state == "running" and time.time() < deadline:
        live = [j for j in reg.jobs(None) if j.sweep and j.state in ("queued", "running", "interrupted")]
        most = max(most, len(live))
        time.sleep(0.05)
    assert reg.get(sweep_id).state == "succeeded" and 1 <= most <= 3, most


def test_a_winner_that_cooled_down_trains_on_from_before_its_cooldown(url, workers, tmp_path):
    """--train-on for a run with --lr_cooldown: retention kept its last checkpoint before the
    cooldown; the job branches there (the newer checkpoints and their metrics set aside, nothing
    deleted), trains the more plus the span it branched back over, and after an interruption
    resumes its own newest checkpoint, never the named one again."""
    root = tmp_path / "root"
    root.mkdir()
    first = workers.start("--save_root", str(root))
    sweep_id = sweep(url, "cool", "--search", "learning_rate=log:1e-3:3e-3", "--flag", "lr_warmup=1",
                     "--flag", "lr_cooldown=0.5", "--trials", "1", "--parallel", "1", "--budget", "30",
                     "--prune", "none", "--sampler", "random")
    finished(url, sweep_id)
    run = root / board(url, "cool")["trials"][0]["run"]
    kept = dict(checkpoint.listed(run))  # step -> identifier: the cooldown began after step 15
    assert sorted(kept) == [15, 30], kept
    proc = tlm("sweep", "best", "cool", "--train-on", "2000", "--queue", url)
    assert proc.returncode == 0, proc.stderr
    reg = registry(url)
    job_id = proc.stdout.strip()
    until(lambda: reg.get(job_id).progress.get("step", 0) >= 60, 120, "the branch past step 60")
    first.send_signal(signal.SIGTERM)  # the worker stops: the job saves and goes back to the queue
    first.wait()
    assert reg.get(job_id).state in ("queued", "interrupted")
    workers.start("--save_root", str(root))
    at = reg.get(job_id).progress["step"]
    until(lambda: reg.get(job_id).progress.get("step", 0) > at + 10, 120, "the job going on")
    assert tlm("cancel", job_id, "--queue", url).returncode == 0
    done = wait_for(url, job_id, ["cancelled"], timeout=120)
    log = "\n".join(reg.logs(job_id)[0])
    assert f"--more 2000 from checkpoint {kept[15][:12]} at iteration 15, the last before" in log, log
    assert f"training on from checkpoint {kept[15][:12]} at iteration 15" in log, log
    resumed = [line.split("resuming ")[1] for line in log.splitlines() if "resuming " in line]
    assert resumed[0].startswith(f"{kept[15][:12]} at iteration 15") and len(resumed) == 2, resumed
    assert int(resumed[1].split("at iteration ")[1].split(",")[0]) >= 60, resumed
    steps = [r["step"] for r in metrics.read(run) if r["kind"] == "valid"]
    # every evaluation once, the branch's after step 15, up to the last before the cancel's save
    assert steps == sorted(set(steps)) and steps[:4] == [5, 10, 15, 20], steps
    assert steps[-1] == done.result["step"] // 5 * 5, (steps, done.result)
    aside = list(run.glob("replaced-*"))
    assert len(aside) == 1 and (aside[0] / f"{kept[30]}.safetensors").exists()
    assert [r["step"] for r in metrics.read(aside[0]) if r["kind"] == "valid"] == [20, 25, 30]
    assert reg.get(job_id).params["num_iters"] == 2030  # the budget counts from the newest: 30 + 2,000
