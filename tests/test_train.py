import math

import pytest

import tlm  # noqa: F401  (BLAS before MLX)
import mlx.core as mx
from tlm.config import TrainConfig
from tlm.data import Dataset, load_dataset
from tlm.train import Trainer, evaluate

from conftest import Collect

def ptb_subset(save_dir) -> Dataset:
    """Real PTB with the validation split cut to 5,000 tokens, so evaluation is quick."""
    d = load_dataset("ptb", save_dir / "datasets")
    return Dataset(d.name, d.tokenizer, d.train, d.valid[:5000], d.test[:5000])


SMALL = dict(dim=64, num_heads=4, num_blocks=2, context_size=32, batch_size=16,
             learning_rate=3e-3, lr_warmup=10, steps_per_report=10)


def losses(save_dir, **kw):
    config = TrainConfig(save_dir=str(save_dir), **{**SMALL, **kw})
    hooks = Collect()
    result = Trainer(config, ptb_subset(save_dir), hooks=hooks).run()
    return result, [p.train_loss for p in hooks.events if p.kind == "report"]


def test_loss_falls_on_real_ptb(save_dir):
    result, reported = losses(save_dir, num_iters=80, steps_per_eval=80)
    assert reported[-1] < reported[0] - 1.0
    assert result.val_loss < math.log(10000) - 1.5  # far better than uniform over the vocabulary
    assert result.checkpoint and (save_dir / f"{result.checkpoint}.safetensors").exists()


def test_same_seed_same_losses_other_seed_other_losses(save_dir, tmp_path):
    first = losses(save_dir, num_iters=20, steps_per_eval=1000, new_model=True, dropout=0.1)[1]
    second = losses(save_dir, num_iters=20, steps_per_eval=1000, new_model=True, dropout=0.1)[1]
    third = losses(save_dir, num_iters=20, steps_per_eval=1000, new_model=True, dropout=0.1,
                   seed=7)[1]
    assert first == second
    assert first != third


def test_a_time_budget_ends_the_run_on_time_with_the_rate_decayed_by_the_clock(save_dir):
    """--time_budget: steps are not what ends the run or shapes the decay, the minutes are."""
    config = TrainConfig(save_dir=str(save_dir), **{**SMALL, "num_iters": 100_000, "time_budget": 0.25,
                                                    "steps_per_eval": 100_000})
    hooks = Collect()
    result = Trainer(config, ptb_subset(save_dir), hooks=hooks).run()
    reports = [p for p in hooks.events if p.kind == "report"]
    rates = [p.learning_rate for p in reports]
    assert 10 < result.step < 100_000
    assert reports[-1].elapsed >= 15 and reports[-1].total == result.step
    assert result.val_loss is not None and result.checkpoint  # then evaluated and saved as at the end
    assert max(rates) > 0.8 * SMALL["learning_rate"]
    assert rates[1:] == sorted(rates[1:], reverse=True)  # after the warmup, only decay
    assert rates[-1] < 0.15 * SMALL["learning_rate"]  # ... to a tenth, reached on time


def test_a_warmup_stable_decay_schedule_holds_the_peak_then_falls_linearly_to_a_tenth():
    """--lr_cooldown 0.4: the peak until 60% of training, then a straight line to a tenth; without
    it the cosine; and a time budget whose --num_iters come first still ends decayed."""
    from tlm.optimizer import follow_budget, make_optimizer, make_schedule

    wsd = make_schedule(TrainConfig(learning_rate=1.0, lr_warmup=10, num_iters=110, lr_cooldown=0.4))
    rates = [wsd(mx.array(step, mx.uint64)).item() for step in (0, 5, 10, 60, 70, 90, 110, 200)]  # as MLX counts
    assert rates == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1])
    cosine = make_schedule(TrainConfig(learning_rate=1.0, lr_warmup=10, num_iters=110))
    assert [cosine(mx.array(step, mx.uint64)).item() for step in (5, 10, 60, 110)] == pytest.approx([0.5, 1.0, 0.55, 0.1])
    config = TrainConfig(learning_rate=1.0, lr_warmup=0, num_iters=100, time_budget=10, lr_cooldown=0.4)
    optimizer = make_optimizer(config)
    follow_budget(optimizer, config, step=80, spent=0.3)  # the steps end it first: 80% through
    assert optimizer.learning_rate.item() == pytest.approx(0.55)
    with pytest.raises(Exception, match="--lr_cooldown"):
        TrainConfig(lr_cooldown=1.5).validate()


