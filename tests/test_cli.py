"""The tlm command line, run as a real process."""

import os
import subprocess

import pytest

from tlm import checkpoint

from conftest import tlm_cmd


def tlm(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(tlm_cmd(*args), capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("flags, message", [
    (["--dim", "100", "--num_heads", "8"], "--dim 100 is not divisible by --num_heads 8"),
    (["--batch_size", "0"], "--batch_size must be positive, got 0"),
    (["--num-iters", "-5"], "--num_iters must be positive, got -5"),
    (["--dataset", "imagenet"], "unknown --dataset 'imagenet'"),
    (["--gpu"], "--gpu: no GPU backend (Metal or CUDA) is available on this machine"),
    (["--learning_rate", "abc"], "'abc' is not a valid float"),
    (["--optimizer", "sgd"], "unknown --optimizer 'sgd' (choose from adamw, muon)"),
    (["--eval_stride", "64"], "--eval_stride 64 is longer than --context_size 48"),
    (["--time_budget", "-5"], "--time_budget must not be negative, got -5.0"),
    (["--embed_dropout", "1"], "--embed_dropout must be in [0, 1), got 1.0"),
])
def test_invalid_settings_fail_fast_with_one_line(tmp_path, flags, message):
    proc = tlm("train", "--save_dir", str(tmp_path / "run"), *flags)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "datasets").exists()  # no work started


def test_unwritable_save_dir_fails_fast(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = tlm("train", "--save_dir", str(blocker / "run"))
    assert proc.returncode == 2
    assert f"--save_dir {blocker / 'run'} is not writable" in proc.stderr.splitlines()[-1]


def test_contradicting_architecture_flag_on_resume_is_a_clear_error(save_dir):
    assert tlm("train", "--save_dir", str(save_dir), "--dim", "32", "--num_heads", "2",
               "--num_blocks", "1", "--num_iters", "2", "--eval_tokens", "200").returncode == 0
    proc = tlm("train", "--save_dir", str(save_dir), "--dim", "64")
    assert proc.returncode == 2
    assert "was trained with --dim 32, not 64: drop the flag or use --new_model" in proc.stderr


def test_seed_smoke_test_as_written(save_dir):
    """The seed README's quick smoke test, verbatim (default model: dim 1024)."""
    proc = tlm("train", "--dataset", "ptb", "--batch_size", "2", "--num_iters", "10",
               "--context_size", "48", "--new_model", "--save_dir", "./tmp", cwd=save_dir.parent)
    assert proc.returncode == 0, proc.stderr
    assert "iter 10/10" in proc.stderr and "valid ppl" in proc.stderr
    found = checkpoint.find(save_dir.parent / "tmp")
    assert found.step == 10 and found.state["config"]["dim"] == 1024
    assert "sample:" in proc.stderr
    from tlm import metrics
    assert [r["step"] for r in metrics.read(save_dir.parent / "tmp") if r["kind"] == "valid"] == [10]


def test_inspect_prints_the_checkpoint(save_dir):
    tlm("train", "--save_dir", str(save_dir), "--dim", "32", "--num_heads", "2",
        "--num_blocks", "1", "--num_iters", "2", "--eval_tokens", "200")
    proc = tlm("inspect", "--save_dir", str(save_dir))
    assert proc.returncode == 0
    assert "iteration:      2 of 2" in proc.stdout and "SHA1 verified" in proc.stdout
    assert tlm("inspect", "--save_dir", str(save_dir / "nothing")).returncode == 1
    from tlm_cli.main import iteration_text  # a run its time budget ended: not "132 of 100000"
    ended = {"step": 132, "elapsed": 121.0, "config": {"num_iters": 100000, "time_budget": 2.0}}
    assert iteration_text(ended) == ("132: its --time_budget of 2 minutes ended the run (--num_iters 100000), "
                                     "2.0 minutes of training")
    assert iteration_text({**ended, "elapsed": 60.0}).startswith("132 of 100000 or 2 minutes")


def test_a_bad_stream_count_is_a_one_line_error_before_training(save_dir):
    env = dict(os.environ, TLM_CPU_STREAMS="two")
    proc = tlm("train", "--save_dir", str(save_dir), "--dim", "32", "--num_heads", "2", env=env)
    assert proc.returncode == 2
    assert "TLM_CPU_STREAMS must be a positive whole number, got 'two'" in proc.stderr.splitlines()[-1]
    assert not list(save_dir.glob("*.safetensors"))


def test_a_preset_fills_flags_and_explicit_flags_override(save_dir):
    proc = tlm("train", "--preset", "ptb-cpu", "--save_dir", str(save_dir), "--num_iters", "2",
               "--eval_tokens", "200", "--dim", "32", "--num_heads", "2",
               "--no_tie_embeddings", "--no-eval-test")  # a preset's True turned off, either spelling
    assert proc.returncode == 0, proc.stderr
    assert "--preset ptb-cpu" in proc.stderr and "--learning_rate 0.0039" in proc.stderr
    config = checkpoint.find(save_dir).state["config"]
    assert config["preset"] == "ptb-cpu" and config["dim"] == 32 and config["context_size"] == 256
    assert config["tie_embeddings"] is False and config["eval_test"] is False
    assert config["optimizer"] == "muon"
    assert tlm("train", "--preset", "nope", "--save_dir", str(save_dir)).returncode == 2
