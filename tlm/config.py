"""Training configuration: the seed's flags as one JSON-serialisable dataclass.

The CLI builds its options from these fields, so flags, defaults and help
live in exactly one place, and the same object travels in queue payloads and
checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import platformdirs

RAMDISK = Path("/Volumes/RAMDisk")


@dataclass(frozen=True)
class BuiltIn:
    """A built-in dataset as flags and the memory estimate know it (its files and how they
    become splits: ``tlm.data.SOURCES``, which needs numpy)."""
    tokenizer: str  # its own: word, char or byte
    vocab: int  # that tokenizer's vocabulary on it


DATASETS: dict[str, BuiltIn] = {  # the one list of built-in datasets
    "ptb": BuiltIn("word", 10_000), "shakespeare": BuiltIn("char", 65), "wikitext2": BuiltIn("word", 33_278),
    "wikitext103": BuiltIn("word", 267_735), "enwik8": BuiltIn("byte", 205)}
MORE = re.compile(r"[1-9]\d*|\d+(\.\d+)?m")  # --more: steps, or minutes
RUN_INPUTS = "inputs"  # where `tlm submit` copies a run's own text, inside its directory
RUN_DATA = "datasets"  # where a run's data is prepared, inside its directory (unless its opener says)
TOKENIZERS = ("word", "char", "byte", "bpe")
OPTIMIZERS = ("adamw", "muon")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # a bool flag given as text
BACKENDS = ("ring", "jaccl", "nccl")  # MLX's distributed backends whose ranks tlm can start


class ConfigError(ValueError):
    """An invalid setting, reported to the user as one line before any work starts."""


# Tuned starting points; explicit flags override them. See the README for why.
PRESETS: dict[str, dict[str, Any]] = {
    # Tiny Shakespeare on a 2-core CPU, found by `tlm sweep` (benchmarks/sweep.py: 48 trials of
    # 7-9 s over width, depth, batch, context, both learning rates and warmup): 2 blocks of 64
    # on context 32, batch 32, Muon, 9 s of training (the decay follows the clock), one
    # whole-split evaluation at the end: validation loss 1.83 after 9.8 s of wall time from
    # process start (517 steps). The shape it replaced (nanoGPT's 4 blocks of 128, context 64,
    # batch 12, 300 steps) reached 1.854 in 21-31 s.
    "shakespeare-cpu": dict(dataset="shakespeare", dim=64, num_blocks=2, num_heads=4, context_size=32,
                            batch_size=32, num_iters=100000, time_budget=0.15, optimizer="muon",
                            learning_rate=5.3e-3, muon_learning_rate=0.031, lr_warmup=9,
                            steps_per_eval=100000, temperature=0.8),
    # Five minutes of Tiny Shakespeare on a 2-core CPU: shakespeare-cpu's optimizer on nanoGPT's
    # small shape (4 blocks of 128, context 64), trained 4.6 minutes: validation loss 1.509
    # (2.18 bits per character) after 280.9 s of wall time from process start (1,402 steps);
    # the best five-minute figure before it was 1.676 (issue 33). Found by hand, one run: not yet swept.
    "shakespeare-cpu-5m": dict(dataset="shakespeare", dim=128, num_blocks=4, num_heads=4, context_size=64,
                               batch_size=32, num_iters=100000, time_budget=4.6, optimizer="muon",
                               learning_rate=5.3e-3, muon_learning_rate=0.031, lr_warmup=9,
                               steps_per_eval=100000, temperature=0.8),
    # PTB on a 2-core CPU, found by `tlm sweep` (17 ten-minute trials, ASHA; docs/performance.md):
    # 3 blocks of 256 on windows of 256 tokens, 16 a batch, tied embeddings, Muon, ten minutes of
    # training or 460 steps (two epochs), whichever ends first; the rate held then decayed over
    # the last 74%, test windows every 64 tokens. Raced against the shape before it (4 blocks,
    # context 128, cooldown 0.5; benchmarks/race.py, one run each, 1,950 tokens/s): test
    # perplexity 95.7 against 100.0 (96.1 in a second race).
    "ptb-cpu": dict(dataset="ptb", dim=256, num_blocks=3, num_heads=4, context_size=256, batch_size=16,
                    num_iters=460, time_budget=10, optimizer="muon", learning_rate=3.9e-3,
                    muon_learning_rate=0.014, lr_warmup=20, lr_cooldown=0.74, tie_embeddings=True,
                    steps_per_eval=230, eval_stride=64, eval_test=True),
    # An hour of PTB on a 2-core CPU: 4 blocks of 256 on windows of 128, trained 57 minutes
    # with the regularisation ten epochs need (dropout, word-type dropout, weight decay, and
    # windows cut at another offset each epoch), evaluated with overlapping windows: test
    # perplexity 77.9 after 57.5 min (5,572 steps) on a 250 GFLOP/s machine; 91.5-91.9 without the
    # word-type dropout, weight decay, shifted epochs and dropout before the output layer.
    "ptb-cpu-hour": dict(dataset="ptb", dim=256, num_blocks=4, num_heads=4, context_size=128,
                         batch_size=16, num_iters=8000, time_budget=57, optimizer="muon",
                         learning_rate=3e-3, muon_learning_rate=0.02, lr_warmup=50,
                         tie_embeddings=True, dropout=0.25, embed_dropout=0.1, weight_decay=0.1,
                         steps_per_eval=1100, eval_stride=64, eval_test=True),
    # Larger models for a Metal GPU, one per dataset.
    "shakespeare-gpu": dict(dataset="shakespeare", dim=384, num_blocks=6, num_heads=6, context_size=256,
                            batch_size=64, num_iters=5000, learning_rate=1e-3, lr_warmup=100,
                            dropout=0.2, steps_per_eval=500, temperature=0.8, gpu=True),
    "ptb-gpu": dict(dataset="ptb", dim=512, num_blocks=6, num_heads=8, context_size=128, batch_size=64,
                    num_iters=20000, learning_rate=6e-4, tie_embeddings=True, dropout=0.3,
                    weight_decay=0.1, steps_per_eval=1000, eval_test=True, gpu=True),
    "wikitext2-gpu": dict(dataset="wikitext2", dim=512, num_blocks=6, num_heads=8, context_size=128,
                          batch_size=64, num_iters=20000, learning_rate=6e-4, tie_embeddings=True,
                          dropout=0.3, weight_decay=0.1, steps_per_eval=1000, eval_test=True, gpu=True),
    "wikitext103-gpu": dict(dataset="wikitext103", dim=768, num_blocks=12, num_heads=12, context_size=256,
                            batch_size=32, num_iters=100000, learning_rate=3e-4, tie_embeddings=True,
                            dropout=0.1, weight_decay=0.1, steps_per_eval=2000, eval_test=True, gpu=True),
    "enwik8-gpu": dict(dataset="enwik8", dim=512, num_blocks=8, num_heads=8, context_size=512, batch_size=32,
                       num_iters=50000, learning_rate=4e-4, dropout=0.1, steps_per_eval=2000,
                       eval_test=True, gpu=True),
}


def apply_preset(given: dict[str, Any]) -> dict[str, Any]:
    """The flags a user gave, over the values of ``given["preset"]``: a name, or a JSON file of
    flags (as ``tlm sweep best --preset-out`` writes)."""
    name = given.get("preset")
    if name is None:
        return given
    if name.endswith(".json") and name not in PRESETS:
        return {**read_preset(name), **given}
    if name not in PRESETS:
        raise ConfigError(f"unknown --preset {name!r} (choose from {', '.join(PRESETS)}, or a .json file)")
    return {**PRESETS[name], **given}


def read_preset(path: str) -> dict[str, Any]:
    """A preset file: a JSON object of TrainConfig flags."""
    try:
        flags = json.loads(Path(path).expanduser().read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--preset {path}: {getattr(e, 'strerror', None) or e}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset", "save_dir"}
    if not isinstance(flags, dict) or set(flags) - known:
        bad = sorted(set(flags) - known) if isinstance(flags, dict) else ["not an object"]
        raise ConfigError(f"--preset {path}: not a preset of training flags ({', '.join(bad)})")
    return flags


def default_save_dir() -> str:
    """The seed's RAM disk where it exists, otherwise the per-user data directory."""
    if RAMDISK.is_dir():
        return str(RAMDISK / "transformer-lm")
    return str(Path(platformdirs.user_data_dir("tlm")) / "transformer-lm")


