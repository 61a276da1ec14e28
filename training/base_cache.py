"""The warm worker's base model: kept in memory between jobs that train on the same base.

A LoRA job never changes the base weights, so a warm worker that trains the same base again can
skip loading it: after a job the adapter is taken out (peft ``unload``, never merged) and the bare
base stays here. The next job with the same key (model folder, revision, fingerprint, the weight
files' sizes and times, precision, quantization, device) wraps a fresh adapter around it; any other
key frees it first, so a different base never shares memory with it.

It can never leak one job into the next: when a job ends, however it ends, the adapter is removed,
the trainable flags and training mode are put back as they were at load, and the base is checked —
no peft module or attribute left, the same tensors (names, shapes, dtypes, devices, storage) and a
checksum of a sample of them unchanged. Any doubt frees the base, and the next job loads it fresh.

A fresh load may run in a thread of its own while the job tokenizes its data (``BaseLease.start_load``).
If the job fails before it takes the model (a dataset that tokenizes to nothing), the load in flight
is not wasted: the cache keeps it, the next job with the same base joins it, and any other job or
``clear`` waits for it to finish and frees it. The next job reads its data meanwhile, but waits for
the load (``settle``) before it builds any model itself: transformers sets torch's default dtype for
the whole process while it builds one. A thread cannot be stopped half-way, so waiting is the
only way to be sure its memory is freed; ``standalone`` (the cache off) waits for it at once.

One cache per worker process (handler.py holds it); the multi-process path (ddp, fsdp) never uses it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.runtime import Runtime

logger = logging.getLogger(__name__)

SAMPLED_TENSORS = 32  # tensors checksummed whole, spread over the model (first, last, evenly between)
SAMPLED_ELEMENTS = 4096  # elements of each sampled tensor hashed raw, beside its exact sum


@dataclass(frozen=True)
class BaseKey:
    """What makes two loads of a base interchangeable."""

    path: str
    revision: str | None
    fingerprint: str
    load_path: str
    files: tuple[tuple[str, int, int], ...]  # (name, bytes, mtime_ns) of every file of the load folder
    runtime: Runtime
    trust_remote_code: bool
    local_rank: int = 0


def base_key(path: Path, revision: str | None, fingerprint: str, load_path: Path, runtime: Runtime,
             trust_remote_code: bool, local_rank: int = 0) -> BaseKey:
    """The key of a base about to be loaded; the file stats catch weights replaced in place."""
    folder = Path(load_path)
    files = tuple(sorted((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns)
                         for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                         for st in (p.stat(),)))
    return BaseKey(str(Path(path).resolve()), revision, fingerprint, str(folder.resolve()), files, runtime,
                   trust_remote_code, local_rank)


@dataclass
class _Snapshot:
    """The base as loaded: what every job must hand back unchanged."""

    requires_grad: dict[str, bool]
    layout: tuple  # (name, shape, dtype, device, storage pointer) of every parameter and buffer
    checksum: str
    training: bool
    gradient_checkpointing: bool
    input_grads_hook: bool
    config: str


def _tensors(model) -> list[tuple[str, Any]]:
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _checksum(model) -> str:
    """sha256 over a sample of tensors: each one's sum and a strided sample of its raw elements.

    Sums accumulate in float32: a float64 sum converts as it reads and cost about as much as loading
    a 0.5 GB model's weights again (0.2-0.3 s here), where float32 reads at memory speed. Any change
    that spreads over a tensor (a merged adapter, a step of training) moves its sum; the raw sample
    catches changes of single elements where it looks. Same tensor, same process: the same sum.
    """
    import torch

    tensors = _tensors(model)
    count = len(tensors)
    picks = sorted({round(i * (count - 1) / max(SAMPLED_TENSORS - 1, 1)) for i in range(SAMPLED_TENSORS)}
                   ) if count else []
    digest = hashlib.sha256()
    with torch.no_grad():
        for index in picks:
            name, tensor = tensors[index]
            flat = tensor.detach().reshape(-1)
            if flat.is_floating_point():
                total = flat.sum(dtype=torch.float32).item()
            else:  # quantized weights are packed integers; summed in the kernel, never copied to int64
                total = flat.sum(dtype=torch.int64).item()
            stride = max(flat.numel() // SAMPLED_ELEMENTS, 1)
            sample = flat[::stride][:SAMPLED_ELEMENTS].cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{total!r}:".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return digest.hexdigest()


def _layout(model) -> tuple:
    return tuple((name, tuple(t.shape), str(t.dtype), str(t.device), t.data_ptr()) for name, t in _tensors(model))


def snapshot(model) -> _Snapshot:
    return _Snapshot(
        requires_grad={name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)},
        layout=_layout(model),
        checksum=_checksum(model),
        training=model.training,
        gradient_checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)),
        input_grads_hook=hasattr(model, "_require_grads_hook"),
        config=model.config.to_json_string(use_diff=False),
    )


def strip_adapter(model, wrapped):
    """The bare base: ``wrapped`` (the PeftModel around ``model``) with its adapter taken out, unmerged."""
    if wrapped is not None and wrapped is not model and hasattr(wrapped, "unload"):
        model = wrapped.unload()  # removes the LoRA layers; the base weights are untouched (no merge)
    for name in ("peft_config", "_hf_peft_config_loaded"):
        if name in vars(model):
            delattr(model, name)
    return model


def restore(model, was: _Snapshot) -> None:
    """Put back what training changes on the base besides weights: flags, mode, checkpointing, hooks."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in was.requires_grad:
            param.requires_grad_(was.requires_grad[name])
    model.train(was.training)
    if not was.gradient_checkpointing and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    if not was.input_grads_hook and hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    model.zero_grad(set_to_none=True)
    _restore_config(model.config, json.loads(was.config))


