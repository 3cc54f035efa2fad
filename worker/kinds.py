"""What a job is: its states, the table of job kinds, and the typed ``Job`` record.

Everything tlm knows about a kind of job lives in one ``JobKind`` entry of
``KINDS``: its queue lane, whether it holds its run's one trainer, how many
workers it needs at once, what its record must hold, and the function its job
process runs. A new kind of job is one entry here (and its ``run`` function).

A ``Job`` is what the registry returns and every front end reads. Records
come from a shared store that other tlm versions (or people) write too, so
``Job.decode`` checks every field: a record that does not decode raises
``BadRecord`` with a one-line reason, and readers skip it (or fail it) instead
of crashing. ``version`` tells a newer tlm's records from broken ones.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

VERSION = 2  # of the record layout; records before it carry none and read as 1

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
CANCELLED, SUCCEEDED, FAILED, INTERRUPTED = "cancelled", "succeeded", "failed", "interrupted"
WAITING, SKIPPED = "waiting", "skipped"  # chains: waiting for its parent; the parent did not succeed
PRUNED = "pruned"  # a sweep trial Optuna stopped early (it saved first)
# A sweep trial that saved at a rung (or at a PBT generation's end) and waits to be promoted: no
# worker holds it, it keeps its run (one trainer) and its checkpoint; its sweep queues it again,
# or ends it pruned.
PAUSED = "paused"
CLAIMABLE = (QUEUED, INTERRUPTED)  # interrupted jobs are back in the queue
ACTIVE = (RUNNING, CANCELLING)  # held by a worker
LIVE = (WAITING,) + CLAIMABLE + ACTIVE + (PAUSED,)
FINAL = (CANCELLED, SUCCEEDED, FAILED, SKIPPED, PRUNED)
STATES = LIVE + FINAL

PRIORITIES = {"high": 10, "normal": 0, "low": -10}  # --priority: higher is taken first


class BadRecord(ValueError):
    """A job record that does not decode (foreign, damaged, or from a newer tlm)."""

    def __init__(self, job_id: str, reason: str, newer: bool = False):
        super().__init__(f"job record {job_id!r} {reason}")
        self.job_id, self.reason, self.newer = job_id, reason, newer


# -- shapes: what a record's nested fields hold --------------------------------------------
# A shape is a type (a bool passes for nothing but bool), a tuple of shapes (any of them),
# [shape] (a list of them), {str: shape} (any keys), or {"key": shape, ...} (those keys,
# each optional unless listed in REQUIRED_KEYS; other keys, from a newer tlm, pass unchecked).
NUMBER = (int, float)
Shape = Any


def misfit(value: Any, shape: Shape, where: str) -> Optional[str]:
    """Why ``value`` does not have ``shape`` (``where`` names it in the reason), or None."""
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {type(value).__name__}, not a list"
        return next((w for i, v in enumerate(value) if (w := misfit(v, shape[0], f"{where}[{i}]"))), None)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is {type(value).__name__}, not an object"
        if str in shape:
            return next((w for k, v in value.items()
                         if (w := misfit(k, str, f"a key of {where}") or misfit(v, shape[str], _key(where, k)))),
                        None)
        missing = [k for k in shape.get(REQUIRED_KEYS, ()) if k not in value]
        if missing:
            return f"{where} has no {missing[0]!r}"
        return next((w for k, s in shape.items() if k != REQUIRED_KEYS and k in value
                     if (w := misfit(value[k], s, _key(where, k)))), None)
    types = shape if isinstance(shape, tuple) else (shape,)
    if not all(isinstance(t, type) for t in types):  # alternatives: (shape, shape, ...)
        whys = [misfit(value, t, where) for t in types]
        return None if None in whys else whys[0]
    if value is None and type(None) in types:
        return None
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        return f"{where} is {type(value).__name__}, not {' or '.join(t.__name__ for t in types)}"
    if isinstance(value, float) and value != value:
        return f"{where} is not a number"
    return None


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


REQUIRED_KEYS = "required keys"  # in a {"key": shape} shape: the keys it must hold
OPTIONAL_NUMBER = (int, float, type(None))
NEEDS = {"gpu": bool, "memory": int, "host": str, "labels": {str: str}}
MEMBER = {REQUIRED_KEYS: ("worker", "expires", "address", "port"), "worker": str, "expires": NUMBER,
          "heartbeat": NUMBER, "address": str, "port": int, "rdma": ({str: str}, type(None))}
TRIAL = {REQUIRED_KEYS: ("id", "name", "trial", "params"), "id": str, "name": str, "trial": int,
         "params": dict, "passed": NUMBER,  # passed: the last rung it was let past (promotion ASHA)
         # PBT: the generation it paused at, its loss and step there, the generation it was let go
         # on from, the copies it took ([step, trial]), the flags its weights saw ([step, flags]),
         # and the copy it is yet to take
         "generation": int, "value": OPTIONAL_NUMBER, "at": NUMBER, "go": int, "copies": [[NUMBER]],
         "schedule": [[(NUMBER, dict)]],
         "copy": {REQUIRED_KEYS: ("from", "run", "generation"), "from": int, "run": str, "generation": int}}
PROGRESS = {  # written by job processes and sweeps; a value of another shape is dropped on read
    "step": int, "total": int, "first_step": int, "val_step": int, "phase": str, "kind": str,
    "message": str, "checkpoint": (str, type(None)), "bits_per_char": bool, "config": dict,
    "val_metric_name": str, "best_valid": [NUMBER], "trials": int, "counts": {str: int},
    "best": ({REQUIRED_KEYS: ("loss", "trial"), "loss": NUMBER, "trial": int}, type(None)),
    **{k: OPTIONAL_NUMBER for k in ("train_loss", "val_loss", "test_loss", "val_metric", "learning_rate",
                                    "it_per_sec", "tokens_per_sec", "peak_memory_gb", "elapsed",
                                    "eta_seconds", "parent_gone_since")}}


def params_of(cls: type, params: dict[str, Any]) -> Any:
    """A kind's params object from a record's params (the keys it does not know left out)."""
    return cls(**{f.name: params[f.name] for f in dataclasses.fields(cls) if f.name in params})


def resolve(ref: str) -> Callable[..., Any]:
    """The function a ``module:function`` reference of the table names (imported on use, so the
    queue never imports MLX)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# -- each kind's params: what its record holds besides the run it reads -------------------
