"""Progress rows are written beside training, never in its way (tracker.py's progress writer)."""

from __future__ import annotations

import threading

from errors import RecordError
from tracker import Tracker


class _Records:
    """Records that hold the first progress write until released, and log every write in order."""

    def __init__(self, *, hold_first: bool = False, fail: bool = False):
        self.writes: list[tuple[str, object]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.hold_first, self.fail = hold_first, fail

    def upsert_progress(self, job_id, row):
        self.entered.set()
        if self.hold_first and not self.writes:
            assert self.release.wait(10), "the test never released the write"
        self.writes.append(("progress", row.current_step))
        if self.fail:
            raise RecordError("Supabase answered HTTP 503")

    def upsert_job(self, job_id, row):
        self.writes.append(("final", row))


def _step(tracker: Tracker, step: int) -> None:
    tracker.send({"stage": "train", "progress": 0.5, "step": step, "total_steps": 100}, force=True)


def test_a_hanging_records_service_never_holds_up_a_training_step():
    records = _Records(hold_first=True)
    notified = []
    tracker = Tracker("job", records, notified.append, interval_s=0)
    _step(tracker, 1)
    assert records.entered.wait(10)  # the writer is now stuck in the service
    for step in range(2, 101):  # every send returns while the first write still hangs
        _step(tracker, step)
    assert len(notified) == 100  # RunPod got every update
    records.release.set()
    tracker.close()
    # the first row, then at most the newest of the 99 that waited: never a backlog of 99
    steps = [step for kind, step in records.writes]
    assert steps[0] == 1 and len(steps) <= 2 and (len(steps) == 1 or steps[1] == 100), steps


def test_no_progress_row_lands_after_close():
    records = _Records(hold_first=True)
    tracker = Tracker("job", records, None, interval_s=0)
    _step(tracker, 1)
    assert records.entered.wait(10)
    _step(tracker, 2)  # waiting behind the held write when the job ends
    closer = threading.Thread(target=tracker.close)
    closer.start()
    records.release.set()
    closer.join(10)
    records.upsert_job("job", "final row")
    _step(tracker, 3)  # a late callback after the job ended
    assert records.writes[-1] == ("final", "final row"), records.writes
    assert ("progress", 3) not in records.writes
    assert not any(t.name == "progress-job" and t.is_alive() for t in threading.enumerate())


def test_after_a_failed_write_the_next_rows_wait_for_the_pause(caplog):
    records = _Records(fail=True)
    tracker = Tracker("job", records, None, interval_s=0)
    _step(tracker, 1)
    assert records.entered.wait(10)
    tracker.close()  # the failed write has finished: close waited for it
    tracker2 = Tracker("job", records, None, interval_s=0)
    _step(tracker2, 1)
    for step in range(2, 50):
        _step(tracker2, step)
    tracker2.close()
    assert len([w for w in records.writes if w[0] == "progress"]) <= 3, records.writes
    assert "progress record not written (the next try in 60s)" in caplog.text


def test_a_tracker_without_records_starts_no_thread():
    before = {t.ident for t in threading.enumerate()}
    tracker = Tracker("job", None, None, interval_s=0)
    _step(tracker, 1)
    tracker.close()
    assert {t.ident for t in threading.enumerate()} == before
