"""Dashboard benchmark: page and runs-table load with 1,000 runs and 10,000 jobs, and
progress-to-browser latency.

    python benchmarks/dashboard.py [--redis redis://127.0.0.1:6379/14] [--jobs 10000] [--runs 1000]

For each backend (an embedded SQLite file, and Redis when given: its database
is flushed): fills the registry with --jobs finished jobs over --runs runs (a
finished training job per run, with its configuration and best validation
loss, and evaluations) and one running training job, starts `tlm dashboard`,
opens it in headless Chromium (Debian's chromium and chromedriver), and
measures the jobs page load (navigation to the jobs table drawn), the runs
page load (to its table drawn, a row per run) and the time from a progress
update written to the registry (as a worker writes it) to the browser showing
the new step (goal for the loads: under 300 ms). Prints figures; asserts
nothing about time.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tlm_worker.queue import Queue
from tlm_worker.registry import Registry

# Records, in the page's own clock, when the live job's step cell shows each value.
WATCH = """
window.__seen = {};
new MutationObserver(() => {
  const cell = document.querySelector('tr[data-job="%s"] td.step');
  if (cell) { const step = cell.textContent.split('/')[0]; if (!(step in window.__seen)) window.__seen[step] = Date.now(); }
}).observe(document.getElementById('view'), {subtree: true, childList: true, characterData: true});
"""


def browser() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1400,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = {"dataset": "ptb", "dim": 256, "num_blocks": 4, "num_heads": 4, "context_size": 64, "batch_size": 32,
          "optimizer": "muon", "learning_rate": 3e-3, "dropout": 0.0, "num_iters": 950}


def fill(reg: Registry, n_jobs: int, n_runs: int) -> None:
    """A finished training job per run (as a worker leaves it), and evaluations for the rest."""
    for i in range(n_jobs):
        key = f"dir:/runs/r{i % n_runs}"
        if i < n_runs:
            job = reg.create("train", {"save_dir": key[4:]}, key)
            held = reg.claim(job.id, "bench")
            reg.update(job.id, progress={"step": 950, "total": 950, "config": {**CONFIG, "learning_rate": 1e-3 + i * 1e-6},
                                         "best_valid": [4.6 + (i % 97) / 100, 950, 600.0], "elapsed": 600.0,
                                         "tokens_per_sec": 2600.0, "test_loss": 4.58})
        else:
            job = reg.create("eval", {"save_dir": key[4:]}, key)
            held = reg.claim(job.id, "bench")
        reg.finish(job.id, "succeeded", held.fence)


def bench(url: str, n_jobs: int, n_runs: int, driver: webdriver.Chrome) -> None:
    if url.startswith("redis"):
        redis.Redis.from_url(url).flushdb()
    reg = Registry(Queue(url))
    tic = time.time()
    fill(reg, n_jobs, n_runs)
    live = reg.create("train", {"save_dir": "/runs/live", "num_iters": 1000}, "dir:/runs/live")
    reg.claim(live.id, "bench")
    print(f"  registry filled with {n_jobs:,} finished jobs over {n_runs:,} runs in {time.time() - tic:.0f} s")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tlm_cli.main", "dashboard", "--queue", url,
                               "--port", str(port)], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                httpx.get(base, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        api = []
        for _ in range(5):
            tic = time.perf_counter()
            httpx.get(base + "api/overview")
            api.append(time.perf_counter() - tic)
        loads = []
        for _ in range(5):
            tic = time.perf_counter()
            driver.get(base)
            while not driver.find_elements("css selector", f'tr[data-job="{live.id}"]'):
                time.sleep(0.005)
            loads.append(time.perf_counter() - tic)
        rows = len(driver.find_elements("css selector", "#jobs tbody tr"))
        print(f"  /api/overview {statistics.median(api) * 1000:.0f} ms; page load to the jobs table "
              f"drawn ({rows} rows: the live job and the latest 100 finished): median "
              f"{statistics.median(loads) * 1000:.0f} ms")
        runs_api, runs_loads = [], []
        for _ in range(5):
            tic = time.perf_counter()
            httpx.get(base + "api/runs", timeout=60)
            runs_api.append(time.perf_counter() - tic)
        for _ in range(5):
            driver.get("about:blank")
            tic = time.perf_counter()
            driver.get(base + "#/runs")
            while int(driver.execute_script("return document.querySelector('#runs-table')?.dataset.count")
                      or 0) < min(n_runs, 100):  # the first page: the best 100 (and the live run)
                time.sleep(0.005)
            runs_loads.append(time.perf_counter() - tic)
        print(f"  /api/runs first page ({n_runs:,} runs from {n_jobs:,} jobs) {statistics.median(runs_api) * 1000:.0f} "
              f"ms; runs page load to its table drawn (the best 100): median "
              f"{statistics.median(runs_loads) * 1000:.0f} ms")
        driver.get(base)
        while not driver.find_elements("css selector", f'tr[data-job="{live.id}"]'):
            time.sleep(0.005)
        time.sleep(1)
        driver.execute_script(WATCH % live.id)
        latencies = []
        for step in range(10, 110, 10):
            sent = time.time()
            reg.update(live.id, progress={"step": step, "total": 1000})  # as the job process does
            while (seen := driver.execute_script(f"return window.__seen['{step}']")) is None:
                time.sleep(0.005)
            latencies.append(seen / 1000 - sent)
            time.sleep(0.5)
        print(f"  progress update to the browser showing it: median {statistics.median(latencies) * 1000:.0f} ms "
              f"({min(latencies) * 1000:.0f}-{max(latencies) * 1000:.0f} ms; the page gathers a burst of "
              "changes for 150 ms before it redraws)")
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default=None, help="also benchmark this Redis URL (flushed!)")
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=1000)
    args = ap.parse_args()
    driver = browser()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            targets = [("embedded SQLite", f"sqlite://{Path(tmp) / 'queue.db'}")]
            if args.redis:
                targets.append(("Redis", args.redis))
            for name, url in targets:
                print(f"{name}:", flush=True)
                bench(url, args.jobs, args.runs, driver)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