# A dataclass per kind: its fields without a default are what a record must hold, its type
# hints what each must be (``Job.decode`` checks both), and ``parse`` reads the argument of
# ``--then KIND[:ARG]`` (ValueError if bad). A field made with ``flag`` is an option of
# ``tlm submit KIND``; the dashboard builds them too, and the kind's ``run`` reads them back
# (``params_of``).

def submitted_path(path: str) -> str:
    """A path given to a job as the machine that submits it sees it: absolute, links resolved."""
    return str(Path(path).expanduser().resolve())


def flag(default: Any = dataclasses.MISSING, help: str = "", **cli: Any) -> Any:
    """A params field that ``tlm submit KIND`` offers as ``--NAME``: its help, and how the
    command reads it: ``choices``, ``min`` (an integer at least this), ``path`` (made absolute
    on the machine that submits it)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TrainParams:
    """A training job: these fields beside the TrainConfig flags given, flat in the record
    (checked by ``lab.training_job`` as `tlm train` checks them; a resume keeps the run's own
    for any flag not given). `tlm submit train`'s options are TrainConfig's."""
    run: Optional[str] = None  # where its run is: a name under each worker's --save_root,
    save_dir: Optional[str] = None  # or a directory (one of the two)
    dataset_sha1: Optional[str] = None  # the digest of a --dataset copied into the run by `tlm submit`

    @staticmethod
    def flags(params: dict[str, Any]) -> dict[str, Any]:
        """The training flags of a record's params: the rest once these fields are left out."""
        return {k: v for k, v in params.items() if k not in _TRAIN_OWN}

    @staticmethod
    def again(params: dict[str, Any]) -> dict[str, Any]:
        """What submits the same training again, once the run's place is given anew."""
        return {k: v for k, v in params.items() if k not in LOCATION}


