import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tlm  # noqa: F401
from tlm.data import Batches, DataError, eval_windows, load_dataset


def test_ptb_through_the_mirror_has_the_standard_sizes(ptb_cache):
    data = load_dataset("ptb", ptb_cache)  # cached: no mirror needed now
    assert data.vocab_size == 10000
    assert len(data.train) == 887521 + 42068  # words + one <eos> per line
    tok = data.tokenizer
    assert tok.decode(tok.encode("the stock market")) == "the stock market"
    assert tok.encode("zzzunseenword") == [tok.vocab.index("<unk>")]
    assert tok.unknown("the zzzunseenword") == ["zzzunseenword"]


def test_vocabulary_is_identical_across_processes(tmp_path, mirror):
    code = ("import sys, tlm; from tlm.data import load_dataset; "
            "load_dataset('ptb', sys.argv[1], sys.argv[2])")
    digests = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name), mirror], check=True,
                       env={"PYTHONHASHSEED": name == "a" and "1" or "2", "PATH": ""})
        vocab = (tmp_path / name / "ptb" / "word" / "tokenizer.json").read_bytes()
        digests.append(hashlib.sha256(vocab).hexdigest())
    assert digests[0] == digests[1]


def test_checksum_mismatch_is_rejected(tmp_path, mirror):
    bad = tmp_path / "mirror" / "ptb"
    shutil.copytree(Path(mirror) / "ptb", bad)
    with open(bad / "ptb.valid.txt", "a") as f:
        f.write("tampered\n")
    with pytest.raises(DataError) as e:
        # The canonical URL is unreachable offline, so the mirror is the only source.
        load_dataset("ptb", tmp_path / "data", str(tmp_path / "mirror"))
    assert "checksum" in str(e.value) and "TLM_DATA_MIRROR" in str(e.value)
    assert not (tmp_path / "data" / "ptb" / "ptb.valid.txt").exists()


def test_batches_are_non_overlapping_windows_in_a_seeded_permutation():
    tokens = np.arange(100, dtype=np.int32)
    b = Batches(tokens, context_size=9, batch_size=3, seed=1)
    seen = [next(b) for _ in range(3)]  # 10 windows of 10: 3 batches per epoch
    rows = np.concatenate(seen)
    assert rows.shape == (9, 10)
    assert len({r[0] for r in rows}) == 9 and all(r[0] % 10 == 0 for r in rows)
    assert b.state() == {"epoch": 0, "position": 9, "shift": False}
    next(b)
    assert b.state() == {"epoch": 1, "position": 3, "shift": False}
    again = Batches(tokens, context_size=9, batch_size=3, seed=1, epoch=0, position=3)
    np.testing.assert_array_equal(next(again), seen[1])


def test_shifted_epochs_cut_the_text_at_a_seeded_offset():
    tokens = np.arange(100, dtype=np.int32)
    b = Batches(tokens, context_size=9, batch_size=3, seed=1, shift=True)
    offsets = []
    for epoch in range(6):
        rows = np.concatenate([next(b) for _ in range(3)])  # 9 or 10 windows: 3 batches
        assert b.epoch == epoch
        assert len({r[0] for r in rows}) == 9 and (np.diff(rows, axis=1) == 1).all()
        offsets.append(rows[0][0] % 10)
        assert all(r[0] % 10 == offsets[-1] for r in rows)  # non-overlapping within the epoch
    assert offsets[0] == 0 and len(set(offsets)) > 2
    resumed = Batches(tokens, context_size=9, batch_size=3, seed=1, **b.state())
    np.testing.assert_array_equal(next(resumed), next(b))


@pytest.mark.parametrize("stride", [None, 1, 2, 5])
def test_eval_windows_score_every_target_exactly_once(stride):
    tokens = np.arange(23)
    for batch in (2, 3, 4):
        batches = list(eval_windows(tokens, 5, batch, stride))
        scored = np.concatenate([y[w > 0] for _, y, w in batches])
        np.testing.assert_array_equal(np.sort(scored), np.arange(1, 23))
        # one shape, the last batch padded with unscored rows: a new shape recompiles MLX's kernels
        assert {x.shape for x, _, _ in batches} == {(batch, 5)}
    (one,) = eval_windows(tokens, 5, 64, stride)  # a split that fits in one batch: no padding
    assert (one[2].sum(axis=1) > 0).all()
    if stride == 1:  # all but the first window's targets see a full context
        first = next(eval_windows(tokens, 5, 2, stride))
        assert first[2][1].tolist() == [0, 0, 0, 0, 1]
