"""The job registry's rules, against both backends (real Redis, a real SQLite file)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from tlm_worker.queue import Queue
from tlm_worker.registry import MAX_LOG_LINES, JobNotFound, LeaseLost, Registry, RunBusy

from queue_helpers import tlm


REDIS_DB = 13


@pytest.fixture
def reg(url) -> Registry:
    return Registry(Queue(url))


def test_each_store_implements_the_store_protocol_and_the_registry_only_uses_it(reg):
    """The rules live in the registry; a store offers the protocol's primitives, no more: a
    primitive missing, renamed, or called by the registry outside the protocol fails here."""
    import ast
    import inspect

    import tlm_worker.registry as registry
    from tlm_worker.registry import Store

    protocol = {n: inspect.signature(f) for n, f in vars(Store).items()
                if callable(f) and not n.startswith("_")}
    store = type(reg.store)
    assert {n for n, f in vars(store).items() if callable(f) and not n.startswith("_")} == set(protocol)
    for name, signature in protocol.items():
        assert list(inspect.signature(getattr(store, name)).parameters) == list(signature.parameters), name
    used = {node.attr for node in ast.walk(ast.parse(inspect.getsource(registry)))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "store"}
    assert used <= set(protocol), used - set(protocol)


def test_create_get_by_prefix_and_update(reg):
    job = reg.create("eval", {"save_dir": "/x"}, "dir:/x")
    assert reg.get(job.id[:5]).id == job.id
    reg.update(job.id, progress={"step": 3})
    assert reg.get(job.id).progress == {"step": 3}
    assert reg.queue.pending("interactive") == {job.id}
    with pytest.raises(JobNotFound, match="no job 'zz'"):
        reg.get("zz")


def test_an_ambiguous_prefix_says_how_many_match(reg):
    ids = {reg.create("sample", {"prompt": "", "sampling": {}}, "dir:/x").id for _ in range(40)}
    first_chars = [i[0] for i in ids]
    shared = max(set(first_chars), key=first_chars.count)
    with pytest.raises(JobNotFound, match=f"job prefix '{shared}' matches 2 jobs"):
        reg.get(shared)  # (2: the lookup stops counting at two)


def test_one_live_trainer_per_run_even_when_submitted_at_once(url):
    errors, created = [], []

    def submit():
        try:
            created.append(Registry(Queue(url)).create("train", {}, "run:a"))
        except RunBusy as e:
            errors.append(e.job.id)
    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 1 and errors == [created[0].id] * 5
    reg = Registry(Queue(url))
    reg.create("sample", {"prompt": "", "sampling": {}}, "run:a")  # other kinds are not exclusive
    assert reg.cancel(created[0].id) is True  # queued: ends at once
    assert reg.get(created[0].id).state == "cancelled"
    assert reg.create("train", {}, "run:a").state == "queued"


def test_exactly_one_of_many_concurrent_claims_wins(url):
    job = Registry(Queue(url)).create("train", {}, "run:a")
    won = []

    def claim(i):
        got = Registry(Queue(url)).claim(job.id, f"w{i}")
        if got:
            won.append(got)
    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    record = Registry(Queue(url)).get(job.id)
    assert record.state == "running" and record.fence == 1 and record.attempts == 1
    assert record.worker == won[0].worker


def test_transitions_are_fenced(reg):
    job = reg.create("train", {}, "run:a")
    held = reg.claim(job.id, "w1")
    assert reg.claim(job.id, "w2") is None  # a duplicate delivery
    assert reg.requeue(job.id, held.fence, "worker stopped", interrupted=True)
    again = reg.claim(job.id, "w2")
    assert again.fence == held.fence + 2  # the requeue voided fence 1, the claim took 3
    with pytest.raises(LeaseLost):
        reg.check_fence(job.id, held.fence)
    # The old holder can neither end it nor write its final line (one change, one step).
    assert reg.finish(job.id, "succeeded", held.fence, log="succeeded at iteration 40") is None
    assert reg.get(job.id).state == "running"
    assert not any("succeeded" in line for line in reg.logs(job.id)[0])
    assert reg.finish(job.id, "succeeded", again.fence, log="succeeded at iteration 40").state == "succeeded"
    assert reg.logs(job.id)[0][-1].endswith(" succeeded at iteration 40")
    assert reg.finish(job.id, "failed", log="failed: late") is None  # final stays final
    assert sum("iteration 40" in line or "late" in line for line in reg.logs(job.id)[0]) == 1


def test_a_paused_trial_holds_its_run_is_promoted_once_and_a_cancel_or_prune_never_loses_it(reg):
    """Issue 39: a trial that pauses at a rung keeps its run (one trainer), its checkpoint and its
    record (a prune takes only ended jobs); its old holder is voided; a promotion queues it once;
    a cancel ends it at once; one asked to stop while it ran ends cancelled, not paused."""
    job = reg.create("train", {}, "run:a")
    held = reg.claim(job.id, "w1")
    paused = reg.finish(job.id, "paused", held.fence, log="paused at iteration 5", checkpoint="c" * 40)
    assert paused.state == "paused" and paused.worker is None and paused.fence == held.fence + 1
    assert paused.checkpoint == "c" * 40 and paused.worked >= 0 and paused.worker_time(reg.now()) == paused.worked
    assert reg.finish(job.id, "succeeded", held.fence) is None  # the old holder is voided
    with pytest.raises(RunBusy):
        reg.create("train", {}, "run:a")  # the paused trial still holds its run
    assert reg.prune(0) == 0 and reg.get(job.id).state == "paused"
    assert job.id in {j.id for j in reg.jobs(None)}  # listed with the live jobs
    assert reg.claim(job.id, "w2") is None  # not claimable until promoted
    assert reg.promote(job.id).state == "queued" and reg.promote(job.id) is None  # queued once
    assert list(reg.queue.pending("train")).count(job.id) == 1
    again = reg.claim(job.id, "w2")
    assert again.fence == paused.fence + 1 and again.attempts == held.attempts + 1
    assert reg.finish(job.id, "paused", again.fence).state == "paused"
    assert reg.cancel(job.id) is True and reg.get(job.id).state == "cancelled"  # a paused job ends at once
    assert reg.promote(job.id) is None
    other = reg.create("train", {}, "run:b")
    running = reg.claim(other.id, "w1")
    reg.cancel(other.id)  # asked to stop while it runs, then it reaches a rung
    assert reg.finish(other.id, "paused", running.fence).state == "cancelled"


def test_interruptions_do_not_use_up_attempts_but_crashes_do(reg):
    job = reg.create("train", {}, "run:a")
    for _ in range(3):
        held = reg.claim(job.id, "w")
        reg.requeue(job.id, held.fence, "stopped", interrupted=True)
    held = reg.claim(job.id, "w")
    assert (held.attempts, held.interruptions) == (1, 3)
    reg.requeue(job.id, held.fence, "crashed", interrupted=False)
    held = reg.claim(job.id, "w")
    assert (held.attempts, held.interruptions) == (2, 3)
    assert "re-queued: crashed" in reg.logs(job.id)[0][-1]


def test_cancelling_a_running_job_asks_it_and_an_interrupted_one_ends_at_claim(reg):
    job = reg.create("train", {}, "run:a")
    held = reg.claim(job.id, "w")
    assert reg.cancel(job.id) is False and reg.get(job.id).cancel == "stop"
    reg.requeue(job.id, held.fence, "worker stopped", interrupted=True)  # before it saw it
    assert reg.claim(job.id, "w") is None
    assert reg.get(job.id).state == "cancelled"


def test_logs_are_capped_and_read_after_a_cursor(reg):
    job = reg.create("train", {}, "run:a")
    for i in range(MAX_LOG_LINES + 10):
        reg.log(job.id, f"line {i}")
    lines, cursor = reg.logs(job.id)
    assert len(lines) == MAX_LOG_LINES and lines[0].endswith("line 10")
    assert reg.logs(job.id, cursor) == ([], cursor)
    reg.log(job.id, "more")
    lines, _ = reg.logs(job.id, cursor)
    assert len(lines) == 1 and lines[0].endswith("more")


def test_listing_reads_live_jobs_and_the_latest_finished(reg):
    done = []
    for i in range(30):
        job = reg.create("eval", {}, f"run:r{i % 3}")
        held = reg.claim(job.id, "w")
        reg.finish(job.id, "succeeded" if i % 2 else "failed", held.fence)
        done.append(job.id)
    live = reg.create("train", {}, "run:r0")
    listed = [j.id for j in reg.jobs(5)]
    assert listed == done[-5:] + [live.id]  # oldest first
    assert [j.id for j in reg.jobs(0)] == [live.id]
    assert len(reg.jobs(None)) == 31
    assert {j.state for j in reg.jobs(100, state="failed")} == {"failed"}
    assert len(reg.jobs(100, state="failed")) == 15
    assert [j.id for j in reg.jobs(2, run="run:r0")] == [done[24], done[27], live.id]
    assert [j.id for j in reg.jobs(0, run="run:r0") if j.kind == "train"] == [live.id]
    assert [j for j in reg.jobs(0, run="run:r1") if j.kind == "train"] == []


def test_prune_forgets_the_summaries_of_runs_no_job_is_left_of(reg):
    """Issue 42: `tlm runs` listed pruned runs (their summaries outlived every job of them)."""
    for run in ("run:gone", "run:kept"):
        job = reg.create("train", {}, run)
        reg.finish(job.id, "succeeded", reg.claim(job.id, "w").fence,
                   progress={"step": 5, "best_valid": [2.0, 5, 1.0]})
    reg.create("train", {}, "run:kept")  # still queued: its run keeps its summary

    def summarized() -> set:
        return {row["key"] for row in reg.run_summaries()[0]}
    assert summarized() == {"run:gone", "run:kept"}
    time.sleep(0.05)
    assert reg.prune(older_than_days=0) == 2
    assert summarized() == {"run:kept"}


def test_prune_takes_the_wake_ups_of_ended_and_deleted_jobs_with_them(reg):
    """Issue 42: wake-ups naming deleted jobs outlived them (26-54 after a prune), and a job
    claimed from the lane's head, not popped, left its wake-up behind."""
    ended = reg.create("eval", {}, "run:a")
    reg.finish(ended.id, "succeeded", reg.claim(ended.id, "w").fence)
    cancelled = reg.create("train", {}, "run:b")
    reg.cancel(cancelled.id)
    time.sleep(0.3)
    young = reg.create("eval", {}, "run:c")
    reg.finish(young.id, "failed")  # ended, but younger than the retention: its record stays
    queued, running = reg.create("train", {}, "run:d"), reg.create("eval", {}, "run:e")
    reg.claim(running.id, "w")
    assert reg.queue.pending("interactive") == {ended.id, young.id, running.id}
    assert reg.prune(older_than_days=0.2 / 86400) == 2  # ended and cancelled deleted
    assert reg.queue.pending("train") == {queued.id}
    assert reg.queue.pending("interactive") == {running.id}  # it may be given back to the queue
    assert reg.get(young.id).state == "failed"


