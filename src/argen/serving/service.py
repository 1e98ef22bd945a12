"""`GenerationService`: a bounded queue and one worker thread that batches requests dynamically.

Contract:
- `submit(spec)` validates nothing itself (`argen.serving.request` does) and queues one row per
  image; a condition is a class id (c2i), a prompt or a `Caption` of precomputed features (t2i;
  prompts and captions may share a batch). It raises `Overloaded` when the queued images would
  exceed `max_queue`, `ShuttingDown` after `close()` began.
- The generator thread takes the oldest rows, waits up to `max_wait_ms` for more (never past
  `max_batch_size` images), and runs them as one `Engine.generate` call with per-row
  `SamplingParams` and per-row generators seeded from the request's seed and the image index, so
  a request's images do not depend on what else shares the batch. With `overlap_decode` (default
  on CUDA) a decoder thread turns the codes into PNGs while the next batch generates (at most two
  batches wait for it); otherwise the same thread decodes (better on a small CPU).
- `cancel(job)` drops the job's rows that have not started; a job already running finishes and
  its result is discarded.
- `close()` refuses new work, finishes everything queued and in flight, then stops both threads.
- `metrics()` reports counters, queue depth, images/s and latency percentiles.
- Result of a job's future: {"codes": [[N ints] per image], "png": [bytes per image], "timings":
  {queue_ms, generate_ms, decode_ms, encode_ms (PNG), total_ms, batch_images}}.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from argen.engine import Engine, decode_codes
from argen.models.gpt import GPT
from argen.models.tokenizer import VQModel
from argen.sampling.logits import SamplingParams
from argen.sampling.seeds import image_seed
from argen.serving.features import Caption
from argen.utils.errors import ArgenError


class Overloaded(ArgenError):
    """The queue is full; retry later."""


class ShuttingDown(ArgenError):
    """The server is shutting down and takes no new work."""


@dataclass(frozen=True)
class ServeConfig:
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_images_per_request: int = 16
    decode_chunk: int = 16
    overlap_decode: bool | None = None  # decode on a second thread while the next batch generates (None: on CUDA)
    max_body_bytes: int = 32 << 20  # larger request bodies get 413 (16 captions of 120 x 2048 float32 as base64 fit)

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "max_images_per_request", "decode_chunk", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ArgenError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_wait_ms < 0:
            raise ArgenError("--max-wait-ms must be >= 0")
        if self.max_images_per_request > self.max_queue:
            raise ArgenError(f"--max-images-per-request ({self.max_images_per_request}) cannot exceed --max-queue "
                             f"({self.max_queue})")


@dataclass
class JobSpec:
    """One validated request: conditions (class ids or prompts), one per image, and settings."""

    conditions: list  # one per image: int class ids (c2i), str prompts or Captions (t2i)
    params: SamplingParams
    seed: int

    def row_seed(self, index: int) -> int:
        return image_seed(self.seed, index)


@dataclass
class Job:
    spec: JobSpec
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    codes: list = field(default_factory=list)
    images: list = field(default_factory=list)
    remaining: int = 0
    started: float | None = None
    timings: dict = field(default_factory=lambda: {"generate_ms": 0.0, "decode_ms": 0.0, "batch_images": []})

    @property
    def size(self) -> int:
        return len(self.spec.conditions)


@dataclass
class _Row:
    job: Job
    index: int


def _resolve(future: Future, result=None, error: Exception | None = None) -> None:
    """Set a result unless the waiter has already cancelled."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class GenerationService:
    def __init__(self, tokenizer: VQModel, gpt: GPT, config: ServeConfig = ServeConfig(),
                 encode_prompts: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 engine: Engine | None = None):
        self.tokenizer = tokenizer
        self.gpt = gpt
        self.config = config
        self.encode_prompts = encode_prompts
        self.device = gpt.tok_embeddings.weight.device
        # many sessions: every power-of-two batch size, guided or not, keeps its CUDA graphs
        self.engine = engine or Engine(gpt, max_batch=config.max_batch_size, max_sessions=16)
        self._queue: deque[_Row] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self._finisher: threading.Thread | None = None
        self._finish_queue: queue.Queue = queue.Queue(maxsize=2)  # generated batches awaiting decode
        self.overlap_decode = self.device.type == "cuda" if config.overlap_decode is None else config.overlap_decode
        self._in_flight = 0
        self._started = time.perf_counter()
        self._latencies: deque[float] = deque(maxlen=2000)
        self._recent: deque[tuple[float, int]] = deque(maxlen=10000)  # (finish time, images)
        self.counters = {"requests": 0, "completed": 0, "failed": 0, "rejected_overload": 0, "rejected_invalid": 0,
                         "cancelled": 0, "images": 0, "batches": 0, "batched_images": 0}

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._worker, name="argen-serve-generate", daemon=True)
            self._finisher = threading.Thread(target=self._finish_worker, name="argen-serve-decode", daemon=True)
            self._thread.start()
            self._finisher.start()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued and running, stop the worker threads."""
        with self._lock:
            self._closing = True
            self._paused = False
            self._lock.notify_all()
            threads = [t for t in (self._thread, self._finisher) if t is not None]
        for thread in threads:  # the generator thread exits first and then stops the decoder thread
            thread.join(timeout)
        with self._lock:
            self._thread = self._finisher = None

    def pause(self) -> None:
        """Hold queued work (tests use this to build a backlog deterministically)."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    @property
    def closing(self) -> bool:
        return self._closing

    # ----------------------------------------------------------------- requests
    def submit(self, spec: JobSpec) -> Job:
        job = Job(spec, remaining=len(spec.conditions))
        with self._lock:
            self.counters["requests"] += 1
            if self._closing:
                self.counters["rejected_overload"] += 1
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) + job.size > self.config.max_queue:
                self.counters["rejected_overload"] += 1
                raise Overloaded(f"the queue is full ({len(self._queue)} images waiting, limit "
                                 f"{self.config.max_queue}); retry later")
            self._queue.extend(_Row(job, i) for i in range(job.size))
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop the job's queued rows; rows already running finish and are discarded."""
        with self._lock:
            if job.cancelled or (job.future.done() and not job.future.cancelled()):
                return
            job.cancelled = True
            self.counters["cancelled"] += 1
            self._queue = deque(row for row in self._queue if row.job is not job)
        job.future.cancel()

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def accepts(self) -> list[str]:
        """The condition fields this server takes: classes (c2i); prompts (with a text encoder), features (t2i)."""
        if self.gpt.config.kind == "c2i":
            return ["classes"]
        return (["prompts"] if self.encode_prompts is not None else []) + ["features"]

    def count_invalid(self) -> None:
        with self._lock:
            self.counters["requests"] += 1
            self.counters["rejected_invalid"] += 1

    # ----------------------------------------------------------------- worker
    def _take_batch(self) -> list[_Row] | None:
        cfg = self.config
        with self._lock:
            while True:
                if self._queue and not self._paused:
                    oldest = self._queue[0].job.submitted
                    wait = cfg.max_wait_ms / 1000 - (time.perf_counter() - oldest)
                    if len(self._queue) >= cfg.max_batch_size or wait <= 0 or self._closing:
                        break
                    self._lock.wait(wait)
                    continue
                if self._closing and not self._queue:
                    return None
                self._lock.wait(0.1)
            batch = [self._queue.popleft() for _ in range(min(cfg.max_batch_size, len(self._queue)))]
            self._in_flight += len(batch)
            return batch

    def _worker(self) -> None:
        """Generate batch after batch; decoding happens on the decoder thread meanwhile."""
        while True:
            batch = self._take_batch()
            if batch is None:
                self._finish_queue.put(None)
                return
            try:
                stage = self._generate_batch(batch)
            except Exception as exc:  # any failure goes to the waiting requests
                self._fail(batch, exc)
                self._release(batch)
                continue
            if self.overlap_decode:
                self._finish_queue.put(stage)
            else:
                self._finish_stage(stage)

    def _finish_worker(self) -> None:
        while True:
            stage = self._finish_queue.get()
            if stage is None:
                return
            self._finish_stage(stage)

    def _finish_stage(self, stage: tuple) -> None:
        """Decode and answer one generated batch; any failure goes to its waiting requests."""
        batch = stage[0]
        try:
            self._complete_batch(*stage)
        except Exception as exc:
            self._fail(batch, exc)
        finally:
            self._release(batch)

    def _release(self, batch: list[_Row]) -> None:
        with self._lock:
            self._in_flight -= len(batch)

    def _conditions(self, batch: list[_Row]):
        conds = [row.job.spec.conditions[row.index] for row in batch]
        if self.gpt.config.kind == "c2i":
            return torch.tensor(conds, dtype=torch.long, device=self.device), None
        features = [c.features if isinstance(c, Caption) else None for c in conds]  # (L, D) each
        masks = [c.mask if isinstance(c, Caption) else None for c in conds]  # (L,) each
        prompts = [i for i, c in enumerate(conds) if not isinstance(c, Caption)]
        if prompts:
            if self.encode_prompts is None:
                raise ArgenError("this server has no text encoder; send caption features")
            encoded, encoded_mask = self.encode_prompts([conds[i] for i in prompts])  # (P, L, D), (P, L)
            for j, i in enumerate(prompts):
                features[i], masks[i] = encoded[j], encoded_mask[j]
        features = torch.stack([f.to(self.device, torch.float32) for f in features])  # (B, L, D)
        masks = torch.stack([m.to(self.device, torch.float32) for m in masks])  # (B, L)
        return features, masks

    def _generate_batch(self, batch: list[_Row]):
        start = time.perf_counter()
        for row in batch:
            if row.job.started is None:
                row.job.started = start
        cond, mask = self._conditions(batch)
        params = [row.job.spec.params for row in batch]
        gens = [torch.Generator(device=self.device).manual_seed(row.job.spec.row_seed(row.index)) for row in batch]
        codes = self.engine.generate(cond, mask, params, row_generators=gens).cpu()  # (B, N); waits for the device
        return batch, codes, start, time.perf_counter()

    def _complete_batch(self, batch: list[_Row], codes: torch.Tensor, start: float, generated: float) -> None:
        grid = self.gpt.config.grid_size
        images = decode_codes(self.tokenizer, codes.view(-1, grid, grid), chunk=self.config.decode_chunk)
        decoded = time.perf_counter()
        finished = []
        with self._lock:
            self.counters["batches"] += 1
            self.counters["batched_images"] += len(batch)
            for i, row in enumerate(batch):
                job = row.job
                job.codes.append((row.index, codes[i].tolist()))
                job.images.append((row.index, images[i]))
                job.remaining -= 1
                if job.remaining == 0:
                    finished.append(job)
            for job in {id(row.job): row.job for row in batch}.values():
                job.timings["generate_ms"] += (generated - start) * 1e3
                job.timings["decode_ms"] += (decoded - generated) * 1e3
                job.timings["batch_images"].append(len(batch))
        for job in finished:
            self._finish(job, decoded)

    def _finish(self, job: Job, decoded: float) -> None:
        if job.cancelled:  # nobody waits for it: skip the PNG encoding
            return
        job.codes.sort(key=lambda item: item[0])
        job.images.sort(key=lambda item: item[0])
        pngs = [png_bytes(img) for _, img in job.images]
        now = time.perf_counter()
        result = {
            "codes": [c for _, c in job.codes],
            "png": pngs,
            "timings": {"queue_ms": ((job.started or now) - job.submitted) * 1e3,
                        "generate_ms": job.timings["generate_ms"], "decode_ms": job.timings["decode_ms"],
                        "encode_ms": (now - decoded) * 1e3, "total_ms": (now - job.submitted) * 1e3,
                        "batch_images": job.timings["batch_images"]},
        }
        with self._lock:
            if job.cancelled:
                return
            self.counters["completed"] += 1
            self.counters["images"] += job.size
            self._latencies.append(now - job.submitted)
            self._recent.append((now, job.size))
        _resolve(job.future, result=result)

    def _fail(self, batch: list[_Row], exc: Exception) -> None:
        jobs = {id(row.job): row.job for row in batch}
        with self._lock:
            for job in jobs.values():
                self.counters["failed"] += 1
                self._queue = deque(row for row in self._queue if row.job is not job)
        for job in jobs.values():
            _resolve(job.future, error=exc)

    # ----------------------------------------------------------------- metrics
    def metrics(self) -> dict:
        now = time.perf_counter()
        with self._lock:
            latencies = np.array(self._latencies, dtype=np.float64) * 1e3
            recent = sum(n for t, n in self._recent if now - t <= 60.0)
            counters = dict(self.counters)
            depth, in_flight = len(self._queue), self._in_flight
        uptime = now - self._started
        percentiles = ({"p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
                        "mean": float(latencies.mean())} if latencies.size else {"p50": None, "p99": None,
                                                                                 "mean": None})
        return {
            **{f"{k}_total": v for k, v in counters.items()},
            "queue_depth": depth,
            "in_flight_images": in_flight,
            "mean_batch_images": counters["batched_images"] / counters["batches"] if counters["batches"] else None,
            "images_per_s": counters["images"] / uptime if uptime > 0 else 0.0,
            "images_per_s_last_60s": recent / min(60.0, uptime) if uptime > 0 else 0.0,
            "latency_ms": {**percentiles, "count": int(latencies.size)},
            "uptime_s": uptime,
        }
