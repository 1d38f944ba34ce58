"""Data-parallel training under ``torchrun``: what :func:`napari_nucsynth.train.train` does when launched that way.

``torchrun --nproc_per_node=N -m napari_nucsynth.cli train ...`` starts N processes with ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK`` in their environment. :func:`setup` sees them and joins the process group (NCCL on CUDA, gloo
on the CPU); without them (or with ``WORLD_SIZE=1``) it returns ``None`` and training is the single-process loop.

Gradients are synchronised by the optimisers, not by :class:`torch.nn.parallel.DistributedDataParallel`: every
optimiser gets a step pre-hook (:meth:`DistContext.sync_gradients_before_step`) that averages the gradients of its
parameters over the ranks right before it steps. That works for every model kind, including GANs whose
``train_step`` hook calls submodules directly (DDP only synchronises what runs through ``forward``), and needs no
change to the hooks. The weights start equal (broadcast from rank 0), the optimisers see equal gradients, so the
weights stay equal; buffers (BatchNorm running statistics) are broadcast from rank 0 after every step, as DDP
does before every forward.

torch is imported when a function here is called, not when the module is imported.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DistContext", "setup", "world_from_env"]


def world_from_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment variables ((1, 0, 0) without them)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
    return world, rank, local


@dataclass
class DistContext:
    """The process group of a data-parallel run, and the few collectives the training loop needs."""

    world_size: int
    rank: int
    local_rank: int
    device: Any  # torch.device: where this rank computes (and where NCCL's tensors must live)
    _handles: list = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective: every rank must call it)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_module(self, module, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters (unless ``buffers_only``) and buffers into every rank's ``module``."""
        import torch
        import torch.distributed as dist

        tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def average_gradients(self, params) -> None:
        """Average the ``.grad`` of ``params`` over the ranks. A parameter with a gradient on some ranks and none
        on others gets zeros where it had none; one with no gradient anywhere keeps ``None`` (the optimiser skips
        it, as it would in a single process)."""
        import torch
        import torch.distributed as dist

        params = [p for p in params if p.requires_grad]
        if not params:
            return
        has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # one flat buffer per dtype: few collectives, whatever the number of tensors
        by_dtype: dict = {}
        for p in live:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            off = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[off : off + n].view_as(g))
                off += n

    def sync_gradients_before_step(self, optimizer) -> None:
        """Make ``optimizer.step()`` average the gradients of its parameters over the ranks first (a step pre-hook:
        the model's ``train_step`` hook, if any, runs unchanged)."""

        def hook(opt, args, kwargs):
            self.average_gradients([p for g in opt.param_groups for p in g["params"]])

        self._handles.append(optimizer.register_step_pre_hook(hook))

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (a collective)."""
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        """Remove the optimiser hooks. The process group stays for the next :func:`setup` of this process (a group
        destroyed and made again on torchrun's store can read the old group's addresses) and is destroyed at exit."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def setup(device) -> tuple[DistContext | None, Any]:
    """Join the process group when launched by torchrun with more than one process.

    Returns ``(context, device)``: ``(None, resolve_device(device))`` for a single process; otherwise the context
    and this rank's device, ``cuda:LOCAL_RANK`` (NCCL) when ``device`` resolves to CUDA, the CPU (gloo) when it
    resolves to the CPU. MPS is refused (no collective backend supports it).
    """
    import torch
    import torch.distributed as dist

    from ..devices import resolve_device

    world, _, local = world_from_env()
    if dist.is_available() and dist.is_initialized():  # a caller that made the group itself
        world = dist.get_world_size()
    if world <= 1:
        return None, resolve_device(device)
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; launch without torchrun")
    dev = resolve_device(device)
    if dev.type == "cuda":
        if torch.cuda.device_count() <= local:
            raise ValueError(f"LOCAL_RANK {local} has no GPU (this machine has {torch.cuda.device_count()}); use "
                             "--nproc_per_node at most the number of GPUs")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not on {dev.type!r}")
    if not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        # a long timeout: ranks > 0 wait at the next collective while rank 0 validates and saves
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=60), **kw)
        atexit.register(_destroy)
    elif dist.get_backend() != backend:
        raise ValueError(f"the process group uses {dist.get_backend()!r}, but device {str(dev)!r} needs {backend!r}")
    return DistContext(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local, device=dev), dev


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
