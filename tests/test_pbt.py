"""Population based training (tlm sweep --schedule pbt): real workers, both backends, tiny models."""

from __future__ import annotations

import signal

from tlm import checkpoint, metrics

from queue_helpers import registry, tlm, until
from test_sweep import board, finished, sweep

REDIS_DB = 14
PBT = ["--schedule", "pbt", "--population", "4", "--search", "learning_rate=3e-3,1e-3,1e-4,1e-5",
       "--flag", "lr_warmup=1", "--budget", "30", "--interval", "10", "--sampler", "grid", "--seed", "3"]


def check_lineage(reg, root, rows: list[dict]) -> list[dict]:
    """What every PBT sweep here must show: each trial trained the whole budget, each evaluation
    step once in its run; at each generation (steps 10, 20) the worst trial took the best one's
    checkpoint at that step (the very file: its SHA1 name) and went on from it with perturbed
    flags, the donor held paused until it had. Returns the copies as (recipient, step, donor)."""
    by_trial = {r["trial"]: r for r in rows}
    assert sorted(by_trial) == [0, 1, 2, 3] and {r["state"] for r in rows} == {"succeeded"}, rows
    copies = sorted((r["trial"], at, donor) for r in rows for at, donor in r["copies"])
    assert [at for _, at, _ in copies] == [10, 20], copies  # a quarter of 4: one copy a generation
    for row in rows:
        steps = [r["step"] for r in metrics.read(root / row["run"]) if r["kind"] == "valid"]
        assert steps == [5, 10, 15, 20, 25, 30], (row["trial"], steps)  # resumed, never repeated
    for trial, at, donor in copies:
        log = "\n".join(reg.logs(by_trial[trial]["job"])[0])
        took = [line for line in log.splitlines() if f"took trial {donor}'s checkpoint" in line]
        assert len(took) == 1, log
        ident = took[0].split("checkpoint ")[1].split()[0]
        donor_log = "\n".join(reg.logs(by_trial[donor]["job"])[0])
        assert f"paused at iteration {at}, checkpoint {ident}" in donor_log, (ident, donor_log)
        schedule = by_trial[trial]["schedule"]  # the flags its weights saw, from step 0
        assert schedule[0][0] == 0 and [s[0] for s in schedule] == sorted({s[0] for s in schedule}), schedule
    said = "\n".join(reg.logs(reg.get(rows[0]["job"]).sweep["id"])[0])
    assert said.count("takes trial") == 2, said
    return copies


def test_pbt_the_worst_trial_takes_the_best_ones_checkpoint_each_generation(url, workers, tmp_path):
    """Four trials on two workers: each pauses at a generation's end (steps 10 and 20) until all
    four have; the worst then copies the best's checkpoint and trains on from it with its flags
    perturbed (Optuna: the old trial pruned, a new one of the new flags); all four end at the
    budget. `tlm sweep best` says whether flags alone reproduce the winner."""
    from tlm_worker.sweeps import SweepSpec, study
    root = tmp_path / "root"
    root.mkdir()
    workers.start("--save_root", str(root))
    workers.start("--save_root", str(root))
    sweep_id = sweep(url, "pbt", *PBT)
    finished(url, sweep_id, timeout=400)
    reg = registry(url)
    assert reg.get(sweep_id).state == "succeeded", reg.logs(sweep_id)[0]
    rows = board(url, "pbt")["trials"]
    copies = check_lineage(reg, root, rows)
    told = study(reg, sweep_id, SweepSpec.from_dict(reg.get(sweep_id).params)).get_trials(deepcopy=False)
    assert sorted(t.state.name for t in told) == ["COMPLETE"] * 4 + ["PRUNED"] * len(copies), told
    assert all(t.user_attrs.get("generation") in (1, 2) for t in told[4:]), [t.user_attrs for t in told]
    status = tlm("sweep", "status", "pbt", "--queue", url)
    assert status.returncode == 0 and "copied" in status.stdout and "trial " in status.stdout, status.stdout
    best = tlm("sweep", "best", "pbt", "--queue", url)
    assert best.returncode == 0, best.stderr
    winner = rows[0]
    if len(winner["schedule"]) > 1:
        assert "no one command reproduces it" in best.stderr and winner["run"] in best.stderr, best.stderr
        assert best.stdout.count("from step ") == len(winner["schedule"]), best.stdout
    else:
        assert "no one command" not in best.stderr and "from step" not in best.stdout
    assert best.stdout.strip().splitlines()[-1].startswith("tlm submit train")
    add = tlm("sweep", "add", "pbt", "2", "--queue", url)
    assert add.returncode != 0 and "fixed population" in add.stderr, add.stderr
    # The copy itself, again by hand: the donor's pair lands under its own SHA1 name, the run's
    # own checkpoints go, and a copier that died halfway (a stray temporary file) changes nothing.
    import shutil
    donor, own = root / rows[0]["run"], tmp_path / "copy"
    shutil.copytree(root / rows[1]["run"], own)
    ident = checkpoint.newest_name(donor)
    checkpoint.adopt(donor, ident, own)
    (own / ".tmp-dead.safetensors.new").write_bytes(b"half")
    checkpoint.adopt(donor, ident, own)
    assert [i for _, i in checkpoint.listed(own)] == [ident] and checkpoint.find(own).identifier == ident
    assert checkpoint.newest_name(donor) == ident