def _restore_config(config, was: dict[str, Any]) -> None:
    """Put back config values training set (TRL turns ``output_router_logits`` on for an MoE model's
    auxiliary loss): the kept base is then the base as loaded, and the next job decides again."""
    from transformers import PretrainedConfig

    now = config.to_dict()
    for key, value in was.items():
        if now.get(key) == value:
            continue
        current = getattr(config, key, None)
        if isinstance(current, PretrainedConfig) and isinstance(value, dict):
            _restore_config(current, value)
        elif key in vars(config):
            setattr(config, key, value)


def problems(model, was: _Snapshot) -> list[str]:
    """What differs from the base as loaded (empty: it is the same base); every check, cheapest first."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = []
    leftovers = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if leftovers:
        found.append(f"peft modules left: {', '.join(leftovers[:3])}")
    if hasattr(model, "peft_config"):
        found.append("a peft_config is still attached")
    if _layout(model) != was.layout:
        found.append("its tensors changed (names, shapes, dtypes, devices or storage)")
    flags = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    if flags != was.requires_grad:
        found.append("trainable flags differ from the loaded base")
    if model.training != was.training:
        found.append("training mode differs")
    if model.config.to_json_string(use_diff=False) != was.config:
        found.append("its config changed")
    if not found and _checksum(model) != was.checksum:
        found.append("the checksum of its sampled weights changed")
    return found


def _on_device(model, key: BaseKey):
    """On a GPU, a base loaded onto the CPU (no device map) is moved to its GPU first, as the Trainer
    would at its start: the snapshot is then of the base as it trains, and a kept base stays there."""
    if key.runtime.device == "cuda" and not getattr(model, "hf_device_map", None):
        model = model.to(f"cuda:{key.local_rank}")
    return model


class PendingLoad:
    """A base model loading in a thread of its own: its (model, snapshot), once ``result`` is asked for.

    The thread runs the load and the snapshot only; it touches nothing else, so the job's own thread
    may tokenize meanwhile (fast tokenizers, safetensors reads and torch copies release the GIL).
    """

    def __init__(self, key: BaseKey, load: Callable[[], Any]):
        self.key = key
        self.seconds: float | None = None  # the load's own duration, once it has finished
        self._future: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(load,), name="base-model-load", daemon=True)
        self._thread.start()

    def _run(self, load: Callable[[], Any]) -> None:
        started = time.monotonic()
        try:
            model = _on_device(load(), self.key)
            ready = (model, snapshot(model))
        except BaseException as exc:  # handed to whoever asks for the result, in its own thread
            self.seconds = time.monotonic() - started
            self._future.set_exception(exc)
        else:
            self.seconds = time.monotonic() - started
            self._future.set_result(ready)
        finally:
            model = ready = None  # only the future holds the model: freeing it frees the memory

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        """Wait for the load to end, however it ends (its result or error stays for ``result``)."""
        self._thread.join()

    def result(self) -> tuple[Any, _Snapshot]:
        """Wait for the load; its (model, snapshot), or its exception raised here."""
        self._thread.join()
        return self._future.result()

    def discard(self) -> None:
        """Wait for the load to end and drop what it made (a thread cannot be stopped half-way)."""
        self._thread.join()
        error = self._future.exception()
        if error is not None:
            logger.info("a base model load that no job waited for failed: %s: %s", type(error).__name__, error)
        self._future = Future()  # the only reference to the model goes with the old one


@dataclass
class BaseLease:
    """A base lent to one job: ``model`` is the cached base (``reused``), or it is loading (``pending``:
    started by this job, or joined from an earlier one that failed before it took it), or it is loaded
    when the job asks for it (``take``)."""

    key: BaseKey
    model: Any = None
    reused: bool = False
    wrapped: Any = None  # the PeftModel training wraps around the base: its adapter is taken out at return
    pending: PendingLoad | None = None
    load_seconds: float | None = None  # the load's own duration when it ran in its thread beside the job
    _snapshot: _Snapshot | None = field(default=None, repr=False)

    def hold(self, model) -> None:
        """The base this job loaded, as loaded: remembered so it can be checked when it comes back."""
        self.model = _on_device(model, self.key)
        self._snapshot = snapshot(self.model)

    def start_load(self, load: Callable[[], Any]) -> None:
        """Start loading the base in a thread of its own, unless it is kept or already loading."""
        if self.model is None and self.pending is None:
            self.pending = PendingLoad(self.key, load)

    def take(self, load: Callable[[], Any]):
        """The base for training: kept, waited for (when loading in its thread), or loaded now."""
        if self.model is not None:
            return self.model
        if self.pending is not None:
            pending, joined = self.pending, self.reused
            try:
                self.model, self._snapshot = pending.result()
            except Exception as exc:
                if not joined:
                    raise  # this job's own load failed: its error is the job's
                # an earlier job's load failed where nobody saw it: this job loads for itself
                logger.warning("the base load an earlier job started failed (%s: %s); loading it again",
                               type(exc).__name__, exc)
                self.reused = False
            else:
                if not joined:
                    self.load_seconds = pending.seconds
            finally:
                self.pending = None
            if self.model is not None:
                return self.model
        self.hold(load())
        return self.model

    def drop(self) -> None:
        """Let go of the base and of a load still in flight (waited for: its memory is freed too)."""
        if self.pending is not None:
            self.pending.discard()
            self.pending = None
        self.model = self.wrapped = self._snapshot = None


@contextmanager
def standalone(key: BaseKey) -> Iterator[BaseLease]:
    """A lease with no cache behind it (``WARM_MODEL_CACHE=false``): everything freed when the job ends,
    a load still in flight waited for first, so neither its thread nor its memory outlives the job."""
    lease = BaseLease(key)
    try:
        yield lease
    finally:
        lease.drop()
        _free_memory()


class BaseModelCache:
    """At most one base model, kept between jobs of one worker process (or still loading for it)."""

    def __init__(self) -> None:
        self._key: BaseKey | None = None
        self._model = None
        self._snapshot: _Snapshot | None = None
        self._pending: PendingLoad | None = None  # a load a failed job started, kept for the next job

    @property
    def key(self) -> BaseKey | None:
        return self._key

    @property
    def loading(self) -> bool:
        """A load some job started is still running (kept for the next job with its base)."""
        return self._pending is not None and not self._pending.done()

    def settle(self) -> None:
        """Wait for a load in flight to end, keeping what it made for the next job with its base.

        transformers sets torch's default dtype for the whole process while it builds a model: no
        other model may be built (a memory plan's meta model) while a load runs unwatched.
        """
        if self._pending is not None:
            self._pending.wait()

    def clear(self, reason: str = "") -> None:
        """Free the kept base (a different base is coming, memory is needed, or the cache is off); a load
        in flight is waited for first, so its memory is freed too."""
        if self._model is None and self._pending is None:
            return
        logger.info("warm base %s freed%s", Path(self._key.path).name if self._key else "?",
                    f": {reason}" if reason else "")
        if self._pending is not None:
            self._pending.discard()
        self._key = self._model = self._snapshot = self._pending = None
        _free_memory()

    @contextmanager
    def lease(self, key: BaseKey) -> Iterator[BaseLease]:
        """Lend the base for ``key`` (kept, loading, or None to load) to one job; take it back, checked,
        at the end."""
        if self._key == key and (self._model is not None or self._pending is not None):
            lease = BaseLease(key, self._model, reused=True, pending=self._pending, _snapshot=self._snapshot)
            logger.info("warm base %s reused: %s", Path(key.path).name,
                        "no load" if self._model is not None else "joining the load an earlier job started")
        else:
            self.clear("a different base or load settings" if self._key is not None else "")
            lease = BaseLease(key)
        # lent: if this job dies half-way the base is not kept until it comes back clean
        self._key = self._model = self._snapshot = self._pending = None
        try:
            yield lease
        finally:
            self._take_back(lease)

    def _take_back(self, lease: BaseLease) -> None:
        if lease.model is None and lease.pending is not None:
            # The job ended before it took the base (its data failed to tokenize): the load goes on,
            # for the next job with this base, and is not waited for here.
            self._key, self._pending = lease.key, lease.pending
            lease.pending = None
            return
        if lease.model is None or lease._snapshot is None:
            return
        try:
            model = strip_adapter(lease.model, lease.wrapped)
            restore(model, lease._snapshot)
            found = problems(model, lease._snapshot)
        except Exception as exc:  # any doubt about the base means a fresh load next time
            found = [f"{type(exc).__name__}: {exc}"]
            model = None
        lease.wrapped = None
        if found:
            logger.warning("warm base %s not kept (%s); the next job loads it fresh",
                           Path(lease.key.path).name, "; ".join(found))
            lease.model = None
            _free_memory()
            return
        self._key, self._model, self._snapshot = lease.key, model, lease._snapshot
        lease.model = None


def lease_for(cache: BaseModelCache | None, enabled: bool, key: BaseKey):
    """The cache's lease on ``key`` when the cache is on (``WARM_MODEL_CACHE``); else a standalone one,
    the cache's kept base freed first."""
    if cache is not None and enabled:
        return cache.lease(key)
    if cache is not None:
        cache.clear("WARM_MODEL_CACHE is off")
    return standalone(key)


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
