"""Sub-commands of the ``noisescale`` CLI, one module each.

Each module defines ``register(subparsers)``, which adds its parser and sets ``func`` to a callable
``run(args) -> int``. The CLI discovers the modules in this package, so a new command is one new
file. Heavy imports (torch, matplotlib, optuna) belong inside ``run`` so that ``noisescale --help``
stays fast.
"""
