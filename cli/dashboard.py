"""``tlm dashboard``: the whole lab on one web page, a thin front end over the registry.

A Starlette app served by uvicorn: JSON under ``/api``, one server-sent event
stream (``/api/events``, sse-starlette) that says "something changed" whenever
the registry does (Redis pub/sub, or SQLite's data_version), and static files
(the page, its script, and uPlot for the curves: shipped in the package, no CDN).
Everything the page shows comes from the registry, so curves draw on a
machine that does not mount the shared save directory.

Safety: it listens on a loopback address (127.0.0.1 by default) and then
checks the Host header (no DNS rebinding); every request body is bounded and
validated field by field (``read_body``, ``field``). Bound to anything else, every request needs the token (printed at
start; ``?token=`` once sets a cookie). State changes are POSTs that must
carry the token in a header and, when the browser sends an Origin, come from
this page's own origin, so another site cannot submit or cancel. The page
writes job-provided text with ``textContent`` only, under a CSP with no inline
script.
"""

from __future__ import annotations

import dataclasses
import errno
import hmac
import html as _html
import ipaddress
import json
import secrets
import shlex
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

import anyio
import click
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tlm.config import PRESETS, apply_preset, flag_types, flag_value
from tlm_worker.kinds import (ACTIVE, CLAIMABLE, FINAL, KINDS, LIVE, SAMPLE, STATES, Job, SampleParams,
                              TrainParams, misfit)
from tlm_worker.lab import Lab, LabError, Placement, answering

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
EVENT_WAIT = 10.0  # seconds between keep-alive pings of the event stream
SEND_TIMEOUT = 5.0  # an event stream client that takes longer to read one is dropped
MAX_COMPARE = 12  # runs on one compare page (each is its curves and configuration)
MAX_STREAMS = 64  # event streams open at once; more get 503 (each is a coroutine, never a thread)
MAX_BODY = 64 * 1024  # bytes of a POST body: a form's fields, never a dataset
MAX_STRING = 10_000  # characters of any one string in a body (a prompt is the longest)
MACHINE_ADDED = ("data_mirror", "dataset_sha1")  # params the submitting machine adds: no one types them


class Refused(Exception):
    """A request the API answers with a status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# The kinds and states table, as the page reads it (a new kind or state needs no change there).
TABLE = {"kinds": [{"name": k.name, "trainer": k.trainer, "driven": k.driven} for k in KINDS.values()],
         "states": list(STATES), "final": list(FINAL), "claimable": list(CLAIMABLE), "active": list(ACTIVE)}


def shown(job: Job, waiting: Optional[str] = None) -> dict[str, Any]:
    """A job as the page reads it: its record, who holds it, whether it is its run's trainer,
    and why it waits when no live worker can run it."""
    return {**job.to_record(), "holder": job.holder, "trainer": job.spec.trainer, "driven": job.spec.driven,
            "waiting": waiting}


def best_by_dataset(rows: list[dict[str, Any]], top: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The best runs of each dataset by validation loss."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["best_valid"] is not None and row["dataset"]:
            board = out.setdefault(str(row["dataset"]), [])
            if len(board) < top:
                board.append(row)
    return out


def command(verb: str, params: dict[str, Any]) -> str:
    """The ``tlm`` command line that does what the page just did."""
    parts = ["tlm", *verb.split()]
    for k, v in params.items():
        if v is None or v is False or k in MACHINE_ADDED:
            continue
        parts += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return shlex.join(parts)


def typed_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Form values (strings) as TrainConfig's types; unknown flags refused."""
    types = flag_types()
    out = {}
    for k, v in overrides.items():
        k = k.strip().lstrip("-").replace("-", "_")
        if k not in types or k == "save_dir":
            raise Refused(400, f"unknown flag --{k}")
        try:
            out[k] = flag_value(v, types[k])
        except ValueError:
            raise Refused(400, f"--{k} {v!r}: expected {types[k].__name__}") from None
    return out


