"""IR-to-IR optimisation passes; each preserves semantics and output schemas."""

from esper.compile.passes.pipeline import PASSES, optimize

__all__ = ["PASSES", "optimize"]
