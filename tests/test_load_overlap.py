"""The base model loads in a thread of its own while the job tokenizes its data, and it changes nothing.

Jobs run through ``handler.handler``. The load (``train_lora.load_base_model``) and the tokenization
(``dataset_loader.tokenize_dataset``) are wrapped to record what happens when: the load must start
before tokenization finishes; a dataset that tokenizes to nothing fails the job with its ``dataset:``
error without waiting for the load, and that load serves the next job with the same base (warm
cache) or is freed, thread and memory, before the handler returns (cache off).
"""

from __future__ import annotations

import gc
import shutil
import threading
import time
import weakref

import pytest

import handler
from tests.conftest import small_job
from tests.test_warm_cache import _adapter, _assert_same_adapter, _run

# Records that read fine, and that tokenizing drops: each prompt fills max_seq_length (128) on its own.
NOTHING_TO_LEARN = [{"prompt": f"question {i} " + "word " * 400, "completion": "answer"} for i in range(8)]


@pytest.fixture
def cache(volume):
    base_cache = handler.get_base_cache()
    base_cache.clear("test start")
    yield base_cache
    base_cache.clear("test end")


class Recorder:
    """Wraps the load and the tokenization; ``events`` in the order they happened."""

    def __init__(self, monkeypatch, *, hold_load: bool = False):
        import dataset_loader
        import train_lora

        self.events: list[str] = []
        self.loaded: list[weakref.ref] = []
        self.load_seconds: list[float] = []
        self.tokenize_seconds: list[float] = []
        self.load_started = threading.Event()
        self.release = threading.Event()  # a held load waits for it (never forever: a test must fail, not hang)
        if not hold_load:
            self.release.set()
        real_load, real_tokenize = train_lora.load_base_model, dataset_loader.tokenize_dataset

        def load(*args, **kwargs):
            started = time.monotonic()
            self.events.append("load_started")
            self.load_started.set()
            self.release.wait(timeout=20)
            model = real_load(*args, **kwargs)
            self.loaded.append(weakref.ref(model))
            self.events.append("load_finished")
            self.load_seconds.append(time.monotonic() - started)
            return model

        def tokenize(*args, **kwargs):
            started = time.monotonic()
            # Without an overlap the load would start only after this returns: wait (bounded) for it.
            self.load_started.wait(timeout=10)
            try:
                return real_tokenize(*args, **kwargs)
            finally:
                self.events.append("tokenize_finished")
                self.tokenize_seconds.append(time.monotonic() - started)

        from training import memory_plan

        real_plan = memory_plan.plan_memory

        def plan(*args, **kwargs):
            self.events.append("plan")
            return real_plan(*args, **kwargs)

        monkeypatch.setattr(train_lora, "load_base_model", load)
        monkeypatch.setattr(dataset_loader, "tokenize_dataset", tokenize)
        monkeypatch.setattr(memory_plan, "plan_memory", plan)


def _load_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "base-model-load"]


def _failing_job(job_id: str, **overrides) -> dict:
    job = small_job(job_id=job_id, **overrides)
    job["dataset"] = {"records": NOTHING_TO_LEARN}
    return job


def test_the_load_starts_before_tokenization_finishes_and_both_are_timed(cache, monkeypatch):
    seen = Recorder(monkeypatch)
    output = _run("overlap-1")
    assert seen.events.index("load_started") < seen.events.index("tokenize_finished"), seen.events
    timings = output["timings"]
    # each timed on its own: the load in its thread, the tokenization here; the overlap is named
    assert timings["load_s"] >= round(seen.load_seconds[0], 3) - 0.002, (timings, seen.load_seconds)
    assert timings["dataset_s"] >= round(seen.tokenize_seconds[0], 3) - 0.002, (timings, seen.tokenize_seconds)
    # the overlap runs from the load's start to train_lora's wait: tokenizing and the train stage's entry
    assert 0 < timings["load_overlap_s"] <= timings["load_s"], timings
    assert output["base_model"]["load"]["reused"] is False
    assert not _load_threads()


def test_an_overlapped_load_trains_what_a_load_after_tokenizing_trains(cache, monkeypatch):
    import train_lora

    overlapped = _run("overlapped")
    cache.clear("a cold worker")
    monkeypatch.setattr(train_lora, "start_loading", lambda request, base: None)  # train_lora loads it itself
    sequential = _run("sequential")
    assert overlapped["timings"]["load_overlap_s"] > 0
    assert sequential["timings"]["load_overlap_s"] == 0
    _assert_same_adapter(_adapter(overlapped), _adapter(sequential))


