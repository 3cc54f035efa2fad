"""`tlm dashboard`: a real server process, a real queue and worker, headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from tlm import checkpoint

from queue_helpers import TINY, Workers, free_port, registry, submit, tlm, wait_for

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


REDIS_DB = 12


class Dashboard:
    def __init__(self, url: str, tmp: Path, *args: str):
        self.port = free_port()
        self.log = open(tmp / "dashboard.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tlm_cli.main", "dashboard", "--queue", url,
                                      "--port", str(self.port), *args],
                                     stdout=self.log, stderr=self.log)
        host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
        self.base = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}"
        for _ in range(150):
            try:
                httpx.get(self.base + "/static/app.css", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(Path(self.log.name).read_text())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def dashboard(url, tmp_path):
    d = Dashboard(url, tmp_path)
    yield d
    d.stop()


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium/chromedriver (scripts/setup.sh installs Debian's)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def until(fn, timeout: float = 60, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception:  # the element is being re-rendered
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out: {what}")


def text(driver, css: str) -> str:
    return driver.find_element("css selector", css).text


def click(driver, css: str) -> None:
    """Click, again if the page re-rendered the element in between (it does on every change)."""
    until(lambda: driver.find_element("css selector", css).click() or True, what=f"click {css}")


def test_a_job_appears_advances_draws_and_is_cancelled_from_the_page(url, dashboard, browser,
                                                                     save_dir, tmp_path):
    workers = Workers(url, tmp_path)
    workers.start()
    try:
        browser.get(dashboard.base + "/")
        browser.execute_script("window.__sameDocument = true")
        job_id = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "100000",
                        "--steps_per_eval", "20")
        row = f'tr[data-job="{job_id}"]'
        until(lambda: text(browser, row + " td.state") == "running", what="the job runs")
        first = until(lambda: int(text(browser, row + " td.step").split("/")[0]), what="a step")
        until(lambda: int(text(browser, row + " td.step").split("/")[0]) > first, what="steps advance")
        until(lambda: "train 1" in text(browser, "#workers"), what="the worker's slots")

        click(browser, row + " td.run a")  # the run's page
        points = lambda: int(browser.find_element("css selector", "#chart-step").get_attribute(  # noqa: E731
            "data-points") or 0)
        seen = until(points, what="curve points")
        until(lambda: points() > seen, what="the curve gains points")
        until(lambda: "iter " in text(browser, "#log"), what="the log")
        until(lambda: browser.find_elements("css selector", "#chart-time canvas"), what="time chart")
        for gauge in ("#chart-lr", "#chart-speed", "#chart-memory"):  # what the trainer reports beside the loss
            until(lambda: int(browser.find_element("css selector", gauge).get_attribute("data-points") or 0) > 0,
                  what=f"{gauge} drawn")
        click(browser, f"#run-jobs {row} button.cancel")
        until(lambda: "tlm cancel " + job_id in text(browser, "#notice"), what="the command shown")
        job = wait_for(url, job_id, ["cancelled"])
        assert checkpoint.find(save_dir).identifier == job.checkpoint
        until(lambda: text(browser, f'#run-jobs {row} td.state') == "cancelled", what="state shown")
        assert browser.execute_script("return window.__sameDocument") is True  # never reloaded
    finally:
        workers.stop_all()


def test_job_provided_text_renders_as_text(tmp_path, browser):
    url = f"sqlite://{tmp_path / 'queue.db'}"
    name = '<img src=x onerror="window.__xss=1">'
    job_id = submit(url, "eval", "--run", name)
    registry(url).log(job_id, "<script>window.__xss=2</script> a log line")
    registry(url).cancel(job_id)
    d = Dashboard(url, tmp_path)
    try:
        browser.get(d.base + "/")
        until(lambda: text(browser, f'tr[data-job="{job_id}"] td.run a') == name, what="the name as text")
        browser.get(d.base + "/#/run/" + urllib.parse.quote(f"run:{name}", safe=""))
        until(lambda: name in text(browser, "h1"), what="the run page")
        until(lambda: "<script>window.__xss=2</script> a log line" in text(browser, "#log"),
              what="the log line as text")
        assert browser.find_elements("css selector", "main img, main script") == []
        assert browser.execute_script("return window.__xss") is None
    finally:
        d.stop()


def test_a_sample_from_the_run_page(tmp_path, browser, save_dir):
    url = f"sqlite://{tmp_path / 'queue.db'}"
    subprocess.run([sys.executable, "-m", "tlm_cli.main", "train", "--save_dir", str(save_dir), *TINY,
                    "--num_iters", "10"], check=True, capture_output=True)
    train = submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "12")
    workers, d = Workers(url, tmp_path), Dashboard(url, tmp_path)
    workers.start()
    try:
        wait_for(url, train, ["succeeded"])
        browser.get(d.base + "/#/run/" + urllib.parse.quote(f"dir:{save_dir}", safe=""))
        prompt = until(lambda: browser.find_element("css selector", "#sample-prompt"), what="form")
        prompt.send_keys("the")
        browser.find_element("css selector", "#sample-max-tokens").clear()
        browser.find_element("css selector", "#sample-max-tokens").send_keys("5")
        click(browser, "form.row button")
        until(lambda: text(browser, "#sample-output") and "…" not in text(browser, "#sample-output"),
              what="the sample")
        job = registry(url).jobs(None, state="succeeded", run=f"dir:{save_dir}")[-1]
        assert job.kind == "sample" and text(browser, "#sample-output") == job.result["samples"][0]
        assert "tlm sample --save_dir" in text(browser, "#notice")
    finally:
        workers.stop_all()
        d.stop()


# -- the API, over a real HTTP server ------------------------------------------------------


def test_state_changes_need_the_page_token_and_its_origin(url, dashboard):
    reg = registry(url)
    job = reg.create("eval", {"save_dir": "/x"}, "dir:/x")
    page = httpx.get(dashboard.base + "/").text
    token = page.split('name="tlm-token" content="')[1].split('"')[0]
    cancel = dashboard.base + f"/api/jobs/{job.id}/cancel"
    assert httpx.post(cancel, json={}).status_code == 403  # no token
    assert httpx.post(cancel, json={}, headers={"X-TLM-Token": "wrong"}).status_code == 403
    refused = httpx.post(cancel, json={}, headers={"X-TLM-Token": token, "Origin": "http://evil.example"})
    assert refused.status_code == 403 and "cross-site" in refused.text
    assert reg.get(job.id).state == "queued"
    ok = httpx.post(cancel, json={}, headers={"X-TLM-Token": token, "Origin": dashboard.base})
    assert ok.status_code == 200 and ok.json()["command"] == f"tlm cancel {job.id}"
    assert reg.get(job.id).state == "cancelled"
    rebound = httpx.get(dashboard.base + "/api/overview", headers={"Host": "evil.example"})
    assert rebound.status_code == 403  # DNS rebinding
    assert "content-security-policy" in httpx.get(dashboard.base + "/").headers


def test_bound_beyond_localhost_every_request_needs_the_token(tmp_path):
    url = f"sqlite://{tmp_path / 'queue.db'}"
    d = Dashboard(url, tmp_path, "--host", "0.0.0.0", "--token", "s3cret-token")
    try:
        assert httpx.get(d.base + "/api/overview").status_code == 401
        assert httpx.get(d.base + "/").status_code == 401
        assert httpx.get(d.base + "/api/overview", headers={"X-TLM-Token": "s3cret-token"}).status_code == 200
        with httpx.Client() as client:
            first = client.get(d.base + "/?token=s3cret-token")
            assert first.status_code == 303 and "token" not in first.headers["location"]
            assert client.get(d.base + "/api/overview").status_code == 200  # the cookie
            assert client.post(d.base + "/api/resume", json={"key": "run:a"}).status_code == 403
        assert "?token=s3cret-token" in Path(d.log.name).read_text()
    finally:
        d.stop()


def test_submit_resume_and_compare_through_the_api(url, dashboard):
    page = httpx.get(dashboard.base + "/").text
    headers = {"X-TLM-Token": page.split('name="tlm-token" content="')[1].split('"')[0]}
    post = lambda path, body: httpx.post(dashboard.base + path, json=body, headers=headers)  # noqa: E731
    r = post("/api/submit", {"preset": "shakespeare-cpu", "run": "a", "overrides": {"num_iters": "7"}})
    assert r.status_code == 200, r.text
    job = registry(url).get(r.json()["job"])
    assert job.params["num_iters"] == 7 and job.params["dataset"] == "shakespeare"
    assert r.json()["command"].startswith("tlm submit train --run a ")
    busy = post("/api/submit", {"run": "a", "overrides": {}})
    assert busy.status_code == 409 and "one trainer per run" in busy.text
    bad = post("/api/submit", {"run": "b", "overrides": {"dim": "many"}})
    assert bad.status_code == 400 and bad.text == "--dim 'many': expected int"
    assert post("/api/submit", {"run": "b", "overrides": {"nope": "1"}}).text == "unknown flag --nope"
    assert post("/api/submit", {"run": "b", "overrides": {"tie_embeddings": "maybe"}}).text == \
        "--tie_embeddings 'maybe': expected bool"  # issue 40: the one parser's words (it was False)
    r = post("/api/submit", {"run": "b", "overrides": {"dim": "96", "num_heads": "4"}})
    reg = registry(url)
    for job_id, loss in ((job.id, 4.0), (r.json()["job"], 3.0)):
        held = reg.claim(job_id, "w")
        reg.add_point(job_id, {"kind": "valid", "step": 5, "loss": loss, "ppl": 2.718 ** loss,
                               "elapsed": 1.0})
        reg.finish(job_id, "cancelled", held.fence)
    resumed = post("/api/resume", {"key": "run:a"})
    assert resumed.status_code == 200 and reg.get(resumed.json()["job"]).params["num_iters"] == 7
    carried = reg.create("train", {"run": "c", "dataset": "shakespeare", "dataset_sha1": "ab" * 20},
                         "run:c")  # as `tlm submit train --dataset mine.txt` leaves it
    reg.cancel(carried.id)
    again = post("/api/resume", {"key": "run:c"})
    assert again.status_code == 200, again.text
    assert reg.get(again.json()["job"]).params["dataset_sha1"] == "ab" * 20
    data = httpx.get(dashboard.base + "/api/compare?key=run:a&key=run:b").json()
    assert {"dim", "dataset", "num_iters"} <= set(data["differs"]) and "num_heads" not in data["differs"]
    assert [r["final"]["valid"]["loss"] for r in data["runs"]] == [4.0, 3.0]
    pages, after = [], ""  # a page further back by the `next` cursor of the one before
    while after is not None:
        page = httpx.get(dashboard.base + "/api/overview", params={"limit": 1, "after": after}).json()
        pages.append([j["id"] for j in page["jobs"] if j["state"] in ("cancelled", "succeeded", "failed")])
        after = page["next"]
    ended = sorted((j for j in reg.jobs(None) if j.finished), key=lambda j: (j.finished, j.id), reverse=True)
    assert pages[:-1] == [[j.id] for j in ended] and pages[-1] == [] and len(ended) >= 2
    bad_state = httpx.get(dashboard.base + "/api/overview?state=nonsense")
    assert bad_state.status_code == 400 and bad_state.text == "unknown state 'nonsense'"
    gang = post("/api/submit", {"run": "g", "overrides": {"nodes": "2"}})  # a gang job waits for 2 workers
    assert gang.status_code == 200 and "--nodes 2" in gang.json()["command"]
    listed = httpx.get(dashboard.base + "/api/overview").json()["jobs"]
    assert next(j for j in listed if j["id"] == gang.json()["job"])["holder"] == "gathering 0/2"
    urgent = post("/api/submit", {"run": "u", "overrides": {"num_iters": "3"}, "priority": "high"})
    assert urgent.status_code == 200 and "--priority high" in urgent.json()["command"]
    assert reg.get(urgent.json()["job"]).priority == 10 and reg.get(urgent.json()["job"]).needs["memory"] > 0
    assert post("/api/submit", {"run": "v", "overrides": {}, "priority": "asap"}).status_code == 400


def test_the_page_lists_everything_else_beside_records_a_stranger_wrote(url, dashboard):
    from queue_helpers import plant

    reg = registry(url)
    planted = plant(url, reg)
    ok = reg.create("eval", {"save_dir": "/x"}, "dir:/x")
    gpu = reg.create("eval", {"save_dir": "/y"}, "dir:/y", priority=10, needs={"gpu": True})
    reg.heartbeat_worker("w1", {"host": "h", "pid": 1, "device": "cpu", "jobs": [],
                                "capabilities": {"device": "cpu", "memory_available": 2**33}})
    r = httpx.get(dashboard.base + "/api/overview")
    assert r.status_code == 200, r.text
    jobs = {j["id"]: j for j in r.json()["jobs"]}
    assert ok.id in jobs and not set(planted) & set(jobs)
    assert jobs[gpu.id]["waiting"] == "waiting: needs gpu; no live worker has it"
    assert jobs[gpu.id]["priority"] == 10 and jobs[ok.id]["trainer"] is False
    assert httpx.get(dashboard.base + "/api/jobs/bad000000001").status_code == 404


def swept(tmp_path, *args: str) -> tuple[str, str, Workers, Dashboard]:
    """A sweep of tiny character-model trials on a fresh embedded queue, with a worker and a
    dashboard on it: (the queue's url, the sweep's id, the workers, the dashboard)."""
    url = f"sqlite://{tmp_path / 'queue.db'}"
    root = tmp_path / "root"
    root.mkdir()
    proc = subprocess.run([sys.executable, "-m", "tlm_cli.main", "sweep", "submit", "--flag", "dataset=shakespeare",
                           "--flag", "dim=32", "--flag", "num_heads=2", "--flag", "num_blocks=1",
                           "--flag", "context_size=16", "--flag", "batch_size=8", "--flag", "eval_tokens=400",
                           "--flag", "steps_per_eval=5", *args, "--queue", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    workers, d = Workers(url, tmp_path), Dashboard(url, tmp_path)
    workers.start("--save_root", str(root))
    return url, proc.stdout.strip(), workers, d


def test_a_sweep_page_shows_its_leaderboard_curves_and_controls(tmp_path, browser):
    url, sweep_id, workers, d = swept(tmp_path, "--name", "page", "--search", "learning_rate=log:1e-4:1e-1",
                                      "--search", "dropout=0.0,0.1", "--trials", "3", "--parallel", "2",
                                      "--budget", "15", "--prune", "none")
    try:
        wait_for(url, sweep_id, ["succeeded"], timeout=180)
        browser.get(d.base + "/")
        click(browser, f'tr[data-job="{sweep_id}"] a.sweep')
        until(lambda: "sweep page" in text(browser, "h1"), what="the sweep page")
        until(lambda: len(browser.find_elements("css selector", "#sweep-board tbody tr")) == 3,
              what="one leaderboard row per trial")
        until(lambda: not any(browser.find_element("css selector", css).is_displayed()
                              for css in ("#sweep-stop", "#sweep-add", "#sweep-more")),
              what="no stop or add-trials control on an ended sweep")
        assert "no pruning" in browser.page_source  # --prune none, said as such
        # Each element is found again at each look: the page re-renders as the registry changes.
        until(lambda: int(browser.find_element("css selector", "#sweep-chart-step").get_attribute(
            "data-points") or 0) == 9, what="3 points on each of 3 curves")
        until(lambda: len(browser.find_elements("css selector", "#sweep-chart-step .u-legend tr.u-series")) == 4,
              what="a legend row for x and one per trial")
        # Issue 42: each searched flag's scatter fills its panel, on the axis its search has.
        axes = "return [...document.querySelectorAll('#sweep-params .chart')].map(b => [b.dataset.flag, " \
               "b.dataset.axis, b.__plot.width / b.clientWidth])"
        shown = until(lambda: browser.execute_script(axes) if len(browser.execute_script(axes)) == 2 else None,
                      what="two scatters")
        assert {f: a for f, a, _ in shown} == {"learning_rate": "log", "dropout": "choice"}
        assert all(width > 0.85 for _, _, width in shown), shown
        first = until(lambda: text(browser, "#sweep-board tbody tr:first-child td:nth-child(1)"), what="rank 1")
        click(browser, '#sweep-board th[data-key="rank"]')  # sort descending
        until(lambda: text(browser, "#sweep-board tbody tr:first-child td:nth-child(1)") != first,
              what="sorted the other way")
        typed = "#sweep-best-run"
        until(lambda: browser.find_element("css selector", typed).get_attribute("value") == "winner"
              or browser.find_element("css selector", typed).send_keys("winner"), what="the run name typed")
        click(browser, "#sweep-best")
        until(lambda: "with the best flags" in text(browser, "#notice"), what="the best queued")
        assert registry(url).jobs(None, run="run:winner")[-1].kind == "train"
    finally:
        workers.stop_all()
        d.stop()


def test_a_resumed_runs_page_shows_its_own_configuration_and_compare_only_real_differences(
        url, dashboard, tmp_path, browser, save_dir):
    other = tmp_path / "other"
    other.mkdir()
    (other / "datasets").symlink_to(save_dir / "datasets")
    workers, d = Workers(url, tmp_path), dashboard
    workers.start()
    try:
        wait_for(url, submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "10"),
                 ["succeeded"])
        resumed = submit(url, "train", "--save_dir", str(save_dir), "--num_iters", "15")  # other flags: the run's
        wait_for(url, resumed, ["succeeded"])
        wait_for(url, submit(url, "train", "--save_dir", str(other), *TINY, "--num_iters", "15",
                             "--learning_rate", "1e-3"), ["succeeded"])
        key = f"dir:{save_dir}"
        browser.get(d.base + "/#/run/" + urllib.parse.quote(key, safe=""))
        until(lambda: text(browser, '[data-flag="dim"] td:last-child') == "32", what="the run's own dim")
        # Each element is found again at each look: the page re-renders as the registry changes.
        until(lambda: text(browser, '[data-flag="num_iters"] td:last-child') == "15", what="the run's num_iters")
        until(lambda: "as its training resolved it" in text(browser, "#config-from"), what="where it comes from")
        until(lambda: f"job {resumed} changed num_iters 10 → 15" in text(browser, ".change"),
              what="which job changed what")
        data = httpx.get(d.base + f"/api/compare?key={urllib.parse.quote(key)}&key=dir:{other}").json()
        assert data["differs"] == ["learning_rate"]
        browser.get(d.base + "/#/compare/" + ",".join(urllib.parse.quote(k, safe="")
                                                      for k in (key, f"dir:{other}")))
        until(lambda: "learning_rate" in text(browser, "main table thead"), what="the differing flag")
        assert "dim" not in text(browser, "main table thead")
    finally:
        workers.stop_all()


def test_runs_table_curve_controls_and_retry_on_the_page(url, dashboard, browser, save_dir, tmp_path):
    workers = Workers(url, tmp_path)
    workers.start()
    other, text_run = tmp_path / "other", tmp_path / "chars"
    other.mkdir()
    (other / "datasets").symlink_to(save_dir / "datasets")
    try:
        ids = [submit(url, "train", "--save_dir", str(save_dir), *TINY, "--num_iters", "20", "--steps_per_eval", "5"),
               submit(url, "train", "--save_dir", str(other), *TINY, "--num_iters", "20", "--steps_per_eval", "5",
                      "--learning_rate", "1e-5"),
               submit(url, "train", "--save_dir", str(text_run), *TINY, "--num_iters", "10",
                      "--dataset", "shakespeare")]
        for job_id in ids:
            wait_for(url, job_id, ["succeeded"], timeout=180)
        failed = registry(url).create("eval", {"save_dir": str(tmp_path / "nothing-here")},
                                      f"dir:{tmp_path / 'nothing-here'}")
        wait_for(url, failed.id, ["failed"])
        browser.get(dashboard.base + "/#/runs")
        rows = lambda: browser.find_elements("css selector", "#runs-table tbody tr")  # noqa: E731
        until(lambda: len(rows()) == 3, what="three runs")
        best = until(lambda: [r.text for r in browser.find_elements(  # read again if the table re-rendered
            "css selector", '#runs-table td[data-col="best_valid"]')], what="the best losses")
        assert float(best[0]) <= float(best[1]) <= float(best[2])  # best validation loss first
        click(browser, '#runs-table th[data-key="best_valid"]')
        until(lambda: float(browser.find_element("css selector", '#runs-table td[data-col="best_valid"]').text)
              == max(map(float, best)), what="sorted the other way")
        from selenium.webdriver.support.ui import Select
        Select(browser.find_element("css selector", "#runs-dataset")).select_by_value("shakespeare")
        until(lambda: len(rows()) == 1 and "chars" in rows()[0].text, what="filtered by dataset")
        assert "shakespeare" in text(browser, "#leaderboards") and "ptb" in text(browser, "#leaderboards")
        # Smoothing and log scale change what is drawn.
        browser.get(dashboard.base + "/#/run/" + urllib.parse.quote(f"dir:{save_dir}", safe=""))
        drawn = "return document.querySelector('#chart-step').__plot.data[1].filter(v => v !== null)"
        raw = until(lambda: browser.execute_script(drawn), what="a drawn curve")
        browser.execute_script("const s = document.querySelector('#smooth'); s.value = 0.9;"
                               "s.dispatchEvent(new Event('input'))")
        until(lambda: browser.execute_script(drawn) != raw, what="smoothed")
        smoothed = browser.execute_script(drawn)
        assert smoothed[0] == pytest.approx(raw[0]) and smoothed[-1] > raw[-1]  # a falling curve lags
        click(browser, "#log-scale")
        until(lambda: browser.execute_script("return document.querySelector('#chart-step').__plot.scales.y.distr")
              == 3, what="log scale")
        # Retry a failed eval job from the jobs page: a new job.
        browser.get(dashboard.base + "/")
        click(browser, f'tr[data-job="{failed.id}"] button.retry')
        until(lambda: "eval again" in text(browser, "#notice"), what="retried")
        assert len([j for j in registry(url).jobs(None) if j.kind == "eval"]) == 2
        until(lambda: "/" in text(browser, "#workers td.load"), what="the worker's load")
        # Issue 42: a page per job (its record and log) and per worker (its jobs).
        link = until(lambda: browser.find_element("css selector", f'tr[data-job="{failed.id}"] td:nth-child(2) a')
                     .get_attribute("href"), what="the job's link")  # followed, not clicked: rows move as jobs come
        assert link.endswith(f"#/job/{failed.id}")
        browser.get(link)
        until(lambda: text(browser, "h1") == f"eval job {failed.id}", what="the job's page")
        until(lambda: "no checkpoint in" in text(browser, '#job-fields [data-field="error"]'), what="its error")
        until(lambda: "failed" in text(browser, "#job-log"), what="its log")
        ran = registry(url).get(ids[0]).worker
        browser.get(until(lambda: browser.find_element("css selector", '#job-fields [data-field="worker"] a')
                          .get_attribute("href"), what="the worker's link"))
        until(lambda: text(browser, "h1") == f"worker {ran}", what="the worker's page")
        until(lambda: browser.find_elements("css selector", f'#worker-jobs tr[data-job="{ids[0]}"]'),
              what="a job it ran, listed on its page")
    finally:
        workers.stop_all()


HOSTILE = [  # (method, path, body or None, content type, expected status)
    ("POST", "/api/sample", b"{not json", "application/json", 400),
    ("POST", "/api/sample", b"", "application/json", 400),  # empty: no key, refused by the endpoint
    ("POST", "/api/submit", b"run=a&preset=x", "application/x-www-form-urlencoded", 400),
    ("POST", "/api/submit", b"\xff\xfe{}", "application/json", 400),
    ("POST", "/api/submit", b"[1, 2]", "application/json", 400),
    ("POST", "/api/submit", b'{"run": 7, "preset": ["x"]}', "application/json", 400),
    ("POST", "/api/sample", b'{"key": "run:a", "max_tokens": "lots"}', "application/json", 400),
    ("POST", "/api/sample", b'{"key": "run:a", "temperature": {}}', "application/json", 400),
    ("POST", "/api/sweep/add", b'{"id": "x", "trials": "many"}', "application/json", 400),
    ("POST", "/api/submit", b'{"run": "' + b"r" * 300 + b'", "preset": "ptb-cpu"}', "application/json", 400),
    ("POST", "/api/submit", b'{"run": "' + b"r" * 20000 + b'"}', "application/json", 400),
    ("POST", "/api/submit", b'{"run": "' + b"r" * (10 << 20) + b'"}', "application/json", 413),
    ("GET", "/api/overview?limit=abc", None, None, 400),
    ("GET", "/api/overview?limit=99999999999999999999", None, None, 400),
    ("GET", "/api/overview?after=-5", None, None, 400),
    ("GET", "/api/overview?after=%5B1%5D", None, None, 400),
    ("GET", "/api/jobs/%00%ff/log", None, None, 404),
    ("POST", "/api/sample", b'{"key": "run:x", "prompt": "a", "max_tokens": null}', "application/json", 400),
    ("POST", "/api/submit", b"[" * 30000 + b"]" * 30000, "application/json", 400),
    ("GET", "/api/compare?" + "&".join(f"key=run:r{i}" for i in range(40)), None, None, 400),
    ("GET", "/api/run?key=run:a%00b", None, None, 400),
]


def test_every_request_is_validated_with_a_one_line_400(url, dashboard):
    page = httpx.get(dashboard.base + "/").text
    token = page.split('name="tlm-token" content="')[1].split('"')[0]
    for method, path, body, kind, status in HOSTILE:
        headers = {"X-TLM-Token": token, **({"Content-Type": kind} if kind else {})}
        r = httpx.request(method, dashboard.base + path, content=body, headers=headers, timeout=30)
        assert r.status_code == status, (path, body[:60] if body else None, r.status_code, r.text[:200])
        assert "\n" not in r.text.strip() and "Traceback" not in r.text, r.text
    assert registry(url).jobs(None) == []  # none of them made a job
    assert "Traceback" not in Path(dashboard.log.name).read_text()


def test_slow_event_clients_do_not_slow_the_page_and_any_loopback_host_is_local(tmp_path):
    url = f"sqlite://{tmp_path / 'queue.db'}"
    d = Dashboard(url, tmp_path, "--host", "127.0.0.2")
    try:
        assert httpx.get(d.base + "/api/overview").status_code == 200  # was 403 "unexpected Host"
        import socket
        idle = []
        for _ in range(80):  # clients that open the stream and never read it
            s = socket.create_connection(("127.0.0.2", d.port))
            s.sendall(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.2:{d.port}\r\n\r\n".encode())
            idle.append(s)
        answered = [httpx.get(d.base + "/api/overview", timeout=30).status_code for _ in range(20)]
        assert answered == [200] * 20
        opened = sum(b"200 OK" in s.recv(64) for s in idle)
        assert opened <= 64, opened  # MAX_STREAMS: the others got a 503 or a stream closed at once
        for s in idle:
            s.close()
        # A second dashboard on the same port says so, and prints no address first.
        again = subprocess.run([sys.executable, "-m", "tlm_cli.main", "dashboard", "--queue", url,
                                "--host", "127.0.0.2", "--port", str(d.port)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "tlm dashboard on" not in again.stderr
        assert "address already in use" in again.stderr.lower().strip().splitlines()[-1], again.stderr
    finally:
        d.stop()


def test_the_same_request_gets_the_same_answer_from_the_command_line_and_the_page(url, dashboard, tmp_path,
                                                                                 save_dir):
    """One lab service under both front ends: each request below, made with `tlm` and through
    the page's API, is refused (or queued) with the same check and the same words."""
    from conftest import tlm_cmd
    page = httpx.get(dashboard.base + "/").text
    headers = {"X-TLM-Token": page.split('name="tlm-token" content="')[1].split('"')[0]}
    post = lambda path, body: httpx.post(dashboard.base + path, json=body, headers=headers)  # noqa: E731
    tiny = {"dim": "32", "num_heads": "2", "num_blocks": "1", "context_size": "16", "batch_size": "8",
            "num_iters": "4", "steps_per_eval": "4", "eval_tokens": "200"}
    done = subprocess.run(tlm_cmd("train", "--save_dir", str(save_dir), *(f"--{k}={v}" for k, v in tiny.items())),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reg = registry(url)
    held = reg.create("train", {"run": "busy"}, "run:busy")
    ended = reg.create("eval", {"save_dir": str(save_dir)}, f"dir:{save_dir}")
    reg.cancel(ended.id)
    elsewhere = reg.create("train", {"run": "big"}, "run:big")  # trained by a worker this machine cannot see
    reg.update(elsewhere.id, progress={"config": {"dim": 512, "num_blocks": 8, "num_heads": 8, "context_size": 256,
                                                  "batch_size": 64, "dataset": "ptb"}})
    reg.cancel(elsewhere.id)
    from tlm_worker import sweeps
    spec = dict(search={"dropout": {"type": "float", "low": 0.0, "high": 0.3, "log": False}}, base={"dim": 32},
                trials=2, parallel=1, budget="20", prune="none", sampler="random")
    live = sweeps.submit(reg, sweeps.SweepSpec(name="s1", **spec))
    gone = sweeps.submit(reg, sweeps.SweepSpec(name="s2", **spec))
    reg.cancel(gone.id)
    sweeps.reconcile(reg, gone.id)
    stopping = sweeps.submit(reg, sweeps.SweepSpec(name="s3", **spec))
    reg.cancel(stopping.id)  # asked, not yet reconciled: the sweep still runs

    def cli(*args: str) -> tuple[int, str]:
        proc = tlm(*args, "--queue", url)
        return proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1].removeprefix("Error: ")

    cases = [  # (tlm arguments, page request, the status the page answers)
        (["submit", "train", "--run", "x", "--dim", "0"], ("/api/submit", {"run": "x", "overrides": {"dim": "0"}}), 400),
        (["submit", "train", "--run", "busy"], ("/api/submit", {"run": "busy", "overrides": {}}), 409),
        (["submit", "train", "--save_dir", str(save_dir), *(f"--{k}={v}" for k, v in tiny.items())],
         ("/api/submit", {"save_dir": str(save_dir), "overrides": tiny}), 400),
        (["cancel", ended.id], (f"/api/jobs/{ended.id}/cancel", {}), 409),
        (["sample", "--save_dir", str(tmp_path / "nope"), "--prompt", "a"],
         ("/api/sample", {"key": f"dir:{tmp_path / 'nope'}", "prompt": "a"}), 400),
        (["sweep", "add", "s1", "0"], ("/api/sweep/add", {"id": live.id, "trials": 0}), 400),
        (["sweep", "add", "s2", "2"], ("/api/sweep/add", {"id": gone.id, "trials": 2}), 409),
        (["sweep", "add", "s3", "2"], ("/api/sweep/add", {"id": stopping.id, "trials": 2}), 409),
        (["sweep", "add", "nosuch", "2"], ("/api/sweep/add", {"id": "nosuch", "trials": 2}), 404),
        (["sweep", "best", "s1"], ("/api/sweep/best", {"id": live.id, "run": "win"}), 409),
        (["sweep", "cancel", "s2"], ("/api/sweep/cancel", {"id": gone.id}), 409),
    ]
    for args, (path, body), status in cases:
        code, said = cli(*args)
        answer = post(path, body)
        assert code in (1, 2) and answer.status_code == status, (args, code, said, answer.status_code, answer.text)
        assert said == answer.text, (args, said, answer.text)
    assert "nothing to train" in cli(*cases[2][0])[1]
    assert "sweep s3 is being cancelled" in cli(*cases[7][0])[1]
    # A resume of a run trained elsewhere needs what that run needs, from either front end.
    queued = subprocess.run(tlm_cmd("submit", "train", "--run", "big", "--queue", url), capture_output=True,
                            text=True, timeout=60)
    first = reg.get(queued.stdout.strip())
    reg.cancel(first.id)
    again = reg.get(post("/api/resume", {"key": "run:big"}).json()["job"])
    assert first.needs["memory"] == again.needs["memory"] > 2**30, (first.needs, again.needs)
    assert cli("sweep", "add", "s1", "3") == (0, "sweep s1: 5 trials in all")
    assert post("/api/sweep/add", {"id": live.id, "trials": 1}).json()["trials"] == 6
    reg.cancel(held.id)


