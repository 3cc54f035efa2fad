"""``tlm sample``: continue a prompt from the latest (or a named) checkpoint,
through the queue, in-process (``--local``), or as the seed's interactive REPL."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import replace
from pathlib import Path

import click

from tlm.config import ConfigError
from tlm_cli.jobs import queue_errors, queue_option
from tlm_cli.options import FiniteRange, find_checkpoint, run_directory, save_root_option
from tlm_worker.kinds import FINAL, SAMPLE, SUCCEEDED, SampleParams
from tlm_worker.lab import Lab


def echo(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@click.option("--run", default=None, help="run name, under each worker's --save_root")
@click.option("--save_dir", "--save-dir", default=None, help="run directory")
@click.option("--identifier", default=None, help="checkpoint SHA1 or prefix (default: latest)")
@click.option("--prompt", default="", help="text to continue")
@click.option("--max_tokens", "--max-tokens", default=100, show_default=True, type=click.IntRange(0))
@click.option("--num_samples", "--num-samples", default=1, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.5, show_default=True, type=FiniteRange(0),
              help="0: greedy")
@click.option("--top_k", "--top-k", default=50, show_default=True, type=click.IntRange(0),
              help="0: off")
@click.option("--top_p", "--top-p", default=1.0, show_default=True, type=FiniteRange(0, 1, min_open=True))
@click.option("--min_p", "--min-p", default=0.0, show_default=True, type=FiniteRange(0, 1, max_open=True))
@click.option("--repetition_penalty", "--repetition-penalty", default=1.0, show_default=True,
              type=FiniteRange(0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="same seed, same sample")
@click.option("--stop", multiple=True, help="stop at this string (repeatable)")
@click.option("--stop_at_eos", "--stop-at-eos", is_flag=True,
              help="word-level data: stop at the first <eos> (default: it reads as a line break)")
@click.option("--allow_unk", "--allow-unk", is_flag=True,
              help="word-level data: let <unk> be sampled (default: never)")
@click.option("--local", is_flag=True, help="run here, without the queue")
@save_root_option
@click.option("--interactive", "-i", is_flag=True, help="the seed's --inference REPL (local)")
@click.option("--gpu", is_flag=True, help="sample on the Metal GPU (with --local/--interactive)")
@queue_option
@queue_errors
def sample(run, save_dir, identifier, prompt, max_tokens, num_samples, temperature, top_k, top_p,
           min_p, repetition_penalty, seed, stop, stop_at_eos, allow_unk, local, save_root, interactive,
           gpu, queue) -> None:
    """Continue --prompt from the latest checkpoint; print only the continuation."""
    from tlm.generate import SampleConfig  # MLX

    cfg = SampleConfig(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                       stop=list(stop), stop_at_eos=stop_at_eos, allow_unk=allow_unk)
    if "" in stop:
        raise click.UsageError("--stop is empty: it would stop before the first token")
    where, run_key = Lab.run_target(run, save_dir)
    if not (local or interactive):
        _queued(queue, run_key, identifier, prompt, cfg, num_samples)
        return
    from tlm.device import select_device  # MLX

    try:
        select_device(gpu)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    ckpt = find_checkpoint(where.get("save_dir") or run_directory(run, save_root, "--run"), identifier)
    model, tokenizer = ckpt.load_model(), ckpt.tokenizer
    context = ckpt.state["config"]["context_size"]
    if interactive:
        repl(ckpt, model, tokenizer, cfg, context)
        return
    _warn_unknown(tokenizer, prompt)
    from tlm.generate import generate_text  # MLX
    for i in range(num_samples):
        text = ""
        for piece in generate_text(model, tokenizer, prompt, replace(cfg, seed=seed + i), context):
            click.echo(piece, nl=False)
            text += piece
        click.echo()
        _explain_if_empty(text, cfg)


def _explain_if_empty(text: str, cfg) -> None:
    """An empty continuation never passes silently: one line on stderr says why."""
    if text.strip():
        return
    why = ("--max_tokens is 0" if cfg.max_tokens == 0 else
           "the model ended the text at once (<eos> first; without --stop_at_eos it reads as a "
           "line break)" if cfg.stop_at_eos else
           f"a --stop string ({', '.join(map(repr, cfg.stop))}) came first" if cfg.stop else
           "the continuation is only whitespace or tokens that decode to no text")
    echo(f"empty continuation: {why}")


def _warn_unknown(tokenizer, text: str) -> None:
    unknown = tokenizer.unknown(text)
    if unknown:
        what = "read as <unk>" if tokenizer.kind == "word" else "left out"
        shown = ", ".join(sorted(set(unknown))[:10])
        echo(f"not in the vocabulary, {what}: {shown}" + (" ..." if len(set(unknown)) > 10 else ""))


def _queued(queue, run_key, identifier, prompt, cfg, num_samples) -> None:
    lab = Lab.connect(queue)
    registry = lab.registry
    params = SampleParams(prompt, dataclasses.asdict(cfg), identifier, num_samples)
    job = lab.read(SAMPLE, run_key, dataclasses.asdict(params))
    echo(f"queued sample job {job.id}; waiting for a worker (Ctrl+C to cancel)")
    try:
        if not any(not w.get("stopping") for w in registry.workers()):
            echo("no worker is alive to answer it: start one (`tlm-worker`), or sample here with "
                 "--local --save_dir DIR")
        with registry.changes() as wait:
            while (job := registry.get(job.id)).state not in FINAL:
                wait(0.5)
    except KeyboardInterrupt:
        registry.cancel(job.id)
        raise click.ClickException(f"gave up waiting: sample job {job.id} cancelled") from None
    if job.state != SUCCEEDED:
        trainer = next((j for j in registry.jobs(None, run=run_key)
                        if j.spec.trainer and j.state not in FINAL), None)
        if trainer is not None and "no checkpoint" in (job.error or ""):
            raise click.ClickException(
                f"no checkpoint of {run_key.split(':', 1)[1]} yet: its training job {trainer.id} "
                f"({trainer.state}) saves one every --steps_per_eval steps; sample again then")
        raise click.ClickException(f"sample job {job.id} {job.state}: {job.error}")
    if job.result["unknown"]:
        echo("not in the vocabulary: " + ", ".join(sorted(set(job.result["unknown"]))[:10]))
    for text in job.result["samples"]:
        click.echo(text)
        _explain_if_empty(text, cfg)


def repl(ckpt, model, tokenizer, cfg, context: int) -> None:
    """Read a prompt, stream a continuation, repeat; Ctrl+D, Ctrl+C or `quit` ends it."""
    from tlm.generate import generate_text  # MLX

    _enable_line_editing()
    val = ckpt.state.get("val_loss")
    metric = ""
    if val is not None:
        metric = (f", validation {val / math.log(2):.3f} bpc" if tokenizer.kind in ("char", "byte")
                  else f", validation perplexity {math.exp(val):.2f}")
    echo(f"loaded {ckpt.identifier[:12]} (iteration {ckpt.step}{metric}) from {ckpt.directory}")
    echo("type a prompt; empty line: skip; quit, Ctrl+D or Ctrl+C at the prompt: exit; "
         "Ctrl+C while generating: stop that sample")
    turn = 0
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            echo("")
            return
        if not text:
            continue
        if text.lower() in ("quit", "exit"):
            return
        _warn_unknown(tokenizer, text)
        n = len(tokenizer.encode(text))
        if n > context:
            echo(f"the prompt has {n} tokens: using its last {context} (the model's context)")
        out = ""
        try:
            for piece in generate_text(model, tokenizer, text, replace(cfg, seed=cfg.seed + turn), context):
                sys.stdout.write(piece)
                sys.stdout.flush()
                out += piece
        except KeyboardInterrupt:
            out += " [stopped]"
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        _explain_if_empty(out, cfg)
        turn += 1


def _enable_line_editing() -> None:
    """readline editing and a history file, where the platform has readline."""
    try:
        import atexit
        import readline  # platform: not in every Python build

        import platformdirs
    except ImportError:
        return
    history = Path(platformdirs.user_data_dir("tlm")) / "sample_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(history)
    except OSError:
        pass
    atexit.register(lambda: _save_history(readline, history))


def _save_history(readline, history: Path) -> None:
    try:
        readline.write_history_file(history)
    except OSError:
        pass
