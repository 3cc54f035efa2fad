"""Take the README's picture of `tlm dashboard`: a real shakespeare-cpu run on a real worker,
photographed by headless Chromium while it trains.

    TLM_DATA_MIRROR=../shared/data .venv/bin/python scripts/dashboard_screenshot.py [docs/dashboard.png]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from dashboard import browser, free_port  # noqa: E402

from tlm_worker.queue import Queue  # noqa: E402
from tlm_worker.registry import Registry  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
    tmp = Path(tempfile.mkdtemp())
    url, root, port = f"sqlite://{tmp / 'queue.db'}", tmp / "runs", free_port()
    tlm = [sys.executable, "-m", "tlm_cli.main"]
    procs = [subprocess.Popen([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--save_root",
                               str(root)], stderr=subprocess.DEVNULL),
             subprocess.Popen([*tlm, "dashboard", "--queue", url, "--port", str(port), "--save_root",
                               str(root)], stderr=subprocess.DEVNULL)]
    driver = browser()
    try:
        job = subprocess.run([*tlm, "submit", "train", "--queue", url, "--run", "shakespeare-a",
                              "--preset", "shakespeare-cpu", "--num_iters", "900", "--time_budget", "0", "--steps_per_eval", "100"],
                             capture_output=True, text=True, check=True).stdout.strip()
        reg = Registry(Queue(url))
        while reg.get(job).progress.get("step", 0) < 500:
            time.sleep(1)
        key = urllib.parse.quote("run:shakespeare-a", safe="")
        driver.get(f"http://127.0.0.1:{port}/#/run/{key}")
        time.sleep(3)
        driver.save_screenshot(str(out))
        print(f"wrote {out}")
    finally:
        driver.quit()
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
