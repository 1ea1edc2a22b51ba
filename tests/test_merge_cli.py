"""``dmo merge`` on the command line: dense and adapter proxies from a manifest, parameters, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import assert_same_model, linear_reference, load_model, make_set
from typer.testing import CliRunner

from dmo.cli import app
from dmo.merge.experts import ParamFilter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    make_set(tmp_path, torch.bfloat16, n=2, visual=True)
    path = tmp_path / "experts.yaml"
    path.write_text("name: tiny\nkind: full\nbudget: 4\nbase: ./base\nexperts: {general: ./e0, ocr: ./e1}\n")
    return path


def _dmo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "dmo.cli", "merge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_dense_merge_prints_bytes_and_speed_and_refuses_to_overwrite(manifest: Path) -> None:
    root = manifest.parent
    done = _dmo("--experts", str(manifest), "--weights", "general=0.25,ocr=0.75", "--out", "proxy", cwd=root)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert "read" in last and "wrote" in last and "GB/s" in last
    expected = linear_reference(
        root / "base", {"general": root / "e0", "ocr": root / "e1"}, {"general": 0.25, "ocr": 0.75},
        keep=ParamFilter("full"),
    )  # fmt: skip
    assert_same_model(load_model(root / "proxy"), expected)
    again = _dmo("--experts", str(manifest), "--weights", "general=0.5,ocr=0.5", "--out", "proxy", cwd=root)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0]


def test_options_reach_the_merge(manifest: Path) -> None:
    root = manifest.parent
    runner = CliRunner()
    args = ["merge", "--experts", str(manifest), "--weights", "general=0.3,ocr=0.7", "--out", str(root / "ties"),
            "--method", "ties", "--param", "density=0.5", "--param", "consensus=count", "--exclude", "none",
            "--dtype", "float32", "--max-shard-size", "4KB", "--paper-rounding", "--threads", "1"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((root / "ties" / "dmo_merge.json").read_text())
    assert record["method"] == "ties" and record["params"] == {"density": 0.5, "consensus": "count"}
    assert record["weights"] == {"general": 0.25, "ocr": 0.75}  # round(w * 4) / 4
    assert record["exclude"] == [] and record["dtype"] == "float32"
    assert len(list((root / "ties").glob("model-*.safetensors"))) > 1
    assert (root / "ties" / "model.safetensors.index.json").is_file()
    result = runner.invoke(app, [*args[:5], "--out", str(root / "bad"), "--param", "oops"])
    assert result.exit_code != 0 and "name=value" in str(result.exception)


def test_adapter_proxy_from_the_command_line(lora_world: dict, tmp_path: Path) -> None:
    root = lora_world["root"]
    manifest = tmp_path / "lora.yaml"
    manifest.write_text(
        f"name: tiny-lora\nbase: {root / 'base'}\nexperts: {{a: {root / 'a'}, b: {root / 'b'}, c: {root / 'c'}}}\n"
    )
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["merge", "--experts", str(manifest), "--weights", "a=0.5,b=0.25,c=0.25",
                                      "--out", str(out), "--as", "adapter"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--max-lora-rank >= 10" in result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "lm_head" not in config["target_modules"]
