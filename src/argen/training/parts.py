"""Training parts shared by the generator and the tokenizer trainers.

- `EMA(model, decay, warmup)`: a float32 moving average of the trainable parameters (`warmup` uses
  min(decay, (1+t)/(10+t)) at step t). Under FSDP it shadows the local shards; `state_dict()` gathers
  the full tensors by parameter name.
- `BatchOrder(size, batch_size, seed)`: the deterministic data order and the data position. Batch `s`
  is a pure function of (seed, s) by `BATCH_ORDER_RULE`; `position` is the next batch to draw.
  `generator(s)` is a torch.Generator for step s's other random choices (augmented copy, dropout).
- `resolve_precision(name, device, fp16_ok)`: the autocast dtype from "auto"/None (bf16 on CUDA,
  fp32 on the CPU), "fp32", "bf16" or "fp16" (CUDA only; only where the trainer has a grad scaler).
- `JsonlLog(path, start_step, enabled)`: `log.jsonl`, one JSON object per line; opened on resume it
  first drops the lines past `start_step` (those steps are redone) and any line cut short by a crash.
- `training_scope(deterministic, device)`: the caller's torch RNG and deterministic-algorithms
  setting are restored after the run. On the CPU deterministic algorithms are always on (they cost
  nothing measurable there; see docs/training.md); `deterministic` turns them on for CUDA too (and
  sets `CUBLAS_WORKSPACE_CONFIG=:4096:8` when it is unset, which cuBLAS needs for that).
- `ModelState`, `OptimizerState`, `RngState`, `Settings`, `Attributes`: checkpoint parts (objects
  with `state_dict()` / `load_state_dict()`), saved together by `checkpointing.TrainingCheckpoint`.
  LR schedulers and grad scalers are parts as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from argen.training import distributed as D
from argen.utils.errors import ArgenError, CheckpointError
from argen.utils.io import atomic_write
from argen.utils.seeds import derive_seed
from argen.utils.torch_utils import parse_dtype

BATCH_ORDER_RULE = ("v2: epoch e is torch.randperm(size) under derive_seed('batch-order', seed, e); the run's "
                    "k-th sample is permutation[k // size][k % size]; batch s holds samples s*B .. s*B+B-1")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP shard) -> its full tensor (collective); plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's trainable parameters, kept in float32."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in trainable]
        self.shadow = [p.detach().clone().float() for _, p in trainable]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        params = [p.detach().float() for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors by parameter name (collective under FSDP)."""
        return {n: full_tensor(t).detach().cpu() for n, t in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(f"the checkpoint's EMA lacks {len(missing)} parameters (e.g. {missing[0]})")
        for name, t in zip(self.names, self.shadow):
            full = state[name].to(torch.float32)
            if hasattr(t, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                t.copy_(distribute_tensor(full.to(t.device), t.device_mesh, t.placements))
            else:
                t.copy_(full.to(t.device))


# ---------------------------------------------------------------------- data order
class BatchOrder:
    """Deterministic batches of sample indices by `BATCH_ORDER_RULE`; the part's state is the position."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size <= 0 or batch_size <= 0:
            raise ArgenError(f"cannot draw batches of {batch_size} from {size} samples")
        self.size, self.batch_size, self.seed = int(size), int(batch_size), int(seed)
        self.position = 0
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            gen = torch.Generator().manual_seed(derive_seed("batch-order", self.seed, epoch))
            self._cache[epoch] = torch.randperm(self.size, generator=gen)
        return self._cache[epoch]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (epochs (B,), indices (B,)) of batch `step`; batches run on across epoch ends."""
        samples = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)  # (B,)
        epochs, offsets = samples // self.size, samples % self.size
        indices = torch.empty_like(samples)
        for epoch in torch.unique(epochs).tolist():
            chosen = epochs == epoch
            indices[chosen] = self.permutation(epoch)[offsets[chosen]]
        return epochs, indices

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at `position`; the position moves on by one."""
        out = self.batch(self.position)
        self.position += 1
        return out

    def keys(self, stop: int) -> Iterator[list[tuple[int, int]]]:
        """[(epoch, index), ...] per batch from `position` to `stop` (a DataLoader batch sampler; it does not
        move the position: the training loop calls `next()` or sets `position` as it consumes batches)."""
        for step in range(self.position, stop):
            epochs, indices = self.batch(step)
            yield list(zip(epochs.tolist(), indices.tolist()))

    @property
    def epoch(self) -> int:
        return self.position * self.batch_size // self.size

    def generator(self, step: int) -> torch.Generator:
        """A generator for step `step`'s other random choices, independent of the order and of the resume."""
        return torch.Generator().manual_seed(derive_seed("batch-extras", self.seed, step))

    def state_dict(self) -> dict:
        return {"rule": BATCH_ORDER_RULE, "size": self.size, "batch_size": self.batch_size, "seed": self.seed,
                "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [k for k in ("rule", "size", "batch_size", "seed") if state.get(k) != mine[k]]
        if changed:
            raise CheckpointError(f"the checkpoint's data order differs from this run's ({', '.join(changed)}: "
                                  f"{', '.join(f'{state.get(k)} vs {mine[k]}' for k in changed)}); resume with the "
                                  f"same data, --batch-size and --seed")
        self.position = int(state["position"])


# ---------------------------------------------------------------------- precision
def resolve_precision(name: str | None, device: torch.device, fp16_ok: bool) -> torch.dtype:
    """The autocast dtype for `--precision` on `device` (None/"auto": bf16 on CUDA, fp32 on the CPU)."""
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = parse_dtype(name)
    if dtype == torch.float16 and not fp16_ok:
        raise ArgenError("--precision fp16 is not supported by this trainer; use bf16 or fp32")
    if dtype == torch.float16 and device.type != "cuda":
        raise ArgenError("fp16 training needs CUDA; use fp32 or bf16 on the CPU")
    return dtype


# ---------------------------------------------------------------------- logging
def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a JSONL log past `step` (they will be redone) and lines cut short by a crash."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    atomic_write(path, lambda tmp: tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8"))


