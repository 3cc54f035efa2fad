"""Checkpoints: exact resume, corruption, faults, signals (real files, real processes)."""

import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tlm  # noqa: F401
from tlm import checkpoint
from tlm.data import load_dataset
from tlm.train import Trainer
from tlm.run import open_run

from conftest import Collect, tlm_cmd

TINY = dict(dim=32, num_heads=2, num_blocks=1, context_size=16, batch_size=8,
            eval_tokens=500, steps_per_report=1, lr_warmup=2)


def tiny_flags(**kw) -> list[str]:
    out = []
    for k, v in {**TINY, **kw}.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


def run_trainer(save_dir: Path, stop_after: int | None = None, **kw):
    given = {"save_dir": str(save_dir), **TINY, **kw}
    config, ckpt = open_run(given)
    hooks = Collect()
    trainer = Trainer(config, load_dataset("ptb", save_dir / "datasets"), ckpt, hooks=hooks)
    if stop_after:
        hooks.stop = lambda: trainer.step >= stop_after
    return trainer.run()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_stop_and_resume_equals_one_uninterrupted_run_bit_for_bit(save_dir, tmp_path, optimizer):
    other = tmp_path / "other"
    shutil.copytree(save_dir, other)
    flags = dict(num_iters=12, steps_per_eval=4, dropout=0.1, embed_dropout=0.1, optimizer=optimizer)
    run_trainer(save_dir, **flags)
    stopped = run_trainer(other, stop_after=6, **flags)
    assert stopped.stopped and stopped.step == 6
    resumed = run_trainer(other, **flags)
    assert resumed.step == 12
    a = checkpoint.find(save_dir).load_weights()
    b = checkpoint.find(other).load_weights()
    assert a.keys() == b.keys()
    for name in a:
        assert np.array(a[name]).tobytes() == np.array(b[name]).tobytes(), name


def make_two_checkpoints(save_dir: Path) -> tuple[str, str]:
    run_trainer(save_dir, num_iters=2, steps_per_eval=2, keep_last=5)
    run_trainer(save_dir, num_iters=4, steps_per_eval=2, keep_last=5)
    older, newer = [c.identifier for c in reversed(checkpoint.list_checkpoints(save_dir))][:2]
    return older, newer


def test_retention_keeps_what_a_reader_pins_until_it_is_read_and_forgets_a_dead_readers_pin(save_dir):
    """Issue 41, item 4: a sample, eval or export pins the checkpoint it reads (a file in the
    run directory, so a reader on another Mac counts); a pin past PIN_SECONDS is a dead one's."""
    older, newer = make_two_checkpoints(save_dir)
    with checkpoint.pinned(save_dir, older[:8]):
        assert checkpoint.retain(save_dir, keep_last=1) == []
        (stale,) = (save_dir / checkpoint.PINS).iterdir()
        os.utime(stale, (time.time() - checkpoint.PIN_SECONDS - 1,) * 2)  # its reader died long ago
        assert checkpoint.retain(save_dir, keep_last=1) == [older] and not stale.exists()
    assert [c.identifier for c in checkpoint.list_checkpoints(save_dir)] == [newer]


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "misname", "metadata"])
def test_a_damaged_checkpoint_is_skipped_for_the_next_older(save_dir, damage):
    older, newer = make_two_checkpoints(save_dir)
    weights = save_dir / f"{newer}.safetensors"
    if damage == "bitflip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "misname":
        weights.rename(save_dir / f"{'0' * 40}.safetensors")
    else:
        meta = save_dir / f"{newer}.metadata"
        meta.write_bytes(meta.read_bytes()[:-10] + b"0123456789")
    warnings = []
    found = checkpoint.find(save_dir, warn=warnings.append)
    assert found.identifier == older and found.step == 2
    assert len(warnings) == 1 and "skipping checkpoint" in warnings[0]


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


def test_a_pickle_payload_is_rejected_and_never_executed(save_dir, tmp_path):
    older, newer = make_two_checkpoints(save_dir)
    Payload.marker = tmp_path / "pwned"
    meta = save_dir / f"{newer}.metadata"
    meta.write_bytes(pickle.dumps({"optimizer": Payload()}))
    # Forge the weights' record of the metadata hash, so only the format can reject it.
    import mlx.core as mx
    weights, header = mx.load(str(save_dir / f"{newer}.safetensors"), return_metadata=True)
    header["metadata_sha1"] = checkpoint._sha1(meta)
    forged = save_dir / "forged.safetensors"
    mx.save_safetensors(str(forged), weights, metadata=header)
    ident = checkpoint._sha1(forged)
    forged.rename(save_dir / f"{ident}.safetensors")
    meta.rename(save_dir / f"{ident}.metadata")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.verify(save_dir, ident)
    warnings = []
    assert checkpoint.find(save_dir, warn=warnings.append).identifier == older
    assert not Payload.marker.exists()


def test_identifier_prefix_and_new_model(save_dir):
    older, newer = make_two_checkpoints(save_dir)
    config, ckpt = open_run({"save_dir": str(save_dir), "identifier": older[:8]})
    assert ckpt.identifier == older and config.dim == TINY["dim"]
    _, none = open_run({"save_dir": str(save_dir), "new_model": True})
    assert none is None


