"""What runs one job: the entry point of the process tlm-worker spawns per job, and
the ``run`` function of each job kind (``tlm_worker.kinds.KINDS`` names them).

Runs in a child started with multiprocessing's ``spawn`` method (MLX hangs in
forked children), in its own process group so a terminal's Ctrl+C reaches
only the worker, which forwards exactly one signal. The trainer's hooks
(``tlm_worker.trainer_hooks.RegistryHooks``) are wired to the registry: ``should_stop`` to the job's
cancel flag and this process's signals, ``on_progress`` to progress and log
lines, ``before_publish`` (each checkpoint and metrics record) to the fencing token.

A gang job runs one such process per member, each a rank of MLX's
distributed engine, rendezvousing at the members' advertised addresses. Rank
0 reports and settles the job; the others only train, and a failure of
theirs that is not the job's own (a peer lost mid-collective) exits non-zero
so their worker re-queues the gang.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tlm.config import ConfigError, TrainConfig
from tlm.files import SETUP, transient, with_retries
from tlm.interrupts import StopOnSignal
from tlm.lease import DEFAULT_TTL as RUN_LEASE_TTL, LeaseLost as RunLeaseLost, RunHeld
from tlm.ranks import rank_env
from tlm_worker.kinds import EvalParams, ExportParams, SampleParams, TrainParams, params_of, resolve
from tlm_worker.queue import QUEUE_ERRORS, Queue
from tlm_worker.registry import ACTIVE, FAILED, SUCCEEDED, Job, JobNotFound, LeaseLost, Registry
from tlm_worker.sweeps import TrialHooks, adopt
from tlm_worker.targets import TargetError, data_folder, resolve_save_dir
from tlm_worker.trainer_hooks import RegistryHooks

EXIT_INTERRUPTED = 75  # stopped by a signal to the worker, or by an outage: re-queue the job
EXIT_LEASE_LOST = 76  # another worker holds the job now: this process stopped at once
EXIT_ELSEWHERE = 77  # an attempt another Mac may do: a write still failing after its retries,
# or a run whose checkpoint is not visible here (its shared folder not mounted)


@dataclass
class Context:
    """What a kind's ``run`` function gets: the claimed job and this process's wiring."""
    registry: Registry
    job: Job
    fence: int
    save_dir: str  # the run's directory on this machine
    params: dict[str, Any]  # the job's params without those that locate the run
    gpu: bool
    rank: Optional[int]
    log: Callable[[str], None]
    orphaned: Callable[[], bool]  # the worker that started this process is gone
    lease: float = 60.0  # the worker's --lease
    confirmed: float = field(default_factory=time.monotonic)  # when the fence was last confirmed
    unreachable: bool = False  # the last report could not be written

    @property
    def tag(self) -> str:
        return f"[{self.job.id}]" if not self.rank else f"[{self.job.id} rank {self.rank}]"

    def finish(self, state: str = SUCCEEDED, line: Optional[str] = None, **fields: Any) -> None:
        """End the job under this process's fence, ``line`` its last log line, written in the
        same step: a holder that lost the job while it finished (its last save or evaluation
        outlasted the lease) writes neither, and the next holder ends it once."""
        if line:
            print(f"{self.tag} {line}", file=sys.stderr, flush=True)
        if self.end(state, line, **fields) is None:
            raise LeaseLost("the job was settled elsewhere before this process could (another "
                            "worker holds it now, or it ended): leaving it")

    def end(self, state: str, line: Optional[str], **fields: Any) -> Optional[Job]:
        """The registry's end of the job under this process's fence (None: not held). A record
        the registry forgot (Redis restarted without its data, the worker's heartbeat not yet
        there to put it back) is put back first, as the worker would; ``restore`` leaves a
        record that exists alone, so a lost lease still ends in None."""
        ended = self.registry.finish(self.job.id, state, self.fence, log=line, **fields)
        if ended is None and self.registry.restore(self.job, self.job.worker):
            ended = self.registry.finish(self.job.id, state, self.fence, log=line, **fields)
        return ended

    def report(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """A write that only informs (a log line, progress, a metric point): while the queue is
        unreachable it is dropped (metrics.jsonl keeps the points), said once, never fatal."""
        try:
            fn(*args, **kwargs)
        except QUEUE_ERRORS as e:
            if not self.unreachable:
                print(f"[{self.job.id}] queue unreachable ({e}): reports are dropped until it is back",
                      file=sys.stderr, flush=True)
            self.unreachable = True
        else:
            self.unreachable = False

    def look(self) -> Optional[Job]:
        """The job's record now, which confirms this process still holds it; None while the
        queue is unreachable or has forgotten the job (its worker puts it back). A job another
        worker took over ends this process at once: two never train one run."""
        try:
            job = self.registry.get(self.job.id)
        except (*QUEUE_ERRORS, JobNotFound):
            return None
        if job.fence != self.fence or job.state not in ACTIVE:
            print(f"[{self.job.id}] lease lost: the job is {job.state} under fence {job.fence} "
                  f"(this process held {self.fence}): stopping at once", file=sys.stderr, flush=True)
            os._exit(EXIT_LEASE_LOST)
        self.confirmed = time.monotonic()
        return job

    def unconfirmed(self) -> float:
        """Seconds since this process last confirmed its hold on the job."""
        return time.monotonic() - self.confirmed


class NotHere(RuntimeError):
    """What the job reads is not on this worker (the lab's shared folder not mounted here)."""


class RunTrained(RuntimeError):
    """Another live job trains this job's directory here (one run named two ways, by machines
    that could not tell them apart at submit): refused again at claim."""


def check_one_trainer(registry: Registry, job: Job, save_dir: str, save_root: Optional[str]) -> None:
    """One trainer per run, checked again where it counts: in the directory, as this worker
    resolves every live training job's run (a path, a name under its --save_root, a symlink).
    Of two started at once, the later claimed gives way."""
    here = os.path.realpath(save_dir)
    for other in registry.in_states(ACTIVE):
        if (other.id != job.id and other.spec.trainer and not other.spec.driven
                and (other.started or 0, other.id) < (job.started or 0, job.id)
                and os.path.realpath(resolve_save_dir(other.params, save_root)) == here):
            raise RunTrained(f"{save_dir} is the run {other.run_name}, which {other.state} job {other.id} "
                             "trains (one trainer per run): not started")


def check_carried_dataset(params: dict[str, Any], save_dir: str) -> None:
    """The text ``tlm submit`` copied into the run is there, with the bytes it had then."""
    if not params.get("dataset_sha1"):
        return
    from tlm.data import DataError, text_digest  # numpy

    path = Path(save_dir) / params["dataset"]
    if not path.exists():
        raise DataError(f"{path} is missing: is the shared run directory mounted here "
                        "(tlm-worker --save_root)?")
    if text_digest(path) != params["dataset_sha1"]:
        raise DataError(f"{path} changed since it was submitted (SHA1 differs)")


def run_job(url: str, job_id: str, fence: int, save_root: Optional[str], gpu: bool,
            rank: Optional[int] = None, lease: float = 60.0) -> None:
    """Run one claimed job (or ``rank`` of a gang job) to an end state, or exit
    EXIT_INTERRUPTED after a signal or an outage, EXIT_ELSEWHERE after a transient I/O error
    that outlasted its retries or when its run's checkpoint is not visible here."""
    os.setpgid(0, 0)
    parent = os.getppid()
    try:
        registry = Registry(Queue(url, patient=False))
        job = registry.get(job_id)
    except (*QUEUE_ERRORS, ConnectionError) as e:  # an outage as it starts: back to the queue, no attempt
        print(f"[{job_id}] queue unreachable as the job started ({_describe(e)}): its worker re-queues it",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)

    def log(line: str) -> None:  # the job's log is rank 0's
        print(f"{c.tag} {line}", file=sys.stderr, flush=True)
        if not rank:
            c.report(registry.log, job_id, line)

    c = Context(registry, job, fence, "", {}, gpu, rank, log, lambda: os.getppid() != parent, lease)
    try:
        import tlm  # noqa: F401  (optimized BLAS before MLX)
        from tlm.device import select_device  # MLX

        select_device(gpu)
        params = TrainParams.flags(job.params)  # a reading kind's own params pass as they are
        save_dir = resolve_save_dir(job.params, save_root)
        if job.spec.trainer and not rank:
            check_one_trainer(registry, job, save_dir, save_root)
        check_carried_dataset(job.params, save_dir)
        run = resolve(job.spec.run)
        c.save_dir, c.params = save_dir, params
        run(c)
    except SystemExit:
        raise
    except (LeaseLost, RunLeaseLost) as e:  # another worker owns the job (or its run) now: leave it
        print(f"{c.tag} {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_LEASE_LOST)
    except BaseException as e:
        why = _describe(e)
        if isinstance(e, QUEUE_ERRORS):  # an outage at a write that settles: another try later
            print(f"{c.tag} queue unreachable ({why}): stopping; its worker re-queues the job",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)
        if transient(e) or isinstance(e, NotHere):  # the disk or the run may be fine elsewhere, or later
            why += " (still failing after the retries)" if transient(e) else ""
            log(f"{why}: stopping; the job goes back to the queue for another worker (an attempt: "
                "one that stays so fails after --max_attempts)")
            c.report(registry.update, job_id, error=why)  # what its worker says it failed on
            sys.exit(EXIT_ELSEWHERE)
        if not _ordinary(e):
            traceback.print_exc()  # a bug, or a lost peer: its traceback goes to the worker's output
            if rank is not None:  # the worker re-queues the gang (a crash: attempts count)
                sys.exit(1)
        print(f"{c.tag} failed: {why}", file=sys.stderr, flush=True)
        c.report(c.end, FAILED, (f"rank {rank} " if rank else "") + f"failed: {why}", error=why)


def _describe(e: BaseException) -> str:
    """One line: an OSError as the file and its reason, anything else as its type and text."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _ordinary(e: BaseException) -> bool:
    """A failure the job's own message explains (bad flags, data, checkpoints, divergence, a
    run directory made read-only, deleted or unreadable)."""
    from tlm.checkpoint import CheckpointError  # MLX
    from tlm.data import DataError  # numpy
    from tlm.train import Diverged  # MLX
    return isinstance(e, (ConfigError, DataError, CheckpointError, Diverged, RunTrained, RunHeld, TargetError)) or (
        isinstance(e, OSError) and e.errno in SETUP)


def run_eval(c: Context) -> None:
    from tlm.run import evaluate_checkpoint  # MLX
    p = params_of(EvalParams, c.params)
    result = evaluate_checkpoint(c.save_dir, p.identifier, p.split, p.data_mirror, p.tokens, p.stride, c.log,
                                 data_folder(c.save_dir))
    metric = (f"{result['bits_per_char']:.3f} bits per character" if "bits_per_char" in result
              else f"perplexity {result['perplexity']:.2f}")
    c.finish(line=f"{result['split']} loss {result['loss']:.4f}, {metric} (checkpoint "
                  f"{result['checkpoint'][:12]}, iteration {result['step']})", result=result)


def run_sample(c: Context) -> None:
    from tlm.generate import SampleConfig, sample_checkpoint  # MLX
    p = params_of(SampleParams, c.params)
    result = sample_checkpoint(c.save_dir, p.identifier, p.prompt, SampleConfig(**p.sampling),
                               p.num_samples, warn=c.log)
    for text in result["samples"]:  # in the job's log too: `tlm logs` shows a chained sample's text
        for line in (p.prompt + text).splitlines() or [""]:
            c.log(f"  {line}")
    c.finish(line=f"sampled {len(result['samples'])} from checkpoint {result['checkpoint'][:12]} "
                  f"(iteration {result['step']})", result=result)


def run_export(c: Context) -> None:
    """Write the checkpoint as an mlx-lm directory (``--then export:DIR``, ``tlm submit export``)."""
    from tlm import checkpoint  # MLX
    from tlm.export import export  # MLX

    p = params_of(ExportParams, c.params)
    out = Path(p.out).expanduser()
    if not out.is_absolute():  # `tlm submit export` resolves it where it was given
        raise checkpoint.CheckpointError(f"export to {p.out[:60]!r}: not an absolute path")
    try:
        ckpt, _ = checkpoint.read(c.save_dir, p.identifier, warn=c.log, use=lambda ckpt: with_retries(
            lambda: export(ckpt, out), f"exporting to {out}", c.log))
    except OSError as e:
        if transient(e):
            raise  # still failing after the retries: re-queued (another Mac may have room)
        raise checkpoint.CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    if ckpt is None:
        raise checkpoint.CheckpointError(f"no checkpoint in {c.save_dir} to export")
    c.finish(line=f"exported {ckpt.identifier[:12]} (iteration {ckpt.step}) to {out}",
             result={"out": str(out), "checkpoint": ckpt.identifier, "step": ckpt.step})


def run_train(c: Context) -> None:
    """Train (or, for a gang job, train this rank), wired to the registry."""
    from tlm import blas  # BLAS before MLX

    c.log(blas.describe())
    params = dict(c.params)
    adopt(c)  # a PBT trial given another's checkpoint takes it first
    if c.job.checkpoint:  # started before and saved: resume that, never afresh nor the named one again
        params.pop("new_model", None)
        params.pop("identifier", None)
        from tlm.checkpoint import newest_name  # MLX
        # retention may have replaced the recorded one by a newer one whose publish was lost
        # (the worker killed between the save and the record): that one is resumed
        if not (Path(c.save_dir) / f"{c.job.checkpoint}.safetensors").is_file() and not newest_name(c.save_dir):
            raise NotHere(f"its checkpoint {c.job.checkpoint[:12]} is not in {c.save_dir} on this worker: "
                          "is the lab's shared folder mounted here (tlm-worker --save_root)?")
    if c.rank is not None:
        os.environ.update(rank_env(params.get("backend", TrainConfig.backend), c.job.members, c.rank,
                                   Path(tempfile.mkdtemp(prefix=f"tlm-{c.job.id}-"))))
    given = {**params, "save_dir": c.save_dir, "gpu": c.gpu}
    if not c.rank:  # until the trainer starts: what the status shows in place of a step
        c.report(c.registry.update, c.job.id, progress={**c.job.progress, "phase": "preparing data and the model"})
    if given.get("more"):  # resolved once, where the run stands now: a resumed job keeps it
        given = pin_more(c, given)
    stop = StopOnSignal()  # no I/O in the signal handler
    if c.job.sweep:
        train_job(c, given, TrialHooks(c, stop))
    else:
        train_job(c, given, RegistryHooks(c, stop))


def pin_more(c: Context, given: dict[str, Any]) -> dict[str, Any]:
    """``--more``: the budget it means against the run's latest checkpoint, written into the
    job's params, so a resume after an interruption does not extend it again."""
    from tlm.run import open_run  # MLX

    config, _ = open_run(given, warn=c.log)
    budget = {"time_budget": config.time_budget, "num_iters": config.num_iters,  # a branch: from where
              **({"identifier": config.identifier} if config.identifier else {})}
    c.log(f"--more {given['more']}: to --num_iters {config.num_iters}"
          + (f", --time_budget {config.time_budget:.2f}" if config.time_budget else ""))
    c.registry.update(c.job.id, params={**{k: v for k, v in c.job.params.items() if k != "more"}, **budget})
    return {**{k: v for k, v in given.items() if k != "more"}, **budget}


def train_job(c: Context, given: dict[str, Any], hooks: RegistryHooks) -> None:
    """Train with these hooks, then settle the job (rank 0) or exit EXIT_INTERRUPTED."""
    from tlm.run import train  # MLX

    labels = {"job": c.job.id, "worker": c.job.worker, "fence": c.fence}
    try:
        lab = c.registry.store.value("save_root")  # which lab's job holds the run directory
    except QUEUE_ERRORS:
        lab = None
    result = train(given, hooks, labels=labels, spent_ok=c.job.ran_before,  # finish an earlier attempt
                   holder={**labels, "lab": lab}, lease_ttl=min(max(c.lease / 2, 2.0), RUN_LEASE_TTL),
                   data=data_folder(c.save_dir))
    state = hooks.end_state(result)
    if state is None:
        if hooks.leaving == "orphaned" and not c.rank:  # no worker will: back to the queue
            c.report(c.registry.requeue, c.job.id, c.fence, f"its worker died; saved at iteration "
                     f"{result.step}", interrupted=True)
        sys.exit(EXIT_INTERRUPTED)
    if c.rank:
        return  # rank 0 settles the job
    c.finish(state, f"{state} at iteration {result.step}, checkpoint {result.checkpoint}",
             checkpoint=result.checkpoint,
             result={"step": result.step, "val_loss": result.val_loss, "test_loss": result.test_loss})
