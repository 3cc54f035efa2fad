"""``tlm-worker``: the command each Mac runs."""

from __future__ import annotations

import sqlite3

import click
import redis

from tlm.config import ConfigError
from tlm.ranks import free_ports
from tlm_cli.options import FiniteRange
from tlm_worker.placement import capabilities, parse_labels
from tlm_worker.power import Policy
from tlm_worker.process import Worker
from tlm_worker.queue import QueueError, queue_url, redact
from tlm_worker.targets import TargetError


class PortRange(click.ParamType):
    """``FIRST-LAST`` (inclusive) or one port, as a range."""
    name = "FIRST-LAST"

    def convert(self, value, param, ctx) -> range:
        if isinstance(value, range):
            return value
        first, _, last = str(value).partition("-")
        try:
            ports = range(int(first), int(last or first) + 1)
        except ValueError:
            self.fail(f"{value!r} is not FIRST-LAST, e.g. 47100-47199", param, ctx)
        if not ports or ports.start < 1 or ports.stop > 65536:
            self.fail(f"{value!r} is not a range of ports within 1-65535", param, ctx)
        return ports


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--queue", envvar="TLM_QUEUE", default=None,
              help="redis://[:password@]host:port/db (env TLM_QUEUE); default: embedded SQLite")
@click.option("--concurrency", default=1, type=click.IntRange(1),
              help="training jobs run at once (sample and eval jobs run beside them in a lane of their own)")
@click.option("--gpu", is_flag=True, help="run jobs on MLX's GPU (Metal on macOS, CUDA on Linux)")
@click.option("--save_root", "--save-root", envvar="TLM_SAVE_ROOT", default=None,
              help="where this machine mounts the shared runs directory (for --run jobs)")
@click.option("--lease", default=60.0, type=FiniteRange(1), show_default=True,
              help="seconds without a heartbeat after which a job is re-queued")
@click.option("--max_attempts", "--max-attempts", default=3, type=click.IntRange(1), show_default=True,
              help="crashes (not interruptions) before a job is failed")
@click.option("--keep_days", "--keep-days", default=30.0, show_default=True,
              type=FiniteRange(0, min_open=True),
              help="finished jobs and their logs are deleted after this many days")
@click.option("--address", default=None,
              help="this Mac's address that other workers reach for gang jobs (--nodes): its "
                   "Ethernet or Thunderbolt bridge address (default: the one it reaches the queue by)")
@click.option("--ports", default="47100-47199", show_default=True, type=PortRange(),
              help="ports a gang job's rank may listen on (open them in the firewall)")
@click.option("--rdma", multiple=True, metavar="PEER=DEVICE",
              help="for --backend jaccl: the RDMA device linking this Mac to the worker at PEER "
                   "(an --address), e.g. 10.0.1.2=rdma_en3; repeat per peer")
@click.option("--interactive_idle", "--interactive-idle", default=600.0, type=FiniteRange(1), show_default=True,
              metavar="SECONDS", help="an interactive process (samples, evals) idle this long is closed, "
                                      "giving its models' memory back; the next one starts afresh")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="a label jobs can ask for with `tlm submit --on KEY=VALUE` (repeatable)")
@click.option("--when_idle", "--when-idle", default=None, type=FiniteRange(0), metavar="MINUTES",
              help="macOS: take training jobs only after the user has been idle this long, and "
                   "save and re-queue them when the user comes back")
@click.option("--on_battery", "--on-battery", type=click.Choice(["run", "pause"]), default="run",
              show_default=True, help="macOS: pause: save and re-queue training jobs on battery power")
@click.option("--burst", is_flag=True, help="exit once the queue is empty and no job runs")
def main(queue, concurrency, gpu, save_root, lease, max_attempts, keep_days, address, ports, rdma,
         interactive_idle, labels, when_idle, on_battery, burst) -> None:
    """Run queued tlm jobs. Ctrl+C once: jobs save and are re-queued; twice: exit now.

    A worker takes only jobs whose needs it meets (--gpu, memory, --label, host), the
    highest priority first. On macOS it keeps the Mac from idle sleep while a job runs
    (caffeinate); --when_idle and --on_battery read ioreg and pmset, which Linux does
    not have: there they never pause, and nothing keeps the machine awake.
    """
    url = queue_url(queue)
    if address is not None and not free_ports(1, address, [0]):  # any port: is it ours?
        raise click.BadParameter(f"{address} is not an address of this machine", param_hint="--address")
    try:
        labels = parse_labels(labels)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--label") from None
    try:
        capabilities(gpu, labels)  # TLM_FAKE_CAPABILITIES is checked here, not blamed on the queue
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if any("=" not in r for r in rdma):
        raise click.BadParameter("give PEER=DEVICE, e.g. 10.0.1.2=rdma_en3", param_hint="--rdma")
    if gpu:
        import tlm  # noqa: F401  (optimized BLAS before MLX)
        from tlm.device import select_device  # MLX
        try:
            select_device(True)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
    try:
        worker = Worker(url, concurrency=concurrency, gpu=gpu, save_root=save_root, lease=lease,
                        max_attempts=max_attempts, keep_days=keep_days, burst=burst, address=address,
                        ports=ports, rdma=dict(r.split("=", 1) for r in rdma), labels=labels,
                        policy=Policy(when_idle, on_battery), interactive_idle=interactive_idle)
    except (QueueError, TargetError) as e:
        raise click.ClickException(str(e)) from None
    except Exception as e:  # a backend that cannot even be opened
        raise click.ClickException(f"queue {redact(url)}: {e}") from None
    try:
        worker.run()
    except QueueError as e:
        raise click.ClickException(str(e)) from None
    except (redis.RedisError, sqlite3.Error) as e:  # the backend refused (a bug prints its traceback)
        raise click.ClickException(f"queue {redact(url)}: {e}") from None
    if worker.killing:  # stopped by a second Ctrl+C or SIGTERM
        raise SystemExit(130)
    if burst and worker.failed:
        raise click.ClickException(f"{worker.failed} job(s) failed: see `tlm status`")


if __name__ == "__main__":
    main()
