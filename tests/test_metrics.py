"""The metrics log survives stops and resumes; tlm plot draws it."""

import subprocess

import tlm  # noqa: F401
from tlm import metrics

from conftest import tlm_cmd
from test_checkpoint import run_trainer


def test_a_resumed_run_continues_one_metrics_log(save_dir):
    flags = dict(num_iters=12, steps_per_eval=4, eval_test=True)
    run_trainer(save_dir, stop_after=6, **flags)
    run_trainer(save_dir, **flags)
    records = metrics.read(save_dir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in records if r["kind"] == "valid"] == [4, 8, 12]
    assert [r["step"] for r in records if r["kind"] == "test"] == [12]
    elapsed = [r["elapsed"] for r in train]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert train[-1]["tokens"] == 12 * 8 * 16
    assert {"lr", "tokens_per_sec", "peak_memory_gb", "loss"} <= set(train[0])
    assert "ppl" in records[-1]


def test_plot_writes_a_png_of_several_runs(save_dir, tmp_path):
    run_trainer(save_dir, num_iters=6, steps_per_eval=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "curves.png"
    proc = subprocess.run(tlm_cmd("plot", str(save_dir), str(empty), "-o", str(out)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "empty: no metrics yet" in proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
