"""The real pipeline stages' handlers (``esper.workers.stages`` registers them):
``compile`` turns submitted blueprints into signed, cached kernel artifacts.
Importing this package loads nothing heavy; import the stage module you need."""
