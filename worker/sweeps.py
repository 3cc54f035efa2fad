"""``tlm sweep``: a family of ordinary training jobs whose flags Optuna proposes and prunes.

A sweep is a registry record of kind ``sweep`` (its spec in ``params``, its
counters in ``result``) that no worker holds: every worker *drives* it
(``reconcile``, from its sweep every lease/2 and whenever a trial of it ends).
Each trial is a train job in its own run (``<name>-<sweep id>/trial-<n>`` under the
save root: a later sweep of the same name never meets an earlier one's checkpoints)
with a fixed id, so the one-trainer-per-run rule makes creating it idempotent; it
has the same fencing, re-queue, resume and interruption rules as any job. Driving
is a sequence of idempotent steps, so any worker may do it and any may die in the
middle:

1. tell Optuna how each ended trial ended (``tell(skip_if_finished=True)``);
2. a cancelled sweep cancels its live trials, then ends ``cancelled``;
3. reserve the next trial number in one atomic change of the sweep record
   (while fewer than ``--parallel`` run and fewer than ``--trials`` exist),
   ask Optuna for its flags, create its job; a number reserved by a worker
   that died before creating its job is created by another one a lease later,
   and the Optuna trial it had asked for is told FAIL;
4. when every trial has ended, the sweep ends ``succeeded`` with the best.

Optuna's storage is its journal beside the queue: on Redis a
``JournalRedisBackend`` under ``tlm:optuna:`` (snapshots off: they are
pickles, and nothing read from the queue is ever unpickled), on the embedded
queue a ``JournalFileBackend`` file beside the SQLite file (JSON lines, file
locks). Both are append-only logs that every process replays, so workers on
every Mac share one study without a server of its own. The sampler and pruner
are not stored: each process builds them from the spec, the sampler seeded
with (--seed, trial number), so --seed makes the proposals reproducible.

Trials report their validation loss at each evaluation (step, or seconds of
training with a time budget) from the trial's own process (``TrialHooks``); a
trial Optuna prunes saves and ends ``pruned``; with promotion ASHA a trial pauses
at a rung and the sweep resumes the best (``_promote``); with ``--schedule pbt``
every trial pauses at each generation's end and the sweep makes the bottom quarter
take the top quarter's checkpoints with perturbed flags (``_generation``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from tlm.config import RESUMABLE, ConfigError, TrainConfig, apply_preset, flag_types, flag_value, local_flags
from tlm.memory import estimate
from tlm_worker.kinds import (ACTIVE, FAILED, FINAL, LIVE, NUMBER, PAUSED, PRIORITIES, PRUNED, REQUIRED_KEYS,
                              RUNNING, SUCCEEDED, SWEEP, TRAIN, Job, misfit)
from tlm_worker.queue import QUEUE_ERRORS
from tlm_worker.registry import CANCELLED, JobNotFound, RunBusy
from tlm_worker.targets import TRIAL
from tlm_worker.trainer_hooks import RegistryHooks

if TYPE_CHECKING:
    from tlm_worker.registry import Registry

SAMPLERS = ("tpe", "random", "grid")
SCHEDULES = ("search", "pbt")
PRUNERS = ("asha", "asha-stop", "hyperband", "none")  # asha: promotion (pause, resume); the rest stop
ETA = 3  # successive halving's reduction factor: a third of the trials at a rung go on
GENERATIONS = 6  # PBT's generations in a trial's budget when --interval is not given
QUANTILE = 0.25  # PBT: the bottom quarter of a generation copies the top quarter
METRICS = ("valid_loss",)
# Flags a trial never sets: how one invocation trains and on what, what it starts from.
FIXED_FLAGS = local_flags() | {"preset", "init_from"}


class SpecError(ValueError):
    """A sweep spec that cannot run; the message is one line."""


@dataclass
class SweepSpec:
    """What a sweep searches, how long each trial trains, and how trials are proposed and pruned."""
    name: str
    search: dict[str, dict[str, Any]]  # flag -> {"type": float|int|choice, low, high, log | values}
    base: dict[str, Any] = field(default_factory=dict)  # the other flags (a --preset applied)
    trials: int = 16
    parallel: int = 2
    metric: str = "valid_loss"
    budget: str = ""  # "10m" (minutes of training) or "500" (steps); empty: the base flags decide
    prune: str = "asha"
    sampler: str = "tpe"
    seed: int = 0
    priority: str = "low"
    schedule: str = "search"  # search: Optuna proposes each trial; pbt: a population that exploits and explores
    interval: str = ""  # pbt: steps (or minutes, 2m) between generations; empty: the budget over GENERATIONS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepSpec":
        """A spec from a record or a file, its fields' types checked (SpecError, one line)."""
        why = misfit(data, SPEC, "the sweep spec")
        unknown = sorted(set(data) - set(SPEC) - {REQUIRED_KEYS})
        if why or unknown:
            raise SpecError(why or f"the sweep spec has unknown keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, data: dict[str, Any]) -> "SweepSpec":
        """A stored spec, checked as at submit: a record edited since reads as SpecError."""
        return check(cls.from_dict(data))

    def trial_flags(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's training flags: the base, the budget, then the proposed values."""
        flags = dict(self.base)
        if self.budget.endswith("m"):
            flags.update(time_budget=float(self.budget[:-1]), num_iters=flags.get("num_iters", 10**6))
        elif self.budget:
            flags.update(num_iters=int(self.budget), time_budget=0.0)
        return {**flags, **params}

    @property
    def by_time(self) -> bool:
        return self.budget.endswith("m")


SCALAR = (str, int, float, bool)
SEARCH = {REQUIRED_KEYS: ("type",), "type": str, "low": NUMBER, "high": NUMBER, "log": bool, "values": [SCALAR]}
SPEC = {REQUIRED_KEYS: ("name", "search"), "name": str, "search": {str: SEARCH}, "base": {str: SCALAR},
        "trials": int, "parallel": int, "metric": str, "budget": str, "prune": str, "sampler": str,
        "seed": int, "priority": str, "schedule": str, "interval": str}
MAX_TRIALS, MAX_PARALLEL = 10000, 1000


def parse_search(item: str, types: dict[str, type]) -> tuple[str, dict[str, Any]]:
    """``flag=log:LO:HI`` (log-uniform), ``flag=LO:HI`` (uniform; integers for integer flags),
    ``flag=a,b,c`` (a choice)."""
    name, eq, text = item.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    if not eq or not text:
        raise SpecError(f"--search {item!r}: give FLAG=LO:HI, FLAG=log:LO:HI or FLAG=a,b,c")
    if name not in types or name in FIXED_FLAGS:
        raise SpecError(f"--search {item!r}: {name!r} is not a training flag that can be searched")
    typ = types[name]

    def value(v: str) -> Any:
        try:
            return flag_value(v, typ)
        except ValueError:
            raise SpecError(f"--search {item!r}: {v!r} is not a {'finite number' if typ is float else typ.__name__} "
                            f"(--{name} takes {typ.__name__})") from None
    log = text.startswith("log:")
    body = text[4:] if log else text
    if ":" in body and "," not in body:
        lo, _, hi = body.partition(":")
        if typ not in (int, float):
            raise SpecError(f"--search {item!r}: --{name} takes {typ.__name__}, not a range: "
                            "give a choice a,b,c")
        low, high = value(lo), value(hi)
        if not low < high:
            raise SpecError(f"--search {item!r}: the range is empty ({low} is not below {high})")
        if log and low <= 0:
            raise SpecError(f"--search {item!r}: a log range must be above 0")
        return name, {"type": typ.__name__, "low": low, "high": high, "log": log}
    values = [value(v.strip()) for v in body.split(",") if v.strip()]
    if len(values) < 2 or log:
        raise SpecError(f"--search {item!r}: a choice needs at least two values (a,b)")
    return name, {"type": "choice", "values": values}


def spec_of(given: dict[str, Any], fixed: dict[str, Any]) -> SweepSpec:
    """A checked spec from `tlm sweep submit`'s options (or a spec file's keys) and its fixed
    flags (``--flag`` strings, or a file's typed values); SpecError, one line, if it cannot run."""
    if not given.get("name"):
        raise SpecError("give the sweep a --name")
    types = flag_types()
    base: dict[str, Any] = {}
    for key, value in fixed.items():
        if key not in types or key in FIXED_FLAGS:
            raise SpecError(f"--flag {key}: not a training flag a sweep can set")
        try:
            base[key] = flag_value(value, types[key])
        except ValueError:
            raise SpecError(f"--flag {key}={value}: expected {types[key].__name__}") from None
    if given.get("preset"):
        try:
            base = apply_preset({"preset": given["preset"], **base})
        except ConfigError as e:
            raise SpecError(str(e)) from None
        base.pop("preset", None)
    search = dict(parse_search(item, types) for item in given.get("search", []))
    if given.get("schedule") == "pbt":  # a population trains at once: N trials, N in parallel, none pruned
        if given.get("trials") is not None or given.get("parallel") is not None:
            raise SpecError("--schedule pbt trains its whole population at once: give --population N, "
                            "not --trials or --parallel")
        n = given.get("population") or 4
        given = {"prune": "none", **given, "trials": n, "parallel": n}
    elif given.get("population") is not None:
        raise SpecError("--population is population based training's: add --schedule pbt")
    spec = SweepSpec(name=given["name"], search=search, base=base,
                     **{k: given[k] for k in ("trials", "parallel", "metric", "budget", "prune", "sampler",
                                              "seed", "priority", "schedule", "interval") if k in given})
    spec.budget, spec.interval = str(spec.budget), str(spec.interval)
    return check(spec)


def check(spec: SweepSpec) -> SweepSpec:
    """Refuse, in one line, a spec that cannot run: names, counts, budget, each trial's flags."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,63}", spec.name or ""):
        raise SpecError(f"--name {spec.name!r}: letters, digits, '.', '_' or '-', at most 64")
    if not spec.search:
        raise SpecError("nothing to search: give --search FLAG=...")
    for name, value, choices in (("prune", spec.prune, PRUNERS), ("sampler", spec.sampler, SAMPLERS),
                                 ("schedule", spec.schedule, SCHEDULES),
                                 ("metric", spec.metric, METRICS), ("priority", spec.priority, PRIORITIES)):
        if value not in choices:
            raise SpecError(f"--{name} {value!r}: choose from {', '.join(choices)}")
    if not (1 <= spec.trials <= MAX_TRIALS and 1 <= spec.parallel <= MAX_PARALLEL):
        raise SpecError(f"--trials must be in [1, {MAX_TRIALS}] and --parallel in [1, {MAX_PARALLEL}], "
                        f"got {spec.trials} and {spec.parallel}")
    if not 0 <= spec.seed < 2**32:
        raise SpecError(f"--seed must be in [0, 2^32), got {spec.seed}")
    for name, s in spec.search.items():
        if s["type"] not in ("int", "float", "choice") or (s["type"] == "choice") != ("values" in s) \
                or (s["type"] != "choice" and not ({"low", "high", "log"} <= s.keys() and s["low"] < s["high"])):
            raise SpecError(f"--search {name}: not a range or a choice this tlm reads")
    if spec.sampler == "grid" and any(s["type"] != "choice" for s in spec.search.values()):
        raise SpecError("--sampler grid searches choices only (FLAG=a,b,c)")
    if spec.budget and not re.fullmatch(r"\d+(\.\d+)?m|\d+", spec.budget):
        raise SpecError(f"--budget {spec.budget!r}: give minutes (10m) or steps (500)")
    # Every end of every range and every choice, each with the others at their first value: a
    # trial Optuna may propose is refused here, not queued to fail.
    first = {n: s["values"][0] if s["type"] == "choice" else s["low"] for n, s in spec.search.items()}
    corners = [first] + [{**first, n: v} for n, s in spec.search.items()
                         for v in (s["values"][1:] if s["type"] == "choice" else [s["high"]])]
    for probe in corners:
        flags = spec.trial_flags(probe)
        try:
            config = TrainConfig(**flags)
            config.validate()
        except (ConfigError, TypeError, ValueError) as e:
            shown = ", ".join(f"--{n} {probe[n]}" for n in spec.search)
            raise SpecError(f"a trial's flags would be refused ({shown}): {e}") from None
    config = TrainConfig(**spec.trial_flags(first))
    if spec.budget and not spec.by_time and int(spec.budget) < 1:
        raise SpecError("--budget: at least one step")
    if spec.by_time and float(spec.budget[:-1]) * 60 < 1:
        raise SpecError(f"--budget {spec.budget}: under a second of training")
    steps = config.num_iters
    judged = "pruning" if spec.schedule == "search" else "population based training"
    if (spec.prune != "none" or spec.schedule == "pbt") and steps <= config.steps_per_eval:
        budget = f"--budget of {steps} steps" if spec.budget and not spec.by_time else \
            f"a trial (at most {steps} steps, or its time budget)"
        raise SpecError(f"{budget} reaches no evaluation before the end "
                        f"(--steps_per_eval {config.steps_per_eval}): {judged} needs one; lower "
                        "--steps_per_eval" + (" or use --prune none" if spec.schedule == "search" else ""))
    check_pbt(spec)
    return spec


def check_pbt(spec: SweepSpec) -> None:
    """A population based training spec that can run: nothing pruned, a population, flags it
    may perturb, an interval in the budget's unit that leaves generations before the end."""
    if spec.schedule != "pbt":
        if spec.interval:
            raise SpecError("--interval is population based training's: add --schedule pbt")
        return
    if spec.prune != "none":
        raise SpecError("--schedule pbt judges its population at each generation: drop --prune")
    if spec.trials != spec.parallel or spec.trials < 2:
        raise SpecError(f"--population must be at least 2, got {spec.trials}")
    if not set(spec.search) & set(RESUMABLE):
        raise SpecError("--schedule pbt perturbs the flags a run may change when it resumes: search at "
                        f"least one of {', '.join(RESUMABLE)}")
    if spec.interval and not re.fullmatch(r"\d+(\.\d+)?m" if spec.by_time else r"\d+", spec.interval):
        raise SpecError(f"--interval {spec.interval!r}: give " + ("minutes (2m), as the budget"
                                                                 if spec.by_time else "steps (200), as the budget"))
    if not generations(spec):
        raise SpecError(f"--interval {spec.interval}: not one generation ends before the budget does")


# -- Optuna ------------------------------------------------------------------------------------

class JournalGone(RuntimeError):
    """A sweep's Optuna journal lost an entry or its whole self (pruned, or a Redis restarted
    empty): reported by the sweep or a trial in one line, never recreated, never waited on."""


def storage(registry: "Registry", sweep_id: str, create: bool = False):
    """The sweep's own Optuna journal beside the queue, so loading a study replays its own trials
    only and deleting one is deleting its journal: Redis keys under ``tlm:optuna:<id>``, or a
    file ``<queue file>.optuna/<id>.log``. A sweep an older tlm started reads the shared journal
    it was written to. Only ``create`` makes a journal: one that is gone stays gone."""
    from optuna.storages import JournalStorage  # Optuna
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend  # Optuna

    class RedisJournal(JournalRedisBackend):
        """Optuna's Redis journal without its snapshots (pickles). Optuna writes an entry and
        its number in one script, so a missing entry is damage: it waits for one forever, deaf
        to signals; this says so. And it recreates a journal Redis lost on its next append,
        where no prune would ever find it; this refuses."""

        def read_logs(self, log_number_from: int):
            last = self._redis.get(f"{self._prefix}:log_number")
            for number in range(log_number_from, int(last or -1) + 1):
                log = self._redis.get(self._key_log_id(number))
                if log is None:
                    raise JournalGone(f"entry {number} of the sweep's Optuna journal is missing")
                yield json.loads(log)

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            if not create and not self._redis.exists(f"{self._prefix}:log_number"):
                raise JournalGone(f"the sweep's Optuna journal {self._prefix} is gone")
            super().append_logs(logs)

        def save_snapshot(self, snapshot: bytes) -> None:
            pass

        def load_snapshot(self) -> Optional[bytes]:
            return None

    queue = registry.queue
    if queue.redis is not None:

        from optuna.exceptions import ExperimentalWarning  # Optuna
        prefix = f"{OPTUNA_PREFIX}:{sweep_id}"
        if not create and not queue.redis.exists(f"{prefix}:log_number"):
            if not queue.redis.exists(f"{OPTUNA_PREFIX}:log_number"):
                raise JournalGone(f"the sweep's Optuna journal {prefix} is gone")
            prefix = OPTUNA_PREFIX  # the shared journal of tlm before per-sweep journals
        with warnings.catch_warnings():  # "experimental since 3.1": stable in use, and ours is pinned
            warnings.simplefilter("ignore", ExperimentalWarning)
            return JournalStorage(RedisJournal(queue.url, prefix=prefix))
    path, shared = _journal_file(registry, sweep_id), Path(str(queue.sqlite_path) + ".optuna.log")
    if not create and not path.exists():
        if not shared.exists():  # Optuna's backend would create it empty
            raise JournalGone(f"the sweep's Optuna journal {path} is gone")
        path = shared
    path.parent.mkdir(exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


OPTUNA_PREFIX = "tlm:optuna"


def _journal_file(registry: "Registry", sweep_id: str) -> Path:
    return Path(str(registry.queue.sqlite_path) + ".optuna") / f"{sweep_id}.log"


def forget_study(registry: "Registry", sweep_id: str) -> None:
    """Delete a sweep's own Optuna journal (with its record: ``tlm prune``, a lost submit race)."""
    redis = registry.queue.redis
    if redis is not None:
        keys = list(redis.scan_iter(match=f"{OPTUNA_PREFIX}:{sweep_id}:*", count=1000))
        if keys:
            redis.delete(*keys)
    else:
        _journal_file(registry, sweep_id).unlink(missing_ok=True)


def distributions(spec: SweepSpec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # Optuna

    out = {}
    for name, s in spec.search.items():
        if s["type"] == "choice":
            out[name] = CategoricalDistribution(s["values"])
        elif s["type"] == "int":
            out[name] = IntDistribution(s["low"], s["high"], log=s["log"])
        else:
            out[name] = FloatDistribution(s["low"], s["high"], log=s["log"])
    return out


def sampler(spec: SweepSpec, trial: int):
    """The sampler for trial ``trial``: seeded by (--seed, trial), so proposals are reproducible."""
    import optuna  # Optuna

    if spec.sampler == "grid":  # its seed orders the grid: the same in every process
        return optuna.samplers.GridSampler({n: s["values"] for n, s in spec.search.items()},
                                           seed=spec.seed)
    seed = (spec.seed * 1_000_003 + trial) % 2**32
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def pruner(spec: SweepSpec):
    """Stopping ASHA's or Hyperband's first rung at a trial's first evaluation (with a step
    budget), so no trial is judged on less than one evaluation's worth of training; a third goes
    on at each. Promotion ASHA (``asha``) is judged by tlm (``rungs``, ``standing``, ``top``): Optuna
    prunes nothing there."""
    import optuna  # Optuna

    first: Any = "auto"
    if not spec.by_time:
        first = int(spec.trial_flags({}).get("steps_per_eval", 1000))
    if spec.prune == "asha-stop":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=ETA)
    if spec.prune == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1 if first == "auto" else first,
                                              reduction_factor=ETA)
    return optuna.pruners.NopPruner()


# -- promotion ASHA: trials pause at rungs and the best resume ------------------------------

def whole(spec: SweepSpec) -> float:
    """A trial's whole budget: steps, or seconds of training with a time budget."""
    if spec.by_time:
        return float(spec.budget[:-1]) * 60
    return float(spec.trial_flags({}).get("num_iters", TrainConfig.num_iters))


def rungs(spec: SweepSpec) -> list[float]:
    """Where promotion ASHA judges a trial, in steps (seconds of training with a time budget):
    its first evaluation, then ETA times further each time, short of the whole budget (with a
    time budget: the budget over ETA, ETA^2, ETA^3)."""
    if spec.by_time:
        return [whole(spec) / ETA**k for k in (3, 2, 1)]
    first = int(spec.trial_flags({}).get("steps_per_eval", TrainConfig.steps_per_eval))
    out: list[float] = []
    while first * ETA ** len(out) < whole(spec):
        out.append(float(first * ETA ** len(out)))
    return out


def generations(spec: SweepSpec) -> list[float]:
    """Where PBT's generations end, in steps (seconds with a time budget): every ``--interval``
    short of the whole budget. A trial pauses at its first evaluation at or past each."""
    every = (float(spec.interval[:-1]) * 60 if spec.by_time else float(spec.interval)) if spec.interval \
        else whole(spec) / GENERATIONS
    if every <= 0:
        return []
    return [every * k for k in range(1, int(whole(spec) // every) + 1) if every * k < whole(spec)]


def rung_value(values: dict[int, float], rung: float) -> Optional[float]:
    """A trial's metric at a rung: the mean of its evaluations in the rung's second half (up
    to the first at or past the rung), so one noisy evaluation does not decide alone; None if
    it has not reached the rung."""
    end = min((at for at in values if at >= rung), default=None)
    if end is None:
        return None
    window = [v for at, v in values.items() if rung / 2 <= at <= end]
    return sum(window) / len(window)


def standing(trials: list, rung: float) -> list[tuple[float, int]]:
    """(metric, Optuna number) of every trial that reached the rung, best first. A promoted
    trial's continuation (a new Optuna trial, ``passed`` the rung it was promoted past) counts
    from its next rung on: at the earlier ones its first entry stands."""
    scored = ((rung_value(t.intermediate_values, rung), t.number) for t in trials
              if t.user_attrs.get("passed", -1.0) < rung)
    return sorted((v, n) for v, n in scored if v is not None)


def top(board: list[tuple[float, int]]) -> set[int]:
    """The promotable of a rung's standing: its top 1/ETA (none while fewer than ETA reached
    it: no trial trains on merely for being first)."""
    return {n for _, n in board[:len(board) // ETA]}


def _promote(registry: "Registry", st, spec: SweepSpec, jobs: list[Job], leader: bool = False) -> Optional[Job]:
    """Queue the paused trial to resume first: the best promotable one at the highest rung; with
    ``leader`` (nothing else runs or is left to start, and no trial has trained its whole
    budget yet), the best one at the highest rung any reached, so one trial always does."""
    paused = {j.sweep["number"]: j for j in jobs if j.state == PAUSED and j.sweep}
    if not paused:
        return None
    trials = st.get_trials(deepcopy=False)
    highest = {t.number: max((r for r in rungs(spec) if rung_value(t.intermediate_values, r) is not None),
                             default=None) for t in trials if t.number in paused}
    for rung in reversed(rungs(spec)):
        board = standing(trials, rung)
        best = top(board)
        for _, n in board:
            if n in paused and highest.get(n) == rung and (leader or n in best):
                # Optuna was told it was pruned (TPE learns from it); it goes on as a new trial
                # of the same flags, which its job carries from now on
                _tell_once(st, n, state=_state("PRUNED"))
                st.enqueue_trial(paused[n].sweep["params"], user_attrs={"passed": rung})
                number = st.ask(distributions(spec)).number
                job = registry.promote(paused[n].id, sweep={**paused[n].sweep, "passed": rung, "number": number})
                if job is not None:
                    registry.log(job.sweep["id"], f"trial {job.sweep['trial']} promoted past "
                                 f"{'step' if not spec.by_time else 'second'} {rung:g}"
                                 + (" (the leader: nothing else to run)" if leader and n not in best else ""))
                return job
    return None


# -- population based training: generations, exploit and explore over the trials' checkpoints --

def perturb(spec: SweepSpec, params: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """PBT's explore: each searched flag a resumed run may change is drawn anew with probability
    QUANTILE, else moved by a factor 0.8 or 1.2 (a choice: to a neighbour), within its range;
    the rest (the model's shape) stay as they are, since the checkpoint carries them."""
    out = dict(params)
    for name, s in spec.search.items():
        if name not in RESUMABLE:
            continue
        if s["type"] == "choice":
            values = s["values"]
            at = values.index(params[name]) if params[name] in values else 0
            out[name] = rng.choice(values) if rng.random() < QUANTILE \
                else values[min(max(at + rng.choice((-1, 1)), 0), len(values) - 1)]
            continue
        if rng.random() < QUANTILE:
            value = math.exp(rng.uniform(math.log(s["low"]), math.log(s["high"]))) if s["log"] \
                else rng.uniform(s["low"], s["high"])
        else:
            value = params[name] * rng.choice((0.8, 1.2))
        value = min(max(value, s["low"]), s["high"])
        out[name] = round(value) if s["type"] == "int" else value
    return out


def _generation(registry: "Registry", st, spec: SweepSpec, sweep: Job, jobs: list[Job]) -> list[Job]:
    """PBT, one idempotent step at a time. When every live trial has paused at the end of a
    generation, those that paused at the earliest are ranked: each of the bottom QUANTILE is
    given a plan (``copy``: a top trial's checkpoint, perturbed flags, a new Optuna trial) and
    all are queued to go on; a trial whose checkpoint a queued one has yet to copy stays paused
    until it has (its retention would delete it), then goes on too. The trials as they are now."""
    live = [j for j in jobs if j.sweep and j.state in LIVE]
    g = min((j.sweep.get("generation", 0) for j in live), default=0)
    cohort = sorted((j for j in live if j.sweep.get("generation", 0) == g),
                    key=lambda j: (_loss(j.sweep), j.sweep["trial"]))
    # ranked once every trial of the generation has paused (a decision a crash cut short is
    # finished over the same ranking: those already decided keep their value in it)
    if g and all(j.state == PAUSED or j.sweep.get("go") == g for j in cohort):
        q = math.ceil(len(cohort) * QUANTILE) if len(cohort) >= 2 else 0
        for i, job in enumerate(cohort):
            if job.state != PAUSED or job.sweep.get("go") == g:
                continue
            family = {**job.sweep, "go": g}
            if i >= len(cohort) - q:
                rng = random.Random(f"{spec.seed}:{g}:{job.sweep['trial']}")
                family = _exploit(registry, st, spec, family, rng.choice(cohort[:q]), rng)
            registry.change(job.id, lambda j, family=family: {"sweep": family}
                            if j.state == PAUSED and j.sweep.get("go") != g else None)
        jobs = trials(registry, sweep)
    copying = {j.sweep["copy"]["from"] for j in jobs if j.sweep and j.state in LIVE and j.sweep.get("copy")}
    promoted = {}
    for job in jobs:
        family = job.sweep or {}
        if job.state == PAUSED and family.get("go") == family.get("generation") and family["trial"] not in copying:
            fields = {"params": {**job.params, **family["params"]}} if family.get("copy") else {}
            promoted[job.id] = registry.promote(job.id, **fields) or job
    return [promoted.get(j.id, j) for j in jobs]


def _exploit(registry: "Registry", st, spec: SweepSpec, family: dict[str, Any], donor_job: Job,
             rng: random.Random) -> dict[str, Any]:
    """A bottom trial's plan: the donor's checkpoint (copied by the trial's own job process as it
    starts: ``adopt``), the donor's flags perturbed, a new Optuna trial of them (the old one told
    pruned), and the lineage: its copies, and the flag schedule its weights were trained with."""
    donor = donor_job.sweep
    params = perturb(spec, donor["params"], rng)
    at, g = donor["at"], family["generation"]
    _tell_once(st, family["number"], state=_state("PRUNED"))
    st.enqueue_trial(params, user_attrs={"parent": donor["number"], "generation": g})
    number = st.ask(distributions(spec)).number
    schedule = [s for s in donor.get("schedule", [[0, donor["params"]]]) if s[0] < at]
    if params != schedule[-1][1]:  # the same flags on: exact resume makes it one run of them
        schedule.append([at, params])
    registry.log(family["id"], f"generation {g}: trial {family['trial']} ({_loss(family):.4f}) takes trial "
                 f"{donor['trial']}'s checkpoint ({_loss(donor):.4f}) at {at:g}: "
                 + " ".join(f"--{k} {_short(v)}" for k, v in params.items()))
    return {**family, "number": number, "params": params, "schedule": schedule,
            "copies": family.get("copies", []) + [[at, donor["trial"]]],
            "copy": {"from": donor["trial"], "run": donor_job.run_name, "generation": g}}


def _loss(family: dict[str, Any]) -> float:
    """A PBT trial's loss at the generation it paused at (none recorded, or not finite: last)."""
    value = family.get("value")
    return math.inf if value is None else value


def _short(value: Any) -> str:
    return format(value, ".4g") if isinstance(value, float) else str(value)


def adopt(c) -> None:
    """In a PBT trial's own job process (``c``: its Context), before it resumes: take the
    checkpoint its plan names into its run (``checkpoint.adopt``: idempotent, so a process that
    died halfway is run again), then drop the plan, which lets the donor go on."""
    from tlm import checkpoint  # MLX

    plan = (c.job.sweep or {}).get("copy")
    if not plan:
        return
    name = Path(plan["run"]).name  # a sweep's trials are siblings: never a path out of its folder
    if not name.startswith(TRIAL):
        raise checkpoint.CheckpointError(f"the copy's run {plan['run']!r} is not a trial of this sweep")
    donor = Path(c.save_dir).parent / name
    ident = checkpoint.newest_name(donor)  # the donor stays paused until this plan is dropped
    if ident is None:
        raise checkpoint.CheckpointError(f"trial {plan['from']}'s run {donor} has no checkpoint to take")
    checkpoint.adopt(donor, ident, c.save_dir)
    c.log(f"took trial {plan['from']}'s checkpoint {ident[:12]} (generation {plan['generation']}): "
          "training on from it with " + " ".join(f"--{k} {_short(v)}" for k, v in c.job.sweep["params"].items()))
    job = c.registry.change(c.job.id, lambda j: {"sweep": {k: v for k, v in j.sweep.items() if k != "copy"}}
                            if j.fence == c.fence else None)
    if job is not None:
        c.job = job


def study(registry: "Registry", sweep_id: str, spec: "SweepSpec", trial: int = 0, create: bool = False):
    import optuna  # Optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    make = optuna.create_study if create else optuna.load_study
    kwargs = {"direction": "minimize"} if create else {}
    return make(study_name=sweep_id, storage=storage(registry, sweep_id, create), sampler=sampler(spec, trial),
                pruner=pruner(spec), **kwargs)


# -- the registry side: submit, drive, read ---------------------------------------------------

def sweep_key(name: str) -> str:
    return f"sweep:{name}"


def trial_id(sweep: Job, n: int) -> str:
    return f"{sweep.id[:7]}t{n:04d}"


def trial_run(spec: SweepSpec, sweep_id: str, n: int) -> str:
    """Trial ``n``'s run: in a folder of this sweep's own, so a sweep that reuses a name (once
    the first one's record is gone) starts fresh instead of resuming a stranger's checkpoints."""
    return f"{spec.name}-{sweep_id[:7]}/{TRIAL}{n:03d}"


def submit(registry: "Registry", spec: SweepSpec) -> Job:
    """Record the sweep, create its study, and start its first trials."""
    check(spec)
    existing = registry.jobs(None, run=sweep_key(spec.name))
    if existing:
        raise SpecError(f"a sweep named {spec.name} exists already ({existing[-1].state}): "
                        "choose another --name")
    sweep_id = uuid.uuid4().hex[:12]
    study(registry, sweep_id, spec, create=True)  # first: a worker that sees the record finds it
    try:
        sweep = registry.create(SWEEP, spec.to_dict(), sweep_key(spec.name), job_id=sweep_id,
                                priority=PRIORITIES[spec.priority])  # no result yet: 0 trials created
    except RunBusy as e:  # another submit of the name won the race
        forget_study(registry, sweep_id)
        raise SpecError(f"a sweep named {spec.name} exists already ({e.job.state}): "
                        "choose another --name") from None
    reconcile(registry, sweep.id)
    return registry.get(sweep.id)


def importances(registry: "Registry", sweep: Job) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA), once two trials are complete; none before."""
    import optuna  # Optuna

    try:
        found = study(registry, sweep.id, SweepSpec.from_dict(sweep.params))
        done = found.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(done) < 2 or len(sweep.params["search"]) < 1:
            return {}
        return {k: float(v) for k, v in optuna.importance.get_param_importances(found).items()}
    except (RuntimeError, ValueError, KeyError):  # too few distinct values, no study, a bad spec
        return {}


def trials(registry: "Registry", sweep: Job) -> list[Job]:
    created = (sweep.result or {}).get("created", 0)
    return registry.find([trial_id(sweep, n) for n in range(created)])


def reconcile(registry: "Registry", sweep_id: str, lease: float = 60.0) -> None:
    """Drive a sweep one round (see the module docstring); safe in any worker at any time: one
    process at a time holds a sweep's drive (for at most a lease), so a round's count of live
    trials is not overtaken by another's."""
    try:
        if registry.get(sweep_id).state != RUNNING:
            return
    except JobNotFound:  # pruned, or lost with a Redis restarted empty: its trials go on alone
        return
    token = uuid.uuid4().hex

    def hold(sweep: Job):
        result = dict(sweep.result or {})
        held = result.get("driver")
        if sweep.state != RUNNING or (held and held[1] > registry.now()):
            return None
        return {"result": {**result, "driver": [token, registry.now() + lease]}}

    def release(sweep: Job):
        result = dict(sweep.result or {})
        if (result.get("driver") or [None])[0] != token:
            return None
        result.pop("driver")
        return {"result": result}

    sweep = registry.change(sweep_id, hold)
    if sweep is None:
        return  # another process drives it now
    try:
        _round(registry, sweep, lease)
    finally:
        registry.change(sweep_id, release)


def _round(registry: "Registry", sweep: Job, lease: float) -> None:
    jobs = trials(registry, sweep)
    live = [j for j in jobs if j.state in LIVE]
    if sweep.cancel:  # needs nothing of Optuna, so a sweep whose study is gone still cancels
        with _study_errors():
            _tell(study(registry, sweep.id, SweepSpec.from_dict(sweep.params)), jobs, lease)
        for job in live:
            registry.cancel(job.id)
        jobs = trials(registry, sweep)
        if all(j.state in FINAL for j in jobs):  # its counts as it ends: no trial "running" after
            registry.finish(sweep.id, CANCELLED, log="cancelled: every trial saved and stopped",
                            progress={**(sweep.progress or {}), **summary(jobs, None)})
        return
    try:
        spec = SweepSpec.load(sweep.params)
        st = study(registry, sweep.id, spec)
        _tell(st, jobs, lease)
        have = {j.sweep["trial"] for j in jobs if j.sweep}
        reserved = (sweep.result or {}).get("reserved", {})
        for n in range((sweep.result or {}).get("created", 0)):
            if n not in have and registry.now() - reserved.get(str(n), 0) > lease:
                _create(registry, sweep, spec, n)  # its creator died between reserving and creating
        if spec.schedule == "pbt":
            jobs = _generation(registry, st, spec, sweep, jobs)
            live = [j for j in jobs if j.state in LIVE]
        asha = spec.schedule == "search"
        running = [j for j in live if j.state != PAUSED]
        while len(running) < spec.parallel:  # promotions first, then new trials
            job = _promote(registry, st, spec, jobs) if asha else None
            if job is None:
                n = _reserve(registry, sweep.id, spec)
                if n is not None:
                    job = _create(registry, sweep, spec, n)
                    if job is None:
                        continue
                elif asha and not running and not any(j.state == SUCCEEDED for j in jobs):
                    job = _promote(registry, st, spec, jobs, leader=True)
                if job is None:
                    break
            running.append(job)
            jobs = [job if j.id == job.id else j for j in jobs]
    except QUEUE_ERRORS:
        raise
    except Exception as e:  # its spec edited, its Optuna journal deleted or damaged
        why = (str(e) if isinstance(e, SpecError) else f"{type(e).__name__}: {e}").splitlines()[0][:200]
        registry.finish(sweep.id, FAILED, error=f"cannot drive the sweep ({why}); its {len(live)} live "
                        "trial(s) go on as ordinary jobs", log=f"failed: cannot drive the sweep: {why}")
        return
    sweep = registry.get(sweep.id)  # with the trials this round created
    jobs = trials(registry, sweep)
    registry.update(sweep.id, progress=summary(jobs, spec))
    # promotion ASHA's paused trials end with it; PBT's go on at the end of every generation
    if len(jobs) >= spec.trials and all(j.state in FINAL + ((PAUSED,) if spec.schedule == "search" else ())
                                        for j in jobs):
        for job in jobs:  # nothing runs and none is promoted: the paused end with the sweep
            if job.state == PAUSED:
                registry.finish(job.id, PRUNED, log="pruned: its sweep ended while it waited at a rung")
        jobs = trials(registry, sweep)
        with _study_errors():
            _tell(st, jobs, lease)  # a trial that ended during this round: told before the end
        best = leaderboard(registry, sweep)[:1]
        result = {k: v for k, v in (sweep.result or {}).items() if k != "driver"}
        registry.finish(sweep.id, SUCCEEDED, result={**result, "created": len(jobs),
                                                     "best": best[0] if best else None})


@contextlib.contextmanager
def _study_errors():
    """Telling Optuna is best effort where the sweep ends anyway (a study gone or damaged)."""
    try:
        yield
    except QUEUE_ERRORS:
        raise
    except Exception:
        pass


def _reserve(registry: "Registry", sweep_id: str, spec: SweepSpec) -> Optional[int]:
    """Take the next trial number in one atomic change of the sweep record (None: all taken)."""
    taken: list[int] = []

    def take(sweep: Job):
        result = dict(sweep.result or {})
        n = result.get("created", 0)
        if sweep.state != RUNNING or sweep.cancel or n >= spec.trials:
            return None
        taken.append(n)
        return {"result": {**result, "created": n + 1,
                           "reserved": {**result.get("reserved", {}), str(n): registry.now()}}}
    return taken[0] if registry.change(sweep_id, take) is not None else None


def _create(registry: "Registry", sweep: Job, spec: SweepSpec, n: int) -> Optional[Job]:
    """Ask Optuna for trial ``n``'s flags and queue its job (None if it exists already)."""
    st = study(registry, sweep.id, spec, trial=n)
    trial = st.ask(distributions(spec))
    flags = spec.trial_flags(trial.params)
    family = {"id": sweep.id, "name": spec.name, "trial": n, "number": trial.number,
              "params": trial.params}
    run = trial_run(spec, sweep.id, n)
    try:
        job = registry.create(TRAIN, {**flags, "run": run}, f"run:{run}", priority=sweep.priority,
                              needs={"memory": estimate(flags)}, job_id=trial_id(sweep, n), sweep=family)
    except RunBusy:
        _tell_once(st, trial.number, state=_state("FAIL"))
        return None
    registry.log(sweep.id, f"trial {n} ({job.id}): " + " ".join(f"--{k} {v}" for k, v in trial.params.items()))
    return job


def _state(name: str):
    from optuna.trial import TrialState  # Optuna
    return TrialState[name]


def _tell(st, jobs: list[Job], lease: float) -> None:
    """Tell Optuna how each ended trial ended, and one paused at a rung as pruned (TPE learns from
    its rungs now; promoted, it goes on as a new trial; one paused at a PBT generation goes on as
    the same trial); fail Optuna trials no job carries (orphans)."""
    running = {t.number: t for t in st.get_trials(deepcopy=False, states=(_state("RUNNING"),))}
    carried = {j.sweep["number"] for j in jobs if j.sweep}
    for job in jobs:
        number = job.sweep["number"] if job.sweep else None
        if number not in running or job.state not in FINAL + (PAUSED,) \
                or (job.state == PAUSED and "generation" in job.sweep):
            continue
        best = best_metric(job)
        if job.state == SUCCEEDED and best is not None:
            _tell_once(st, number, value=best[0])
        else:
            _tell_once(st, number, state=_state("PRUNED" if job.state in (PRUNED, PAUSED) else "FAIL"))
    for number, t in running.items():
        started = t.datetime_start.timestamp() if t.datetime_start else time.time()
        if number not in carried and time.time() - started > lease:
            _tell_once(st, number, state=_state("FAIL"))


def _tell_once(st, number: int, value: Optional[float] = None, state=None) -> None:
    """Tell a trial's end, unless another worker told it first (the two raced). The grid
    sampler asks the study to stop once every point is told, which outside Optuna's own loop
    raises after the trial's end is stored: nothing to stop here."""
    from optuna.exceptions import UpdateFinishedTrialError  # Optuna

    try:
        st.tell(number, value, state=state, skip_if_finished=True)
    except UpdateFinishedTrialError:
        pass
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def best_metric(job: Job) -> Optional[tuple[float, int, float]]:
    """(best validation loss, its step, its minute) of a trial, from its progress record."""
    best = (job.progress or {}).get("best_valid")
    return tuple(best) if best else None


def summary(jobs: list[Job], spec: Optional[SweepSpec]) -> dict[str, Any]:
    """The sweep's progress: trials by state, the best so far (and the planned count, given the
    spec: a cancel needs none, so a spec edited into nonsense still ends cleanly)."""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    scored = [(b, j) for j in jobs if (b := best_metric(j))]
    best = min(scored, key=lambda x: x[0][0]) if scored else None
    return {**({"trials": spec.trials} if spec else {}), "counts": counts,
            "best": {"loss": best[0][0], "trial": best[1].sweep["trial"]} if best else None}


def leaderboard(registry: "Registry", sweep: Job) -> list[dict[str, Any]]:
    """Every trial, best first: rank, trial, parameters, best metric (step, minute), steps,
    worker time, state. Trials with no evaluation yet come last."""
    rows = []
    unit = "elapsed" if str(sweep.params.get("budget", "")).endswith("m") else "step"  # of rungs, generations
    for job in trials(registry, sweep):
        best = best_metric(job)
        worker_time = job.worker_time(registry.now())
        rows.append({"trial": job.sweep["trial"], "job": job.id, "run": job.run_name,
                     "params": job.sweep["params"], "best": best[0] if best else None,
                     "best_step": best[1] if best else None,
                     "best_minute": round(best[2] / 60, 2) if best else None,
                     "steps": (job.progress or {}).get("step", 0), "worker_time": round(worker_time, 1),
                     "state": job.state, "finished": job.finished, "checkpoint": job.checkpoint,
                     # PBT's lineage: [step, donor trial] of each copy it took; the flags its weights
                     # were trained with, [from step, flags] (one entry: reproducible by its flags)
                     "copies": job.sweep.get("copies", []), "reached": (job.progress or {}).get(unit, 0),
                     "schedule": job.sweep.get("schedule", [[0, job.sweep["params"]]])})
    rows.sort(key=lambda r: (r["best"] is None, r["best"] if r["best"] is not None else math.inf,
                             r["trial"]))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def live_sweeps(registry: "Registry") -> list[Job]:
    return [j for j in registry.in_states(ACTIVE) if j.spec.driven]


class TrialHooks(RegistryHooks):
    """The hooks of a sweep trial's job process (``c``: its ``tlm_worker.jobs.Context``): they
    report each evaluation to the sweep's study, judge the trial at promotion ASHA's rungs (train
    on or pause), and stop it where a stopping pruner says so."""

    def __init__(self, c, stop):
        super().__init__(c, stop)
        self.pruned = self.paused = False
        self.family = c.job.sweep
        # The last rung it was let past (by its own judgement, or promoted): a rung above it is
        # judged when an evaluation reaches it, also after a crash lost the judgement's pause.
        self.passed = float(self.family.get("passed", 0))
        self.spec: Optional[SweepSpec] = None  # None: reports to no study
        self._trial = None
        try:
            self.spec = SweepSpec.from_dict(c.registry.get(self.family["id"]).params)
        except JobNotFound:  # pruned, or lost with a Redis restarted empty
            self.log(f"its sweep {self.family['name']} is gone: training on as an ordinary job")

    def trial(self):
        import optuna  # Optuna

        if self._trial is None:
            st = study(self.c.registry, self.family["id"], self.spec, self.family["trial"])
            trial_id = st._storage.get_trial_id_from_study_id_trial_number(st._study_id, self.family["number"])
            self._trial = optuna.trial.Trial(st, trial_id)
        return self._trial

    def on_progress(self, p) -> None:
        super().on_progress(p)
        if self.spec is None or self.c.rank or p.kind != "eval" or p.message == "test" \
                or p.val_loss is None or self.pruned or self.paused:
            return
        at = int(p.elapsed or 0) if self.spec.by_time else p.step
        unit = "second" if self.spec.by_time else "step"
        try:
            trial = self.trial()
            trial.report(p.val_loss, at)
            self.pruned = trial.should_prune()
            crossed = [r for r in rungs(self.spec) if self.passed < r <= at]
            if self.spec.prune == "asha" and crossed:
                self.judge(trial, crossed[-1], unit)
            if self.spec.schedule == "pbt" and p.step < p.total:
                self.generation_end(at, p.val_loss, unit)
        except QUEUE_ERRORS as e:  # the study unreachable for now: train on, unpruned
            self.log(f"could not report to sweep {self.spec.name}'s study ({e}); training on")
            return
        except Exception as e:  # its journal gone or damaged: it never answers again
            self.log(f"sweep {self.spec.name}'s study cannot be read ({e}): training on as an ordinary job")
            self.spec = None
            return
        if self.pruned:
            self.log(f"pruned ({self.spec.prune}) at {unit} {at}, valid loss {p.val_loss:.4f}: saved, stopping")

    def judge(self, trial, rung: float, unit: str) -> None:
        """At a rung: train on if in the top 1/ETA of the trials that reached it, else save and
        pause (the sweep resumes it if it becomes promotable)."""
        board = standing(trial.study.get_trials(deepcopy=False), rung)
        place = next((i for i, (_, n) in enumerate(board, 1) if n == self.family["number"]), None)
        if self.family["number"] in top(board):
            self.log(f"rung at {unit} {rung:g}: {place} of {len(board)}, in the top 1/{ETA}: training on")
            self.passed = rung
            self.family = {**self.family, "passed": rung}
            self.c.report(self.c.registry.update, self.c.job.id, sweep=self.family)
            return
        self.paused = True
        self.log(f"rung at {unit} {rung:g}: {place} of {len(board)}, not in the top 1/{ETA} "
                 f"({len(board) // ETA} go on): saved, pausing until promoted")

    def generation_end(self, at: int, loss: float, unit: str) -> None:
        """PBT: at the first evaluation past a generation's end, record the loss and pause
        until the whole population has reached it (the sweep ranks them there)."""
        g = sum(1 for end in generations(self.spec) if end <= at)
        if g <= self.family.get("generation", 0):
            return
        self.family = {**self.family, "generation": g, "value": loss if math.isfinite(loss) else None, "at": at}
        self.c.report(self.c.registry.update, self.c.job.id, sweep=self.family)
        self.paused = True
        self.log(f"generation {g} ends at {unit} {at}: valid loss {loss:.4f}: saved, pausing for the population")

    def should_stop(self) -> bool:
        return self.pruned or self.paused or super().should_stop()

    def end_state(self, result):
        if self.paused and not self.cancelled:
            return PAUSED
        return PRUNED if self.pruned else super().end_state(result)
