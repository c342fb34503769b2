"""Distributed calibration under ``torchrun`` (``torch.distributed``: gloo on CPU, NCCL on GPUs).

Every rank loads the model and the same calibration set; the engine (:func:`mmcompress.engine.run_layerwise`)
pushes only this rank's contiguous block of samples (:meth:`World.block`) through the decoder layers, and
every statistic a method gathers from those samples is combined across ranks here, so that each rank
ends every layer with the same weights as a single process would:

* maxima (SmoothQuant/MASQuant ``max |x|``): :meth:`World.max` — exact;
* sums (token counts, ``Σ|x|``, second moments ``Σ xᵀx`` of MASQuant's CMC and LaRoSA's PCA):
  :meth:`World.sum` — equal up to the order of the float64 additions: each rank sums its samples in
  order, then the partial sums are added; the relative difference of a sum of ``n`` per-sample terms
  is at most about ``n · 2⁻⁵³ · Σ|terms| / |Σ terms|`` (exact for integer counts);
* token subsets (AWQ/MBQ's scale search) and seeded samples of ``|x|`` (TEAL/CATS thresholds, each rank
  drawing from where one process's generator would stand): :meth:`World.gather_rows` — the rows each
  rank holds, placed at their global positions: exact;
* sequential training (MASQuant's per-sample AdamW steps): the rank holding sample ``j`` computes its
  gradient and :meth:`World.share_gradients` broadcasts it, so every rank takes the same step in the
  same order as one process: exact.

A ``World`` of size 1 (no ``torchrun``, or ``--nproc-per-node 1``) does no communication.  No launcher
and no transport of our own: ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
and :func:`init_from_env` calls ``init_process_group``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

_MAX_KEY = 64  # dictionary keys exchanged by :meth:`World.union` are small non-negative ints (modality ids)


class DistributedError(ValueError):
    """A bad ``torchrun`` set-up or a request that cannot be split across ranks (one line)."""


class World:
    """This process's place among the ranks, and the only code that talks to the other ranks."""

    def __init__(self, rank: int = 0, size: int = 1, device: str | torch.device = "cpu", backend: str | None = None):
        self.rank, self.size, self.device, self.backend = int(rank), int(size), torch.device(device), backend

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, backend={self.backend})"

    # -- the split of the calibration samples --------------------------------------------------------
    def blocks(self, n: int) -> list[range]:
        """Contiguous blocks of ``range(n)``, one per rank, sizes differing by at most one."""
        base, extra = divmod(n, self.size)
        out, lo = [], 0
        for r in range(self.size):
            hi = lo + base + (1 if r < extra else 0)
            out.append(range(lo, hi))
            lo = hi
        return out

    def block(self, n: int) -> range:
        """The global indices of the samples this rank processes."""
        if n < self.size:
            raise DistributedError(f"{n} calibration samples cannot be split across {self.size} ranks; "
                                   f"give at least --nsamples {self.size} or fewer ranks")
        return self.blocks(n)[self.rank]

    def owner(self, j: int, n: int) -> int:
        """The rank that holds global sample ``j`` of ``n``."""
        return next(r for r, b in enumerate(self.blocks(n)) if j in b)

    # -- collectives (no-ops for one rank) ---------------------------------------------------------
    def _collective(self, t: torch.Tensor, op) -> torch.Tensor:
        dev = t.device
        buf = t.detach().to(self.device).contiguous().clone()
        dist.all_reduce(buf, op=op)
        return buf.to(dev)

    def sum(self, x):
        """``Σ_ranks x`` (a tensor, or an int/float); identical on every rank."""
        if self.size == 1:
            return x
        if isinstance(x, torch.Tensor):
            return self._collective(x, dist.ReduceOp.SUM)
        kind = int if isinstance(x, int) else float
        t = torch.tensor([x], dtype=torch.int64 if kind is int else torch.float64)
        return kind(self._collective(t, dist.ReduceOp.SUM).item())

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise ``max_ranks x``: exact."""
        if self.size == 1:
            return x
        return self._collective(x, dist.ReduceOp.MAX)

    def union(self, keys) -> list[int]:
        """The sorted union over the ranks of small non-negative int ``keys``."""
        keys = sorted(set(int(k) for k in keys))
        if self.size == 1:
            return keys
        if any(not 0 <= k < _MAX_KEY for k in keys):
            raise ValueError(f"keys must be in [0, {_MAX_KEY}), got {keys}")
        present = torch.zeros(_MAX_KEY, dtype=torch.int64)
        present[keys] = 1
        return self.max(present).nonzero().reshape(-1).tolist()

    def gather_ints(self, value: int) -> list[int]:
        """``[value of rank 0, value of rank 1, ...]`` on every rank."""
        if self.size == 1:
            return [int(value)]
        mine = torch.zeros(self.size, dtype=torch.int64)
        mine[self.rank] = int(value)
        return self.sum(mine).tolist()  # every other entry is 0: exact

    def gather_rows(self, rows: torch.Tensor, positions: torch.Tensor, total: int) -> torch.Tensor:
        """``out[positions] = rows`` over all ranks: ``out`` has ``total`` rows, each held by one rank.
        The bits are moved, not added: exact."""
        out = torch.empty(total, *rows.shape[1:], dtype=rows.dtype)
        if self.size == 1:
            out[positions] = rows.cpu()
            return out
        counts = self.gather_ints(rows.shape[0])
        width = max(counts)
        pad = torch.zeros(width, *rows.shape[1:], dtype=rows.dtype, device=self.device)
        pad[: rows.shape[0]] = rows.to(self.device)
        pos = torch.zeros(width, dtype=torch.int64, device=self.device)
        pos[: rows.shape[0]] = positions.to(self.device)
        all_rows = [torch.empty_like(pad) for _ in range(self.size)]
        all_pos = [torch.empty_like(pos) for _ in range(self.size)]
        dist.all_gather(all_rows, pad)
        dist.all_gather(all_pos, pos)
        for r, c in enumerate(counts):
            out[all_pos[r][:c].cpu()] = all_rows[r][:c].cpu()
        return out

    def share_gradients(self, params: list[torch.Tensor], loss: torch.Tensor | None, owner: int) -> float:
        """After rank ``owner`` ran ``loss.backward()`` for one sample, give every rank its gradients
        (``p.grad``, ``None`` kept as ``None``) and return the loss value: one sequential step, exactly
        as one process takes it."""
        if self.size == 1:
            return float(loss.detach())
        sizes = [p.numel() for p in params]
        buf = torch.zeros(sum(sizes) + len(params) + 1, dtype=torch.float64)
        if self.rank == owner:
            off = 0
            for k, p in enumerate(params):
                if p.grad is not None:
                    buf[off:off + sizes[k]] = p.grad.detach().reshape(-1).double().cpu()
                    buf[sum(sizes) + k] = 1
                off += sizes[k]
            buf[-1] = float(loss.detach())
        buf = buf.to(self.device)
        dist.broadcast(buf, src=owner)
        buf = buf.cpu()
        if self.rank != owner:
            off = 0
            for k, p in enumerate(params):
                has = bool(buf[sum(sizes) + k])
                p.grad = buf[off:off + sizes[k]].reshape(p.shape).to(p.dtype).to(p.device) if has else None
                off += sizes[k]
        return float(buf[-1])

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


_SINGLE = World()


def current() -> World:
    """The world of the initialised default process group (``init_from_env`` or the user's own), else one rank."""
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return World(dist.get_rank(), dist.get_world_size(), device, backend)
    return _SINGLE


def init_from_env(device: str = "cpu") -> World:
    """Join the ranks ``torchrun`` started (gloo for a CPU ``device``, NCCL for CUDA); one rank without it.

    A bad set-up is one :class:`DistributedError` line, before any collective can hang."""
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        return current()
    if "WORLD_SIZE" not in env:
        return _SINGLE
    try:
        size = int(env["WORLD_SIZE"])
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not a number; launch with torchrun") from None
    if size < 1:
        raise DistributedError(f"WORLD_SIZE={size} must be >= 1")
    if size == 1:
        return _SINGLE
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={size} but {', '.join(missing)} not set; launch with "
                               "torchrun --nproc-per-node N")
    try:
        rank = int(env["RANK"])
    except ValueError:
        raise DistributedError(f"RANK={env['RANK']!r} is not a number") from None
    if not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={size}")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    dev = torch.device(device)
    if dev.type == "cuda":
        local = int(env.get("LOCAL_RANK", "0"))
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank} (LOCAL_RANK={local}) has no CUDA device "
                                   f"({torch.cuda.device_count() if torch.cuda.is_available() else 0} visible)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"distributed calibration runs on cpu (gloo) or cuda (nccl), not --device {device}")
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(minutes=30))
    return World(rank, size, dev, backend)


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def launched() -> bool:
    """``torchrun`` (or another launcher) started more than one rank and this process has not joined them
    yet (a malformed ``WORLD_SIZE`` counts too: :func:`init_from_env` reports it)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return (not size.isdigit() or int(size) > 1) and not (dist.is_available() and dist.is_initialized())


@contextmanager
def joined(device: str = "cpu"):
    """The :class:`World` of the ranks ``torchrun`` started, for the duration of the block."""
    world = init_from_env(device)
    try:
        yield world
    finally:
        shutdown(world)