class Api:
    """What the page reads (over one registry) and does (through the lab's service)."""

    def __init__(self, lab: Lab):
        self.lab, self.registry, self.save_root = lab, lab.registry, lab.save_root

    def _on_disk(self, key: str, identifier: str) -> Optional[bool]:
        """Whether a checkpoint's file is still there (None: the run is not visible here)."""
        directory = self.lab.run_dir(key)
        return (directory / f"{identifier}.safetensors").exists() if directory.is_dir() else None

    def overview(self, state: Optional[str], run: Optional[str], limit: int,
                 after: Optional[str] = None) -> dict[str, Any]:
        """Live jobs and a page of finished ones, with ``next``: the cursor of the page further
        back (the oldest one's finish time and id; None at the end)."""
        if state not in (None, "", *LIVE, *FINAL):
            raise Refused(400, f"unknown state {state!r}")
        if not 0 < limit <= 1000:
            raise Refused(400, "limit must be 1-1000")
        cursor = _cursor(after, [(int, float, str)])
        if cursor is not None and not (len(cursor) == 2 and isinstance(cursor[1], str)):
            raise Refused(400, "after: the `next` of an earlier page")
        jobs = self.registry.jobs(limit, state=state or None, run=run or None,
                                  after=tuple(cursor) if cursor else None)
        workers = self.registry.workers()
        waiting = self.lab.waiting(jobs, workers)
        done = [j for j in jobs if j.state in FINAL]
        last = min(done, key=lambda j: (j.finished, j.id)) if len(done) >= limit and not run else None
        return {"jobs": [{k: v for k, v in shown(j, waiting.get(j.id)).items() if k != "params"}
                         for j in jobs],
                "workers": workers, "now": self.registry.now(),  # the queue's clock: ages read by it
                "next": json.dumps([last.finished, last.id]) if last else None}

    def run(self, key: str) -> dict[str, Any]:
        self.lab.target(key)
        jobs = self.registry.jobs(None, run=key)
        trains = [j for j in jobs if j.spec.trainer]
        points: dict[tuple[str, int], dict] = {}
        configs: list[tuple[str, dict]] = []  # each training job's resolved configuration
        for job in trains:  # oldest first: a resumed step's later record wins
            for p in self.registry.points(job.id)[0]:
                if p.get("kind") == "config":
                    configs += [(job.id, p["config"])] if not configs or configs[-1][0] != job.id else []
                else:
                    points[(p["kind"], p["step"])] = p
        ordered = sorted(points.values(), key=lambda p: (p["step"], p["kind"]))
        checkpoints = [{**p, "on_disk": self._on_disk(key, p["identifier"])}
                       for p in reversed(ordered) if p["kind"] == "checkpoint"]
        changes = [{"job": job_id, "changed": {k: [before.get(k), v] for k, v in after.items()
                                                 if before.get(k) != v}}
                   for (_, before), (job_id, after) in zip(configs, configs[1:])]
        if not trains:  # its jobs pruned (or it was trained by `tlm train`): its folder tells
            return {"key": key, "jobs": [shown(j) for j in jobs], "changes": [], **self._from_disk(key)}
        return {"key": key, "jobs": [shown(j) for j in jobs],
                "config": configs[-1][1] if configs else (trains[-1].params if trains else {}),
                "config_from": "checkpoint" if configs else "job",
                "changes": [c for c in changes if c["changed"]],
                "points": [p for p in ordered if p["kind"] != "checkpoint"],
                "checkpoints": checkpoints}

    def _from_disk(self, key: str) -> dict[str, Any]:
        """A run page's curves, checkpoints and configuration from its run directory: its
        metrics.jsonl and its checkpoints' headers (none hashed), for runs the registry forgot."""
        from tlm import checkpoint, metrics  # MLX

        directory = self.lab.run_dir(key)
        state = checkpoint.peek_state(directory) or {}
        return {"config": state.get("config") or {}, "config_from": "checkpoint" if state else "job",
                "points": [p for p in metrics.read(directory) if p.get("kind") in ("train", "valid", "test")],
                "checkpoints": [{"kind": "checkpoint", "step": step, "identifier": ident, "on_disk": True}
                                for step, ident in checkpoint.listed(directory)]}

    def compare(self, keys: list[str]) -> dict[str, Any]:
        if not 1 <= len(keys) <= MAX_COMPARE:
            raise Refused(400, f"compare 1 to {MAX_COMPARE} runs, not {len(keys)}")
        runs = [self.run(k) for k in keys]
        configs = [r["config"] for r in runs]
        flags = sorted({k for c in configs for k in c} - set(MACHINE_ADDED))
        differs = [k for k in flags if len({repr(c.get(k)) for c in configs}) > 1]
        out = []
        for r in runs:
            last = {kind: next((p for p in reversed(r["points"]) if p["kind"] == kind), None)
                    for kind in ("train", "valid", "test")}
            out.append({"key": r["key"], "points": r["points"], "config": r["config"],
                        "final": {k: p and {"step": p["step"], "loss": p["loss"],
                                            "ppl": p.get("ppl"), "bpc": p.get("bpc")}
                                  for k, p in last.items()}})
        return {"runs": out, "differs": differs}

    def runs(self, limit: int = 100, after: Optional[str] = None) -> dict[str, Any]:
        """A page of the runs table (worker/runs.py), best first, with ``next``: the cursor of
        the page after it (None at the end); the first page with each dataset's best runs."""
        if not 0 < limit <= 1000:
            raise Refused(400, "limit must be 1-1000")
        cursor = _cursor(after, (int, [(int, float, str)]))
        rows, more = self.lab.runs(limit, cursor, disk=self.save_root is not None)
        return {"runs": rows, "next": json.dumps(more) if more is not None else None,
                "leaderboard": best_by_dataset(rows) if not after else {}}

    def log(self, job_id: str, after: Optional[str]) -> dict[str, Any]:
        """A job's log lines after a cursor (404 for no such job)."""
        lines, cursor = self.registry.logs(self.registry.get(job_id).id, after)
        return {"lines": lines, "cursor": cursor}

    def retry(self, job_id: str) -> dict[str, Any]:
        """Queue again what an ended job did (any kind)."""
        job = self.lab.retry(job_id)
        return {"job": job.id, "command": f"(queued again: {job.kind} of {job.run_name})"}

    def cancel(self, job_id: str, force: bool) -> dict[str, Any]:
        _, ended = self.lab.cancel(job_id, force)
        return {"job": job_id, "ended": ended,
                "command": command(f"cancel {job_id}", {"force": force})}

    def submit(self, key: str, params: dict[str, Any], priority: str = "normal") -> dict[str, Any]:
        """Queue a training job of a run (resuming its checkpoints), as `tlm submit train`."""
        from tlm.data import is_text_path  # numpy

        if params.get("dataset") and is_text_path(str(params["dataset"])):
            raise Refused(400, "a --dataset of your own text is submitted with `tlm submit train`, "
                               "which copies it into the run")
        job = self.lab.train(key, params, Placement.of(priority))
        extra = {"priority": priority} if priority != "normal" else {}
        return {"job": job.id, "command": command("submit train", {**self.lab.target(key), **params, **extra})}

    def new_run(self, body: dict[str, Any]) -> dict[str, Any]:
        run, save_dir = field(body, "run", str, "").strip(), field(body, "save_dir", str, "").strip()
        if bool(run) == bool(save_dir):
            raise Refused(400, "give a run name or a save directory (one of them)")
        key = self.lab.run_target(run or None, save_dir or None)[1]
        preset = field(body, "preset", str, "") or None
        if preset is not None and preset not in PRESETS:
            raise Refused(400, f"unknown preset {preset!r}")
        overrides = typed_overrides(field(body, "overrides", dict, {}))
        given = {**({"preset": preset} if preset else {}), **overrides}
        return self.submit(key, apply_preset(given) if preset else given,
                           field(body, "priority", str, "normal"))

    def resume(self, key: str) -> dict[str, Any]:
        job = self.lab.resume(key)
        return {"job": job.id, "command": command("submit train", {**self.lab.target(key),
                                                                   **TrainParams.again(job.params)})}

    # -- sweeps --------------------------------------------------------------------------

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        """A sweep's leaderboard, every trial's validation curve, and Optuna's importances."""
        job = self.lab.sweep(sweep_id)
        rows = self.lab.trials(job)
        curves = {}
        for row in rows:
            points = self.registry.points(row["job"])[0]
            curves[row["trial"]] = [{"step": p["step"], "loss": p["loss"], "elapsed": p.get("elapsed")}
                                    for p in points if p.get("kind") == "valid"]
        return {"sweep": shown(job), "trials": rows, "curves": curves,
                "importances": self.lab.importances(job)}

    def sweep_cancel(self, sweep_id: str) -> dict[str, Any]:
        job = self.lab.sweep(sweep_id)
        self.lab.cancel_sweep(job)
        return {"sweep": job.id, "command": f"tlm sweep cancel {job.params['name']}"}

    def sweep_add(self, sweep_id: str, more: int) -> dict[str, Any]:
        """More trials for a sweep that still runs."""
        job = self.lab.sweep(sweep_id)
        return {"sweep": job.id, "trials": self.lab.add_trials(job, more),
                "command": f"tlm sweep add {job.params['name']} {more}"}

    def sweep_best(self, sweep_id: str, run: str) -> dict[str, Any]:
        """Queue the best trial's flags as a run of its own."""
        job = self.lab.sweep(sweep_id)
        key = self.lab.run_target(run.strip() or None, None)[1]
        if not run.strip():
            raise Refused(400, "give the new run a name")
        return self.submit(key, self.lab.best(job)[1])

    def sample(self, key: str, prompt: str, max_tokens: int, temperature: float) -> dict[str, Any]:
        from tlm.generate import SampleConfig  # MLX
        target = self.lab.target(key)
        if not 0 < max_tokens <= 2000 or not 0 <= temperature <= 10:
            raise Refused(400, "max_tokens must be 1-2000 and temperature 0-10")
        cfg = SampleConfig(max_tokens=max_tokens, temperature=temperature)
        job = self.lab.read(SAMPLE, key, dataclasses.asdict(SampleParams(prompt, dataclasses.asdict(cfg))))
        return {"job": job.id, "command": command(SAMPLE, {
            **target, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature})}