def test_pbt_with_a_worker_killed_mid_generation_loses_no_trial_and_copies_each_once(url, workers, tmp_path):
    """A worker SIGKILLed while trials train and others wait at a generation's end: its trial is
    re-queued and resumes, the generation is ranked once every trial has reached it, each copy
    is made once, and no Optuna trial is left running."""
    from optuna.trial import TrialState
    from tlm_worker.sweeps import SweepSpec, study
    root = tmp_path / "root"
    root.mkdir()
    first = workers.start("--save_root", str(root), lease=3)
    workers.start("--save_root", str(root), lease=3)
    sweep_id = sweep(url, "pbt-kill", *PBT)
    reg = registry(url)
    until(lambda: any(j.state == "paused" for j in reg.jobs(None) if j.sweep)
          and any(j.state == "running" and j.worker for j in reg.jobs(None) if j.sweep), 200,
          "a trial paused at a generation while another trains")
    first.send_signal(signal.SIGKILL)
    first.wait()
    workers.start("--save_root", str(root), lease=3)
    finished(url, sweep_id, timeout=400)
    assert reg.get(sweep_id).state == "succeeded", reg.logs(sweep_id)[0]
    check_lineage(reg, root, board(url, "pbt-kill")["trials"])
    told = study(reg, sweep_id, SweepSpec.from_dict(reg.get(sweep_id).params)).get_trials(deepcopy=False)
    assert not [t for t in told if t.state == TrialState.RUNNING], told


def test_a_pbt_spec_that_cannot_run_is_one_line(url):
    for args, says in ((["--schedule", "pbt", "--trials", "4"], "give --population N"),
                       (["--population", "4"], "add --schedule pbt"),
                       (["--schedule", "pbt", "--prune", "asha"], "drop --prune"),
                       (["--schedule", "pbt", "--interval", "2m"], "give steps (200)"),
                       (["--schedule", "pbt", "--interval", "40"], "not one generation ends"),
                       (["--interval", "10"], "--interval is population based training's")):
        proc = tlm("sweep", "submit", "--name", "bad", "--search", "learning_rate=1e-4:1e-3", "--budget", "30",
                   "--flag", "steps_per_eval=5", "--queue", url, *args)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    proc = tlm("sweep", "submit", "--name", "bad", "--schedule", "pbt", "--search", "dim=32,64",
               "--budget", "30", "--flag", "steps_per_eval=5", "--queue", url)
    assert proc.returncode != 0 and "perturbs the flags a run may change" in proc.stderr, proc.stderr


def test_a_pbt_sweep_cancelled_mid_generation_ends_every_trial_with_its_checkpoint(url, workers, tmp_path):
    """`tlm sweep cancel` while trials wait at a generation's end and others train or wait to
    start: the waiting end at once, the training ones after a save; every run that trained keeps
    a readable checkpoint."""
    root = tmp_path / "root"
    root.mkdir()
    workers.start("--save_root", str(root))
    sweep_id = sweep(url, "pbt-stop", *[a if a != "30" else "100000" for a in PBT])
    reg = registry(url)
    until(lambda: any(j.state == "paused" for j in reg.jobs(None) if j.sweep), 200, "a trial at a generation's end")
    assert tlm("sweep", "cancel", "pbt-stop", "--queue", url).returncode == 0
    finished(url, sweep_id, timeout=200)
    rows = board(url, "pbt-stop")["trials"]
    assert reg.get(sweep_id).state == "cancelled" and {r["state"] for r in rows} == {"cancelled"}, rows
    trained = [row for row in rows if row["steps"]]  # one worker: some never started
    assert trained and all(checkpoint.find(root / row["run"]) is not None for row in trained), rows
    assert "cancelled: every trial saved and stopped" in "\n".join(reg.logs(sweep_id)[0])