def test_a_dataset_that_tokenizes_to_nothing_fails_at_once_and_its_load_serves_the_next_job(cache, monkeypatch):
    seen = Recorder(monkeypatch, hold_load=True)
    failed = handler.handler({"id": "nothing", "input": _failing_job("nothing")})
    assert failed["error"].startswith("dataset: no usable training examples"), failed
    assert "no completion tokens within max_seq_length" in failed["error"]
    # the handler did not wait for the load: it is still in flight, kept by the cache
    assert not seen.release.is_set() and "load_finished" not in seen.events
    assert cache.loading and [t.is_alive() for t in _load_threads()] == [True]

    # The next job reads its data while the load goes on, and waits for it before its memory plan
    # builds a model (transformers sets torch's default dtype process-wide while it builds one).
    threading.Timer(1.0, seen.release.set).start()
    second = _run("after-nothing")
    assert second["base_model"]["load"]["reused"] is True  # joined the load the failed job started
    assert seen.events.count("load_started") == 1
    assert seen.events.index("load_finished") < len(seen.events) - 1 - seen.events[::-1].index("plan"), seen.events
    assert not _load_threads()


def test_another_base_waits_for_a_load_in_flight_and_frees_it(cache, volume, model_factory, monkeypatch):
    shutil.copytree(model_factory("qwen2"), volume / "models" / "tiny-qwen2")
    seen = Recorder(monkeypatch)
    failed = handler.handler({"id": "nothing", "input": _failing_job("nothing")})
    assert failed["error"].startswith("dataset:"), failed
    qwen = _run("qwen-after", base_model="tiny-qwen2")
    assert qwen["base_model"]["load"]["reused"] is False
    assert cache.key is not None and cache.key.path.endswith("tiny-qwen2")
    gc.collect()
    assert seen.loaded[0]() is None  # the llama the failed job loaded is gone
    assert not _load_threads()


def test_with_the_cache_off_a_failed_job_leaves_no_thread_and_no_model(cache, monkeypatch):
    monkeypatch.setenv("WARM_MODEL_CACHE", "false")
    handler.get_settings.cache_clear()
    seen = Recorder(monkeypatch)
    failed = handler.handler({"id": "nothing-off", "input": _failing_job("nothing-off")})
    assert failed["error"].startswith("dataset: no usable training examples"), failed
    assert seen.events.index("load_started") < seen.events.index("tokenize_finished")
    assert not _load_threads()  # joined before the handler returned
    gc.collect()
    assert [ref() for ref in seen.loaded] == [None]
    assert cache.key is None and not cache.loading


def test_data_with_no_weighted_turn_fails_before_any_weight_is_read(cache, monkeypatch):
    seen = Recorder(monkeypatch)
    seen.load_started.set()  # no waiting in tokenize: nothing should get that far
    job = small_job(job_id="unweighted")
    job["dataset"] = {"records": [{"messages": [{"role": "user", "content": f"q{i}"},
                                                {"role": "assistant", "content": f"a{i}", "weight": 0}]}
                                  for i in range(4)]}
    failed = handler.handler({"id": "unweighted", "input": job})
    assert failed["error"].startswith("dataset: no usable training examples in inline (4 records): 4 dropped: "
                                      "every assistant turn has weight 0 (first: record 1)"), failed
    assert seen.events == [] and not _load_threads()


def test_only_data_with_nothing_to_learn_at_all_is_refused_before_tokenizing():
    from data.normalize import Example
    from dataset_loader import RawDataset, require_something_to_learn
    from errors import DatasetError

    unweighted = Example("messages", messages=(("user", "q", False), ("assistant", "a", False)), where="line 1")
    weighted = Example("messages", messages=(("user", "q", False), ("assistant", "a", True)), where="line 2")
    text = Example("text", text="plain", where="line 3")
    for train in ([unweighted, weighted], [unweighted, text]):  # something is left: tokenizing decides
        require_something_to_learn(RawDataset(train, [], "x", "f.jsonl", "auto"), train_on_inputs=False)
    require_something_to_learn(RawDataset([unweighted], [], "x", "f.jsonl", "auto"), train_on_inputs=True)
    with pytest.raises(DatasetError, match=r"no usable training examples in f.jsonl: 2 dropped: every assistant "
                                           r"turn has weight 0 \(first: line 1\)"):
        require_something_to_learn(RawDataset([unweighted, unweighted], [], "x", "f.jsonl", "auto"),
                                   train_on_inputs=False)
