"""MkDocs hook: the reference pages generated from the code (dmo/cli/reference.py) join the site at build time."""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

from dmo.cli.reference import PAGES


def on_files(files: Files, config: Any) -> Files:
    for path, render in PAGES.items():
        files.append(File.generated(config, path, content=render()))
    return files
