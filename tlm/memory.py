"""How much memory a training run needs, from its configuration alone (no MLX import):
what the queue compares with a worker's free memory before it claims a job.

    weights + gradients      4P + 4P bytes (float32)
    optimizer state          AdamW: 8P (two moments); Muon: 4 bytes per block-matrix
                             weight (momentum) and AdamW's 8 for the rest
    activations (training)   per block, B*T*(ACT_D*D + ACT_F*F) + B*H*T*T*ACT_ATT floats
                             (with --checkpoint, CKPT_BLOCKS of them: MLX keeps
                             more than one block's worth alive), plus the logits:
                             B*T*V*ACT_LOGITS floats
    evaluation batch         EVAL_TOKENS*V*EVAL_LOGITS floats (the logits and the loss's
                             temporaries over them; no gradients)
    runtime                  BASE bytes (MLX, the dataset, buffers)

The larger of the training activations and the evaluation batch counts (they are
never alive at once).

P parameters, B batch, T context, D width, F the MLP's hidden width (llama's 8/3 D
rounded up to 64), H heads, V vocabulary. The constants were fitted to MLX's measured
peak memory (benchmarks/memory_estimate.py; table in docs/performance.md).
"""

from __future__ import annotations

from typing import Any

from tlm.config import DATASETS, TrainConfig

OWN_TEXT_VOCAB = 256  # own text: char, at most a few hundred
EVAL_TOKENS = 8192  # tokens per evaluation batch (tlm.train.EVAL_TOKENS)
ACT_D, ACT_F, ACT_ATT, ACT_LOGITS, EVAL_LOGITS = 14, 4, 3, 7.5, 6.5
CKPT_BLOCKS = 0.75  # of --num_blocks, with --checkpoint
BASE = 100 * 2**20


def parameters(dim: int, blocks: int, vocab: int, tied: bool) -> tuple[int, int]:
    """(all parameters, those in the blocks' weight matrices)."""
    hidden = -(-8 * dim // 3 // 64) * 64
    matrices = blocks * (4 * dim * dim + 3 * dim * hidden)
    return matrices + blocks * 2 * dim + dim + vocab * dim * (1 if tied else 2), matrices


def estimate(config: dict[str, Any], vocab: int | None = None) -> int:
    """Bytes a training job's process will peak at, from its flags (TrainConfig's fields)."""
    c = TrainConfig(**{k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__
                       and k != "save_dir"})
    v = vocab or (DATASETS[c.dataset].vocab if c.dataset in DATASETS else OWN_TEXT_VOCAB)
    d, n, h, t = c.dim, c.num_blocks, c.num_heads, c.context_size
    b = c.batch_size // max(c.nodes, 1)  # each rank holds its share of the batch
    f = -(-8 * d // 3 // 64) * 64
    p, matrices = parameters(d, n, v, c.tie_embeddings)
    optimizer = 8 * p if c.optimizer == "adamw" else 4 * matrices + 8 * (p - matrices)
    per_block = b * t * (ACT_D * d + ACT_F * f) + b * h * t * t * ACT_ATT
    activations = per_block * (max(1.0, CKPT_BLOCKS * n) if c.checkpoint else n) + b * t * v * ACT_LOGITS
    evaluation = EVAL_TOKENS * v * EVAL_LOGITS
    return int(BASE + 8 * p + optimizer + 4 * max(activations, evaluation))


def size_text(n: float) -> str:
    """Bytes as a reader wants them: 512 MiB, 2.1 GiB, 1.5 TiB."""
    if n >= 2**40:
        return f"{n / 2**40:,.1f} TiB"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
