"""Export to mlx-lm: its loader, tokenizer and greedy generation agree with ours."""

import subprocess
import sys

import pytest

import tlm  # noqa: F401

from conftest import tlm_cmd

CHECK = r"""
import json, sys
import tlm
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler
from transformers import AutoTokenizer
from tlm import checkpoint
from tlm.generate import SampleConfig, generate

out, run, prompt = sys.argv[1:4]
model, tok = load(out)
hf = AutoTokenizer.from_pretrained(out)
ckpt = checkpoint.find(run)

ids = ckpt.tokenizer.encode(prompt)
theirs = [r.token for r in stream_generate(model, tok, mx.array(ids), max_tokens=12,
                                           sampler=make_sampler(0.0))]
if theirs and theirs[-1] == ckpt.tokenizer.eos:
    theirs.pop()  # mlx-lm yields the end token it stopped at; ours leaves it out
# Both stop at <eos> (word level); mlx-lm reads it from config.json's eos_token_id.
ours = list(generate(ckpt.load_model(), ids, SampleConfig(max_tokens=12, temperature=0, stop_at_eos=True,
                                                         allow_unk=True), 64, ckpt.tokenizer.eos))
print(json.dumps({"hf_ids": hf.encode(prompt, add_special_tokens=False), "ids": ids,
                  "theirs": theirs, "ours": ours,
                  "hf_text": hf.decode(ours), "text": ckpt.tokenizer.decode(ours)}))
"""


@pytest.mark.parametrize("kind", ["word", "char", "byte", "bpe"])
def test_mlx_lm_generates_what_we_generate_from_the_export(tmp_path, kind):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . she sells sea shells .\n" * 300
                    + "café naïve ☃\n" * 20)
    run, out = tmp_path / "run", tmp_path / "export"
    train = subprocess.run(tlm_cmd("train", "--dataset", str(text), "--tokenizer", kind, "--save_dir",
                                   str(run), "--dim", "32", "--num_heads", "2", "--num_blocks", "2",
                                   "--context_size", "24", "--batch_size", "8", "--num_iters", "60",
                                   "--learning_rate", "1e-2", "--lr_warmup", "5", "--eval_tokens", "200",
                                   "--tie_embeddings"), capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    export = subprocess.run(tlm_cmd("export", "--save_dir", str(run), "--out", str(out)),
                            capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    check = subprocess.run([sys.executable, "-c", CHECK, str(out), str(run), "the lazy café"],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    import json
    r = json.loads(check.stdout.strip().splitlines()[-1])
    assert r["hf_ids"] == r["ids"]
    assert r["theirs"] == r["ours"] and len(set(r["ours"])) > 1
    assert r["hf_text"].replace(" ", "") == r["text"].replace(" ", "") if kind == "word" else \
        r["hf_text"] == r["text"]


def test_init_from_an_export_continues_from_its_weights(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . she sells sea shells .\n" * 300)
    flags = ["--dataset", str(text), "--context_size", "24", "--batch_size", "8", "--eval_tokens", "200",
             "--steps_per_report", "1"]
    shape = ["--dim", "32", "--num_heads", "2", "--num_blocks", "2"]  # --init_from brings its own

    def train(run, *extra):
        proc = subprocess.run(tlm_cmd("train", "--save_dir", str(tmp_path / run), *flags, *extra),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    train("base", *shape, "--tokenizer", "word", "--num_iters", "60", "--learning_rate", "1e-2",
          "--lr_warmup", "5")
    out = tmp_path / "export"
    subprocess.run(tlm_cmd("export", "--save_dir", str(tmp_path / "base"), "--out", str(out)), check=True,
                   capture_output=True)
    first_loss = lambda log: float(log.split("iter 1/")[1].split("train loss ")[1].split()[0])
    tuned = train("tuned", "--init_from", str(out), "--num_iters", "2")
    fresh = train("fresh", *shape, "--tokenizer", "word", "--num_iters", "2")
    assert f"starting from {out}" in tuned
    assert first_loss(tuned) < first_loss(fresh) - 1.0  # it starts where the export left off
    bad = subprocess.run(tlm_cmd("train", "--save_dir", str(tmp_path / "x"), "--init_from", str(tmp_path)),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no config.json there" in bad.stderr
