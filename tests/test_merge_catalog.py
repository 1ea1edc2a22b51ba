"""``dmo merge --help`` lists the merge methods without importing torch or pandas (it took 2.2 s when it did)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dmo.merge.catalog import builtin_method_names
from dmo.merge.registry import method_names

ROOT = Path(__file__).resolve().parent.parent


def test_the_light_listing_names_every_registered_method() -> None:
    assert builtin_method_names() == method_names()
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "fisher", "wudi2"} <= set(builtin_method_names())


def test_merge_help_imports_neither_torch_nor_pandas() -> None:
    # a fresh interpreter runs the command line as `dmo merge --help` does, then reports what it imported
    script = (
        "import json, sys\n"
        "from dmo.cli.main import app\n"
        "try:\n"
        "    app(['merge', '--help'])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in ('torch', 'pandas', 'transformers', 'optuna', 'scipy') if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    *help_text, last = res.stdout.strip().splitlines()
    report = json.loads(last)
    assert report == {"code": 0, "heavy": []}
    text = " ".join(help_text)
    assert "Merge method:" in text and all(name in text for name in method_names())