def test_save_hitting_the_file_size_limit_keeps_the_previous_checkpoint(save_dir):
    run_trainer(save_dir, num_iters=2, steps_per_eval=2)
    before = checkpoint.find(save_dir).identifier

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run(tlm_cmd("train", "--save_dir", str(save_dir), "--num_iters", "4",
                                  "--save_retries", "1"),
                          preexec_fn=limit, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "checkpoint save failed (File too large); the previous checkpoint is intact" in proc.stderr
    assert "could not save a checkpoint" in proc.stderr.splitlines()[-1]
    assert checkpoint.find(save_dir).identifier == before
    assert [c.identifier for c in checkpoint.list_checkpoints(save_dir)] == [before]


def start_training(save_dir: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(tlm_cmd("train", "--save_dir", str(save_dir), *tiny_flags(**kw)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 60) -> list[str]:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {text!r}; output:\n{''.join(seen)}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_finishes_the_step_saves_and_exits_zero(save_dir, sig):
    proc = start_training(save_dir, num_iters=100000, steps_per_eval=100000)
    wait_for(proc, "iter 3/")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopping: finishing this step and saving" in out
    step = int(out.split("stopped at iteration ")[1].split(";")[0])
    found = checkpoint.find(save_dir)
    assert found.step == step and f"saved {found.weights_path}" in out


def test_second_signal_exits_at_once(save_dir):
    # A bigger model, so that the save after the first signal takes a while.
    proc = start_training(save_dir, num_iters=100000, steps_per_eval=100000, dim=512,
                          num_blocks=4)
    wait_for(proc, "iter 3/")
    proc.send_signal(signal.SIGINT)
    wait_for(proc, "stopping:")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "SIGINT again: exiting now" in out
    warnings = []
    checkpoint.find(save_dir, warn=warnings.append)  # none, or a complete one
    assert warnings == []


def test_ctrl_c_at_random_moments_on_a_busy_machine_resumes_bit_for_bit(save_dir, tmp_path):
    """Issue 31: Ctrl+C at any moment (mid-step, mid-evaluation, mid-save), with other processes
    holding the cores, then a resume: the weights of one uninterrupted run, bit for bit
    (dropout on; the batch split across both cores' streams)."""
    flags = dict(num_iters=100, steps_per_eval=10, dropout=0.1, seed=7, steps_per_report=10)
    straight = tmp_path / "straight"
    shutil.copytree(save_dir, straight)
    start_training(straight, **flags).communicate(timeout=300)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    try:
        for attempt in range(2):
            run = tmp_path / f"stopped-{attempt}"
            shutil.copytree(save_dir, run)
            proc = start_training(run, **flags)
            wait_for(proc, "saved", timeout=120)
            time.sleep(rng.uniform(0.0, 2.0))
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "stopped at iteration" in out, out
            resumed = start_training(run, **flags)
            out, _ = resumed.communicate(timeout=300)
            assert resumed.returncode == 0, out
            a, b = (checkpoint.find(d).load_weights() for d in (straight, run))
            differ = [k for k in a if np.array(a[k]).tobytes() != np.array(b[k]).tobytes()]
            assert not differ, f"random seed {seed}, attempt {attempt}: {len(differ)} tensors differ"
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_sigkill_at_random_moments_never_leaves_an_unusable_checkpoint(save_dir):
    rng = random.Random(1234)
    last_step = 0
    for trial in range(12):
        # Save every step, so kills land inside saves often.
        earlier = set(save_dir.glob(".tmp-*.new"))
        proc = start_training(save_dir, num_iters=100000, steps_per_eval=1, keep_last=2, dim=128)
        wait_for(proc, "iter")
        if trial % 2:
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # the moment a save has begun writing its temporary files
            deadline = time.time() + 30
            while not set(save_dir.glob(".tmp-*.new")) - earlier and time.time() < deadline:
                time.sleep(0.001)
        proc.kill()
        proc.communicate()
        warnings = []
        found = checkpoint.find(save_dir, warn=warnings.append)
        assert warnings == [], f"trial {trial}: {warnings}"
        assert found is None or found.step >= last_step
        last_step = found.step if found else 0
    # Some kills landed inside a save (its temporary files remain, unpublished).
    assert list(save_dir.glob(".tmp-*.new"))
    # And training continues from there.
    proc = subprocess.run(tlm_cmd("train", "--save_dir", str(save_dir),
                                  "--num_iters", str(last_step + 2)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if last_step:
        assert f"at iteration {last_step}," in proc.stderr
    assert checkpoint.find(save_dir).step == last_step + 2


def test_the_branch_point_of_a_cooling_run_passes_over_damaged_checkpoints(save_dir):
    """--more on a run in its cooldown goes on from its newest checkpoint before the cooldown,
    chosen from the headers: a header with a damaged record is passed over (no traceback), a
    chosen checkpoint that fails verification makes way for the next older valid one."""
    from safetensors.numpy import load_file, save_file
    run_trainer(save_dir, num_iters=8, steps_per_eval=2, keep_last=10, lr_cooldown=0.5)
    by_step = {c.step: c.identifier for c in checkpoint.list_checkpoints(save_dir)}
    assert sorted(by_step) == [2, 4, 6, 8]  # the cooldown begins after step 5: (step - 2) / 6 > 0.5
    assert checkpoint.branch_point(save_dir).step == 4
    newest = save_dir / f"{by_step[8]}.metadata"
    with checkpoint.safe_open(str(newest), framework="numpy") as f:
        header = f.metadata()
    save_file(load_file(str(newest)), str(newest), metadata={**header, "tlm": '{"step": "8"}'})
    assert checkpoint.branch_point(save_dir).step == 4
    weights = save_dir / f"{by_step[4]}.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert checkpoint.branch_point(save_dir).step == 2
