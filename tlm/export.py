"""Export a checkpoint as a directory mlx-lm loads as is (``model_type: llama``).

Writes ``config.json``, ``model.safetensors`` (our parameter names already are
llama's) and ``tokenizer.json`` + ``tokenizer_config.json`` built with Hugging
Face ``tokenizers``, which ``transformers.AutoTokenizer`` loads: a word-level
vocabulary for PTB/WikiText, a character or byte vocabulary for
character-level data, the trained BPE as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from tlm.checkpoint import Checkpoint, CheckpointError
from tlm.files import read_small, replace
from tlm.model import ModelArgs
from tlm.vocab import EOS, UNK, BPETokenizer, Tokenizer


def hf_tokenizer(tok: Tokenizer):
    """The Hugging Face ``tokenizers.Tokenizer`` that encodes and decodes exactly as ``tok``."""
    from tokenizers import Regex, Tokenizer as HF, decoders, models, pre_tokenizers  # tokenizers

    if tok.kind == "bpe":
        return HF.from_str(tok.spec)
    if tok.kind == "word":
        hf = HF(models.WordLevel({w: i for i, w in enumerate(tok.vocab)}, unk_token=UNK))
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return hf  # decoding joins words with spaces
    if tok.kind == "char":
        hf = HF(models.WordLevel({c: i for i, c in enumerate(tok.vocab)}, unk_token=tok.vocab[0]))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        return hf
    # byte: GPT-2's byte-to-unicode alphabet, one token per byte, in byte order
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    hf = HF(models.BPE({ch: _byte_of(ch) for ch in alphabet}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def _an_export(out: Path) -> bool:
    try:
        config = json.loads(read_small(out / "config.json", 1 << 20) or b"{}")
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and isinstance(config.get("tlm"), dict)


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def export(ckpt: Checkpoint, out: str | Path) -> Path:
    """Write the mlx-lm directory for ``ckpt`` at ``out`` (created, or an earlier export's files
    replaced); a folder holding anything else is refused (CheckpointError), never overwritten."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not _an_export(out):
        raise CheckpointError(f"--out {out} is not empty and not an earlier export: choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    args, config = ckpt.state["model_args"], ckpt.state["config"]
    tok = ckpt.tokenizer
    eos = getattr(tok, "eos", None)
    hf_config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": args["hidden_size"], "num_hidden_layers": args["num_hidden_layers"],
        "num_attention_heads": args["num_attention_heads"],
        "num_key_value_heads": args["num_attention_heads"],
        "head_dim": args["hidden_size"] // args["num_attention_heads"],
        "intermediate_size": args["intermediate_size"], "rms_norm_eps": args["rms_norm_eps"],
        "rope_theta": args["rope_theta"], "rope_traditional": False, "hidden_act": "silu",
        "vocab_size": args["vocab_size"], "tie_word_embeddings": args["tie_word_embeddings"],
        "max_position_embeddings": config["context_size"], "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32",
        **({"eos_token_id": eos} if eos is not None else {}),
        "tlm": {"checkpoint": ckpt.identifier, "step": ckpt.step, "dataset": ckpt.state["dataset"],
                "tokenizer": tok.kind},
    }
    _write(out / "config.json", json.dumps(hf_config, indent=2))
    weights = ckpt.load_weights()
    replace(out / "model.safetensors", lambda tmp: _save_safetensors(tmp, weights))
    _write(out / "tokenizer.json", hf_tokenizer(tok).to_str())
    _write(out / "tlm_tokenizer.json", json.dumps(tok.to_dict()))  # exact round trip for --init_from
    special = {"eos_token": EOS} if tok.kind == "word" else {}
    if tok.kind == "word":
        special["unk_token"] = UNK
    _write(out / "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
         "model_max_length": config["context_size"], **special}, indent=2))
    return out


def _write(path: Path, text: str) -> None:
    replace(path, lambda tmp: tmp.write_text(text))


def _save_safetensors(path: Path, weights: dict[str, mx.array]) -> None:
    with open(path, "wb") as f:  # a file object: MLX adds no suffix to the name
        mx.save_safetensors(f, weights, metadata={"format": "mlx"})


def load_pretrained(directory: str | Path) -> tuple[ModelArgs, dict[str, mx.array], Tokenizer]:
    """Architecture, weights and tokenizer of an exported or mlx-lm llama directory."""
    directory = Path(directory).expanduser()
    cfg = json.loads((directory / "config.json").read_text())
    problems = []
    if cfg.get("model_type") != "llama":
        problems.append(f"model_type {cfg.get('model_type')!r} is not llama")
    heads = cfg["num_attention_heads"]
    if cfg.get("num_key_value_heads", heads) != heads:
        problems.append("grouped-query attention (num_key_value_heads != num_attention_heads)")
    if cfg.get("rope_scaling") or cfg.get("rope_traditional") or cfg.get("attention_bias") \
            or cfg.get("mlp_bias"):
        problems.append("RoPE scaling, traditional RoPE or biases")
    if cfg.get("head_dim", cfg["hidden_size"] // heads) * heads != cfg["hidden_size"]:
        problems.append("head_dim * heads != hidden_size")
    if problems:
        raise ValueError(f"{directory}: not a compatible model: {'; '.join(problems)}")
    args = ModelArgs(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                     num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
                     intermediate_size=cfg["intermediate_size"],
                     rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", 10000.0),
                     tie_word_embeddings=cfg.get("tie_word_embeddings", False))
    weights: dict[str, mx.array] = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(mx.load(str(path)))
    weights = {k: v.astype(mx.float32) for k, v in weights.items() if "rotary_emb" not in k}
    ours = directory / "tlm_tokenizer.json"
    if ours.exists():
        tok = Tokenizer.from_dict(json.loads(ours.read_text()))
    else:
        tok = BPETokenizer((directory / "tokenizer.json").read_text(), kind="hf")
    if tok.vocab_size > args.vocab_size:
        raise ValueError(f"{directory}: tokenizer has {tok.vocab_size} tokens, the model {args.vocab_size}")
    return args, weights, tok
