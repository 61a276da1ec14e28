"""Faults injected for real into the worker's own code paths, for tests/test_faults*.py.

- Worker processes killed with SIGKILL at an exact point: ``run_child`` runs the real
  ``handler.handler`` in a fresh worker process (forked from a server that has imported the worker's
  modules and run nothing, so each child is a new worker without paying for the imports again). The
  fault (``"train:4"``) names where the child kills itself: a hook installed, in the child only, on
  the worker's own function at that point (``KILL_POINTS``). The child prints ``KILLED <where>`` just
  before the signal, so the parent knows the fault struck where it was aimed, not somewhere near it.
- A service that goes away, hangs or throttles: ``FaultProxy`` (tests/fault_proxy.py).
- A full disk: ``torn_write``, a write that puts part of its bytes on disk, then fails with ENOSPC.
- ``FaultFigures``: what the fault suite counts into build/reliability.json (RELIABILITY.md), and
  ``losses``, the checks whose failures are counted as data lost or duplicated.

Nothing here is imported by the worker: production code carries no test hook.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.reliability import count, plant_environment, scan, volume_texts

OUTPUT_PREFIX = "OUTPUT "
KILLED_PREFIX = "KILLED "
CHILD_TIMEOUT_S = 240


# --------------------------------------------------------------------------------------------------
# SIGKILL at an exact point, in a child process running the real handler


def _die(where: str) -> None:
    print(f"{KILLED_PREFIX}{where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after_checkpoint(step: str) -> None:
    """During training: right after checkpoint-<step> is complete (its marker written)."""
    from training.checkpoints import CheckpointKeeper

    real = CheckpointKeeper.mark

    def mark(self, at: int) -> None:
        real(self, at)
        if at == int(step):
            _die(f"train: checkpoint-{at} is complete")

    CheckpointKeeper.mark = mark


def _kill_during_checkpoint_save(step: str) -> None:
    """During the save of checkpoint-<step>: its adapter weights half on disk, nothing after them."""
    import peft.peft_model

    real = peft.peft_model.safe_save_file

    def save(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        path = Path(filename)
        if path.parent.name == f"checkpoint-{step}":
            with open(path, "r+b") as fh:  # what the page cache had flushed when the power went
                fh.truncate(path.stat().st_size // 2)
            _die(f"checkpoint: {path.parent.name}/{path.name} half written")

    peft.peft_model.safe_save_file = save


def _kill_during_upload(_: str) -> None:
    """During the upload: after the first file of the adapter's folder is stored, before the rest."""
    if os.environ.get("S3_BUCKET"):
        import storage.s3

        real = storage.s3.make_s3_client
        puts: list[int] = []

        def after_put(**_):
            puts.append(1)
            if len(puts) == 2:  # the owner claim (before training), then the first file of the upload
                _die("upload: 1 object of the job stored, the rest not")

        def make(settings, **kwargs):
            client = real(settings, **kwargs)
            client.meta.events.register("after-call.s3.PutObject", after_put)
            return client

        storage.s3.make_s3_client = make
        return
    import storage.artifacts

    real_copy = storage.artifacts.shutil.copy2
    copies: list[str] = []

    def copy2(src, dst, **kwargs):
        result = real_copy(src, dst, **kwargs)
        copies.append(str(dst))
        if len(copies) == 2:
            _die(f"upload: {len(copies)} files copied")
        return result

    storage.artifacts.shutil.copy2 = copy2


def _kill_during_record_write(_: str) -> None:
    """During the record stage: the artifact row committed, the job's final row not yet written."""
    from storage.records import SqliteRecords

    real = SqliteRecords.upsert_artifact

    def upsert(self, job_id, row):
        real(self, job_id, row)
        _die("record: the artifact row is written, the final job row is not")

    SqliteRecords.upsert_artifact = upsert


def _kill_after_start(_: str) -> None:
    """As the job starts: its lock held, its row 'running', before any model, data or file is touched."""
    import pipeline

    def train(*args, **kwargs):
        _die("start: the job lock is held and the row says running")

    pipeline._train = train


KILL_POINTS: dict[str, Callable[[str], None]] = {
    "train": _kill_after_checkpoint,
    "checkpoint": _kill_during_checkpoint_save,
    "upload": _kill_during_upload,
    "record": _kill_during_record_write,
    "start": _kill_after_start,
}


# What a worker has imported before its first job. The children are forked from a server that imported
# these once and ran nothing (multiprocessing's forkserver): each child is a fresh worker with no job
# state, without paying ~10 s of CPU to import torch again.
PRELOAD = ["torch", "transformers", "peft", "peft.peft_model", "trl", "boto3", "handler", "pipeline", "train_lora",
           "dataset_loader", "storage.s3", "storage.records", "training.checkpoints"]