_TRAIN_OWN = frozenset(f.name for f in dataclasses.fields(TrainParams))
LOCATION = ("run", "save_dir")  # a job's run, as ``targets.run_target`` writes it into params


@dataclass(frozen=True)
class EvalParams:
    """Loss and perplexity of a checkpoint on a split."""
    identifier: Optional[str] = flag(None, "checkpoint SHA1 or prefix (default: latest)")
    split: str = flag("valid", choices=("valid", "test"))
    tokens: int = flag(0, "evaluate the split's first N tokens only (default: all)", min=0)
    stride: Optional[int] = flag(None, "sliding-window evaluation: windows every N tokens, each scoring its last N",
                                 min=1)
    data_mirror: Optional[str] = field(default_factory=lambda: os.environ.get("TLM_DATA_MIRROR"))

    @classmethod
    def parse(cls, arg: str) -> "EvalParams":
        if arg not in ("", "valid", "test"):
            raise ValueError(f"no split {arg!r}: valid or test")
        return cls(split=arg or "valid")


@dataclass(frozen=True)
class SampleParams:
    """Text continued from a prompt by a checkpoint."""
    prompt: str
    sampling: dict[str, Any] = field(default_factory=dict)  # tlm.generate.SampleConfig's fields
    identifier: Optional[str] = None
    num_samples: int = 1

    @classmethod
    def parse(cls, arg: str) -> "SampleParams":
        return cls(prompt=arg)


@dataclass(frozen=True)
class ExportParams:
    """A checkpoint written as a directory mlx-lm loads (``out``: absolute, as submitted)."""
    out: str = flag(help="directory to write, as the worker sees it", path=True)
    identifier: Optional[str] = flag(None, "checkpoint SHA1 or prefix (default: latest)")

    @classmethod
    def parse(cls, arg: str) -> "ExportParams":
        """To the directory ``arg``, made absolute here (on the machine that submits it)."""
        if not arg:
            raise ValueError("give the directory to write")
        return cls(out=submitted_path(arg))


# The kinds' and lanes' names, for the code that must name one (the table below is the rest).
TRAIN, EVAL, SAMPLE, EXPORT, SWEEP = "train", "eval", "sample", "export", "sweep"
TRAINING, INTERACTIVE = "train", "interactive"  # the lanes: training slots, and one slot beside them