def test_finished_jobs_page_back_by_a_cursor_that_ties_and_new_endings_do_not_shift(reg):
    """Issue 42: paging back was an offset (1.6-4.0 s at 5,000 back); now a keyset cursor,
    (finish time, id) of a page's oldest job. One cancel ends a chain at one time (a tie)."""
    ended = []
    for _ in range(4):
        job = reg.create("eval", {}, "run:a")
        reg.finish(job.id, "succeeded", reg.claim(job.id, "w").fence)
        ended.append(job.id)
    head = reg.create("train", {}, "run:b")
    chain = [reg.create("eval", {}, "run:b", after=head.id).id for _ in range(4)]
    reg.cancel(head.id)  # the head and its four followers end at one time
    ended += [head.id, *chain]
    newest_first = [j.id for j in sorted(reg.find(ended), key=lambda j: (j.finished, j.id), reverse=True)]
    seen, after = [], None
    while True:
        page = [j for j in reg.jobs(3, after=after) if j.state in ("succeeded", "cancelled")]
        if not page:
            break
        oldest = min(page, key=lambda j: (j.finished, j.id))
        seen += [j.id for j in sorted(page, key=lambda j: (j.finished, j.id), reverse=True)]
        if after is None:  # jobs ending now do not shift the pages further back
            for _ in range(2):
                reg.finish(reg.create("eval", {}, "run:c").id, "failed")
        after = (oldest.finished, oldest.id)
    assert seen == newest_first and len(set(reg.get(i).finished for i in chain)) == 1


