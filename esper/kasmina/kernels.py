"""Kernels for seed slots: the per-site kernel table, offers queued for the
next step boundary, and the loader pool that builds modules off the training
thread (``factory(device)`` may take seconds; the training loop only polls)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

# What a loaded kernel artifact gives: factory(device) → a fresh module. Opaque here.
from esper.compile.backend import ModuleFactory
from esper.kasmina.schema import SiteSchema


@dataclass(frozen=True, slots=True)
class KernelEntry:
    cache_key: str
    factory: ModuleFactory


class KernelTable:
    """A site's kernel slots. Seeds holding the same slot share a kernel (one
    cache key), so they can run as one batched launch."""

    def __init__(self) -> None:
        self.entries: list[KernelEntry] = []

    def slot_for(self, cache_key: str, factory: ModuleFactory) -> int:
        """The slot holding ``cache_key``, added if new."""
        for i, entry in enumerate(self.entries):
            if entry.cache_key == cache_key:
                return i
        self.entries.append(KernelEntry(cache_key, factory))
        return len(self.entries) - 1

    def __getitem__(self, slot: int) -> KernelEntry:
        return self.entries[slot]

    def keys(self) -> list[str]:
        return [e.cache_key for e in self.entries]


@dataclass(frozen=True, slots=True)
class KernelOffer:
    """A request to germinate ``cache_key`` in ``seed`` (None: any free slot) of a site."""

    site: str
    seed: int | None
    cache_key: str
    factory: ModuleFactory


class OfferQueue:
    """Thread-safe inbox of offers; drained by the training thread at a boundary."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[KernelOffer] = queue.SimpleQueue()

    def put(self, offer: KernelOffer) -> None:
        self._q.put(offer)

    def drain(self) -> list[KernelOffer]:
        out: list[KernelOffer] = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def empty(self) -> bool:
        return self._q.empty()


@dataclass(slots=True)
class LoadedKernel:
    """A built, shape-checked module and the CUDA event its init kernels end at."""

    module: nn.Module
    ready: torch.cuda.Event | None


class KernelLoader:
    """A small thread pool that runs factories and a dry forward off the
    training thread. On CUDA the work runs on a side stream; the training
    stream waits on an event at install time (no host sync)."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kasmina-loader")
        self._streams = threading.local()
        # Start the threads now: starting one later waits for the OS to schedule
        # it, a stall the training thread would feel at the boundary that offers.
        started = [self._pool.submit(lambda: None) for _ in range(workers)]
        for f in started:
            f.result()

    def submit(
        self, factory: ModuleFactory, device: torch.device, schema: SiteSchema
    ) -> Future[LoadedKernel]:
        return self._pool.submit(self._build, factory, device, schema)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _build(
        self, factory: ModuleFactory, device: torch.device, schema: SiteSchema
    ) -> LoadedKernel:
        if device.type != "cuda":
            return LoadedKernel(build_checked(factory, device, schema), None)
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            module = build_checked(factory, device, schema)
            ready = torch.cuda.Event()
            ready.record(stream)
        return LoadedKernel(module, ready)


def build_checked(factory: ModuleFactory, device: torch.device, schema: SiteSchema) -> nn.Module:
    """``factory(device)``, then one dry forward on zeros of the site's schema:
    the output must have the input's shape and dtype (a seed is a residual
    branch). Raises TypeError/ValueError on a misfit."""
    module = factory(device)
    if not isinstance(module, nn.Module):
        raise TypeError(f"kernel factory returned {type(module).__name__}, not an nn.Module")
    module.to(device)
    x = torch.zeros(schema.example_shape(2), dtype=schema.dtype, device=device)
    with torch.no_grad():
        y = module(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        got = f"{y.dtype}{list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"kernel maps {schema} to {got}; a seed must keep the site's schema")
    return module
