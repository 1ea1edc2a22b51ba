"""The ``dmo`` command line (:mod:`dmo.cli.main`); ``dmo = "dmo.cli:main"`` in ``pyproject.toml``."""

from dmo.cli.main import app, main

__all__ = ["app", "main"]
