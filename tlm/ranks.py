"""Data-parallel ranks on MLX's distributed engine: start them on this machine, or join one.

A rank is a process started with ``MLX_RANK`` and its backend's rendezvous
variables, as ``mlx.launch`` starts them: for the ring backend
``MLX_HOSTFILE`` (a JSON list of ``["ip:port"]`` lists, one per rank), for
NCCL rank 0's address, for JACCL rank 0's address and the RDMA devices that
link each pair of machines. ``rank_env`` builds them from the members' own
addresses, whoever starts the ranks: ``launch_local`` here on 127.0.0.1, or
each worker of a queued gang on its own Mac.

``launch_local`` starts each rank in its own session (process group): it
forwards one SIGINT/SIGTERM to each (so all stop after the same step and
save), and if one dies it stops the others at once, so no rank is left
waiting in a collective. A ``Watchdog`` in each rank ends it when a step
makes no progress for too long (a peer stopped, or a ring hang, mlx#4475).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from tlm.config import ConfigError

if TYPE_CHECKING:
    import mlx.core as mx

STALLED = 76  # a rank's exit status when its watchdog fired
COLLECTIVE_TIMEOUT = float(os.environ.get("TLM_COLLECTIVE_TIMEOUT", "300"))


def joined() -> bool:
    """Whether this process was started as a rank."""
    return "MLX_RANK" in os.environ


def follower() -> bool:
    """Whether this process is a rank other than 0 (which alone writes into the run)."""
    return os.environ.get("MLX_RANK", "0") != "0"


def join(backend: str = "ring") -> Optional["mx.distributed.Group"]:
    """This rank's group, or None when not started as a rank."""
    import mlx.core as mx  # here: a worker imports this module without using MLX itself

    if not joined():
        return None
    if not mx.distributed.is_available(backend):
        raise ConfigError(f"MLX's {backend} backend is not available in this MLX build "
                           f"({sys.platform}): use --backend ring")
    return mx.distributed.init(strict=True, backend=backend)


def barrier(group: "mx.distributed.Group") -> None:
    """Wait until every rank of the group is here."""
    import mlx.core as mx  # MLX

    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def rank_env(backend: str, members: list[dict[str, Any]], rank: int, directory: Path) -> dict[str, str]:
    """The environment that makes this process rank ``rank`` of ``members`` (each an
    ``address``, a ``port``, and for JACCL ``rdma``: peer address -> RDMA device);
    files it needs are written to ``directory``."""
    env = {"MLX_RANK": str(rank)}
    first = members[0]
    if backend == "ring":
        hostfile = directory / "hostfile.json"
        hostfile.write_text(json.dumps([[f"{m['address']}:{m['port']}"] for m in members]))
        env["MLX_HOSTFILE"] = str(hostfile)
    elif backend == "nccl":
        env.update(NCCL_HOST_IP=first["address"], NCCL_PORT=str(first["port"]),
                   MLX_WORLD_SIZE=str(len(members)))
    elif backend == "jaccl":
        matrix = [[None if i == j else (m.get("rdma") or {}).get(peer["address"])
                   for j, peer in enumerate(members)] for i, m in enumerate(members)]
        missing = [f"{members[i]['address']} to {members[j]['address']}" for i in range(len(members))
                   for j in range(len(members)) if i != j and matrix[i][j] is None]
        if missing:
            raise ConfigError(f"--backend jaccl: no RDMA device from {', '.join(missing)} (start each "
                              "worker with --rdma PEER=DEVICE for every peer; `ibv_devices` lists them)")
        devices = directory / "ibv-devices.json"
        devices.write_text(json.dumps(matrix))
        env.update(MLX_IBV_DEVICES=str(devices),
                   MLX_JACCL_COORDINATOR=f"{first['address']}:{first['port']}")
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return env


def free_ports(n: int, address: str = "127.0.0.1", ports: Optional[Iterable[int]] = None) -> list[int]:
    """``n`` ports free on ``address`` now (from ``ports``, else any the system gives)."""
    found, socks = [], []
    for port in ports if ports is not None else [0] * n:
        s = socket.socket()
        try:
            s.bind((address, port))
        except OSError:
            s.close()
            continue
        socks.append(s)
        found.append(s.getsockname()[1])
        if len(found) == n:
            break
    for s in socks:
        s.close()
    return found


class Watchdog:
    """Ends this rank if ``beat()`` is not called for ``timeout`` seconds: a collective that
    never returns (a peer stopped or lost, or a ring hang) would otherwise hold it forever.
    Its peers then fail too, and whoever started the ranks sees a failure to recover from."""

    def __init__(self, timeout: float = COLLECTIVE_TIMEOUT):
        self.timeout = timeout
        self.last = time.monotonic()
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="tlm-watchdog").start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                print(f"rank {os.environ.get('MLX_RANK')}: no progress for {self.timeout:.0f}s "
                      "(a peer stopped, or a collective hangs): stopping this rank",
                      file=sys.stderr, flush=True)
                os._exit(STALLED)


def launch_local(command: list[str], n: int, backend: str = "ring") -> int:
    """Run ``command`` as ``n`` ranks here; rank 0 keeps this terminal's output, the others
    write to log files shown if they fail. Returns the first failing exit status, or 0."""
    logs = Path(tempfile.mkdtemp(prefix="tlm-ranks-"))
    members = [{"address": "127.0.0.1", "port": p} for p in free_ports(n)]
    procs: list[subprocess.Popen] = []
    for rank in range(n):
        out = None if rank == 0 else open(logs / f"rank-{rank}.log", "w")
        procs.append(subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True,
                                      env={**os.environ, **rank_env(backend, members, rank, logs)}))

    def forward(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((c for c in codes if c not in (None, 0)), None)
            if failed is not None:  # a rank died: the others would wait in a collective forever
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for rank, code in enumerate(codes):
                    if code not in (None, 0) and rank:
                        tail = (logs / f"rank-{rank}.log").read_text().strip().splitlines()[-3:]
                        print(f"rank {rank} exited with status {code}:", *tail, sep="\n  ",
                              file=sys.stderr)
                return failed
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            p.wait()
