"""`tlm train --nodes N`: data-parallel ranks on MLX's ring backend over 127.0.0.1."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from tlm import checkpoint, metrics

from conftest import tlm_cmd
from queue_helpers import TINY, tlm

FLAGS = [*TINY, "--num_iters", "40", "--steps_per_eval", "20"]


def test_two_ranks_train_what_one_process_trains(save_dir, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(save_dir / "datasets", one / "datasets")
    two = tlm("train", "--save_dir", str(save_dir), *FLAGS, "--nodes", "2")
    assert two.returncode == 0, two.stderr
    assert "starting 2 ranks on this machine" in two.stderr
    assert tlm("train", "--save_dir", str(one), *FLAGS).returncode == 0
    ranked, single = metrics.read(save_dir), metrics.read(one)
    assert [(r["kind"], r["step"]) for r in ranked] == [(r["kind"], r["step"]) for r in single]
    for a, b in zip(ranked, single):  # every reported loss: the same mathematics
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
    theirs, ours = checkpoint.find(one).load_weights(), checkpoint.find(save_dir).load_weights()
    for name, value in theirs.items():
        np.testing.assert_allclose(np.array(ours[name]), np.array(value), rtol=1e-3, atol=1e-5)


def test_ctrl_c_stops_every_rank_after_the_same_step_and_a_resume_continues(save_dir):
    proc = subprocess.Popen(tlm_cmd("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                                    "--steps_per_eval", "100000", "--nodes", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (save_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = checkpoint.find(save_dir)
    assert saved is not None and saved.step > 0
    again = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", str(saved.step + 5),
                "--nodes", "2")
    assert again.returncode == 0 and f"resuming {saved.identifier[:12]} at iteration {saved.step}" \
        in again.stderr


def test_a_rank_that_dies_stops_the_others_and_the_checkpoint_stays_valid(save_dir):
    proc = subprocess.Popen(tlm_cmd("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                                    "--steps_per_eval", "10", "--nodes", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and checkpoint.find(save_dir) is None:
        time.sleep(0.2)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2
    subprocess.run(["kill", "-9", children[1]])  # rank 1: a Mac that lost power
    _, err = proc.communicate(timeout=60)  # rank 0 is not left waiting in a collective
    assert proc.returncode != 0 and "rank 1 exited with status -9" in err
    assert checkpoint.find(save_dir) is not None  # the last published one verifies


def test_nodes_must_divide_the_batch(tmp_path):
    proc = tlm("train", "--save_dir", str(tmp_path / "r"), *TINY, "--nodes", "3")
    assert proc.returncode == 2 and "--nodes 3 must be positive and divide --batch_size 8" in proc.stderr