@dataclass(frozen=True)
class JobKind:
    """One kind of job. ``run`` is ``module:function`` of the job process (imported
    there only, so the queue never imports MLX)."""
    name: str
    lane: str  # TRAINING (training slots) or INTERACTIVE (beside them)
    run: str
    trainer: bool = False  # holds its run's one trainer (one live at a time)
    params: Optional[type] = None  # its params dataclass (above): what its record holds
    then: str = ""  # its ``--then`` syntax, if a training job may be followed by one
    required: tuple[str, ...] = ()  # params its record must hold (a kind without a params class)
    nodes: Callable[[dict[str, Any]], int] = lambda params: 1  # workers it needs at once
    checkpoint_input: bool = False  # reads a checkpoint: a chain pins its parent's
    driven: bool = False  # held by no worker: every worker drives it in its sweep (a tlm sweep)
    result: Shape = dict  # what its record's result holds once it succeeded
    forget: str = ""  # ``module:function(registry, job_id)``: what else goes when its record is pruned
    submit: str = ""  # ``tlm submit KIND``'s help, for a kind that reads a run and is queued by hand

    @functools.cached_property
    def params_shape(self) -> Shape:
        """What a record's params must hold: its params class's fields, or the ``required`` keys."""
        if self.params is None:
            return {REQUIRED_KEYS: self.required}
        fields = {f.name: f for f in dataclasses.fields(self.params)}
        return {REQUIRED_KEYS: tuple(n for n, f in fields.items() if f.default is dataclasses.MISSING
                                     and f.default_factory is dataclasses.MISSING),
                **{n: types + ((type(None),) if optional else ()) for n, (types, optional)
                   in _field_types(self.params).items()}}


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind(TRAIN, TRAINING, "tlm_worker.jobs:run_train", trainer=True, params=TrainParams,
            nodes=lambda params: int(params.get("nodes", 1)),
            result={"step": int, "val_loss": OPTIONAL_NUMBER, "test_loss": OPTIONAL_NUMBER}),
    JobKind(EVAL, INTERACTIVE, "tlm_worker.jobs:run_eval", params=EvalParams, then="eval[:SPLIT]",
            checkpoint_input=True, result={"split": str, "loss": NUMBER},
            submit="Queue an evaluation of a checkpoint: loss and perplexity on a split."),
    JobKind(SAMPLE, INTERACTIVE, "tlm_worker.jobs:run_sample", params=SampleParams, then="sample:PROMPT",
            checkpoint_input=True, result={REQUIRED_KEYS: ("samples", "unknown"), "samples": [str],
                                           "unknown": [str]}),
    JobKind(EXPORT, INTERACTIVE, "tlm_worker.jobs:run_export", params=ExportParams, then="export:DIR",
            checkpoint_input=True, result={"out": str, "checkpoint": str, "step": int},
            submit="Queue an export of a checkpoint as a directory mlx-lm loads (as `tlm export` does here)."),
    JobKind(SWEEP, "", "", trainer=True, required=("search", "name"), driven=True,  # one per name
            forget="tlm_worker.sweeps:forget_study",
            result={"created": int, "reserved": {str: NUMBER}, "best": (dict, type(None)),
                    "driver": [(str, int, float)]}),  # the process driving it, until when
)}