def field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """One field of a request body, of the type the endpoint takes (an int passes for a
    float); Refused(400) naming it otherwise (null included). Absent: ``default``."""
    if name not in body:
        return default
    value = body[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise Refused(400, f"{name!r} must be {'a number' if kind is float else kind.__name__}, "
                           f"not {type(value).__name__}")
    return value


async def read_body(request: Request) -> dict[str, Any]:
    """A POST's JSON object, read no further than MAX_BODY bytes; Refused (400, 413) for a
    body too large, not UTF-8 JSON, not an object, or holding a string over MAX_STRING."""
    if request.method != "POST":
        return {}
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise Refused(413, f"request body over {MAX_BODY // 1024} KiB")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise Refused(413, f"request body over {MAX_BODY // 1024} KiB")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise Refused(400, "the request body is nested too deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Refused(400, "the request body is not JSON (send Content-Type: application/json)") from None
    if not isinstance(body, dict):
        raise Refused(400, "expected a JSON object")

    def check(value: Any, where: str) -> None:
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise Refused(400, f"{where} is over {MAX_STRING} characters")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            check(v, f"{where}.{k}")
    try:
        check(body, "body")
    except RecursionError:
        raise Refused(400, "the request body is nested too deep") from None
    return body


class Changes:
    """One thread follows the registry for every event stream: a client costs a coroutine
    that looks at a counter, so slow or idle clients never hold the threads requests use."""

    def __init__(self, lab: Lab):
        self.registry, self.version, self.streams = lab.registry, 0, 0
        self._thread: Optional[threading.Thread] = None

    def open_stream(self) -> Optional[Callable[[], None]]:
        """A slot for one more event stream, taken when the request is answered (so MAX_STREAMS
        holds however many arrive at once): its release, to call once; None when all are taken."""
        if self.streams >= MAX_STREAMS:
            return None
        self.streams += 1
        held = [True]

        def release() -> None:
            if held:
                held.clear()
                self.streams -= 1
        return release

    async def events(self, request: Request) -> Response:
        """"Something changed", whenever the registry does (sse-starlette sends the stream,
        pings it, and drops a client that stops reading after SEND_TIMEOUT seconds)."""
        release = self.open_stream()
        if release is None:
            return PlainTextResponse(f"{MAX_STREAMS} event streams are open: close a tab", status_code=503)
        self.start()

        async def stream():
            try:
                seen = self.version
                while True:
                    await anyio.sleep(0.25)
                    if self.version != seen:
                        seen = self.version
                        yield ServerSentEvent(event="change", data="{}", retry=1000)
            finally:
                release()
        body = stream()
        weakref.finalize(body, release)  # a client gone before its stream began: the slot comes back
        return EventSourceResponse(body, ping=EVENT_WAIT, send_timeout=SEND_TIMEOUT,
                                   headers={"Cache-Control": "no-cache"})

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, daemon=True, name="tlm-changes")
            self._thread.start()

    def _follow(self) -> None:
        while True:
            try:
                with answering(), self.registry.changes() as wait:
                    while True:
                        if wait(EVENT_WAIT):
                            self.version += 1
            except LabError:
                time.sleep(1)  # the queue is down: the page shows it; follow again when back


def _endpoint(fn: Callable[[Request, Any], Any], url: Optional[str]) -> Callable:
    """An API route: ``fn(request, body)`` in a thread, its answer as JSON; a refusal, a missing
    job, an outage (503: the page tries again) or a field of the wrong type as its status and
    one line."""
    def answer(request: Request, body: dict[str, Any]) -> Any:
        with answering(url):
            return fn(request, body)

    async def endpoint(request: Request) -> Response:
        try:
            body = await read_body(request)
            return JSONResponse(await anyio.to_thread.run_sync(answer, request, body))
        except (Refused, LabError) as e:
            return PlainTextResponse(str(e), status_code=e.status)
        except (ValueError, TypeError) as e:  # a field of the wrong type (int("many"))
            return PlainTextResponse(f"bad request: {e}".splitlines()[0], status_code=400)
    return endpoint


def _cursor(after: Optional[str], shape: Any) -> Any:
    """A page's ``after``: the JSON ``next`` of an earlier page, of this shape (None: the first)."""
    try:
        cursor = json.loads(after) if after else None
    except ValueError:
        raise Refused(400, "after: the `next` of an earlier page") from None
    if misfit(cursor, (shape, type(None)), "after"):
        raise Refused(400, "after: the `next` of an earlier page")
    return cursor


def create_app(lab: Lab, token: str, require_token: bool) -> "Guard":
    """The dashboard's ASGI app; ``require_token`` for every request (bound beyond localhost)."""
    api = Api(lab)
    table = _html.escape(json.dumps(TABLE), quote=True)  # the kinds and states, as the page's <meta>
    changes = Changes(lab)

    def page(request: Request) -> Response:
        html = (STATIC / "index.html").read_text().replace("{{TOKEN}}", token).replace("{{TABLE}}", table)
        return Response(html, media_type="text/html")

    endpoint = lambda fn: _endpoint(fn, lab.url)  # noqa: E731
    q = lambda request, name, default=None: request.query_params.get(name, default)  # noqa: E731
    routes = [
        Route("/", page),
        Route("/api/overview", endpoint(lambda r, b: api.overview(
            q(r, "state"), q(r, "run"), int(q(r, "limit", "50")), q(r, "after")))),
        Route("/api/runs", endpoint(lambda r, b: api.runs(int(q(r, "limit", "100")), q(r, "after")))),
        Route("/api/jobs/{id}/retry", endpoint(lambda r, b: api.retry(r.path_params["id"])), methods=["POST"]),
        Route("/api/jobs/{id}", endpoint(lambda r, b: {"job": shown(lab.registry.get(r.path_params["id"]))})),
        Route("/api/jobs/{id}/log", endpoint(lambda r, b: api.log(r.path_params["id"], q(r, "after")))),
        Route("/api/run", endpoint(lambda r, b: api.run(q(r, "key", "")))),
        Route("/api/compare", endpoint(lambda r, b: api.compare(r.query_params.getlist("key")))),
        Route("/api/presets", endpoint(lambda r, b: {"presets": PRESETS})),
        Route("/api/sweep", endpoint(lambda r, b: api.sweep(q(r, "id", "")))),
        Route("/api/sweep/cancel", endpoint(lambda r, b: api.sweep_cancel(field(b, "id", str, ""))),
              methods=["POST"]),
        Route("/api/sweep/add", endpoint(lambda r, b: api.sweep_add(
            field(b, "id", str, ""), field(b, "trials", int, 1))), methods=["POST"]),
        Route("/api/sweep/best", endpoint(lambda r, b: api.sweep_best(
            field(b, "id", str, ""), field(b, "run", str, ""))), methods=["POST"]),
        Route("/api/events", changes.events),
        Route("/api/jobs/{id}/cancel", endpoint(lambda r, b: api.cancel(
            r.path_params["id"], field(b, "force", bool, False))), methods=["POST"]),
        Route("/api/resume", endpoint(lambda r, b: api.resume(field(b, "key", str, ""))), methods=["POST"]),
        Route("/api/submit", endpoint(lambda r, b: api.new_run(b)), methods=["POST"]),
        Route("/api/sample", endpoint(lambda r, b: api.sample(
            field(b, "key", str, ""), field(b, "prompt", str, ""), field(b, "max_tokens", int, 60),
            field(b, "temperature", float, 0.5))), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Guard(Starlette(routes=routes), token, require_token)


class Guard:
    """ASGI middleware: Host check on localhost, the token where required, safe POSTs."""

    def __init__(self, app, token: str, require_token: bool):
        self.app, self.token, self.require_token = app, token, require_token

    def _valid(self, given: Optional[str]) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        host = request.headers.get("host", "")
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        header = request.headers.get("x-tlm-token")
        from_query = request.query_params.get("token")
        refusal = None
        if not self.require_token and not is_local(hostname.strip("[]")):
            refusal = PlainTextResponse(f"unexpected Host {host!r}", status_code=403)
        elif self.require_token and not (self._valid(header) or self._valid(from_query)
                                         or self._valid(request.cookies.get("tlm_token"))):
            refusal = PlainTextResponse("token required: open the address `tlm dashboard` printed",
                                        status_code=401)
        elif request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if not self._valid(header):
                refusal = PlainTextResponse("missing or wrong X-TLM-Token header", status_code=403)
            elif origin is not None and origin != f"{request.url.scheme}://{host}":
                refusal = PlainTextResponse(f"cross-site request from {origin} refused",
                                            status_code=403)
        if refusal is None and from_query and request.method == "GET":
            # The token from the printed address becomes a cookie; the address bar drops it.
            refusal = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            refusal.set_cookie("tlm_token", self.token, httponly=True, samesite="strict")
        response = refusal
        if response is not None:
            return await response(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [(b"content-security-policy", CSP.encode()),
                                       (b"x-content-type-options", b"nosniff"),
                                       (b"referrer-policy", b"no-referrer")]
            await send(message)
        await self.app(scope, receive, with_headers)


def is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command()
@click.option("--queue", envvar="TLM_QUEUE", default=None,
              help="redis://[:password@]host:port/db (env TLM_QUEUE); default: embedded SQLite")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; anything but localhost requires the token")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", envvar="TLM_DASHBOARD_TOKEN", default=None,
              help="the access token (env TLM_DASHBOARD_TOKEN); default: a new random one")
@click.option("--save_root", "--save-root", default=None,
              help="where this machine mounts the shared runs directory (to mark checkpoints "
                   "still on disk; curves and logs need no mount)")
def dashboard(queue, host, port, token, save_root) -> None:
    """Serve the lab's web page: jobs, workers, live curves, logs, controls."""
    import uvicorn  # web server

    try:
        lab = Lab.connect(queue, save_root)
    except LabError as e:
        raise click.ClickException(str(e)) from None
    token = token or secrets.token_urlsafe(18)
    local = is_local(host)
    app = create_app(lab, token, require_token=not local)
    try:  # bound before the address is printed: a busy port is the one line said
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}"
                                   + (" (another tlm dashboard? try --port)" if e.errno == errno.EADDRINUSE
                                      else "")) from None
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + ("" if local else f"?token={token}")
    click.echo(f"tlm dashboard on {url}" + ("" if local else
               "  (from another Mac: this machine's address in place of the host)"), err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1,
                                           access_log=False))
    server.run(sockets=[sock])