def test_prune_deletes_old_finished_jobs_and_their_logs_only(reg, url):
    old = reg.create("eval", {}, "run:a")
    reg.finish(old.id, "succeeded", reg.claim(old.id, "w").fence)
    reg.log(old.id, "old line")
    live = reg.create("train", {}, "run:a")
    time.sleep(0.05)
    assert reg.prune(older_than_days=0) == 1
    with pytest.raises(JobNotFound):
        reg.get(old.id)
    assert reg.logs(old.id)[0] == []
    assert reg.get(live.id).state == "queued" and reg.jobs(None) == [reg.get(live.id)]
    assert [j.id for j in reg.jobs(None, run="run:a")] == [live.id]
    if url.startswith("redis"):  # finished records also expire on their own
        young = reg.create("eval", {}, "run:b")
        reg.finish(young.id, "failed")
        ttl = redis.Redis.from_url(url).ttl(f"tlm:job:{young.id}")
        assert 30 * 86400 < ttl <= 31 * 86400


def test_tlm_prune_command(url):
    reg = Registry(Queue(url))
    job = reg.create("eval", {}, "run:a")
    reg.finish(job.id, "failed")
    proc = tlm("prune", "--older_than", "0", "--queue", url)
    assert proc.returncode == 0 and "deleted 1 finished job(s)" in proc.stderr
    assert reg.jobs(None) == []


