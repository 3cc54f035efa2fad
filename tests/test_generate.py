"""Generation: KV cache against full recomputation, samplers, the REPL, sampling jobs."""

import signal
import subprocess
import time

import numpy as np
import pytest

import tlm  # noqa: F401
import mlx.core as mx

from tlm import checkpoint
from tlm.generate import SampleConfig, generate, make_sampler
from tlm.model import Model, ModelArgs

from conftest import tlm_cmd
from queue_helpers import TINY, Workers, registry


def small_model() -> Model:
    mx.random.seed(3)
    model = Model(ModelArgs(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    mx.eval(model.parameters())
    return model.eval() or model


def recompute(model: Model, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """The seed's method: run the whole sequence again for every new token (greedy)."""
    seq, logits = list(prompt), []
    for _ in range(n):
        last = model(mx.array([seq]))[0, -1]
        logits.append(np.array(last))
        seq.append(int(mx.argmax(last).item()))
    return seq[len(prompt):], logits


def test_cached_decoding_matches_full_recomputation():
    model = small_model()
    prompt = [5, 3, 9, 1]
    expected, expected_logits = recompute(model, prompt, 12)
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    got = []
    for want in expected_logits:
        np.testing.assert_allclose(np.array(logits), want, rtol=1e-4, atol=1e-4)
        got.append(int(mx.argmax(logits).item()))
        logits = model(mx.array([[got[-1]]]), cache=cache)[0, -1]
    assert got == expected
    greedy = SampleConfig(max_tokens=12, temperature=0)
    assert list(generate(model, prompt, greedy, context_size=64)) == expected


def test_generation_runs_past_the_context_with_a_sliding_window():
    model = small_model()
    out = list(generate(model, [1, 2, 3], SampleConfig(max_tokens=50, temperature=0.8), context_size=8))
    assert len(out) == 50
    assert model.make_cache(8)[0].max_size == 8


def test_same_seed_same_sample_other_seed_other_sample():
    model = small_model()
    run = lambda seed: list(generate(model, [4, 2], SampleConfig(max_tokens=30, temperature=1.0,
                                                                  top_k=0, seed=seed), 64))
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_samplers_restrict_the_choice():
    logits = mx.array([0.0, 5.0, 4.9, -2.0])
    none = mx.array([0])

    def picks(banned=None, **kw):
        sample = make_sampler(SampleConfig(**{"temperature": 1.0, "top_k": 0, **kw}), 4, banned)
        return {int(sample(logits, none, k).item()) for k in mx.random.split(mx.random.key(0), 200)}
    assert picks(top_p=0.01) == {1}
    assert picks(top_k=2) == {1, 2}
    assert picks(min_p=0.5) == {1, 2}
    assert len(picks(temperature=5.0)) == 4
    assert 1 not in picks(banned=1, temperature=5.0)  # <unk>, unless --allow_unk
    penalised = make_sampler(SampleConfig(temperature=0, repetition_penalty=2.0), 4)(
        logits, mx.array([1]), mx.random.key(0))
    assert penalised.item() == 2


@pytest.fixture
def trained(save_dir):
    proc = subprocess.run(tlm_cmd("train", "--save_dir", str(save_dir), *TINY, "--num_iters", "20"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return save_dir


def test_repl_handles_awkward_input_without_tracebacks(trained):
    long = " ".join(["the"] * 100)
    session = "\n".join(["", "the stock market", "zzyzx qwrtp", long, "ünïcödé ☃", "quit", "never read"])
    proc = subprocess.run(tlm_cmd("sample", "--interactive", "--save_dir", str(trained),
                                  "--max_tokens", "5"), input=session + "\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    found = checkpoint.find(trained)
    assert f"loaded {found.identifier[:12]} (iteration 20, validation perplexity" in proc.stderr
    assert "read as <unk>: qwrtp, zzyzx" in proc.stderr
    assert "the prompt has 100 tokens: using its last 16" in proc.stderr
    assert "ünïcödé" in proc.stderr
    assert proc.stdout.count("> ") == 6  # empty, 4 prompts, quit


def test_repl_ends_cleanly_on_eof_and_on_ctrl_c(trained):
    eof = subprocess.run(tlm_cmd("sample", "-i", "--save_dir", str(trained)), input="",
                         capture_output=True, text=True, timeout=120)
    assert eof.returncode == 0 and "Traceback" not in eof.stderr
    proc = subprocess.Popen(tlm_cmd("sample", "-i", "--save_dir", str(trained)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while "type a prompt" not in proc.stderr.readline() and time.time() < deadline:
        pass
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err


def test_no_checkpoint_says_how_to_train_one(tmp_path):
    proc = subprocess.run(tlm_cmd("sample", "--local", "--save_dir", str(tmp_path), "--prompt", "x"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"no checkpoint in {tmp_path}: train one first, e.g. `tlm train --save_dir" in proc.stderr


def test_a_sampling_job_through_a_worker_matches_local_sampling(trained, tmp_path):
    url = f"sqlite://{tmp_path / 'queue.db'}"
    args = ["sample", "--save_dir", str(trained), "--prompt", "the company said",
            "--max_tokens", "12", "--seed", "5", "--num_samples", "2"]
    local = subprocess.run(tlm_cmd(*args, "--local"), capture_output=True, text=True, timeout=60)
    workers = Workers(url, tmp_path)
    try:
        workers.start()
        queued = [subprocess.run(tlm_cmd(*args, "--queue", url), capture_output=True, text=True,
                                 timeout=120) for _ in range(2)]
    finally:
        workers.stop_all()
    assert queued[0].returncode == 0, queued[0].stderr
    assert queued[0].stdout == queued[1].stdout == local.stdout
    assert local.stdout.count("\n") >= 2 and local.stdout.strip()  # two samples, <eos> as line breaks
    jobs = sorted((j for j in registry(url).jobs() if j.kind == "sample"), key=lambda j: j.created)
    assert [j.result["model_cached"] for j in jobs] == [False, True]  # the worker kept it


def test_tlm_eval_local_whole_split_and_sliding_window(trained):
    def run(*extra):
        proc = subprocess.run(tlm_cmd("eval", "--local", "--save_dir", str(trained), "--split", "test",
                                      "--tokens", "3000", *extra), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return float(proc.stdout.split("test loss ")[1].split()[0])

    plain, sliding = run(), run("--stride", "4")
    assert 0 < sliding < 12 and 0 < plain < 12
    assert sliding != plain  # more context per scored token changes the loss


def test_the_readme_sampling_example_reads_like_text(trained):
    """Non-empty, no <unk>, <eos> as line breaks; --stop_at_eos stops at the first one."""
    base = ["sample", "--local", "--save_dir", str(trained), "--prompt", "the company said",
            "--max_tokens", "40"]
    for seed in range(3):
        proc = subprocess.run(tlm_cmd(*base, "--seed", str(seed)), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
        assert "<unk>" not in proc.stdout and "<eos>" not in proc.stdout
        assert len(proc.stdout.split()) >= 20  # it kept going past line ends
    from tlm import checkpoint
    ckpt = checkpoint.find(trained)
    model, tok = ckpt.load_model(), ckpt.tokenizer
    prompt = tok.encode("the company said")
    free = list(generate(model, prompt, SampleConfig(max_tokens=200, temperature=1.0, seed=3,
                                                     allow_unk=True), 64, tok.eos, tok.unk))
    assert tok.eos in free and tok.unk in free  # an undertrained model says both often
    banned = list(generate(model, prompt, SampleConfig(max_tokens=200, temperature=1.0, seed=3),
                           64, tok.eos, tok.unk))
    assert tok.unk not in banned
    stopped = list(generate(model, prompt, SampleConfig(max_tokens=200, temperature=1.0, seed=3,
                                                        stop_at_eos=True), 64, tok.eos, tok.unk))
    assert stopped == banned[:banned.index(tok.eos)]


def test_an_empty_continuation_says_why(trained):
    proc = subprocess.run(tlm_cmd("sample", "--local", "--save_dir", str(trained), "--prompt", "the",
                                  "--max_tokens", "0"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "\n"
    assert proc.stderr.strip().splitlines()[-1] == "empty continuation: --max_tokens is 0"
    proc = subprocess.run(tlm_cmd("sample", "--local", "--save_dir", str(trained), "--prompt", "the",
                                  "--stop", " ", "--max_tokens", "30"),
                          capture_output=True, text=True, timeout=60)
    assert "empty continuation: a --stop string (' ') came first" in proc.stderr  # the word's space


def test_greedy_decoding_matches_mlx_lm_on_the_export(trained, tmp_path):
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from tlm import checkpoint
    from tlm.export import export
    ckpt = checkpoint.find(trained)
    export(ckpt, tmp_path / "export")
    theirs, _ = load(str(tmp_path / "export"))
    prompt = ckpt.tokenizer.encode("the company said")
    expected = [t for t, _ in generate_step(mx.array(prompt), theirs, max_tokens=40)]
    ours = list(generate(ckpt.load_model(), prompt, SampleConfig(max_tokens=40, temperature=0,
                                                                  allow_unk=True), 1000))
    assert ours == expected


def test_the_seeds_inference_flag_runs_the_repl_in_a_terminal(trained):
    """`python main.py --inference` as the seed spells it, driven through a pseudo-terminal."""
    import os
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the seed's command on a terminal
        os.execvp(tlm_cmd()[0], tlm_cmd("train", "--inference", "--save_dir", str(trained),
                                        "--top_k", "5", "--temperature", "0.1"))
    out = b""

    def read_until(prompts: int, timeout: float = 120) -> None:
        """Read the terminal until it has shown ``prompts`` prompts."""
        nonlocal out
        deadline = time.time() + timeout
        while out.count(b"> ") < prompts and time.time() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        assert out.count(b"> ") >= prompts, out.decode(errors="replace")
    read_until(1)
    os.write(fd, b"the company\n")
    read_until(2, 60)
    os.write(fd, b"quit\n")
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.WEXITSTATUS(status) == 0, text
    found = checkpoint.find(trained)
    assert f"loaded {found.identifier[:12]}" in text and "Traceback" not in text
    after = text.split("the company", 1)[1]
    assert after.split("> ")[0].strip()  # a continuation was printed before the next prompt
