"""The validation plane: prove a kernel artifact computes its blueprint's
function, trains correctly and is safe to graft before any trainer sees it.

``runner.SandboxRunner`` runs ``checks`` on the real artifact bytes in an
isolated ``python -m esper.validate.sandbox`` process; ``report`` is the
machine-readable outcome; ``policy`` and ``tolerances`` say what is demanded.
Importing this package (or runner, report, policy) does not load torch."""