def test_records_of_the_previous_release_are_migrated_once(url):
    """tlm 0.1 kept jobs in huey's result store; the first registry opened moves them."""
    storage = Queue(url).storage
    old = {"id": "0123456789ab", "kind": "train", "params": {"num_iters": 5}, "run": "run:old",
           "state": "succeeded", "worker": "w", "attempts": 1, "fence": 1, "created": 100.0,
           "started": 101.0, "finished": 102.0, "progress": {"step": 5, "total": 5}, "checkpoint": "c" * 40,
           "error": None, "result": {"step": 5}}
    queued = {**old, "id": "ba9876543210", "state": "queued", "finished": None, "attempts": 0,
              "run": "run:new"}
    for job in (old, queued):
        storage.put_data(f"job:{job['id']}", json.dumps(job).encode())
    storage.put_data(f"log:{old['id']}", json.dumps(["10:00:00 iter 5/5"]).encode())
    storage.put_data(f"fence:{old['id']}", b"1")
    reg = Registry(Queue(url))
    assert storage.result_store_size() == 0
    assert reg.get(old["id"]).checkpoint == "c" * 40
    assert reg.logs(old["id"])[0] == ["10:00:00 iter 5/5"]
    assert reg.get(queued["id"]).interruptions == 0
    with pytest.raises(RunBusy):  # the migrated queued trainer still holds its run
        reg.create("train", {}, "run:new")
    assert reg.claim(queued["id"], "w").state == "running"
    proc = tlm("status", "--queue", url)
    assert proc.returncode == 0 and old["id"] in proc.stdout


def test_workers_are_listed_until_they_sign_off(reg):
    reg.heartbeat_worker("w1", {"host": "h", "pid": 1, "device": "cpu", "jobs": []})
    assert [w["id"] for w in reg.workers()] == ["w1"]
    reg.remove_worker("w1")
    assert reg.workers() == []


def test_metric_points_travel_with_the_job_and_go_with_it(reg):
    job = reg.create("train", {}, "run:a")
    for step in (10, 20):
        reg.add_point(job.id, {"kind": "train", "step": step, "loss": 5.0 - step / 10})
    points, cursor = reg.points(job.id)
    assert [p["step"] for p in points] == [10, 20] and reg.points(job.id, cursor)[0] == []
    reg.finish(job.id, "cancelled")
    reg.prune(0)
    assert reg.points(job.id)[0] == []


def test_a_follower_wakes_when_another_process_changes_a_job(url):
    reg, other = Registry(Queue(url)), Registry(Queue(url))
    job = reg.create("train", {}, "run:a")
    with reg.changes() as wait:
        threading.Timer(0.3, lambda: other.log(job.id, "hello")).start()
        tic = time.monotonic()
        wait(10)
        assert time.monotonic() - tic < 5


