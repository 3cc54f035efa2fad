import math

import tlm  # noqa: F401
from tlm.config import TrainConfig
from tlm.data import Dataset, load_dataset
from tlm.train import Trainer

def ptb_subset(save_dir) -> Dataset:
    """Real PTB with the validation split cut to 5,000 tokens, so evaluation is quick."""
    d = load_dataset("ptb", save_dir / "datasets")
    return Dataset(d.name, d.tokenizer, d.train, d.valid[:5000], d.test[:5000])


SMALL = dict(dim=64, num_heads=4, num_blocks=2, context_size=32, batch_size=16,
             learning_rate=3e-3, lr_warmup=10, steps_per_report=10)


def losses(save_dir, **kw):
    config = TrainConfig(save_dir=str(save_dir), **{**SMALL, **kw})
    trainer = Trainer(config, ptb_subset(save_dir))
    seen = []
    result = trainer.run(on_progress=lambda p: seen.append(p))
    return result, [p.train_loss for p in seen if p.kind == "report"]


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
