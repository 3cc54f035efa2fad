"""Data-parallel ranks on MLX's distributed engine: start them on this machine, or join one.

A rank is a process started with ``MLX_RANK`` and ``MLX_HOSTFILE`` (a JSON list
of ``["ip:port"]`` lists, one per rank), as ``mlx.launch`` starts them; the ring
backend connects them over TCP. ``launch_local`` starts N ranks of a command on
127.0.0.1, each in its own session (process group): it forwards one SIGINT/SIGTERM to
each (so all stop after the same step and save), and if one dies it stops the
others at once, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx


def joined() -> bool:
    """Whether this process was started as a rank."""
    return "MLX_RANK" in os.environ and "MLX_HOSTFILE" in os.environ


def join(backend: str = "ring") -> Optional[mx.distributed.Group]:
    """This rank's group, or None when not started as a rank."""
    return mx.distributed.init(strict=True, backend=backend) if joined() else None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch_local(command: list[str], n: int) -> int:
    """Run ``command`` as ``n`` ranks here; rank 0 keeps this terminal's output, the others
    write to log files shown if they fail. Returns the first failing exit status, or 0."""
    logs = Path(tempfile.mkdtemp(prefix="tlm-ranks-"))
    hostfile = logs / "hostfile.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    procs: list[subprocess.Popen] = []
    for rank in range(n):
        out = None if rank == 0 else open(logs / f"rank-{rank}.log", "w")
        procs.append(subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True,
                                      env={**os.environ, "MLX_RANK": str(rank),
                                           "MLX_HOSTFILE": str(hostfile)}))

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