def test_a_gang_is_gathered_not_claimed_and_starts_when_its_last_place_is_taken(reg):
    gang = reg.create("train", {"nodes": 3}, "run:g")
    assert reg.queue.pending("train") == set()  # gathered through the registry, not popped
    assert reg.claim(gang.id, "w1") is None
    place = lambda port: {"address": "10.0.0.1", "port": port}  # noqa: E731
    now = time.time()
    assert reg.reserve(gang.id, "w1", place(1), now + 60).members[0]["worker"] == "w1"
    reg.reserve(gang.id, "gone", place(2), now - 1)  # a place that has expired
    job = reg.reserve(gang.id, "w2", place(3), now + 60)
    assert job.state == "queued" and [m["worker"] for m in job.members] == ["w1", "w2"]
    reg.withdraw(gang.id, "w2")
    reg.reserve(gang.id, "w1", place(1), now + 60)  # a refresh keeps w1's rank
    assert reg.reserve(gang.id, "w3", place(1), now + 60) is None  # w1's address and port
    reg.reserve(gang.id, "w3", place(4), now + 60)
    job = reg.reserve(gang.id, "w2", place(3), now + 60)
    assert job.state == "running" and job.fence == 1 and job.worker == "w1"
    assert [(m["worker"], m["port"]) for m in job.members] == [("w1", 1), ("w3", 4), ("w2", 3)]
    assert reg.reserve(gang.id, "w4", place(5), now + 60) is None  # it no longer waits


def test_a_gang_member_sees_when_its_gang_is_over_elsewhere(reg):
    gang = reg.create("train", {"nodes": 2}, "run:g")
    for port, w in enumerate(("w1", "w2")):
        job = reg.reserve(gang.id, w, {"address": "127.0.0.1", "port": port}, time.time() + 60)
    time.sleep(0.01)
    beat = reg.heartbeat_member(gang.id, "w2", job.fence)
    assert beat.heartbeat == job.members[0]["heartbeat"] < beat.members[1]["heartbeat"]
    reg.requeue(gang.id, job.fence, "rank 1 died", interrupted=False)
    assert reg.heartbeat_member(gang.id, "w1", job.fence) is None
    again = reg.get(gang.id)
    assert again.state == "interrupted" and again.members == [] and again.attempts == 1
    assert reg.queue.pending("train") == set()


def test_waiting_gangs_are_offered_oldest_first_and_a_cancel_ends_one(reg):
    first = reg.create("train", {"nodes": 2}, "run:a")
    reg.create("train", {}, "run:b")
    second = reg.create("train", {"nodes": 4}, "run:c")
    assert [g.id for g in reg.waiting_gangs()] == [first.id, second.id]
    reg.update(first.id, cancel="stop")  # asked while it ran; it was re-queued since
    assert reg.reserve(first.id, "w1", {"address": "127.0.0.1", "port": 1}, time.time() + 60).state == "cancelled"
    assert [g.id for g in reg.waiting_gangs()] == [second.id]


def test_a_worker_record_from_the_future_and_a_log_line_that_is_not_utf8(reg, url):
    now = time.time()
    reg.heartbeat_worker("ok", {"host": "h", "pid": 1, "device": "cpu", "jobs": []})
    reg.store.put_worker("ahead", {"id": "ahead", "heartbeat": now + 10**7, "host": "h", "jobs": []})
    assert [w["id"] for w in reg.workers()] == ["ok"]  # not counted as live
    proc = tlm("status", "--queue", url)
    assert proc.returncode == 0 and "-9999" not in proc.stdout
    job = reg.create("eval", {}, "run:a")
    reg.log(job.id, "a line")
    if url.startswith("redis"):
        r = redis.Redis.from_url(url)
        r.rpush(f"tlm:lines:log:{job.id}", b"2\x1f\xff\xfe not utf-8")
        reg.log(job.id, "after it")
        lines = tlm("logs", job.id, "--queue", url)
        assert lines.returncode == 0 and "a line" in lines.stdout and "after it" in lines.stdout
        old = reg.create("eval", {}, "run:a")  # a job whose log an earlier layout kept in a stream
        r.xadd(f"tlm:log:{old.id}", {"l": b"an old line \xff"})
        assert tlm("logs", old.id, "--queue", url).stdout.startswith("an old line")


