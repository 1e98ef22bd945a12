"""`GenerationService`: a bounded queue and one worker thread that schedules images onto the engine.

Contract:
- Edits: a `JobSpec` with `forced` ((N,) int64, -1 where sampled; `argen.serving.edits`) puts those
  forced tokens on each of its images' slots (`SlotRequest.forced`); kept tokens are fed, never
  sampled. Both schedulers take edits (static: the batch's rows without one carry -1 everywhere).
- `submit(spec)` validates nothing itself (`argen.serving.request` does) and queues one row per
  image; a condition is a class id (c2i), a prompt or a `Caption` of precomputed features (t2i;
  prompts and captions may share a batch). It raises `Overloaded` when the queued images would
  exceed `max_queue`, `ShuttingDown` after `close()` began.
- Adapters (a generator loaded with `load_gpt(adapters=...)`, batched LoRA): `JobSpec.adapter` (index into
  `adapter_names`, None = the base) goes onto each of its images' slots (`SlotRequest.adapter`); images of
  different adapters and of the base share the steps of either scheduler, each with its adapter's weights.
- Every image has its own generator seeded with `image_seed(request seed, image index)` and its
  own `SamplingParams`, so a request's images do not depend on what else runs with them.
- Both schedulers run the engine's one decode loop (`argen.engine.slots.SlotDecoder`); its step
  policy is `PlainStep` or, with `decode="jacobi"`, `JacobiStep(window, tree)` (a Jacobi iteration of
  `window` positions per slot, with a draft tree if one is set). They differ only in when images are admitted.
- `scheduler="continuous"` (default): a `SlotDecoder` with `max_batch_size` slots. At every step
  boundary the worker frees the slots of cancelled requests, admits the oldest queued images into
  the free slots (prefill), runs one decode step of all active slots, and hands the images that
  finished to decoding. A request waits only for a free slot, never for a whole batch.
- `scheduler="static"`: the worker takes the oldest rows, waits up to `max_wait_ms` for more (never
  past `max_batch_size` images), admits them together and steps them to the end before taking more
  (`argen.engine.Batches`: static batching over the same loop).
- With `overlap_decode` a decoder thread turns codes into PNGs while generation goes on; otherwise
  the generator thread decodes. Default: on for the continuous scheduler (decoding on the step
  thread would stall every slot; images that finish while a decode runs are decoded together
  next), and for the static one on CUDA only (at most two batches wait for it; on a small CPU the
  two threads would only compete for cores).
- `cancel(job)` drops the job's queued rows; continuous: its slots are freed at the next step
  boundary; static: a job already running finishes and its result is discarded.
- `close()` refuses new work, finishes everything queued and in flight, then stops both threads.
- `metrics()` reports counters, queue depth, images/s, latency percentiles and, continuous, slot
  occupancy and prefills and decode steps per second.
- Result of a job's future: {"codes": [[N ints] per image], "png": [bytes per image], "timings":
  {queue_ms (arrival to admission: first slot or batch), generate_ms, decode_ms, encode_ms (PNG),
  total_ms, batch_images (static: the size of each engine batch; continuous: the occupied slots
  when the request was admitted)}}.
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

from argen.engine import Batches, JacobiStep, PlainStep, SlotDecoder, SlotRequest, decode_codes
from argen.engine.jacobi import check_decode, check_tree
from argen.models.gpt import GPT
from argen.models.tokenizer import VQModel
from argen.nn.lora import multi_lora
from argen.sampling.logits import SamplingParams
from argen.sampling.seeds import image_seed
from argen.serving.features import Caption
from argen.utils.errors import ArgenError


class Overloaded(ArgenError):
    """The queue is full; retry later."""


class ShuttingDown(ArgenError):
    """The server is shutting down and takes no new work."""


SCHEDULERS = ("continuous", "static")


@dataclass(frozen=True)
class ServeConfig:
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_images_per_request: int = 16
    decode_chunk: int | None = None  # images per decoder call; None: argen.engine.decode's default
    overlap_decode: bool | None = None  # decode on a second thread meanwhile (None: continuous, or on CUDA)
    max_body_bytes: int = 32 << 20  # larger request bodies get 413 (16 captions of 120 x 2048 float32 as base64 fit)
    scheduler: str = "continuous"  # or "static" (batches run to the end); continuous: max_batch_size slots
    decode: str = "ar"  # "jacobi": Jacobi decoding for every request, `window` positions per forward pass
    window: int | None = None
    tree: str | None = None  # with "jacobi": a draft tree, "KxD[xG]" (argen.engine.draft_tree)

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ArgenError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        object.__setattr__(self, "window", check_decode(self.decode, self.window))
        tree = check_tree(self.decode, self.tree)
        object.__setattr__(self, "tree", None if tree is None else str(tree))
        for name in ("max_batch_size", "max_queue", "max_images_per_request", "decode_chunk", "max_body_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
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
    forced: torch.Tensor | None = None  # (N,) int64 for an edit: the kept token, -1 where sampled (all images)
    adapter: int | None = None  # index into the served LoRA adapters (GenerationService.adapter_names); None: base

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
                 engine: Batches | None = None):
        self.tokenizer = tokenizer
        self.gpt = gpt
        self.config = config
        self.encode_prompts = encode_prompts
        self.device = gpt.tok_embeddings.weight.device
        self.continuous = config.scheduler == "continuous"
        self._step_policy = ((lambda: PlainStep()) if config.decode == "ar"
                             else (lambda: JacobiStep(config.window, config.tree)))
        if self.continuous:
            self.engine = None
            self.decoder = SlotDecoder(gpt, config.max_batch_size, self._step_policy())
        else:  # many decoders: every power-of-two batch size keeps its cache and CUDA graphs
            self.engine = engine or Batches(gpt, max_batch=config.max_batch_size, max_sessions=16)
            self.decoder = None
        self._queue: deque[_Row] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self._finisher: threading.Thread | None = None
        # generated batches awaiting decode; continuous hand-overs are small and merged when they wait
        self._finish_queue: queue.Queue = queue.Queue(maxsize=0 if self.continuous else 2)
        default_overlap = self.continuous or self.device.type == "cuda"  # continuous: decoding would stall every slot
        self.overlap_decode = default_overlap if config.overlap_decode is None else config.overlap_decode
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
            worker = self._continuous_worker if self.continuous else self._worker
            self._thread = threading.Thread(target=worker, name="argen-serve-generate", daemon=True)
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
        """Drop the job's queued rows; its slots are freed at the next step boundary (continuous),
        or its running batch finishes and is discarded (static)."""
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

    @property
    def adapter_names(self) -> list[str]:
        """The served LoRA adapters' names (a request's `adapter` indexes them)."""
        lora = multi_lora(self.gpt)
        return list(lora.names) if lora is not None else []

    def num_classes(self, adapter: int | None) -> int:
        """How many classes the base (None) or adapter `adapter` takes (c2i)."""
        lora = multi_lora(self.gpt)
        if adapter is None or lora is None:
            return self.gpt.config.num_classes
        return lora.embedder(self.gpt, adapter + 1).num_classes

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

    # ----------------------------------------------------------------- continuous worker
    def _take_rows(self, free: int, idle: bool) -> list[_Row] | None:
        """At a step boundary: up to `free` queued rows ([] when none and slots are busy); waits while
        paused, or while idle with an empty queue; None once closing with nothing left."""
        with self._lock:
            while True:
                if not self._paused:
                    if self._queue and free > 0:
                        rows = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
                        self._in_flight += len(rows)
                        return rows
                    if not idle:
                        return []
                    if self._closing and not self._queue:
                        return None
                self._lock.wait(0.1)

    def _continuous_worker(self) -> None:
        """Step after step: free cancelled slots, admit queued images into free slots, decode one step."""
        decoder = self.decoder
        while True:
            cancelled = [slot.request.tag for slot in decoder.slots if slot.request.tag.job.cancelled]
            if cancelled:
                decoder.cancel(lambda r: r.tag.job.cancelled)
                self._release(cancelled)
            rows = self._take_rows(decoder.free, idle=not decoder.slots)
            if rows is None:
                self._finish_queue.put(None)
                return
            if rows:
                try:
                    self._admit(rows)
                except Exception as exc:  # a bad batch of conditions fails its own requests only
                    self._fail(rows, exc)
                    self._release(rows)
            if not decoder.slots:
                continue
            try:
                done = decoder.step()
            except Exception as exc:  # the step failed for every active slot
                active = [slot.request.tag for slot in decoder.slots]
                decoder.cancel(lambda r: True)
                self._fail(active, exc)
                self._release(active)
                continue
            if done:
                finished = [request.tag for request, _ in done]
                codes = torch.stack([tokens for _, tokens in done]).cpu()  # (F, N); waits for the device
                stage = (finished, codes, None, time.perf_counter())
                if self.overlap_decode:
                    self._finish_queue.put(stage)
                else:
                    self._finish_stage(stage)

    def _admit(self, rows: list[_Row]) -> None:
        """Prefill `rows` into free slots (prompts are encoded here)."""
        now = time.perf_counter()
        occupied = self.decoder.active + len(rows)
        jobs = {id(row.job): row.job for row in rows}
        with self._lock:
            self.counters["batches"] += 1
            self.counters["batched_images"] += len(rows)
            for job in jobs.values():
                if job.started is None:
                    job.started = now
                job.timings["batch_images"].append(occupied)
        cond, mask = self._conditions(rows)
        self.decoder.admit([
            SlotRequest(cond[i], None if mask is None else mask[i], row.job.spec.params,
                        torch.Generator(device=self.device).manual_seed(row.job.spec.row_seed(row.index)), tag=row,
                        adapter=row.job.spec.adapter,
                        **({} if row.job.spec.forced is None else {"forced": row.job.spec.forced.to(self.device)}))
            for i, row in enumerate(rows)])

    def _finish_worker(self) -> None:
        while True:
            stage = self._finish_queue.get()
            if stage is None:
                return
            stop = False
            if self.continuous:  # images that finished while the last decode ran: decode them together
                stages = [stage]
                while True:
                    try:
                        more = self._finish_queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    stages.append(more)
                stage = ([row for st in stages for row in st[0]], torch.cat([st[1] for st in stages]), None,
                         max(st[3] for st in stages))
            self._finish_stage(stage)
            if stop:
                return

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
        if not batch:
            return
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
        forced = None
        if any(row.job.spec.forced is not None for row in batch):
            tokens = self.gpt.config.num_image_tokens
            forced = torch.stack([torch.full((tokens,), -1, dtype=torch.long) if row.job.spec.forced is None
                                  else row.job.spec.forced.cpu().long() for row in batch])  # (B, N)
        adapters = [row.job.spec.adapter for row in batch]
        result = self.engine.run(cond, mask, params, row_generators=gens, step=self._step_policy(), forced=forced,
                                 adapters=adapters if any(a is not None for a in adapters) else None)
        codes = result.tokens.cpu()  # (B, N); waits for the device
        return batch, codes, start, time.perf_counter()

    def _complete_batch(self, batch: list[_Row], codes: torch.Tensor, start: float | None, generated: float) -> None:
        """Decode and attach finished rows; start None (continuous): generate_ms runs from admission."""
        grid = self.gpt.config.grid_size
        images = decode_codes(self.tokenizer, codes.view(-1, grid, grid), micro_batch=self.config.decode_chunk)
        decoded = time.perf_counter()
        finished = []
        with self._lock:
            if start is not None:
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
                if start is None:
                    job.timings["generate_ms"] = (generated - job.started) * 1e3
                else:
                    job.timings["generate_ms"] += (generated - start) * 1e3
                    job.timings["batch_images"].append(len(batch))
                job.timings["decode_ms"] += (decoded - generated) * 1e3
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
        slots = {}
        if self.continuous:
            dec = self.decoder.counters
            steps = dec["decode_steps"]
            slots = {"scheduler": "continuous", "slots": self.decoder.num_slots, "slots_active": self.decoder.active,
                     "slot_occupancy": dec["slot_steps"] / (steps * self.decoder.num_slots) if steps else None,
                     "prefills_total": dec["prefills"], "decode_steps_total": steps,
                     "prefills_per_s": dec["prefills"] / uptime if uptime > 0 else 0.0,
                     "decode_steps_per_s": steps / uptime if uptime > 0 else 0.0}
            if "drafted" in dec:  # Jacobi slots: a step advances a slot by 1 + its accepted tokens
                slots.update(jacobi_drafted_total=dec["drafted"], jacobi_accepted_total=dec["accepted"],
                             jacobi_acceptance=dec["accepted"] / dec["drafted"] if dec["drafted"] else None,
                             jacobi_rescued_total=dec["rescued"])  # steps an alternative of a draft tree won
        else:
            slots = {"scheduler": "static"}
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
            **slots,
        }
