"""The collectives a data-parallel trainer needs beyond DDP's own, pickle-free:
bytes broadcast as a uint8 tensor (its length first), flags agreed by all-reduce,
seed gradients averaged in one flat all-reduce, modules broadcast from rank 0,
and a hash of the whole model state compared across ranks.

``torch.distributed.broadcast_object_list`` would pickle; nothing here does."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from esper.errors import ConfigError, ReplicaDivergenceError


@dataclass(frozen=True)
class Comm:
    """This process's place in the process group, and where collectives' tensors
    live (the CPU for gloo, this rank's GPU for NCCL)."""

    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # --- bytes and flags ---------------------------------------------------------------

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """``data`` from rank ``src`` to every rank (others pass None): the length as
        an int64 tensor, then the bytes as a uint8 tensor."""
        mine = self.rank == src
        if mine and data is None:
            raise ValueError("the source rank must give the bytes to broadcast")
        size = torch.tensor([len(data) if mine and data is not None else 0], dtype=torch.int64,
                            device=self.device)
        dist.broadcast(size, src)
        n = int(size.item())
        if n == 0:
            return b""
        if mine and data is not None:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src)
        return data if mine and data is not None else buf.cpu().numpy().tobytes()

    def agree(self, flags: Sequence[bool], *, any_rank: bool) -> list[bool]:
        """Per flag: set on any rank (``any_rank``: MAX), or on every rank (MIN)."""
        if not flags:
            return []
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if any_rank else dist.ReduceOp.MIN)
        return [bool(v) for v in t.tolist()]

    def max_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # --- gradients and modules ----------------------------------------------------------

    def average_grads(self, params: Iterable[torch.Tensor],
                      flags: Sequence[bool] = ()) -> list[bool]:
        """Average ``params``' gradients over ranks in ONE all-reduce (a flat float32
        buffer plus one presence count per param): a param with a gradient on some
        rank gets sum / world everywhere (as DDP averages), one with none anywhere
        keeps ``grad is None`` (an optimizer must not step it). ``flags`` ride along
        in the same all-reduce; returned: each set on any rank."""
        ps = [p for p in params if p.requires_grad]
        if not ps and not flags:
            return []
        parts = [
            p.grad.detach().reshape(-1).float().to(self.device) if p.grad is not None
            else torch.zeros(p.numel(), dtype=torch.float32, device=self.device)
            for p in ps
        ]
        tail = [float(p.grad is not None) for p in ps] + [float(f) for f in flags]
        flat = torch.cat([*parts, torch.tensor(tail, device=self.device)])
        dist.all_reduce(flat)
        counts = flat[flat.numel() - len(tail):].tolist()
        offset = 0
        for p, count in zip(ps, counts, strict=False):
            n = p.numel()
            if count > 0:
                avg = (flat[offset:offset + n] / self.world).view_as(p).to(p.device, p.dtype)
                if p.grad is None:
                    p.grad = avg
                else:
                    p.grad.copy_(avg)
            offset += n
        return [c > 0 for c in counts[len(ps):]]

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Copy ``module``'s parameters and buffers from rank ``src`` in place, one
        broadcast per dtype (a seed built on every rank starts from rank ``src``'s
        random init)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in (*module.parameters(), *module.buffers()):
            by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for ts in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in ts])
                dist.broadcast(flat, src)
                offset = 0
                for t in ts:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    # --- replica identity ---------------------------------------------------------------

    def hashes(self, digest: bytes) -> list[bytes]:
        """Every rank's 32-byte ``digest``, in rank order."""
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)
        return [t.cpu().numpy().tobytes() for t in out]

    def check_identical(self, digest: bytes, what: str) -> None:
        """Raise ReplicaDivergenceError on every rank unless all ranks' digests match."""
        got = self.hashes(digest)
        if any(h != got[0] for h in got):
            ranks = ", ".join(f"rank {r}: {h.hex()[:16]}" for r, h in enumerate(got))
            raise ReplicaDivergenceError(f"replicas diverged {what} ({ranks})")


def state_digest(modules: Sequence[nn.Module], extra: object = None) -> bytes:
    """sha256 over every tensor of ``modules``' state dicts (name, dtype, shape and
    raw bytes, in registration order) and ``extra`` as canonical JSON: equal on two
    ranks iff their states are bit-identical."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in module.state_dict(keep_vars=False).items():
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)};".encode())
            data = t.detach().cpu().contiguous().reshape(-1)
            if data.dtype is torch.bool:
                data = data.to(torch.uint8)
            h.update(data.view(torch.uint8).numpy().tobytes())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, separators=(",", ":")).encode())
    return h.digest()


def env_comm(device: str = "cpu", *, timeout_s: float = 1800.0) -> Comm:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL with one GPU per process
    on ``cuda``, gloo on ``cpu``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("--ddp runs under torchrun (RANK and WORLD_SIZE are not set)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if backend == "nccl" else None)
    return Comm(dist.get_rank(), dist.get_world_size(), dev)


def close_comm() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