def test_a_log_is_capped_numbered_and_read_after_its_cursor_on_both_stores(reg):
    from tlm_worker.registry import STREAMS
    job = reg.create("eval", {}, "run:capped")
    reg.store.append(job.id, "log", [f"line {i}" for i in range(STREAMS["log"] + 5)])
    lines, cursor = reg.logs(job.id)
    assert len(lines) == STREAMS["log"] and lines[0] == "line 5" and lines[-1] == f"line {STREAMS['log'] + 4}"
    reg.store.append(job.id, "log", ["one more"])
    assert reg.logs(job.id, cursor) == (["one more"], reg.logs(job.id, cursor)[1])
    assert reg.logs(job.id, reg.logs(job.id, cursor)[1])[0] == []


def test_a_deep_chain_settles_when_its_root_fails_and_a_planted_cycle_cancels(reg):
    root = reg.create("train", {"save_dir": "/x"}, "dir:/x")
    chain = [root]
    for _ in range(300):  # deep enough that settling it by recursion passed Python's limit of 1,000 frames
        chain.append(reg.create("eval", {"save_dir": "/x"}, "dir:/x", after=chain[-1].id))
    assert reg.finish(root.id, "failed").state == "failed"  # before: RecursionError, followers left waiting
    states = {j.state for j in reg.find([j.id for j in chain[1:]])}
    assert states == {"skipped"}
    a = reg.create("train", {"save_dir": "/y"}, "dir:/y")
    b = reg.create("eval", {"save_dir": "/y"}, "dir:/y", after=a.id)
    c = reg.create("eval", {"save_dir": "/y"}, "dir:/y", after=b.id)
    reg.store.set_fields(c.id, {"followers": [b.id]})  # edited records: b waits on c waits on b
    assert reg.cancel(a.id) is True  # before: RecursionError
    assert reg.get(a.id).state == "cancelled"
    assert {j.state for j in reg.find([b.id, c.id])} <= {"cancelled", "skipped"}
    deep = [reg.create("train", {"save_dir": "/w"}, "dir:/w")]
    for _ in range(50):
        deep.append(reg.create("eval", {"save_dir": "/w"}, "dir:/w", after=deep[-1].id))
    reg.cancel(deep[0].id)
    assert {j.state for j in reg.find([j.id for j in deep])} == {"cancelled"}


def test_a_follower_waits_a_grace_for_a_parent_whose_record_vanished(reg):
    parent = reg.create("train", {"save_dir": "/z"}, "dir:/z")
    follower = reg.create("eval", {"save_dir": "/z"}, "dir:/z", after=parent.id)
    record = reg.get(parent.id).to_record()
    _forget(reg, parent.id)
    reg.waiting_for_parents(grace=60)
    assert reg.get(follower.id).state == "waiting"  # its parent's worker may put it back
    reg.store.insert(record, exclusive=False)  # ... as it does (Registry.restore)
    reg.waiting_for_parents(grace=60)
    assert reg.get(follower.id).state == "waiting" and "parent_gone_since" not in reg.get(follower.id).progress
    _forget(reg, parent.id)
    reg.waiting_for_parents(grace=0)
    reg.waiting_for_parents(grace=0)
    ended = reg.get(follower.id)
    assert ended.state == "skipped" and f"job {parent.id} is gone" in ended.error


def _forget(reg, job_id: str) -> None:
    """The record lost (a Redis restarted empty, a file restored from a backup)."""
    if reg.queue.redis is not None:
        reg.queue.redis.delete(f"tlm:job:{job_id}")
    else:
        reg.store.db.execute("DELETE FROM tlm_job WHERE id = ?", (job_id,))