def _opt(default: Any, help: str, local: str = "") -> Any:
    """A flag: its default and help; ``local``: it is not the run's own setting, but says how
    this one invocation trains ("invocation": where, from which checkpoint, how much more) or
    on what ("machine": its device, its ranks)."""
    return field(default=default, metadata={"help": help, "local": local})


@dataclass
class TrainConfig:
    preset: Optional[str] = _opt(None, "tuned flags to start from (explicit flags override): "
                                       "shakespeare-cpu, shakespeare-cpu-5m, ptb-cpu, ptb-cpu-hour, <dataset>-gpu")
    dataset: str = _opt("ptb", "dataset: " + ", ".join(DATASETS) + ", or a .txt file or directory")
    tokenizer: Optional[str] = _opt(None, "word, char, byte or bpe (default: the dataset's own; "
                                          "char for your text)")
    save_dir: str = _opt("", "checkpoint and data directory (default: /Volumes/RAMDisk/"
                             "transformer-lm if that disk exists, else the per-user data dir)",
                         local="invocation")
    data_mirror: Optional[str] = _opt(None, "directory or URL laid out like the dataset "
                                            "sources, tried first (env TLM_DATA_MIRROR)",
                                      local="invocation")
    seed: int = _opt(42, "RNG seed for initialisation, batches and dropout")
    context_size: int = _opt(48, "context window size in tokens")
    num_blocks: int = _opt(4, "number of Transformer blocks")
    dim: int = _opt(1024, "embedding/hidden dimension")
    num_heads: int = _opt(8, "number of attention heads")
    dropout: float = _opt(0.0, "dropout probability (embeddings, residual branches, final hidden state)")
    embed_dropout: float = _opt(0.0, "in training, drop whole word types from the input "
                                     "embeddings with this probability")
    tie_embeddings: bool = _opt(False, "share the input embedding and output projection")
    batch_size: int = _opt(32, "minibatch size")
    num_iters: int = _opt(100000, "training iterations: the step a run ends at, counted from its start "
                                  "(a resume trains on to it; --more N trains N more)")
    time_budget: float = _opt(0.0, "train for N minutes (mid-run evaluations included), the learning "
                                   "rate decaying over that time, then evaluate; counted from the "
                                   "run's start, so a resume trains what is left (--more 2m: two "
                                   "more minutes); 0: --num_iters decides (it still caps the steps)")
    learning_rate: float = _opt(3e-4, "AdamW peak learning rate")
    optimizer: str = _opt("adamw", "adamw, or muon: Muon for the blocks' weight matrices, "
                                   "AdamW for embeddings, output layer and norms")
    muon_learning_rate: float = _opt(0.02, "Muon peak learning rate (with --optimizer muon)")
    weight_decay: float = _opt(1e-5, "decoupled weight decay (AdamW's, and Muon's matrices')")
    lr_warmup: int = _opt(200, "linear warmup steps before the decay")
    lr_cooldown: float = _opt(0.0, "decay the rate linearly over this last fraction of training "
                                   "(warmup-stable-decay; 0: cosine decay over all of it)")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: off)")
    top_k: int = _opt(50, "top-k for the sample printed after each save")
    temperature: float = _opt(0.5, "temperature for the sample printed after each save")
    steps_per_report: int = _opt(10, "report training loss every N steps")
    steps_per_eval: int = _opt(1000, "evaluate on the validation split and save every N steps")
    eval_tokens: int = _opt(0, "evaluate on the first N validation tokens only (0: the whole split; "
                               "a run that trains on fewer tokens scores as many as it trains on, "
                               "at least 4,096)")
    eval_stride: int = _opt(0, "start evaluation windows every N tokens, scoring only new targets "
                               "(0: the context, non-overlapping; less: every target sees more context)")
    more: str = _opt("", "resume and train this much beyond the checkpoint: minutes (2m) or steps "
                         "(500); sets --time_budget or --num_iters from where the run stands (a run in "
                         "or past its --lr_cooldown goes on from its last checkpoint before it)",
                     local="invocation")
    identifier: Optional[str] = _opt(None, "checkpoint identifier (SHA1 or unique prefix) to load",
                                     local="invocation")
    new_model: bool = _opt(False, "start from scratch, ignoring existing checkpoints", local="invocation")
    gpu: bool = _opt(False, "use MLX's GPU (Metal on macOS, CUDA on Linux)", local="machine")
    nodes: int = _opt(1, "data-parallel ranks on MLX's distributed engine: `tlm train` starts "
                         "them on this machine, `tlm submit train` on N workers", local="machine")
    backend: str = _opt("ring", "MLX distributed backend for --nodes: ring (TCP over Ethernet or "
                                "a Thunderbolt bridge), jaccl (Thunderbolt 5 RDMA), nccl (CUDA)",
                        local="machine")
    checkpoint: bool = _opt(False, "gradient checkpointing (less memory, more compute)")
    init_from: Optional[str] = _opt(None, "start a new model from an exported or mlx-lm llama "
                                          "directory (its weights, shape and tokenizer)")
    eval_test: bool = _opt(False, "evaluate on the test split at the end")
    keep_last: int = _opt(1, "keep the newest N checkpoints (the best by validation loss is kept too)")
    save_retries: int = _opt(8, "retries, with back-off, of a failing checkpoint save")

    def __post_init__(self) -> None:
        if not self.save_dir:
            self.save_dir = default_save_dir()
        if self.data_mirror is None:
            self.data_mirror = os.environ.get("TLM_DATA_MIRROR") or None

    def dataset_source(self) -> str:
        """``--dataset`` to read: a name, a path, or a copy that ``tlm submit`` carried into
        the run directory (``inputs/...``, the same on every Mac whatever the mount)."""
        carried = Path(self.save_dir).expanduser() / self.dataset
        if self.dataset.startswith(f"{RUN_INPUTS}/") and carried.exists():
            return str(carried)
        return self.dataset

    def validate(self) -> None:
        """Raise ConfigError naming the first bad setting; touches nothing on disk."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2^32), got {self.seed}")
        if self.nodes < 1 or self.batch_size % self.nodes:
            raise ConfigError(f"--nodes {self.nodes} must be positive and divide --batch_size "
                              f"{self.batch_size} (each rank takes an equal share of every batch)")
        if self.backend not in BACKENDS:
            why = ": its ranks are started by mpirun, and tlm starts its own" \
                if self.backend == "mpi" else ""
            raise ConfigError(f"--backend {self.backend}{why}; choose one of {', '.join(BACKENDS)}")
        if self.new_model and self.identifier:
            raise ConfigError("--identifier picks a checkpoint to resume and --new_model starts "
                              "afresh: give one of them")
        if self.more and not MORE.fullmatch(self.more):
            raise ConfigError(f"--more {self.more!r}: give minutes (2m) or steps (500)")
        if 0 < self.time_budget < 1 / 60:
            raise ConfigError(f"--time_budget is in minutes: {self.time_budget} is under a second, "
                              "too short for one step")
        positive = ("context_size", "num_blocks", "dim", "num_heads", "batch_size",
                    "num_iters", "steps_per_report", "steps_per_eval", "top_k", "keep_last")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate", "muon_learning_rate", "weight_decay", "lr_warmup", "grad_clip", "temperature",
                     "save_retries", "eval_tokens", "eval_stride", "time_budget"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.lr_cooldown <= 1:
            raise ConfigError(f"--lr_cooldown is a fraction of training in [0, 1], got {self.lr_cooldown}")
        for name in ("dropout", "embed_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eval_stride > self.context_size:
            raise ConfigError(f"--eval_stride {self.eval_stride} is longer than --context_size "
                              f"{self.context_size}: windows would skip targets")
        if self.dim % self.num_heads:
            raise ConfigError(f"--dim {self.dim} is not divisible by --num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ConfigError(f"head size --dim/--num_heads = {self.dim // self.num_heads} "
                              "must be even for rotary embeddings")
        if self.dataset not in DATASETS and not Path(self.dataset_source()).expanduser().exists():
            raise ConfigError(f"unknown --dataset {self.dataset!r}: choose from "
                              f"{', '.join(DATASETS)}, or give a path to a .txt file or directory")
        if self.init_from and not (Path(self.init_from).expanduser() / "config.json").exists():
            raise ConfigError(f"--init_from {self.init_from}: no config.json there (export one "
                              "with `tlm export`, or give an mlx-lm model directory)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown --optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        if self.tokenizer is not None and self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"unknown --tokenizer {self.tokenizer!r} (choose from {', '.join(TOKENIZERS)})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The flags that differ from the defaults, as one command-line-like line."""
        defaults = TrainConfig(save_dir=self.save_dir, data_mirror=self.data_mirror)
        return " ".join(f"--{f.name} {getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != getattr(defaults, f.name))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**data)


def invocation_flags() -> frozenset[str]:
    """The flags that say how one invocation trains, not what the run is: a run's recorded
    configuration leaves them out, and a sweep's trials never set them."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["local"] == "invocation")


def local_flags() -> frozenset[str]:
    """The invocation's flags and the machine's: never taken from a checkpoint on resume."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["local"])


# Flags a run may change when it resumes (its shape, data and optimizer kind stay): what population
# based training perturbs in a trial that took another's checkpoint.
RESUMABLE = ("learning_rate", "muon_learning_rate", "weight_decay", "dropout", "embed_dropout", "grad_clip",
             "lr_warmup", "lr_cooldown")


def flag_types() -> dict[str, type]:
    """Each TrainConfig field's type, ``Optional[X]`` as X: what a flag's value converts to."""
    hints = typing.get_type_hints(TrainConfig)
    return {name: typing.get_args(t)[0] if typing.get_origin(t) is typing.Union else t
            for name, t in hints.items()}


def flag_value(text: Any, typ: type) -> Any:
    """A flag's value given as text (a dashboard form, ``--flag K=V``, a ``--search`` bound or
    choice) as its type: the one parser of them. ValueError for text that is not one: a bool
    is one of TRUE_WORDS or FALSE_WORDS, a float is finite."""
    if typ is bool:
        word = str(text).strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f"{text!r} is not true or false")
        return word in TRUE_WORDS
    try:
        value = typ(text)
    except OverflowError:
        raise ValueError(f"{text!r} is not a finite number") from None
    if typ is float and not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def check_save_dir(path: str) -> Path:
    """Create the save directory if needed and prove it is writable."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--save_dir {path} is a file, not a directory") from None
        raise ConfigError(f"--save_dir {path} is not writable: {e.strerror or e}") from None
    return p
