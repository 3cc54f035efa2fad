"""A worker's place in gang jobs (``tlm submit train --nodes N``).

A worker with a free training slot reserves a place in the oldest waiting gang
that the live workers could fill, refreshes it while it waits, and gives it up
after two leases (for two more, taking other jobs meanwhile), so a gang that
cannot gather never holds slots forever. The reservation that completes a gang
starts it; each member then runs one rank, reachable at ``--address`` on a
port from ``--ports``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from tlm.ranks import free_ports
from tlm_worker.chores import IDLE_POLL
from tlm_worker.kinds import TRAINING
from tlm_worker.placement import unmet
from tlm_worker.registry import CLAIMABLE, RUNNING, Job

if TYPE_CHECKING:
    from tlm_worker.process import Worker

LOOK_SECONDS = 1.0  # how often a worker with a free slot looks for a gang while one waits


@dataclass
class Reservation:
    """A place held in a waiting gang."""
    job_id: str
    port: int
    since: float = field(default_factory=time.monotonic)
    refreshed: float = field(default_factory=time.monotonic)


@dataclass
class Gangs:
    """One worker's part in gangs: at most one place held at a time."""
    worker: "Worker"
    reservation: Optional[Reservation] = None
    shunned: dict[str, float] = field(default_factory=dict)  # gang job -> when it may be joined again
    next_look: float = 0.0  # no look for a gang to join before (monotonic); 0: at the next turn

    def step(self) -> bool:
        """Reserve a place in the oldest waiting gang, keep it fresh, start this worker's rank
        once the gang is complete, or give the place up after two leases. True if started."""
        w, now, r = self.worker, time.monotonic(), self.reservation
        if r is None:
            if not w._free(TRAINING) or now < self.next_look:
                return False
            self.next_look = now + LOOK_SECONDS
            gang = self._joinable()
            if gang is None:
                return False
            taken = {m["port"] for m in gang.members if m["address"] == w.address}
            ports = free_ports(1, w.address, [p for p in w.ports if p not in taken])
            if not ports:
                w.say(f"no free port in --ports {w.ports.start}-{w.ports.stop - 1} "
                      f"on {w.address}: not joining gang job {gang.id}")
                return False
            r = self.reservation = Reservation(gang.id, ports[0])
            job = self._reserve(r)
        elif now - r.refreshed > w.lease / 4:
            job = self._reserve(r)
        else:
            job = w.registry.get(r.job_id)
        rank = next((i for i, m in enumerate(job.members) if m["worker"] == w.id), None)
        if rank is None or job.state not in (RUNNING, *CLAIMABLE):
            self.reservation = None  # it started without this worker, or ended
            return False
        if job.state == RUNNING:
            self.reservation = None
            w._start(job, TRAINING, rank)
            return True
        if now - r.since > 2 * w.lease:
            self.withdraw()
            self.shunned[r.job_id] = now + 2 * w.lease
            w.say(f"gang job {r.job_id}: {len(job.members)} of {job.nodes} workers after "
                  f"{2 * w.lease:.0f}s: gave up its place for {2 * w.lease:.0f}s")
        return False

    def withdraw(self) -> None:
        """Give up the place held (stopping, or after waiting two leases)."""
        if self.reservation is not None:
            self.worker.registry.withdraw(self.reservation.job_id, self.worker.id)
            self.reservation = None

    def _reserve(self, r: Reservation) -> Job:
        """Hold or refresh the place; the job as it is now (perhaps started, or ended)."""
        w = self.worker
        r.refreshed = time.monotonic()
        place = {"address": w.address, "port": r.port, "rdma": w.rdma}
        return w.registry.reserve(r.job_id, w.id, place, w.registry.now() + w.lease, w.caps) \
            or w.registry.get(r.job_id)

    def _joinable(self) -> Optional[Job]:
        """The oldest waiting gang the live workers could fill, unless this worker gave it up
        lately; every worker picks the same one, so gangs never split the workers."""
        w = self.worker
        gangs = [g for g in w.registry.waiting_gangs() if not unmet(g.placement, w.caps)]
        if not gangs and w.wakeup is not None:  # a gang queued or re-queued wakes this worker
            self.next_look = time.monotonic() + IDLE_POLL
        live = sum(not x.get("stopping") for x in w.registry.workers()) if gangs else 0  # this one too
        gang = next((g for g in gangs if g.nodes <= live), None)
        if gang is None or self.shunned.get(gang.id, 0) > time.monotonic():
            return None
        return gang
