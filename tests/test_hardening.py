"""Bad input gets a one-line answer at once; a diverging run publishes nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import redis

from tlm import checkpoint

from conftest import tlm_cmd
from queue_helpers import TINY, Workers, free_port, registry, submit, suite_redis, tlm, wait_for

BAD = [
    (["train", "--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
    (["train", "--seed", "99999999999999999999999"], "--seed must be in [0, 2^32)"),
    (["train", "--time_budget", "inf"], "--time_budget must be a finite number, got inf"),
    (["train", "--time_budget", "nan"], "--time_budget must be a finite number, got nan"),
    (["train", "--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["sample", "--local", "--temperature", "nan"], "'nan' is not a finite number"),
    (["sample", "--local", "--seed", "-1"], "--seed"),
    (["status", "--queue", "sqlite:///nonexistent/dir/q.db"], "no directory /nonexistent/dir"),
    (["status", "--queue", "redis://OWN/abc"], "the database must be a number, not 'abc'"),
    (["status", "--queue", "redis://127.0.0.1:notaport/0"], "queue URL redis://127.0.0.1:notaport/0"),
    (["status", "--queue", "redis://OWN/99"], "DB index is out of range"),
    (["train", "--time_budget", "1e-9"], "is under a second, too short for one step"),
    (["train", "--context_size", "2000000", "--dim", "32", "--num_heads", "2"],
     "fewer than one window of --context_size + 1 = 2000001: lower --context_size"),
    (["train", "--dim", "1000000"], "training needs about"),
    (["sample", "--local", "--stop", ""], "--stop is empty"),
    (["submit", "train", "--run", ""], "--run is empty"),
    (["submit", "train", "--run", "r", "--after", ""], "--after is empty"),
    (["submit", "train", "--run", "r" * 300], "a run name is a directory on every worker: at most 200 bytes"),
    (["sample", "--run", "r" * 300], "at most 200 bytes"),
    (["submit", "eval", "--save_dir", "/nonexistent"], "no run directory /nonexistent: train one first"),
    # Every command's flags: negative, zero, huge, nan, inf, empty, wrong type.
    (["train", "--dim", "0"], "--dim must be positive, got 0"),
    (["train", "--batch_size", "-1"], "--batch_size must be positive, got -1"),
    (["train", "--num_iters", "0"], "--num_iters must be positive, got 0"),
    (["train", "--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["train", "--learning_rate", "-1"], "--learning_rate must not be negative, got -1.0"),
    (["train", "--weight_decay", "inf"], "--weight_decay must be a finite number, got inf"),
    (["train", "--dim", "many"], "'many' is not a valid integer"),
    (["train", "--dataset", ""], "--dataset is empty"),
    (["train", "--dataset", "missing.txt"], "unknown --dataset 'missing.txt'"),
    (["train", "--tokenizer", "bogus"], "unknown --tokenizer 'bogus'"),
    (["train", "--optimizer", "bogus"], "unknown --optimizer 'bogus'"),
    (["train", "--preset", "bogus"], "unknown --preset 'bogus'"),
    (["sample", "--local", "--max_tokens", "-1"], "--max_tokens"),
    (["sample", "--local", "--num_samples", "0"], "--num_samples"),
    (["sample", "--local", "--top_p", "0"], "--top_p"),
    (["sample", "--local", "--repetition_penalty", "inf"], "'inf' is not a finite number"),
    (["eval", "--local", "--tokens", "-1"], "--tokens"),
    (["eval", "--local", "--stride", "0"], "--stride"),
    (["eval", "--local", "--split", "bogus"], "--split"),
    (["status", "--limit", "-1"], "--limit"),
    (["logs", "nosuchjob"], "no job 'nosuchjob'"),
    (["cancel", "nosuchjob"], "no job 'nosuchjob'"),
    (["prune", "--older_than", "nan"], "'nan' is not a finite number"),
    (["prune", "--older_than", "-1"], "--older_than"),
    (["dashboard", "--port", "70000"], "--port"),
    (["export", "--out", "/dev/null/x"], "no checkpoint"),
    (["plot", "/nonexistent"], "no such directory"),
    (["status", "--queue", "ftp://x"], "unsupported queue URL 'ftp://x'"),
]


def own_redis(args: list[str]) -> list[str]:
    """``redis://OWN`` in a case: the suite's own redis-server (never a user's 6379)."""
    return [a.replace("redis://OWN", f"redis://127.0.0.1:{suite_redis().port}") for a in args]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_at_once(args, message, tmp_path):
    args = own_redis(args)
    proc = tlm(*args, "--save_dir", str(tmp_path / "run")) if args[0] == "train" else tlm(*args)
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.safetensors"))