def test_prune_keeps_a_live_sweeps_trials_and_takes_an_ended_ones_study_with_it(reg, tmp_path):
    from tlm_worker import sweeps
    spec = sweeps.SweepSpec(name="kept", search={"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                                   "log": True}},
                            base={"dim": 32, "num_heads": 2, "num_blocks": 1, "context_size": 16,
                                  "steps_per_eval": 5}, trials=2, parallel=1, budget="20", prune="none")
    sweep = sweeps.submit(reg, spec)
    first = sweeps.trials(reg, sweep)[0]
    reg.finish(first.id, "succeeded")
    assert reg.prune(0) == 0 and reg.get(first.id).state == "succeeded"  # before: pruned, then re-created
    sweeps.reconcile(reg, sweep.id)
    assert [t.sweep["trial"] for t in sweeps.trials(reg, reg.get(sweep.id))] == [0, 1]
    reg.cancel(sweep.id)
    sweeps.reconcile(reg, sweep.id)
    assert reg.get(sweep.id).state == "cancelled"
    journal = (lambda: reg.queue.redis.keys(f"tlm:optuna:{sweep.id}:*")) if reg.queue.redis is not None \
        else (lambda: [p for p in [sweeps._journal_file(reg, sweep.id)] if p.exists()])
    assert journal()
    assert reg.prune(0) == 3 and reg.jobs(None) == [] and not journal()


def test_expired_records_leave_no_id_in_any_index_after_a_prune(reg):
    jobs = [reg.create("eval", {"run": "x"}, f"run:x{i % 3}") for i in range(9)]
    for job in jobs:
        reg.cancel(job.id)
    for job in jobs[:5]:
        _forget(reg, job.id)  # expired (Redis: the TTL a day after a prune would have taken it)
    reg.prune(0)
    if reg.queue.redis is not None:
        r = reg.queue.redis
        for key in ["tlm:finished", "tlm:ids", "tlm:trainers", *r.keys("tlm:run:*")]:
            assert not r.zrange(key, 0, -1), key
    assert reg.store.finished_before(reg.now() + 1) == [] and reg.jobs(None) == []


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_sqlite_gives_space_back_after_a_prune(reg, url):
    import os
    path = url[len("sqlite://"):]
    for i in range(600):
        job = reg.create("eval", {"run": "x", "pad": "x" * 2000}, f"run:x{i}")
        reg.cancel(job.id)
    full = os.path.getsize(path)
    assert reg.prune(0) == 600
    reg.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert os.path.getsize(path) < full / 4, (os.path.getsize(path), full)


def test_runs_are_summarized_as_their_jobs_end_and_listed_a_page_at_a_time(reg, tmp_path):
    from tlm_worker.runs import runs_table
    for i, best in enumerate([4.0, 3.0, 5.0, None, 3.5]):
        job = reg.create("train", {"save_dir": f"/r{i}"}, f"dir:/r{i}")
        held = reg.claim(job.id, "w")
        if best is not None:
            reg.update(job.id, progress={"step": 10, "total": 10, "best_valid": [best, 10, 60.0],
                                         "config": {"dataset": "ptb", "dim": 32}})
        reg.finish(job.id, "succeeded", held.fence)
    live = reg.create("train", {"save_dir": "/r1"}, "dir:/r1")  # a resume of r1, training now
    page, cursor = reg.run_summaries(None, 2)
    assert [r["run"] for r in page] == ["/r1", "/r4"] and cursor is not None
    rest, cursor = reg.run_summaries(cursor, 10)
    assert [r["run"] for r in rest] == ["/r0", "/r2", "/r3"] and reg.run_summaries(cursor, 10)[0] == []
    rows, more = runs_table(reg, str(tmp_path), limit=2)
    assert [r["run"] for r in rows] == ["/r1", "/r4"] and rows[0]["state"] == "queued" and rows[0]["jobs"] == 2
    assert more is not None
    rows, more = runs_table(reg, str(tmp_path), limit=2, cursor=more)
    assert "/r1" not in [r["run"] for r in rows]  # a live run is listed once, on the first page
    reg.cancel(live.id)
    assert reg.prune(0, keep_runs=True) == 6
    everything, more = runs_table(reg, str(tmp_path))  # the runs outlive their pruned jobs (retention)
    assert [r["run"] for r in everything] == ["/r1", "/r4", "/r0", "/r2", "/r3"] and more is None


def test_a_lab_set_up_by_a_newer_tlm_is_refused_in_one_line_and_an_older_one_is_upgraded(reg, url):
    import subprocess
    import sys
    from tlm_worker.registry import LAYOUT
    reg.store.set_value("layout", str(LAYOUT + 1))
    proc = tlm("status", "--queue", url)
    worker = subprocess.run([sys.executable, "-m", "tlm_worker.main", "--queue", url, "--burst"],
                            capture_output=True, text=True, timeout=60)
    for out in (proc, worker):
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"set up by a newer tlm (layout {LAYOUT + 1}; this tlm reads {LAYOUT}): upgrade tlm on this Mac" \
            in out.stderr.strip().splitlines()[-1], out.stderr
    reg.store.set_value("layout", str(LAYOUT - 1))
    Registry(Queue(url))
    assert reg.store.value("layout") == str(LAYOUT)
