"""Issue 13, findings 6 and 7: job_id is an idempotency key, and two live deliveries never collide."""

from __future__ import annotations

import pytest

import handler
from storage.records import SqliteRecords
from tests.conftest import small_job


def _no_training(monkeypatch):
    import train_lora

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train_lora, "train_lora", refuse)


def _job(**overrides) -> dict:
    return {"id": "rp", "input": small_job(job_id="idem", **overrides)}


def test_a_resent_succeeded_job_reads_its_dataset_once(volume, monkeypatch):
    """The request is compared before the row changes and again with the stored artifact: one read."""
    import dataset_loader

    first = handler.handler(_job())
    assert first["status"] == "succeeded", first
    reads = []
    real = dataset_loader.read_dataset

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_loader, "read_dataset", counted)
    _no_training(monkeypatch)
    again = handler.handler(_job())
    assert again["status"] == "succeeded" and again["adapter"] == first["adapter"], again
    assert len(reads) == 1, reads


def test_the_same_request_returns_the_stored_result_and_a_different_one_is_refused(volume, monkeypatch):
    first = handler.handler(_job())
    assert first["status"] == "succeeded", first

    monkeypatch.setattr("pipeline._train_into", lambda *a, **k: pytest.fail("trained again"))
    again = handler.handler(_job())
    assert again["status"] == "succeeded" and again["adapter"] == first["adapter"], again

    other = handler.handler(_job(hyperparameters={"lora_r": 16, "epochs": 1}))
    assert other["error"].startswith("input: job_id 'idem' already succeeded"), other
    assert "hyperparameters.lora_r (8 then, 16 now)" in other["error"]
    assert "hyperparameters.epochs (2.0 then, 1.0 now)" in other["error"]

    moved = handler.handler(_job(output={"prefix": "elsewhere"}))  # one job_id owns one place
    assert moved["error"].startswith("input: job_id 'idem' already succeeded"), moved
    assert "output.prefix ('' then, 'elsewhere' now)" in moved["error"]

    # The user fixed the data at the same place and retried with the same id: told, not handed the old adapter.
    data = volume / "datasets" / "capitals.jsonl"
    data.write_text("\n".join(data.read_text().splitlines()[1:]) + "\n")
    fixed = handler.handler(_job())
    assert fixed["error"].startswith("input: job_id 'idem' already succeeded"), fixed
    assert "dataset sha256" in fixed["error"]
    row = SqliteRecords(volume / "records.sqlite3").get_job("idem")
    assert row["status"] == "succeeded" and row["error"] is None  # the refusal leaves the job as it was


def test_a_failed_job_sent_again_with_another_request_starts_over(volume, monkeypatch):
    import storage.artifacts
    from errors import StorageError

    real = storage.artifacts.LocalArtifactStore.put

    def down(self, *a, **k):
        raise StorageError("the store is down")

    monkeypatch.setattr(storage.artifacts.LocalArtifactStore, "put", down)
    failed = handler.handler(_job())
    assert failed["error"].startswith("upload: the store is down"), failed
    assert (volume / "jobs" / "idem" / "adapter" / "manifest.json").is_file()  # trained, kept

    monkeypatch.setattr(storage.artifacts.LocalArtifactStore, "put", real)
    retried = handler.handler(_job(hyperparameters={"lora_r": 4}))
    assert retried["status"] == "succeeded", retried
    assert retried["lora"]["r"] == 4  # trained anew, not the kept rank-8 adapter


# --- finding 7: two live deliveries of one job_id ---------------------------------------------------


def _hold_first_training(monkeypatch):
    """The first delivery stops at its first training step until released."""
    import threading

    import pipeline

    started, release = threading.Event(), threading.Event()
    real = pipeline.Tracker.on_train_progress

    def held(self, event):
        if not started.is_set():
            started.set()
            assert release.wait(120)
        real(self, event)

    monkeypatch.setattr(pipeline.Tracker, "on_train_progress", held)
    return started, release


@pytest.mark.parametrize("wait_s, second_answer", [("0.5", "running"), ("120", "stored")])
def test_a_second_live_delivery_never_touches_the_first(volume, monkeypatch, wait_s, second_answer):
    import threading

    monkeypatch.setenv("JOB_LOCK_TIMEOUT_S", wait_s)
    handler.get_settings.cache_clear()
    started, release = _hold_first_training(monkeypatch)
    results: dict[str, dict] = {}
    first = threading.Thread(target=lambda: results.__setitem__("first", handler.handler(_job())))
    first.start()
    assert started.wait(120)
    second = threading.Thread(target=lambda: results.__setitem__("second", handler.handler(_job())))
    second.start()
    if second_answer == "running":
        second.join(60)
        assert results["second"]["error"].startswith("train: job_id 'idem' is already running"), results
        row = SqliteRecords(volume / "records.sqlite3").get_job("idem")
        assert row["status"] == "running" and row["error"] is None  # the first's row, untouched
    release.set()
    first.join(120)
    second.join(120)
    assert results["first"]["status"] == "succeeded", results["first"]
    if second_answer == "stored":
        assert results["second"]["status"] == "succeeded", results["second"]
        assert results["second"]["adapter"] == results["first"]["adapter"]
    row = SqliteRecords(volume / "records.sqlite3").get_job("idem")
    assert row["status"] == "succeeded" and row["error"] is None and row["stage"] == "done"


def test_a_success_clears_an_error_written_while_it_ran(volume, monkeypatch):
    """Whatever wrote an error meanwhile (an older worker, a lost write), the final row is the final state."""
    started, release = _hold_first_training(monkeypatch)
    import threading

    results = {}
    first = threading.Thread(target=lambda: results.__setitem__("first", handler.handler(_job())))
    first.start()
    assert started.wait(120)
    records = SqliteRecords(volume / "records.sqlite3")
    records.upsert_job("idem", {"error": "train: unexpected FileNotFoundError", "status": "failed"})
    release.set()
    first.join(120)
    assert results["first"]["status"] == "succeeded", results
    row = records.get_job("idem")
    assert (row["status"], row["error"], row["progress"]) == ("succeeded", None, 1.0)