@pytest.mark.parametrize("args,message", [
    (["--lease", "nan"], "'nan' is not a finite number"),
    (["--lease", "0"], "--lease"),
    (["--concurrency", "0"], "--concurrency"),
    (["--max_attempts", "0"], "--max_attempts"),
    (["--keep_days", "0"], "--keep_days"),
    (["--keep_days", "inf"], "'inf' is not a finite number"),
    (["--gpu"], "no GPU backend (Metal or CUDA)"),
    (["--queue", "redis://OWN/99"], "DB index is out of range"),
])
def test_worker_refuses_bad_settings_at_start(args, message):
    import mlx.core as mx
    if "--gpu" in args and mx.is_available(mx.gpu):
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "tlm_worker.main", *own_redis(args)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_a_password_protected_redis_without_the_password_fails_at_once(tmp_path):
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--requirepass", "s3cret", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                redis.Redis(port=port, password="s3cret").ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        for url, why in ((f"redis://127.0.0.1:{port}/0", "Redis asks for a password"),
                         (f"redis://:hunter2@127.0.0.1:{port}/0", "wrong password")):
            proc = tlm("status", "--queue", url)  # before: 400 s of retries with no word
            assert proc.returncode == 1 and why in proc.stderr, proc.stderr
            assert "hunter2" not in proc.stderr
        assert tlm("status", "--queue", f"redis://:s3cret@127.0.0.1:{port}/0").returncode == 0
    finally:
        server.kill()


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_good_checkpoint(save_dir):
    ok = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "5")
    assert ok.returncode == 0, ok.stderr
    good = checkpoint.find(save_dir)
    proc = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "30",
               "--learning_rate", "1e30", "--steps_per_eval", "5")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "training diverged at step" in proc.stderr.strip().splitlines()[-1]
    assert checkpoint.find(save_dir).identifier == good.identifier


def test_a_diverging_queued_job_fails_with_the_reason_and_no_traceback(tmp_path, save_dir):
    url = f"sqlite://{tmp_path / 'queue.db'}"
    workers = Workers(url, tmp_path)
    worker = workers.start()
    try:
        job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "30",
                        "--learning_rate", "1e30", "--steps_per_eval", "5")
        job = wait_for(url, job_id, ["failed"])
        assert job.error.startswith("Diverged: training diverged at step")
        assert job.attempts == 1  # a job's own failure is final, not retried
        (tmp_path / "nothing-here").mkdir()
        missing = submit(url, "eval", "--save_dir", str(tmp_path / "nothing-here"))
        assert wait_for(url, missing, ["failed"]).error.startswith("CheckpointError: no checkpoint")
    finally:
        workers.stop_all()
    assert "Traceback" not in workers.log(worker)
    assert checkpoint.find(save_dir) is None
    assert os.path.isdir(save_dir)


def test_submit_commands_of_reading_kinds_take_their_options_from_the_kinds_params(tmp_path):
    """Issue 40: `tlm submit eval` and `tlm submit export` are built from EvalParams and
    ExportParams (kinds.flag): a path made absolute where it is submitted, ranges and choices
    checked, an empty value refused; a new kind needs no hand-written command."""
    from tlm_worker.kinds import KINDS

    url, run = f"sqlite://{tmp_path / 'queue.db'}", tmp_path / "run"
    run.mkdir()
    exported = tlm("submit", "export", "--save_dir", str(run), "--out", "out/here", "--queue", url, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert registry(url).get(exported.stdout.strip()).params["out"] == str((tmp_path / "out" / "here").resolve())
    evaluated = submit(url, "eval", "--save_dir", str(run), "--split", "test", "--tokens", "64", "--stride", "8")
    assert {k: registry(url).get(evaluated).params[k] for k in ("split", "tokens", "stride")} == \
        {"split": "test", "tokens": 64, "stride": 8}
    for args, says in ((["eval", "--tokens", "-1"], "-1 is not in the range x>=0"),
                       (["eval", "--split", "train"], "'train' is not one of 'valid', 'test'"),
                       (["export", "--out", ""], "--out is empty"), (["export"], "Missing option '--out'")):
        proc = tlm("submit", *args, "--save_dir", str(run), "--queue", url)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)
    assert {k.name for k in KINDS.values() if k.submit} == {"eval", "export"}