class JsonlLog:
    """Append-only `log.jsonl` of a run (resumed runs continue after `start_step`); a no-op when disabled."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.handle = None
        if enabled:
            truncate_log(self.path, start_step)
            self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


# ---------------------------------------------------------------------- global torch state
@contextlib.contextmanager
def training_scope(deterministic: bool, device: torch.device):
    """Run a training job with deterministic algorithms on the CPU (and on CUDA when asked); the caller's
    RNG states and deterministic setting are restored afterwards."""
    import torch.utils.deterministic as det_settings

    was, was_fill = torch.are_deterministic_algorithms_enabled(), det_settings.fill_uninitialized_memory
    devices = [device] if device.type == "cuda" else []
    if deterministic and device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        with torch.random.fork_rng(devices=devices):
            torch.use_deterministic_algorithms(deterministic or device.type == "cpu")
            # the NaN fill of new tensors is a debugging aid that deterministic mode also turns on; it is
            # not needed for determinism and cost ~7% of a CPU generator step
            det_settings.fill_uninitialized_memory = False
            yield
    finally:
        torch.use_deterministic_algorithms(was)
        det_settings.fill_uninitialized_memory = was_fill


# ---------------------------------------------------------------------- checkpoint parts
def _options(info: D.DistInfo | None):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=bool(info and info.distributed))


class ModelState:
    """A module's full (unsharded) state; plain, DDP and FSDP2 modules give the same file. With
    `trainable_only` the part holds only the parameters that train (a LoRA run's adapters: its frozen
    weights come from the init again on resume); `full_state_dict()` is always the whole state."""

    def __init__(self, module: torch.nn.Module, info: D.DistInfo | None = None, trainable_only: bool = False):
        self.module, self.info, self.trainable_only = module, info, trainable_only

    def _trainable(self) -> set[str]:
        return {n for n, p in D.unwrap(self.module).named_parameters() if p.requires_grad}

    def full_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=_options(self.info))

    def state_dict(self) -> dict:
        state = self.full_state_dict()
        if self.trainable_only:
            keep = self._trainable()
            state = {k: v for k, v in state.items() if k in keep}
        return state

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        options = _options(None)
        if self.trainable_only:
            wanted = self._trainable()
            if set(state) != wanted:
                raise CheckpointError(f"the checkpoint holds other trainable weights than this run "
                                      f"({len(set(state) ^ wanted)} differ, e.g. {sorted(set(state) ^ wanted)[0]})")
            options = dataclasses.replace(options, strict=False)
        set_model_state_dict(self.module, state, options=options)


class OptimizerState:
    """An optimizer's full state keyed by parameter names."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, info: D.DistInfo | None = None):
        self.module, self.optimizer, self.info = module, optimizer, info

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer, options=_options(self.info))

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state, options=_options(None))


class RngState:
    """The global torch CPU (and CUDA) generator state of every rank; restored when the world size matches."""

    def __init__(self, device: torch.device, info: D.DistInfo | None = None):
        self.device, self.info = device, info or D.DistInfo(device=device)

    def _local(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self) -> dict:
        return {"world_size": self.info.world_size, "ranks": D.all_gather_objects(self._local(), self.info)}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.info.world_size:
            return  # another world size: the per-rank dropout streams start afresh
        mine = state["ranks"][self.info.rank]
        torch.set_rng_state(mine["cpu"])
        if self.device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], self.device)


class Settings:
    """Values a resumed run must share with its checkpoint; a mismatch is refused, naming the keys.

    `message` is formatted with `keys` (the differing names, comma separated)."""

    def __init__(self, values: dict, message: str):
        self.values, self.message = dict(values), message

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        diff = [k for k in sorted(set(state) | set(self.values)) if state.get(k) != self.values.get(k)]
        if diff:
            raise CheckpointError(self.message.format(keys=", ".join(diff)))


class Attributes:
    """Plain attributes of an object (counters, lists) as a part, e.g. a FailureTracker's counts."""

    def __init__(self, obj, names: tuple[str, ...]):
        self.obj, self.names = obj, names

    def state_dict(self) -> dict:
        return {n: getattr(self.obj, n) for n in self.names}

    def load_state_dict(self, state: dict) -> None:
        for name in self.names:
            setattr(self.obj, name, state[name])