def _context():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _enter_child(env: dict[str, str], log: str) -> None:
    """In the child: the test's environment, and stdout and stderr into ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)


def _deliver(fault: str | None, job: dict, env: dict[str, str], log: str) -> None:
    """One delivery of ``job`` through the real handler, killed at ``fault`` (if given)."""
    _enter_child(env, log)
    if fault:  # "train:4": the point, and what it needs to know (a step)
        point, _, arg = fault.partition(":")
        KILL_POINTS[point](arg)
    import handler

    output = handler.handler({"id": "child", "input": job})
    print(OUTPUT_PREFIX + json.dumps(output), flush=True)


def _deliver_twice_meanwhile(job: dict, env: dict[str, str], log: str) -> None:
    """A second worker delivering ``job`` while the first runs it: once with a short lock wait (told the
    job is running), then with a long one (waits, then answers the stored result). It must never train:
    a training attempt is an error. Each answer is printed as it comes."""
    _enter_child(env, log)
    import handler
    import pipeline
    from config.settings import WorkerSettings

    def no_training(*args, **kwargs):
        raise AssertionError("the second delivery trained")

    pipeline._train_into = no_training
    handler.configure_logging(WorkerSettings())
    for wait_s in (0.5, 120.0):
        output = handler.handler({"id": "second", "input": job}, settings=WorkerSettings(job_lock_timeout_s=wait_s))
        print(OUTPUT_PREFIX + json.dumps(output), flush=True)


@dataclass
class Child:
    """A child worker process and what it printed (stdout and stderr together, in ``log``)."""

    process: Any
    log: Path

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    @property
    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    @property
    def killed_at(self) -> str | None:
        lines = [line for line in self.text.splitlines() if line.startswith(KILLED_PREFIX)]
        return lines[-1].removeprefix(KILLED_PREFIX) if lines else None

    @property
    def outputs(self) -> list[dict]:
        return [json.loads(line.removeprefix(OUTPUT_PREFIX)) for line in self.text.splitlines()
                if line.startswith(OUTPUT_PREFIX)]

    def wait(self, timeout_s: float = CHILD_TIMEOUT_S) -> Child:
        self.process.join(timeout_s)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(10)
            pytest.fail(f"the child worker ran past {timeout_s:.0f}s:\n{self.text[-3000:]}")
        return self

    def explain(self) -> str:
        return f"exit code {self.returncode}; it printed:\n{self.text[-5000:]}"


def _start(target, log: Path, *args) -> Child:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PROGRESS_INTERVAL_S": "0"}
    log.parent.mkdir(parents=True, exist_ok=True)
    process = _context().Process(target=target, args=(*args, env, str(log)), daemon=True)
    process.start()
    return Child(process, log)


def run_child(job: dict, fault: str | None, log: Path) -> Child:
    """One delivery of ``job`` in a fresh worker process with the test's environment, killed at
    ``fault``; waits for it (bounded)."""
    return _start(_deliver, log, fault, job).wait()


def start_second_delivery(job: dict, log: Path) -> Child:
    """``_deliver_twice_meanwhile`` in a fresh worker process; not waited for."""
    return _start(_deliver_twice_meanwhile, log, job)


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 120.0, every_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def lock_is_free(path: Path) -> bool:
    """Whether an exclusive flock on ``path`` can be taken now (then released at once)."""
    import fcntl

    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
    return True


# --------------------------------------------------------------------------------------------------
# a full disk


def torn_write(path: Path, data: bytes) -> None:
    """Write about half of ``data`` to ``path``, then fail as a full disk does."""
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


# --------------------------------------------------------------------------------------------------
# figures and checks


@dataclass
class FaultFigures:
    """The fault suite's figures (section ``faults`` of build/reliability.json)."""

    injected: set[str] = field(default_factory=set)  # distinct faults that struck where they were aimed
    recovered: set[str] = field(default_factory=set)  # of those, the ones after which the job ended right
    data_lost: int = 0  # artifacts, rows or checkpoints lost or duplicated, as found by ``losses``
    secrets_leaked: int = 0
    places_scanned: int = 0

    def inject(self, fault: str) -> None:
        self.injected.add(fault)

    def recover(self, fault: str) -> None:
        assert fault in self.injected, f"{fault} recovered but never injected"
        self.recovered.add(fault)

    def lost(self, problems: list[str]) -> list[str]:
        self.data_lost += len(problems)
        return problems

    def leaks(self, places: dict[str, str], secrets: list[str]) -> list[str]:
        found = scan(places, secrets)
        self.secrets_leaked += len(found)
        self.places_scanned += len(places)
        return found

    def check_ended_right(self, volume: Path, job_id: str, output: dict, *, job_row: dict | None,
                          texts: dict[str, str], secrets: list[str], **checks: Any) -> None:
        """The checks a fault test ends with, counted: nothing lost or duplicated (``losses``, with
        ``checks``: the rows when they are not the volume's, ``trained``, ``resumed_from``, ``s3``), no
        secret in ``texts`` or any file on the volume, and ``job_row`` in exactly the job's final state."""
        if "artifact_rows" not in checks:  # the volume's own records
            checks.update(artifact_rows=artifact_rows(volume), job_rows=job_rows(volume))
        problems = self.lost(losses(volume, job_id, output, **checks))
        leaks = self.leaks(places(volume, **texts), secrets)
        assert not problems and not leaks, (problems, leaks)
        assert final_state(job_row) == want_final(output)

    def write(self) -> None:
        count("faults", injected=len(self.injected), recovered=len(self.recovered), data_lost=self.data_lost,
              secrets_leaked=self.secrets_leaked, places_scanned=self.places_scanned)