def test_empty_save_dir_is_refused_not_defaulted():
    proc = tlm("train", "--save_dir", "")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == "Error: --save_dir is empty"


def test_training_and_export_with_standard_input_closed(save_dir, tmp_path):
    """Service managers may start us with descriptor 0 closed; MLX's loader then failed."""
    from conftest import tlm_cmd
    for iters in ("3", "6"):  # a save, then a resume that loads it
        proc = subprocess.run(tlm_cmd("train", "--save_dir", str(save_dir), *TINY, "--num_iters", iters),
                              capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.close(0))
        assert proc.returncode == 0, proc.stderr
    assert checkpoint.find(save_dir).step == 6
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    proc = tlm("export", "--save_dir", str(save_dir), "--out", str(tmp_path / "busy"))
    assert proc.returncode == 1 and "is not empty and not an earlier export" in proc.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    for _ in range(2):  # an earlier export may be replaced
        assert tlm("export", "--save_dir", str(save_dir), "--out", str(tmp_path / "export")).returncode == 0
    proc = tlm("export", "--save_dir", str(save_dir), "--out", "/proc/nope")
    assert proc.returncode == 1 and "cannot write /proc/nope" in proc.stderr


def test_tlm_eval_refuses_a_stride_longer_than_the_context(save_dir):
    assert tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "2").returncode == 0
    proc = tlm("eval", "--local", "--save_dir", str(save_dir), "--stride", "1000")
    assert proc.returncode == 2
    assert "--stride 1000 is longer than the model's context (16)" in proc.stderr


def test_the_dataset_cache_follows_edits_to_own_text(tmp_path):
    """Train on mine.txt, change it, train again: the new text is tokenized, not the old tokens."""
    import tlm  # noqa: F401
    from tlm.data import load_dataset
    text = tmp_path / "mine.txt"
    text.write_text("abc\n" * 400)
    logs = []
    first = load_dataset(str(text), tmp_path / "datasets", log=logs.append)
    assert first.tokenizer.vocab_size == 4  # a, b, c and the line break
    text.write_text("xyz\n" * 400)
    second = load_dataset(str(text), tmp_path / "datasets", log=logs.append)
    assert "changed since it was tokenized" in logs[-2] and second.tokenizer.vocab_size == 4
    assert second.tokenizer.decode([int(t) for t in second.train[:3]]) == "xyz"
    os.utime(text)  # touched, same bytes: the cache stands
    logs.clear()
    load_dataset(str(text), tmp_path / "datasets", log=logs.append)
    assert logs == []


def test_a_new_model_in_a_used_directory_sets_the_old_run_aside(save_dir):
    assert tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "20").returncode == 0
    old = checkpoint.find(save_dir)
    proc = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "5", "--new_model",
               "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    assert "the earlier run's checkpoints and metrics moved to" in proc.stderr
    new = checkpoint.find(save_dir)  # before: retention kept the old run's and deleted this one
    assert new.step == 5 and new.state["config"]["seed"] == 7
    aside = next(save_dir.glob("replaced-*"))
    assert checkpoint.find(aside).identifier == old.identifier  # nothing lost
    resumed = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "8")
    assert f"resuming {new.identifier[:12]} at iteration 5" in resumed.stderr


@pytest.mark.parametrize("flags,message", [
    (["--new_model", "--identifier", "abc"], "give one of them"),
    (["--tokenizer", "byte"], "was trained with --tokenizer unset (word), not byte"),
])
def test_flags_that_contradict_are_refused(save_dir, flags, message):
    assert tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "2").returncode == 0
    proc = tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "4", *flags)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_init_from_refuses_shape_flags_and_a_directory_with_checkpoints(save_dir, tmp_path):
    assert tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "2").returncode == 0
    assert tlm("export", "--save_dir", str(save_dir), "--out", str(tmp_path / "export")).returncode == 0
    proc = tlm("train", "--save_dir", str(tmp_path / "new"), "--init_from", str(tmp_path / "export"),
               "--dim", "64")
    assert proc.returncode == 2 and "--dim: the model's shape comes from --init_from" in proc.stderr
    proc = tlm("train", "--save_dir", str(save_dir), "--init_from", str(tmp_path / "export"))
    assert proc.returncode == 2 and "already has checkpoints" in proc.stderr