@pytest.mark.parametrize("trials", [100, 500])
def test_a_sweep_page_of_many_trials_stays_readable(tmp_path, browser, trials):
    """No legend of 101 series pushing the leaderboard off the window: past a handful of
    trials the best three are in colour, the rest grey, and hovering names a curve."""
    from tlm_worker import sweeps
    url = f"sqlite://{tmp_path / 'queue.db'}"
    reg = registry(url)
    spec = sweeps.SweepSpec(name="wide", search={"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                                   "log": True}},
                            base={"dim": 32, "num_heads": 2, "num_blocks": 1, "context_size": 16, "steps_per_eval": 5},
                            trials=trials, parallel=trials, budget="20", prune="none", sampler="random")
    sweep = sweeps.submit(reg, spec)
    for n, job in enumerate(sweeps.trials(reg, reg.get(sweep.id))):
        held = reg.claim(job.id, "w")
        for step in (5, 10, 15, 20):
            loss = 5.0 - step / 10 + n / 100
            reg.add_point(job.id, {"kind": "valid", "step": step, "loss": loss, "elapsed": step * 3.0})
        reg.update(job.id, progress={"step": 20, "total": 20, "best_valid": [loss, 20, 60.0]})
        reg.finish(job.id, "succeeded", held.fence)
    d = Dashboard(url, tmp_path)
    try:
        browser.set_window_size(1280, 900)
        browser.get(d.base + f"/#/sweep/{sweep.id}")
        until(lambda: len(browser.find_elements("css selector", "#sweep-board tbody tr")) == trials, 60,
              what=f"{trials} rows")
        chart = browser.find_element("css selector", "#sweep-chart-step")
        until(lambda: int(chart.get_attribute("data-points") or 0) == 4 * trials, 60,
              what=f"4 points on each of {trials} curves")
        assert chart.get_attribute("data-legend") == "false"
        assert not browser.find_elements("css selector", "#sweep-chart-step .u-legend tr.u-series")
        board_top = browser.execute_script("return document.querySelector('#sweep-board').getBoundingClientRect().top")
        assert board_top < 900, board_top  # before: ~750 px of legend per chart above it
        browser.save_screenshot(str(tmp_path / f"sweep-{trials}.png"))
    finally:
        d.stop()


def test_a_pbt_sweep_page_draws_each_trials_lineage(tmp_path, browser):
    """Population based training's page: no add-trials control (a fixed population) and a lineage
    picture: a lane per trial, each copy drawn from the donor's lane into the taker's."""
    url, sweep_id, workers, d = swept(tmp_path, "--name", "family", "--flag", "lr_warmup=1", "--schedule", "pbt",
                                      "--population", "4", "--interval", "10", "--budget", "30", "--sampler", "grid",
                                      "--search", "learning_rate=3e-3,1e-3,1e-4,1e-5", "--seed", "3")
    try:
        wait_for(url, sweep_id, ["succeeded"], timeout=300)
        browser.get(d.base + f"/#/sweep/{sweep_id}")
        until(lambda: "population based training" in browser.page_source, what="the schedule said")
        until(lambda: browser.find_element("css selector", "#sweep-lineage").get_attribute("data-copies") == "2",
              what="two copies on the lineage picture")
        lanes = "return document.querySelector('#sweep-lineage').__plot.series.length"
        assert until(lambda: browser.execute_script(lanes), what="the lanes") == 5  # x and a lane per trial
        assert browser.find_element("css selector", "#sweep-lineage canvas").is_displayed()
        assert not browser.find_element("css selector", "#sweep-add").is_displayed()
    finally:
        workers.stop_all()
        d.stop()
