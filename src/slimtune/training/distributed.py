"""Data-parallel runs of slimtune's own loop, started by `accelerate launch` or `torchrun`.

    accelerate launch --num_processes 2 -m slimtune.cli prune --model ... --out pruned

A launcher starts one process per device and sets WORLD_SIZE, RANK and LOCAL_RANK. `setup()` then
has Accelerate's `PartialState` create the process group (NCCL on GPUs, gloo on CPUs) and pick this
process's device (cuda:LOCAL_RANK). Every process holds the whole model and draws its own
micro-batches (the loop shards the batch index by rank), so the global batch is
world size x micro-batch x accumulation.

Gradients. Only the adapters train and they are small, so the model is not wrapped in
DistributedDataParallel: once per optimiser step, after the last backward, `World.average_gradients`
all-reduces the gradients of the parameters that require grad (the adapters, and the W0 that
metric="grad" only observes) as one flat buffer per dtype, together with the step's losses. The
frozen base gets no gradient buckets and the distillation teacher (the same model with its adapters
off) needs no unwrapped copy. A parameter without a gradient on one rank counts as zero there, and
has a gradient afterwards when any rank had one.

After the reduction every rank holds the same bits, so clipping, `importance.observe`, AdamW and the
pruner compute the same numbers everywhere and the masks agree. They are still broadcast from rank 0
whenever they change: a guard against kernels that are not bit-reproducible across devices.

Only rank 0 writes (checkpoints, the JSONL log, the output directory); the others wait at a barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from ..errors import SlimtuneError

# rank 0 alone evaluates and saves while the others wait at a barrier: allow for that
TIMEOUT = timedelta(minutes=60)


def launched() -> bool:
    """True inside a multi-process launch (accelerate launch, torchrun): WORLD_SIZE > 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    except ValueError:
        return False


def is_main() -> bool:
    """True in the process that writes (rank 0, or the only process); sets nothing up."""
    try:
        return int(os.environ.get("RANK", "0") or 0) == 0 or not launched()
    except ValueError:
        return True


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device | None = None  # this process's device (None: a single process, the model's own)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def _comm(self) -> torch.device:
        """Where collectives run: the GPU for NCCL, else the CPU (gloo)."""
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            dist = torch.distributed
            if self._comm.type == "cuda":
                dist.barrier(device_ids=[self._comm.index])
            else:
                dist.barrier()

    @torch.no_grad()
    def average_gradients(self, params: list[torch.Tensor], extras: list[torch.Tensor]) -> list[float]:
        """Average `p.grad` of every parameter in `params` (the same list, in the same order, on every
        rank) and the scalars `extras` over all ranks, with one all-reduce per gradient dtype.
        Returns the averaged extras as floats: reading them back is the step's one host sync."""
        if not self.enabled:
            return [float(e) for e in extras]
        comm = self._comm
        # the scalars and one has-a-gradient flag per parameter ride in the float32 buffer
        flags = [torch.ones((), device=comm) if p.grad is not None else torch.zeros((), device=comm) for p in params]
        meta = torch.stack([*(e.detach().float().to(comm).reshape(()) for e in extras), *flags])
        groups: dict[torch.dtype, list[int]] = {torch.float32: []}
        for k, p in enumerate(params):
            groups.setdefault(p.dtype, []).append(k)
        reduced = {}
        for dtype in sorted(groups, key=str):  # the same order on every rank
            parts = [params[k].grad.reshape(-1).to(comm, dtype) if params[k].grad is not None
                     else torch.zeros(params[k].numel(), dtype=dtype, device=comm) for k in groups[dtype]]
            if dtype == torch.float32:
                parts.append(meta)
            flat = torch.cat(parts)
            torch.distributed.all_reduce(flat)
            reduced[dtype] = flat.div_(self.size)
        values = reduced[torch.float32][-meta.numel():].tolist()  # the one host sync
        for dtype, members in groups.items():
            offset = 0
            for k in members:
                p = params[k]
                part = reduced[dtype][offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if values[len(extras) + k] == 0:  # no rank had a gradient: leave it None, as one process would
                    continue
                if p.grad is None:
                    p.grad = part.to(p.device, copy=True)
                else:
                    p.grad.copy_(part)
        return values[: len(extras)]

    @torch.no_grad()
    def sum_(self, tensors) -> None:
        """Replace `tensors` (in place) by their sum over all ranks, with one all-reduce."""
        if not self.enabled:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self._comm) for t in tensors])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    @torch.no_grad()
    def broadcast_(self, tensors) -> None:
        """Overwrite `tensors` (in place) with rank 0's values."""
        if not self.enabled:
            return
        for t in tensors:
            buf = t.detach().to(self._comm, dtype=torch.uint8 if t.dtype == torch.bool else t.dtype)
            torch.distributed.broadcast(buf, src=0)
            t.copy_(buf)

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out


SINGLE = World()
_world: World | None = None


def _cpu_requested(device) -> bool:
    if str(device).startswith("cpu"):
        return True
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        return True
    return not torch.cuda.is_available()


def setup(device: str | torch.device = "auto") -> World:
    """The World of this process: rank 0 of 1 unless launched with several processes; then the
    process group is set up (once) with Accelerate and this process's device selected."""
    global _world
    if _world is not None:
        return _world
    if not launched():
        return SINGLE
    try:
        from accelerate import PartialState
    except ImportError:
        raise SlimtuneError(f"this is a multi-process launch (WORLD_SIZE={os.environ.get('WORLD_SIZE')}) and that needs accelerate; "
                            "pip install accelerate, or start a single process") from None
    name = str(device)
    if name.startswith("cuda:"):
        raise SlimtuneError(f"--device {name} pins every process to one GPU; in a multi-process launch each process uses its own "
                            "(cuda:LOCAL_RANK): pass --device auto or cuda")
    state = PartialState(cpu=_cpu_requested(device), timeout=TIMEOUT)
    if state.num_processes < 2:
        return SINGLE
    device = torch.device(state.device)
    if device.type == "cpu":
        device = torch.device("cpu")  # Accelerate says cpu:LOCAL_RANK; tensors say cpu
    _world = World(state.num_processes, state.process_index, state.local_process_index, device)
    return _world


def current() -> World:
    """`setup()` with the default device: what the training loop asks."""
    return setup()


def place(model: nn.Module) -> World:
    """In a multi-process launch, move `model` to this process's device (call before attaching
    adapters, gates and importance state); returns the World."""
    world = current()
    if not world.enabled:
        return world
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise SlimtuneError(f"the model is spread over {len(devices)} devices (a device_map) and cannot also be data-parallel; "
                            "load it whole on one device per process, or start a single process")
    if devices and devices != {world.device}:
        model.to(world.device)
    return world
