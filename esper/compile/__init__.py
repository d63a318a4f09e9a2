"""Compilation plane: IR passes, the backend interface, the torch reference backend,
the shared parameter module and the float64 evaluator.

Import the submodules directly (``esper.compile.backend`` needs no torch)."""
