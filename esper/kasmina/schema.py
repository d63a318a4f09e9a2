"""A site's fixed activation schema: shape with a symbolic batch, and dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class SiteSchema:
    """What every kernel offered to a site must accept and return."""

    shape: tuple[int | str, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, value: Any) -> SiteSchema:
        """From a SiteSchema, an ``esper.ir`` TensorSchema / IRInput (anything with
        ``.shape`` and ``.dtype``), or a ``(shape, dtype)`` pair."""
        if isinstance(value, SiteSchema):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            shape, dtype = value
        else:
            shape, dtype = value.shape, value.dtype
        return cls(tuple(_dim(d) for d in shape), _torch_dtype(dtype))

    def example_shape(self, batch: int = 2) -> tuple[int, ...]:
        """A concrete shape: every symbolic dim set to ``batch``."""
        return tuple(batch if isinstance(d, str) else d for d in self.shape)

    def matches(self, shape: torch.Size) -> bool:
        """Whether a concrete activation shape fits (symbols match any size)."""
        if len(shape) != len(self.shape):
            return False
        return all(isinstance(d, str) or d == s for d, s in zip(self.shape, shape, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteSchema:
        return cls.of((tuple(data["shape"]), data["dtype"]))

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}[{', '.join(map(str, self.shape))}]"


def _dim(d: Any) -> int | str:
    if isinstance(d, bool) or not isinstance(d, int | str):
        raise ValueError(f"a dim is an int or a symbol, got {d!r}")
    return d


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(getattr(dtype, "value", dtype))
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return result