def test_muon_learns_faster_than_adamw_in_the_same_steps(save_dir):
    adamw, _ = losses(save_dir, num_iters=40, steps_per_eval=40, new_model=True)
    muon, _ = losses(save_dir, num_iters=40, steps_per_eval=40, new_model=True, optimizer="muon")
    assert muon.val_loss < adamw.val_loss


def test_muon_weight_decay_is_decoupled_from_the_orthogonalised_update():
    import mlx.optimizers as optim
    from tlm.optimizer import Muon

    weights, no_gradient = {"w": mx.ones((4, 4))}, {"w": mx.zeros((4, 4))}
    ours = Muon(learning_rate=0.1, weight_decay=0.5).apply_gradients(no_gradient, weights)
    assert mx.allclose(ours["w"], mx.full((4, 4), 0.95)).item()  # shrunk by lr * decay, as AdamW
    mlx = optim.Muon(learning_rate=0.1, weight_decay=0.5).apply_gradients(no_gradient, weights)
    assert not mx.allclose(mlx["w"], ours["w"]).item()  # MLX's decay goes through Newton-Schulz


def test_a_batch_split_across_cpu_streams_gives_one_streams_loss_and_gradients(monkeypatch):
    """Each stream takes a share of the batch; the weighted sum is the whole batch's mean."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten

    from tlm import parallel
    from tlm.model import Model, ModelArgs
    from tlm.train import loss_fn

    mx.random.seed(0)
    model = Model(ModelArgs(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    batch = mx.random.randint(0, 50, (7, 17))  # 7 rows: shares of 3/7 and 4/7 on two streams
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    whole = loss_and_grad(model, batch[:, :-1], batch[:, 1:])
    monkeypatch.setenv("TLM_CPU_STREAMS", "2")
    shards = parallel.map_shards(lambda b: loss_and_grad(model, b[:, :-1], b[:, 1:]), [batch])
    split = parallel.weighted_sum(shards)
    assert len(set(parallel.streams())) == 2
    assert [w for w, _ in shards] == [3 / 7, 4 / 7]
    assert abs(split[0].item() - whole[0].item()) < 1e-5
    for (name, a), (_, b) in zip(tree_flatten(whole[1]), tree_flatten(split[1])):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6, err_msg=name)


def test_eval_stride_scores_the_split_with_a_sliding_window(save_dir):
    data = ptb_subset(save_dir)
    trainer = Trainer(TrainConfig(save_dir=str(save_dir), **SMALL, eval_stride=8), data)
    for _ in range(30):
        mx.eval(trainer._train_step(mx.array(next(trainer.batches))), trainer._state)
    sliding = trainer.evaluate()
    assert sliding == pytest.approx(evaluate(trainer.model, data.valid, 32, stride=8), rel=1e-6)
    assert sliding != evaluate(trainer.model, data.valid, 32)  # not the non-overlapping windows


def test_a_short_run_scores_a_bounded_validation_sample_and_a_long_one_the_whole_split(save_dir):
    """The seed's smoke test trains 960 tokens: scoring all 73,760 validation tokens of the
    default model would take a minute after six seconds of training."""
    data = load_dataset("ptb", save_dir / "datasets")
    whole = len(data.valid) - 1

    def scored(**kw) -> int:
        config = TrainConfig(save_dir=str(save_dir), dim=32, num_heads=2, num_blocks=1, **kw)
        return Trainer(config, data).validation_tokens()
    assert scored(num_iters=10, batch_size=2, context_size=48) == 4096
    assert scored(num_iters=50, batch_size=16, context_size=48) == 50 * 16 * 48  # as many as it trained on
    assert scored(num_iters=460, batch_size=16, context_size=256) == whole  # ptb-cpu: all of it
    assert scored(num_iters=10, batch_size=2, time_budget=1.0) == whole  # a time budget: all of it
    assert scored(num_iters=10, batch_size=2, eval_tokens=500) == 500  # --eval_tokens decides


def test_a_busy_machine_is_said_once_and_a_quiet_one_not_at_all():
    from tlm.train import busy_note
    assert busy_note(5.3, 2) == ("this machine is busy: load 5.3 on 2 cores, so this run trains slower than "
                                 "it could (other processes hold the cores)")
    assert busy_note(2.4, 2) is None and busy_note(None, 2) is None  # a run's own two streams
