"""``tlm-worker``: the command each Mac runs."""

from __future__ import annotations

import click

from tlm_cli.options import FiniteRange
from tlm_worker.process import Worker
from tlm_worker.queue import QueueError, queue_url, redact


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--queue", envvar="TLM_QUEUE", default=None,
              help="redis://[:password@]host:port/db (env TLM_QUEUE); default: embedded SQLite")
@click.option("--concurrency", default=1, type=click.IntRange(1),
              help="training jobs run at once (sample and eval jobs run beside them in a lane of their own)")
@click.option("--gpu", is_flag=True, help="run jobs on MLX's GPU (Metal on macOS, CUDA on Linux)")
@click.option("--save_root", "--save-root", default=None,
              help="where this machine mounts the shared runs directory (for --run jobs)")
@click.option("--lease", default=60.0, type=FiniteRange(1), show_default=True,
              help="seconds without a heartbeat after which a job is re-queued")
@click.option("--max_attempts", "--max-attempts", default=3, type=click.IntRange(1), show_default=True,
              help="crashes (not interruptions) before a job is failed")
@click.option("--keep_days", "--keep-days", default=30.0, show_default=True,
              type=FiniteRange(0, min_open=True),
              help="finished jobs and their logs are deleted after this many days")
@click.option("--burst", is_flag=True, help="exit once the queue is empty and no job runs")
def main(queue, concurrency, gpu, save_root, lease, max_attempts, keep_days, burst) -> None:
    """Run queued tlm jobs. Ctrl+C once: jobs save and are re-queued; twice: exit now."""
    url = queue_url(queue)
    if gpu:
        import tlm  # noqa: F401  (optimized BLAS before MLX)
        from tlm.config import ConfigError
        from tlm.train import select_device
        try:
            select_device(True)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
    try:
        worker = Worker(url, concurrency=concurrency, gpu=gpu, save_root=save_root, lease=lease,
                        max_attempts=max_attempts, keep_days=keep_days, burst=burst)
        worker.run()
    except QueueError as e:
        raise click.ClickException(str(e)) from None
    except Exception as e:  # a backend that cannot even be opened
        raise click.ClickException(f"queue {redact(url)}: {e}") from None
    if worker.killing:  # stopped by a second Ctrl+C or SIGTERM
        raise SystemExit(130)
    if burst and worker.failed:
        raise click.ClickException(f"{worker.failed} job(s) failed: see `tlm status`")


if __name__ == "__main__":
    main()