def test_a_save_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = tlm("train", "--save_dir", str(tmp_path / "afile"))
    assert proc.returncode == 2 and f"--save_dir {tmp_path / 'afile'} is a file" in proc.stderr


def test_plot_refuses_bad_outputs_and_skips_foreign_lines(tmp_path, save_dir):
    assert tlm("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "10").returncode == 0
    with open(save_dir / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n{\"kind\": \"valid\"}\n")
    for out, message in ((tmp_path / "p.xyz", "must end in one of .png"),
                         (tmp_path / "missing" / "p.png", "no directory")):
        proc = tlm("plot", str(save_dir), "-o", str(out))
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    proc = tlm("plot", str(save_dir), "-o", str(tmp_path / "p.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_ctrl_c_cancels_a_job_no_worker_took(tmp_path, save_dir):
    """`submit --wait` and a queued `sample` with no worker: Ctrl+C ends the job, at once."""
    import signal
    from conftest import tlm_cmd
    from queue_helpers import registry
    url = f"sqlite://{tmp_path / 'queue.db'}"
    (tmp_path / "afile").write_text("x")
    proc = tlm("sample", "--local", "--save_dir", str(tmp_path / "afile"))
    assert proc.returncode == 1 and "is a file, not a run directory" in proc.stderr
    for args in (["submit", "train", "--save_dir", str(save_dir), *TINY, "--wait"],
                 ["sample", "--save_dir", str(save_dir), "--prompt", "the"]):
        child = subprocess.Popen(tlm_cmd(*args, "--queue", url), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        reg = registry(url)
        deadline = time.time() + 60
        while not reg.jobs(0) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)  # before: "cancelling", then waiting forever
        assert child.returncode in (1, 130), err
        assert [j.state for j in reg.jobs(5)][-1] == "cancelled"
        assert not reg.jobs(0)  # nothing left queued for a later worker


def test_a_full_disk_keeps_the_last_checkpoint_and_says_so(tmp_path, ptb_cache):
    """The save directory fills up mid-run: one line, the previous checkpoint still the latest."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (disk / "datasets").symlink_to(ptb_cache)
        proc = tlm("train", "--save_dir", str(disk), *TINY, "--num_iters", "10", "--steps_per_eval", "5",
                   "--save_retries", "0")  # each checkpoint is 8 MB: the second does not fit
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "No space left on device" in proc.stderr.strip().splitlines()[-1]
        saved = checkpoint.find(disk)
        assert saved.step == 5
        proc = tlm("sample", "--local", "--save_dir", str(disk), "--prompt", "the", "--max_tokens", "5")
        assert proc.returncode == 0 and proc.stdout.strip()
    finally:
        subprocess.run(["umount", str(disk)])


# -- checkpoints whose hashes are right but whose contents are not ----------------------------

def _drop(key):
    return lambda state, weights: ({k: v for k, v in state.items() if k != key}, weights)


def _set(key, value):
    return lambda state, weights: ({**state, key: value}, weights)


def _arg(key, value):
    return lambda state, weights: ({**state, "model_args": {**state["model_args"], key: value}}, weights)


def _tensor(fn):
    return lambda state, weights: (state, fn(dict(weights)))


EMBED = "model.embed_tokens.weight"
DAMAGED = [
    ("no model_args", _drop("model_args"), "its metadata has no 'model_args'"),
    ("no tokenizer", _drop("tokenizer"), "its metadata has no 'tokenizer'"),
    ("no config", _drop("config"), "its metadata has no 'config'"),
    ("config without context_size", _set("config", {}), "context_size is not usable"),
    ("an unknown model argument", _arg("flux_capacitor", 1), "unknown model argument 'flux_capacitor'"),
    ("hidden_size a string", _arg("hidden_size", "32"), "model argument 'hidden_size' is not usable"),
    ("no layers", _arg("num_hidden_layers", 0), "model argument 'num_hidden_layers' is not usable"),
    ("heads not dividing", _arg("num_attention_heads", 3), "is not a multiple of 'num_attention_heads'"),
    ("a tensor of the wrong shape", _tensor(lambda w: {**w, EMBED: w[EMBED][:, :16]}), "has shape"),
    ("a tensor missing", _tensor(lambda w: {k: v for k, v in w.items() if k != EMBED}), "is missing"),
    ("a tensor too many", _tensor(lambda w: {**w, "extra.weight": w[EMBED]}), "is not in the model"),
    ("step a string", _set("step", "ten"), "its metadata's 'step' is str"),
    ("step 10^30", _set("step", 10**30), "out of range"),
    ("elapsed a list", _set("elapsed", [1]), "its metadata's 'elapsed' is list"),
    ("a tokenizer of an unknown kind", _set("tokenizer", {"kind": "morse"}), "tokenizer do not load"),
    ("a vocabulary that is not a list", _set("tokenizer", {"kind": "word", "vocab": 7}), "do not load"),
]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, ptb_cache):
    run = tmp_path_factory.mktemp("good") / "run"
    import shutil
    shutil.copytree(ptb_cache, run / "datasets")
    proc = tlm("train", "--save_dir", str(run), *TINY, "--num_iters", "5")
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.mark.parametrize("name,damage,reason", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_a_checkpoint_that_hashes_right_but_is_not_usable_is_skipped_with_its_reason(
        name, damage, reason, good_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(good_run, run, symlinks=True)
    good = checkpoint.find(run)
    state, weights = damage({**good.state, "step": good.step + 1}, good.load_weights())
    bad = checkpoint.save(run, weights, good.load_tensors(), state)
    # Named: an error naming the reason. Latest: skipped with its reason; the good one is used.
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(reason)):
        checkpoint.verify(run, bad.identifier)
    warnings: list[str] = []
    assert checkpoint.find(run, warn=warnings.append).identifier == good.identifier
    assert len(warnings) == 1 and f"skipping checkpoint {bad.identifier[:12]}" in warnings[0], warnings
    assert reason in warnings[0]
    if name in ("a tensor of the wrong shape", "step 10^30"):  # and through the commands, in one line
        named = tlm("inspect", "--save_dir", str(run), "--identifier", bad.identifier)
        assert named.returncode == 1 and "Traceback" not in named.stderr, named.stderr
        assert reason in named.stderr.strip().splitlines()[-1], named.stderr
        latest = tlm("inspect", "--save_dir", str(run))
        assert latest.returncode == 0 and good.identifier in latest.stdout, latest.stderr
        sample = tlm("sample", "--local", "--save_dir", str(run), "--prompt", "the", "--max_tokens", "3")
        assert sample.returncode == 0 and reason in sample.stderr, sample.stderr
        resume = tlm("train", "--save_dir", str(run), *TINY, "--num_iters", "7")
        assert resume.returncode == 0 and f"resuming {good.identifier[:12]}" in resume.stderr, resume.stderr


# -- own text that is not what it seems ---------------------------------------------------------

def _fifo(d):
    os.mkfifo(d / "fifo.txt")
    return d / "fifo.txt"


def _folder_named_txt(d):
    (d / "corpus" / "chapter.txt").mkdir(parents=True)
    (d / "corpus" / "real.txt").write_text("hello world\n" * 500)
    return d / "corpus"


def _bad_name(d):
    (d / "corpus").mkdir()
    (d / "corpus" / os.fsdecode(b"caf\xe9.txt")).write_text("hello world\n" * 500)
    return d / "corpus"


def _bad_file_name(d):
    (d / os.fsdecode(b"caf\xe9.txt")).write_text("hello world\n" * 500)
    return d / os.fsdecode(b"caf\xe9.txt")


def _empty_folder(d):
    (d / "corpus").mkdir()
    (d / "corpus" / "notes.md").write_text("hello world\n" * 500)
    return d / "corpus"


def _self_link(d):
    (d / "corpus").mkdir()
    (d / "corpus" / "a.txt").write_text("hello world\n" * 500)
    os.symlink(d / "corpus", d / "corpus" / "loop")
    (d / "corpus" / "loop.txt").symlink_to(d / "corpus" / "loop.txt")  # a link to itself
    return d / "corpus"


def _utf16_no_bom(d):
    (d / "u16.txt").write_bytes(("hello world\n" * 500).encode("utf-16-le"))
    return d / "u16.txt"


def _broken_link(d):
    (d / "gone.txt").symlink_to(d / "nowhere.txt")
    return d / "gone.txt"


OWN_TEXT = [
    ("a FIFO", _fifo, "not a regular file or a folder"),
    ("a folder named *.txt", _folder_named_txt, None),  # its real.txt trains; the folder is skipped
    ("a name that is not UTF-8", _bad_name, "is not valid UTF-8: rename it"),
    ("a file whose own name is not UTF-8", _bad_file_name, "is not valid UTF-8: rename it"),
    ("a folder with no .txt file", _empty_folder, "no text found (no .txt files)"),
    ("a symlink loop", _self_link, "loop.txt"),
    ("UTF-16 without a byte-order mark", _utf16_no_bom, "UTF-16 without a byte-order mark"),
    ("a broken link", _broken_link, "gone.txt"),
]


@pytest.mark.parametrize("name,make,message", OWN_TEXT, ids=[c[0] for c in OWN_TEXT])
def test_own_text_is_checked_before_it_is_read(name, make, message, tmp_path):
    dataset = make(tmp_path)
    flags = ["--dataset", str(dataset), *TINY, "--num_iters", "2", "--tokenizer", "char"]
    queue = f"sqlite://{tmp_path / 'queue.db'}"
    for args in (["train", "--save_dir", str(tmp_path / "run"), *flags],
                 ["submit", "train", "--save_dir", str(tmp_path / "queued"), *flags, "--queue", queue]):
        proc = subprocess.run(tlm_cmd(*args), capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr, proc.stderr
        if message is None:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode in (1, 2) and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not list(tmp_path.rglob("*.part")), "a partial copy was left behind"


def test_utf16_with_a_byte_order_mark_is_decoded_not_trained_as_bytes(tmp_path):
    from tlm.data import load_dataset
    text = "hello wörld\n" * 2000
    (tmp_path / "u16.txt").write_bytes(text.encode("utf-16"))  # with its BOM
    data = load_dataset(str(tmp_path / "u16.txt"), tmp_path / "datasets", tokenizer="char")
    assert "\0" not in data.tokenizer.decode([int(t) for t in data.train[:200]])
    assert "ö" in data.tokenizer.decode([int(t) for t in data.train[:200]])


def test_tables_read_at_80_columns_with_whole_job_ids_and_status_watch_writes_into_a_pipe(tmp_path):
    """At 80 columns (and at 20) no line is wider than the terminal, a job id is never cut, and
    the columns left out are named; ``tlm status --watch`` into a pipe writes the table."""
    import re
    queue = f"sqlite://{tmp_path / 'queue.db'}"
    (tmp_path / "run").mkdir()
    job_id = submit(queue, "eval", "--save_dir", str(tmp_path / "run"))
    for width in (20, 80):
        env = {**os.environ, "COLUMNS": str(width), "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0"}  # a terminal
        for args in (["status"], ["runs"]):
            proc = subprocess.run(tlm_cmd(*args, "--queue", queue), capture_output=True, text=True, env=env,
                                  timeout=60)
            shown = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
            assert proc.returncode == 0 and max(map(len, shown.splitlines())) <= width, shown
            assert args == ["runs"] or job_id in shown.split(), shown  # whole, to copy
    status = re.sub(r"\x1b\[[0-9;]*m", "", subprocess.run(
        tlm_cmd("status", "--queue", queue), capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "80", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0"}).stdout)
    assert job_id in status.split() and "not shown at 80 columns: worker" in status, status
    watch = subprocess.Popen(tlm_cmd("status", "--watch", "--queue", queue), stdout=subprocess.PIPE, text=True)
    try:
        assert job_id in watch.stdout.readline() + "".join(watch.stdout.readline() for _ in range(5))
    finally:
        watch.kill()


def test_a_unix_socket_queue_url_works(tmp_path):
    sock = tmp_path / "redis.sock"
    server = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        ok = tlm("status", "--queue", f"unix://{sock}?db=2")
        assert ok.returncode == 0, ok.stderr  # was "the database must be a number"
        bad = tlm("status", "--queue", f"unix://{sock}?db=abc")
        assert bad.returncode == 1 and "the database must be a number, not 'abc'" in bad.stderr
    finally:
        server.kill()
