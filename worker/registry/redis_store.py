"""The registry's store on Redis: a lab shared by many Macs.

Keys under ``tlm:``: a hash per job (``tlm:job:<id>``, each field JSON), sets of ids
per live state, a sorted set of finished ids by finish time, one per run, one of all
ids for prefix lookups, and ``tlm:trainer:<run>`` naming a run's live trainer; capped
lists of numbered lines per job (log lines, metric points); run summaries in a hash
and a sorted set; worker records that expire; WATCH/MULTI for each change; pub/sub
for followers. A finished record expires a day after the prune that should take it.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator, Optional

import redis

from tlm_worker.kinds import FINAL, LIVE
from tlm_worker.queue import subscribed
from tlm_worker.registry.store import STREAMS, WORKER_TTL, RawChange, loads


def _json(fields: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in fields.items()}


class RedisStore:
    """The ``Store`` on one Redis database; see the module docstring."""

    P = "tlm:"

    def __init__(self, client: redis.Redis):
        self.r = client

    def _job(self, job_id: str) -> str:
        return f"{self.P}job:{job_id}"

    def first_value(self, name: str, value: str) -> str:
        """The lab-wide setting ``name``: ``value`` if none was set, else the one set first."""
        self.r.set(f"{self.P}lab:{name}", value, nx=True)
        stored = self.r.get(f"{self.P}lab:{name}")
        return stored.decode() if stored is not None else value

    def value(self, name: str) -> Optional[str]:
        stored = self.r.get(f"{self.P}lab:{name}")
        return stored.decode(errors="replace") if stored is not None else None

    def set_value(self, name: str, value: str) -> None:
        self.r.set(f"{self.P}lab:{name}", value)

    def take_turn(self, name: str, now: float, until: float) -> bool:
        return bool(self.r.set(f"{self.P}lab:turn:{name}", until, nx=True, px=max(1, int((until - now) * 1000))))

    def put_runs(self, rows: dict[str, tuple[float, str]]) -> None:
        """Run summaries (key -> (sort score, the row as JSON)): a hash, and a sorted set by score."""
        if rows:
            with self.r.pipeline() as pipe:
                pipe.hset(f"{self.P}runs", mapping={k: row for k, (_, row) in rows.items()})
                pipe.zadd(f"{self.P}runs:best", {k: score for k, (score, _) in rows.items()})
                pipe.execute()

    def get_runs(self, keys: list[str]) -> dict[str, str]:
        values = self.r.hmget(f"{self.P}runs", keys) if keys else []
        return {k: v.decode() for k, v in zip(keys, values) if v is not None}

    def drop_runs(self, keys: list[str]) -> None:
        if keys:
            with self.r.pipeline() as pipe:
                pipe.hdel(f"{self.P}runs", *keys)
                pipe.zrem(f"{self.P}runs:best", *keys)
                pipe.execute()

    def run_page(self, cursor: Optional[int], count: int) -> tuple[list[str], int]:
        """Summaries best first after ``cursor`` (a rank: a page costs its own rows)."""
        start = cursor or 0
        keys = [k.decode() for k in self.r.zrange(f"{self.P}runs:best", start, start + count - 1)]
        rows = self.get_runs(keys)
        return [rows[k] for k in keys if k in rows], start + len(keys)

    def _stream(self, job_id: str, stream: str) -> str:
        """A job's capped list of lines (its log, its metric points): a Redis list of
        ``<n>\x1f<line>``, numbered from 1, the oldest dropped past the cap. A list of one
        line costs what the line costs (a stream's first entry took a 4 kB node)."""
        return f"{self.P}lines:{stream}:{job_id}"

    def _old_stream(self, job_id: str, stream: str) -> str:
        """Where tlm before layout 3 kept them (Redis streams): still read, never written."""
        return f"{self.P}{stream}:{job_id}"

    # Append ARGV[2:] numbered after the list's last line, then keep the last ARGV[1].
    _APPEND = """
    local last = redis.call('LINDEX', KEYS[1], -1)
    local n = last and tonumber(string.match(last, '^(%d+)')) or 0
    for i = 2, #ARGV do
        n = n + 1
        redis.call('RPUSH', KEYS[1], n .. string.char(31) .. ARGV[i])
    end
    redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)"""

    # The lines numbered after ARGV[1]: from where it falls in the list (its first line's number).
    _AFTER = """
    local first = redis.call('LINDEX', KEYS[1], 0)
    if not first then return {} end
    local start = tonumber(ARGV[1]) + 1 - tonumber(string.match(first, '^(%d+)'))
    return redis.call('LRANGE', KEYS[1], math.max(start, 0), -1)"""

    def _trainer(self, run: str) -> str:
        return f"{self.P}trainer:{run}"

    def _decode(self, raw: dict, job_id: str) -> Optional[dict[str, Any]]:
        """A record's fields; one that is not JSON is kept as text and the record marked bad
        (readers skip it). A record without a state is a fragment (expired): None."""
        job: dict[str, Any] = {"id": job_id}
        for k, v in raw.items():
            key = k.decode(errors="replace")
            try:
                job[key] = json.loads(v)
            except (UnicodeDecodeError, json.JSONDecodeError):
                job[key] = v.decode(errors="replace")
                job.setdefault("_bad", f"has a field {key!r} that is not JSON")
        return job if "state" in job else None

    def insert(self, job: dict[str, Any], exclusive: bool, migrating: bool = False) -> Optional[str]:
        """Add a job; return the id of the run's live trainer instead if ``exclusive`` and busy."""
        key, trainer = self._job(job["id"]), self._trainer(job["run"])
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(trainer, key)
                    if migrating and pipe.exists(key):
                        return job["id"]
                    holder = pipe.get(trainer) if exclusive else None
                    if holder is not None:
                        state = pipe.hget(self._job(holder.decode()), "state")
                        if state is not None and json.loads(state) in LIVE:
                            return holder.decode()
                    pipe.multi()
                    pipe.hset(key, mapping=_json(job))
                    self._index(pipe, job, None)
                    if exclusive:
                        pipe.set(trainer, job["id"])
                    pipe.zadd(f"{self.P}run:{job['run']}", {job["id"]: job["created"]})
                    pipe.zadd(f"{self.P}ids", {job["id"]: 0})
                    if _nodes(job) > 1:  # a gang: what workers look for (gang_ids)
                        pipe.sadd(f"{self.P}gangs", job["id"])
                    if exclusive:  # a run's trainer: what the runs table reads
                        pipe.zadd(f"{self.P}trainers", {job["id"]: job["created"]})
                    pipe.execute()
                    return None
                except redis.WatchError:
                    continue

    def _index(self, pipe, job: dict[str, Any], old_state: Optional[str],
               expire: Optional[float] = None) -> None:
        """Move a job between the state indexes (inside a MULTI)."""
        if old_state is not None:
            pipe.srem(f"{self.P}state:{old_state}", job["id"])
        if job["state"] in FINAL:
            pipe.zadd(f"{self.P}finished", {job["id"]: job["finished"]})
            if expire:
                pipe.expire(self._job(job["id"]), int(expire) + 86400)  # prune comes first
                for stream in STREAMS:
                    pipe.expire(self._stream(job["id"], stream), int(expire) + 86400)
                    pipe.expire(self._old_stream(job["id"], stream), int(expire) + 86400)
        else:
            pipe.sadd(f"{self.P}state:{job['state']}", job["id"])
        pipe.publish(f"{self.P}events", job["id"])

    def change(self, job_id: str, fn: RawChange, expire: Optional[float] = None,
               line: Optional[str] = None) -> Optional[dict]:
        """Atomically apply ``fn(job) -> changes`` to a job (and append ``line`` to its log);
        the new record, or None."""
        key = self._job(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    job = self._decode(pipe.hgetall(key), job_id)
                    changes = fn(job) if job is not None else None
                    if changes is None:
                        pipe.unwatch()
                        return None
                    new = {**job, **changes}
                    trainer = self._trainer(job.get("run"))
                    release = False  # an ending trainer frees its run
                    if new["state"] in FINAL:
                        pipe.watch(trainer)
                        release = pipe.get(trainer) == job_id.encode()
                    pipe.multi()
                    if line is not None:  # before the index sets a final job's streams to expire
                        self._add(pipe, job_id, "log", [line])
                    pipe.hset(key, mapping=_json(changes))
                    if new["state"] != job["state"]:
                        self._index(pipe, new, str(job["state"]), expire)
                    else:
                        pipe.publish(f"{self.P}events", job_id)
                    if release:
                        pipe.delete(trainer)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    # Fields written outside a state change; only while the record exists, so a late
    # heartbeat never brings back an expired job as a fragment.
    _SET_IF_EXISTS = """
    if redis.call('EXISTS', KEYS[1]) == 1 then
        redis.call('HSET', KEYS[1], unpack(ARGV))
        redis.call('PUBLISH', KEYS[2], KEYS[3])
    end"""

    def set_fields(self, job_id: str, fields: dict[str, Any]) -> None:
        args = [x for kv in _json(fields).items() for x in kv]
        self.r.eval(self._SET_IF_EXISTS, 3, self._job(job_id), f"{self.P}events", job_id, *args)

    def read(self, ids: list[str], fields: Optional[tuple[str, ...]] = None) -> list[dict[str, Any]]:
        """The records (or only ``fields`` of them: what a claim sorts and filters by)."""
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                if fields:
                    pipe.hmget(self._job(job_id), fields)
                else:
                    pipe.hgetall(self._job(job_id))
            raws = pipe.execute()
        if fields:
            raws = [{k.encode(): v for k, v in zip(fields, raw) if v is not None} for raw in raws]
        return [j for j in map(self._decode, raws, ids) if j is not None]

    def ids_in(self, states) -> list[str]:
        return [i.decode() for i in self.r.sunion([f"{self.P}state:{s}" for s in states])]

    def gang_ids(self, states) -> list[str]:
        return [i.decode() for i in self.r.smembers(f"{self.P}gangs")]

    def finished_page(self, cursor: Optional[tuple[float, str]], count: int) -> tuple[list[str], tuple]:
        """Finished ids newest first after ``cursor`` (the last one's finish time and id, as
        SQLite's keyset: new jobs ending do not shift it): the cursor's rank is counted by
        score, and ties (one cancel ends a chain at one time) are ordered by id, as Redis
        orders them."""
        key = f"{self.P}finished"
        start = 0 if cursor is None else self.r.zcount(key, f"({cursor[0]!r}", "+inf")
        page: list[tuple[str, float]] = []
        while len(page) < count:
            chunk = self.r.zrevrange(key, start, start + count - 1, withscores=True)
            if not chunk:
                break
            start += len(chunk)
            page += [(m.decode(), s) for m, s in chunk
                     if cursor is None or s < cursor[0] or m.decode() < cursor[1]]
        page = page[:count]
        return [i for i, _ in page], (page[-1][1], page[-1][0]) if page else cursor

    def trainer_ids(self) -> list[str]:
        return [i.decode() for i in self.r.zrange(f"{self.P}trainers", 0, -1)]

    def run_ids(self, run: str) -> list[str]:
        return [i.decode() for i in self.r.zrevrange(f"{self.P}run:{run}", 0, -1)]

    def match_prefix(self, prefix: str, count: int) -> list[str]:
        return [i.decode() for i in self.r.zrangebylex(
            f"{self.P}ids", f"[{prefix}", f"[{prefix}\xff", start=0, num=count)]

    def append(self, job_id: str, stream: str, lines: list[str]) -> None:
        with self.r.pipeline() as pipe:
            self._add(pipe, job_id, stream, lines)
            pipe.publish(f"{self.P}events", job_id)
            pipe.execute()

    def _add(self, pipe, job_id: str, stream: str, lines: list[str]) -> None:
        """Append inside the caller's pipeline, dropping the oldest past the cap."""
        if lines:
            pipe.eval(self._APPEND, 1, self._stream(job_id, stream), STREAMS[stream], *lines)

    def read_stream(self, job_id: str, stream: str,
                    after: Optional[str]) -> tuple[list[str], Optional[str]]:
        """The lines after the cursor ``after`` (a line's number), and the cursor of the last."""
        done = int(after) if after and str(after).isdigit() else 0
        items = self.r.eval(self._AFTER, 1, self._stream(job_id, stream), done)
        if not items and not done and self.r.type(self._old_stream(job_id, stream)) == b"stream":
            entries = self.r.xrange(self._old_stream(job_id, stream))  # a job of an earlier layout
            return [fields.get(b"l", b"").decode(errors="replace") for _, fields in entries], after
        numbered = [item.decode(errors="replace").partition("\x1f") for item in items]
        lines = [line for n, _, line in numbered if int(n) > done]
        return lines, numbered[-1][0] if numbered else after

    @contextlib.contextmanager
    def waiter(self) -> Iterator[Callable[[float], bool]]:
        with subscribed(self.r, f"{self.P}events", burst=0.05) as wait:
            yield wait

    def put_worker(self, worker_id: str, record: dict[str, Any]) -> None:
        with self.r.pipeline() as pipe:
            pipe.set(f"{self.P}worker:{worker_id}", json.dumps(record), ex=int(WORKER_TTL))
            pipe.sadd(f"{self.P}workers", worker_id)
            pipe.execute()

    def drop_worker(self, worker_id: str) -> None:
        with self.r.pipeline() as pipe:
            pipe.delete(f"{self.P}worker:{worker_id}")
            pipe.srem(f"{self.P}workers", worker_id)
            pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        ids = [i.decode() for i in self.r.smembers(f"{self.P}workers")]
        values = self.r.mget([f"{self.P}worker:{i}" for i in ids]) if ids else []
        gone = [i for i, v in zip(ids, values) if v is None]
        if gone:
            self.r.srem(f"{self.P}workers", *gone)
        return [loads(v) for v in values if v is not None]

    def finished_before(self, before: float) -> list[str]:
        return [i.decode() for i in self.r.zrangebyscore(f"{self.P}finished", "-inf", before)]

    def delete(self, ids: list[str]) -> None:
        """Finished jobs, their streams and every index entry. A record that expired already
        (its TTL, a day after a prune would have taken it) no longer names its run: its id is
        swept from every run's index instead, so no index keeps a dead id."""
        expired = []
        for job_id in ids:
            run = self.r.hget(self._job(job_id), "run")
            with self.r.pipeline() as pipe:
                pipe.delete(self._job(job_id), *(self._stream(job_id, s) for s in STREAMS),
                            *(self._old_stream(job_id, s) for s in STREAMS))
                for index in ("finished", "ids", "trainers"):
                    pipe.zrem(f"{self.P}{index}", job_id)
                pipe.srem(f"{self.P}gangs", job_id)
                if run is None:
                    expired.append(job_id)
                else:
                    with contextlib.suppress(ValueError):
                        pipe.zrem(f"{self.P}run:{json.loads(run)}", job_id)
                pipe.execute()
        if expired:
            for key in self.r.scan_iter(match=f"{self.P}run:*", count=1000):
                self.r.zrem(key, *expired)


def _nodes(job: dict[str, Any]) -> int:
    """A record's --nodes (1 for anything that is not a number above it)."""
    nodes = job["params"].get("nodes", 1) if isinstance(job.get("params"), dict) else 1
    return nodes if isinstance(nodes, int) and not isinstance(nodes, bool) else 1