def module_figures():
    """For a module-scoped ``fault_figures`` fixture: the figures of the module's tests, written at its end."""
    figures = FaultFigures()
    yield figures
    figures.write()


def scrubbed_logs(caplog, monkeypatch):
    """For a ``logs`` fixture: the in-process worker's log lines, with the secrets of
    ``plant_environment`` in the environment, scrubbed as ``configure_logging`` scrubs every handler
    (the filter comes off again: pytest keeps one capture handler for the whole run)."""
    import handler
    from config.settings import WorkerSettings
    from errors import ScrubFilter

    plant_environment(monkeypatch)
    handler.get_settings.cache_clear()
    caplog.set_level(logging.INFO)
    scrubber = ScrubFilter(WorkerSettings().secret_values())
    caplog.handler.addFilter(scrubber)
    yield caplog
    caplog.handler.removeFilter(scrubber)


def no_training(monkeypatch) -> list[int]:
    """Training refused (a call fails the job), and every training step counted (there must be none)."""
    import pipeline
    import train_lora

    steps: list[int] = []
    real = pipeline.Tracker.on_train_progress

    def counted(self, event):
        steps.append(event.step)
        real(self, event)

    monkeypatch.setattr(train_lora, "train_lora", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(pipeline.Tracker, "on_train_progress", counted)
    return steps


def artifact_rows(volume: Path) -> list[dict]:
    import sqlite3

    with sqlite3.connect(volume / "records.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM training_artifacts")]


def job_rows(volume: Path) -> list[dict]:
    import sqlite3

    with sqlite3.connect(volume / "records.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM training_jobs")]


def losses(volume: Path, job_id: str, output: dict, *, artifact_rows: list[dict], job_rows: list[dict],
           trained: list[dict] | None = None, resumed_from: int | None = None,
           s3: tuple[Any, str] | None = None) -> list[str]:
    """Every artifact, row or checkpoint of a job that succeeded in the end, lost or duplicated.

    ``trained``: the adapter's files as trained before the fault (the stored ones must be those);
    ``resumed_from``: the step of the newest intact checkpoint (a resume from an older one lost one);
    ``s3``: (client, bucket) when the artifact store is S3, else the volume's folder is checked.
    """
    from config.settings import WorkerSettings
    from storage.artifacts import open_artifact_store

    problems = []
    stored = open_artifact_store(WorkerSettings()).find_complete("", job_id)
    if stored is None:
        problems.append("the stored artifact is missing or does not verify against its manifest")
    elif [vars(f) for f in stored.files] != output.get("adapter", {}).get("files"):
        problems.append("the stored adapter is not the one the output names")
    if trained is not None and output.get("adapter", {}).get("files") != trained:
        problems.append("the stored adapter is not the one trained before the fault (lost, trained again)")
    if s3 is not None:
        client, bucket = s3
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        strays = [k for k in keys if not k.startswith(f"{job_id}/")]
        if strays:
            problems.append(f"objects outside the job's place: {strays[:3]}")
    else:
        entries = sorted(p.name for p in (volume / "artifacts").iterdir())
        if entries != [job_id]:
            problems.append(f"the artifacts folder holds {entries}, not one copy of the job")
    mine = [r for r in artifact_rows if r.get("job_id") == job_id]
    if len(mine) != 1 or len(artifact_rows) != 1:
        problems.append(f"{len(artifact_rows)} artifact rows, {len(mine)} for the job (want exactly one)")
    elif mine[0]["id"] != output.get("record_id"):
        problems.append("the artifact row is not the one the output names")
    if len([r for r in job_rows if r.get("job_id") == job_id]) != 1 or len(job_rows) != 1:
        problems.append(f"{len(job_rows)} job rows (want exactly one)")
    if resumed_from is not None and output.get("metrics", {}).get("resumed_from_step") != resumed_from:
        problems.append(f"resumed from step {output.get('metrics', {}).get('resumed_from_step')}, not from the "
                        f"newest intact checkpoint (step {resumed_from})")
    return problems


def final_state(row: dict | None) -> dict:
    """The job row's columns that must hold exactly the final state, beside what they must be."""
    row = row or {}
    got = {k: row.get(k) for k in ("status", "error", "stage", "progress", "output")}
    if isinstance(got["output"], str):
        got["output"] = json.loads(got["output"])
    return got


def want_final(output: dict) -> dict:
    return {"status": "succeeded", "error": None, "stage": "done", "progress": 1.0, "output": output}


def places(volume: Path, **more: str) -> dict[str, str]:
    """What a secret could leak into: the given texts (outputs, logs) and every file and row on the volume."""
    return {**more, **volume_texts(volume)}