@dataclass
class Job:
    """One job's record. Fields are written through the registry's atomic changes only."""
    id: str
    kind: str
    params: dict[str, Any]
    run: str  # the run's key: run:NAME or dir:PATH
    state: str = QUEUED
    worker: Optional[str] = None
    attempts: int = 0  # crashes count here; interruptions do not
    interruptions: int = 0
    fence: int = 0  # the holder's token: bumped at every claim and re-queue
    created: float = 0.0
    enqueued: float = 0.0
    started: Optional[float] = None
    finished: Optional[float] = None
    heartbeat: Optional[float] = None
    cancel: Optional[str] = None  # "stop" or "force", asked by tlm cancel
    progress: dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    error: Optional[str] = None
    result: Optional[dict[str, Any]] = None
    members: list[dict[str, Any]] = field(default_factory=list)  # a gang's workers, rank order
    priority: int = 0
    needs: dict[str, Any] = field(default_factory=dict)  # placement: see tlm_worker.placement
    after: Optional[str] = None  # the job this one waits for (a chain)
    followers: list[str] = field(default_factory=list)  # the jobs that wait for this one
    sweep: Optional[dict[str, Any]] = None  # a sweep trial's family: sweep id, name, trial, params
    worked: float = 0.0  # seconds its attempts that ended (paused at rungs, or finished) ran
    version: int = VERSION

    @property
    def spec(self) -> JobKind:
        return KINDS[self.kind]

    @property
    def nodes(self) -> int:
        """The workers it needs at once: a training job's --nodes, else one."""
        return self.spec.nodes(self.params)

    @property
    def placement(self) -> dict[str, Any]:
        """What a worker must have to run it: its needs, and the lab's shared folder for a job
        that reads a run by name (resolved under each worker's --save_root)."""
        return {**self.needs, "lab_root": True} if "run" in self.params else self.needs

    @property
    def ran_before(self) -> bool:
        """An earlier attempt ran and may have saved (published or not, as a crash or an
        outage can cut it short): a resume finishes that work rather than refusing it."""
        return bool(self.checkpoint) or self.attempts > 1 or self.interruptions > 0

    def worker_time(self, now: float) -> float:
        """Seconds workers ran it, over its attempts that paused or ended and the one running
        (a record from before ``worked``: its last attempt)."""
        if self.state in ACTIVE and self.started:
            return self.worked + max(now - self.started, 0.0)
        return self.worked or (self.finished - self.started if self.finished and self.started else 0.0)

    @property
    def holder(self) -> str:
        """Who runs it: its worker, a gang's members (rank 0 first), or how far a gang has gathered."""
        if self.nodes > 1 and self.state in CLAIMABLE:
            return f"gathering {len(self.members)}/{self.nodes}"
        return ", ".join(m["worker"] for m in self.members) if self.members else self.worker or "-"

    @property
    def run_name(self) -> str:
        return self.run.split(":", 1)[1]

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def decode(cls, record: dict[str, Any]) -> "Job":
        """A Job from a stored record, or BadRecord saying what is wrong with it."""
        job_id = record.get("id") if isinstance(record.get("id"), str) else "?"
        if "_bad" in record:
            raise BadRecord(job_id, record["_bad"])
        version = record.get("version", 1)
        if isinstance(version, int) and version > VERSION:
            raise BadRecord(job_id, f"was written by a newer tlm (record version {version}; "
                                    f"this one reads {VERSION})", newer=True)
        fields = _field_types(Job)
        for name in ("id", "kind", "params", "run", "state"):
            if name not in record:
                raise BadRecord(job_id, f"has no {name!r}")
        values = {}
        for name, value in record.items():
            if name not in fields:
                continue  # a field this version does not know, from the same layout version
            types, optional = fields[name]
            if value is None and optional:
                values[name] = None
            elif isinstance(value, bool) or not isinstance(value, types):
                raise BadRecord(job_id, f"field {name!r} is {type(value).__name__}, "
                                        f"not {' or '.join(t.__name__ for t in types)}")
            else:
                values[name] = value
        if values["kind"] not in KINDS:
            raise BadRecord(job_id, f"has an unknown kind {values['kind']!r}")
        if values["state"] not in STATES:
            raise BadRecord(job_id, f"has an unknown state {values['state']!r}")
        spec = KINDS[values["kind"]]
        missing = [k for k in spec.params_shape[REQUIRED_KEYS] if k not in values["params"]]
        if missing:
            raise BadRecord(job_id, f"({values['kind']}) has no {', '.join(missing)} in its params")
        why = misfit(values["params"], spec.params_shape, "params")
        if why:
            raise BadRecord(job_id, why)
        for name, shape in (("needs", NEEDS), ("members", [MEMBER]), ("sweep", TRIAL),
                            ("followers", [str]), ("result", spec.result)):
            why = values.get(name) is not None and misfit(values[name], shape, name)
            if why:
                raise BadRecord(job_id, why)
        values["progress"] = {k: v for k, v in values.get("progress", {}).items()
                              if k not in PROGRESS or not misfit(v, PROGRESS[k], k)}
        try:
            nodes = KINDS[values["kind"]].nodes(values["params"])
        except (TypeError, ValueError):
            nodes = 0
        if nodes < 1:
            raise BadRecord(job_id, f"asks for {values['params'].get('nodes')!r} nodes")
        values["version"] = VERSION
        return cls(**values)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple[tuple[type, ...], bool]]:
    """Each field's accepted types and whether it may be None, from its annotation: what a
    record that other writers made is checked against (an int passes for a float)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is typing.Union and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        base = typing.get_origin(base) or base  # dict[str, Any] -> dict
        out[name] = ((int, float) if base is float else (base,), optional)
    return out
