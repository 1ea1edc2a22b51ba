"""`dmo train` without LLaMA-Factory: the recipe, YAMLs, plans, local runs (with a stand-in llamafactory-cli),
registration into manifests, and SLURM scripts. The real thing runs in test_llamafactory_integration.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from test_data_mix import make_sources

from dmo.config import load_manifest
from dmo.errors import DmoError
from dmo.llamafactory import (
    LORA_DEFAULTS,
    PAPER_DEFAULTS,
    Recipe,
    RunFolder,
    parse_overrides,
    plan_runs,
    register,
    train_runs,
    validate,
    write_slurm,
)
from dmo.mixture import Mixture

MIX = Mixture(("general", "ocr"), (0.25, 0.75))


def test_paper_recipe_in_one_place(tmp_path):
    r = Recipe(base="Qwen/Qwen2-VL-2B-Instruct", template="qwen2_vl")
    assert (r.budget, r.global_batch, r.max_steps, r.accumulation) == (102_400, 128, 800, 32)
    cfg = r.config(dataset_dir=tmp_path, data={"dataset": "x"}, output_dir=tmp_path / "o", seed=1, run="x")
    assert cfg["lora_rank"] == 16 and cfg["lora_alpha"] == 32 and cfg["lora_target"] == "all"
    assert cfg["learning_rate"] == 2e-5 and cfg["lr_scheduler_type"] == "cosine" and cfg["warmup_ratio"] == 0.1
    assert cfg["bf16"] is True and cfg["freeze_vision_tower"] is True and cfg["freeze_multi_modal_projector"] is True
    assert cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"] == 128
    assert cfg["max_steps"] * 128 == 102_400 and cfg["seed"] == 1 and cfg["finetuning_type"] == "lora"
    full = Recipe(base="b", template="intern_vl", method="full", gpus=8).config(
        dataset_dir=tmp_path, data={"dataset": "x"}, output_dir=tmp_path, seed=0, run="x"
    )
    assert not set(LORA_DEFAULTS) & set(full) and full["finetuning_type"] == "full"
    assert full["gradient_accumulation_steps"] == 4  # 128 / (4 per device x 8 GPUs)
    assert set(PAPER_DEFAULTS) <= set(full)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_batch": 126}, "not a multiple"),
        ({"overrides": {"output_dir": "x"}}, "set by dmo itself"),
        ({"method": "qlora"}, "unknown training method"),
        ({"budget": 0}, "positive whole number"),
    ],
)
def test_recipe_refuses(kwargs, message):
    with pytest.raises(DmoError, match=message):
        Recipe(base="b", template="qwen2_vl", **kwargs)


def test_parse_overrides():
    assert parse_overrides(["use_cpu=true", "bf16=false", "lr=1e-4", "report_to=none", "x=a=b"]) == {
        "use_cpu": True, "bf16": False, "lr": 1e-4, "report_to": "none", "x": "a=b",
    }  # fmt: skip
    with pytest.raises(DmoError, match="key=value"):
        parse_overrides(["novalue"])


FAKE_LF = """\
#!{python}
# Stand-in for llamafactory-cli: 'train CONFIG' writes a tiny PEFT LoRA adapter into output_dir.
import json, sys, pathlib
import torch, yaml
from safetensors.torch import save_file
cfg = yaml.safe_load(open(sys.argv[2]))
print("training", cfg["run_name"], cfg.get("dataset"), cfg.get("mix_strategy"))
if cfg.get("fail_with"):
    print("Traceback (most recent call last):")
    print("ValueError: " + cfg["fail_with"])
    sys.exit(1)
out = pathlib.Path(cfg["output_dir"])
(out / "checkpoint-1").mkdir(parents=True, exist_ok=True)
torch.manual_seed(cfg["seed"] + len(cfg["run_name"]))
mod = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
save_file({{f"{{mod}}.lora_A.weight": torch.randn(2, 4), f"{{mod}}.lora_B.weight": torch.randn(4, 2)}},
          str(out / "adapter_model.safetensors"))
(out / "adapter_config.json").write_text(json.dumps({{"peft_type": "LORA", "r": 2, "lora_alpha": 4,
    "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}}))
"""


@pytest.fixture
def fake_lf(tmp_path) -> Path:
    path = tmp_path / "lf" / "bin" / "llamafactory-cli"
    path.parent.mkdir(parents=True)
    path.write_text(FAKE_LF.format(python=sys.executable))
    path.chmod(0o755)
    return path


def _recipe(**kw) -> Recipe:
    return Recipe(base="org/base-model", template="qwen2_vl", budget=16, global_batch=8, per_device_batch=8, **kw)


def test_plan_writes_data_configs_and_plan(tmp_path):
    src = make_sources(tmp_path, n_general=16)
    out = tmp_path / "runs"
    manifest = tmp_path / "experts" / "m.yaml"
    planned = plan_runs("experts", _recipe(), data=src, out=out, domains=["general", "ocr"], manifest=manifest)
    assert [r.name for r in planned.runs] == ["expert-general", "expert-ocr"] and not planned.validated
    cfg = yaml.safe_load((out / "configs" / "expert-ocr.yaml").read_text())
    assert cfg["dataset"] == "ocr-16" and cfg["dataset_dir"] == str(out / "data") and cfg["max_steps"] == 2
    assert cfg["output_dir"] == str(out / ".partial" / "expert-ocr") and cfg["template"] == "qwen2_vl"
    info = json.loads((out / "data" / "dataset_info.json").read_text())
    assert {"general", "ocr", "general-16", "ocr-16"} <= set(info)
    plan_runs("mixtures", _recipe(), data=src, out=out, mixtures=[MIX], seeds=[0, 1], strategy="interleave")
    runs = RunFolder(out).runs()
    assert set(runs) == {"expert-general", "expert-ocr", "general-0.25+ocr-0.75-interleave.seed0",
                         "general-0.25+ocr-0.75-interleave.seed1"}  # fmt: skip
    icfg = yaml.safe_load((out / "configs" / "general-0.25+ocr-0.75-interleave.seed1.yaml").read_text())
    assert (icfg["dataset"], icfg["mix_strategy"], icfg["interleave_probs"]) == (
        "general,ocr", "interleave_under", "0.25,0.75",
    )  # fmt: skip
    assert icfg["seed"] == 1
    assert runs["general-0.25+ocr-0.75-interleave.seed0"].manifest.endswith("experts/runs-interleave.yaml")
    # another recipe in the same run folder is refused, and writes nothing
    before = (out / "plan.json").read_bytes()
    with pytest.raises(DmoError, match="planned with budget 16"):
        plan_runs("experts", Recipe(base="org/base-model", template="qwen2_vl", budget=32, global_batch=8,
                                    per_device_batch=8), data=src, out=out, domains=["general"])  # fmt: skip
    assert (out / "plan.json").read_bytes() == before


def test_plan_refuses_too_little_data_and_writes_nothing(tmp_path):
    src = make_sources(tmp_path, n_general=3)
    out = tmp_path / "runs"
    with pytest.raises(DmoError, match="pool has only 3"):
        plan_runs("mixtures", _recipe(), data=src, out=out, mixtures=[MIX])
    assert not out.exists()
    with pytest.raises(DmoError, match="one seed"):
        plan_runs("experts", _recipe(), data=src, out=out, domains=["ocr"], seeds=[0, 1])


def test_local_runs_move_register_and_resume(tmp_path, fake_lf, capsys):
    src = make_sources(tmp_path, n_general=16)
    out = tmp_path / "runs"
    manifest = tmp_path / "experts" / "m.yaml"
    recipe = _recipe()
    plan_runs("mixtures", recipe, data=src, out=out, mixtures=[MIX], manifest=manifest)
    folder = RunFolder(out)
    train_runs(folder, fake_lf, validate_first=False)
    # a trained mixture waits for its experts: the manifest must always load
    assert not manifest.exists()
    assert "no expert for every domain" in capsys.readouterr().out
    plan_runs("experts", recipe, data=src, out=out, domains=["general", "ocr"], manifest=manifest)
    results = train_runs(folder, fake_lf, validate_first=False)
    assert sorted(r.run.name for r in results if not r.skipped) == ["expert-general", "expert-ocr"]
    m = load_manifest(manifest)
    assert m.kind == "lora" and m.budget == 16 and str(m.base) == "org/base-model@main"
    assert m.experts["ocr"].path == out / "experts" / "ocr"
    ((mixture, seed, ref),) = m.trained_mixtures()
    assert (mixture.as_dict(), seed, ref.path) == (
        {"general": 0.25, "ocr": 0.75},
        0,
        out / "mixtures" / MIX.id / "seed0",
    )
    assert not list((out / "experts" / "ocr").glob("checkpoint-*"))  # resumption checkpoints dropped
    assert not (out / ".partial" / "expert-ocr").exists()
    text = manifest.read_text()
    assert "../runs/experts/ocr" in text  # relative to the manifest
    # registering again changes nothing; finished runs are not retrained
    register(folder)
    assert manifest.read_text() == text
    assert all(r.skipped for r in train_runs(folder, fake_lf, validate_first=False))


def test_failed_run_is_one_line_and_registers_nothing(tmp_path, fake_lf):
    src = make_sources(tmp_path, n_general=16)
    out = tmp_path / "runs"
    manifest = tmp_path / "m.yaml"
    plan_runs("experts", _recipe(overrides={"fail_with": "CUDA out of memory"}), data=src, out=out,
              domains=["ocr"], manifest=manifest)  # fmt: skip
    with pytest.raises(DmoError) as exc:
        train_runs(RunFolder(out), fake_lf, validate_first=False)
    assert "expert-ocr failed (exit 1): ValueError: CUDA out of memory" in str(exc.value)
    assert "\n" not in str(exc.value)
    assert not (out / "experts" / "ocr").exists() and not manifest.exists()


def test_manifest_of_another_base_is_refused(tmp_path, fake_lf):
    src = make_sources(tmp_path, n_general=16)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: other\nbase: org/other\nexperts:\n  ocr: ./x\n")
    plan_runs("experts", _recipe(), data=src, out=tmp_path / "runs", domains=["ocr"], manifest=manifest)
    with pytest.raises(DmoError, match="manifest of base 'org/other'"):
        train_runs(RunFolder(tmp_path / "runs"), fake_lf, validate_first=False)


def test_validation_needs_a_working_llamafactory(tmp_path, fake_lf):
    # the stand-in's Python has no llamafactory: say so in one line instead of failing later
    with pytest.raises(DmoError, match="cannot import LLaMA-Factory.*install_llamafactory.sh"):
        validate({"x": {"template": "qwen2_vl"}}, fake_lf)


def test_slurm_array_script(tmp_path):
    src = make_sources(tmp_path, n_general=16)
    out = tmp_path / "runs"
    planned = plan_runs("mixtures", _recipe(gpus=1), data=src, out=out, mixtures=[MIX], seeds=[0, 1, 2])
    script = write_slurm(planned.folder, planned.runs, tmp_path / "slurm" / "train.sbatch", Path("/opt/lf/cli"),
                         what="mixtures", gpus=1, partition="gpu", sbatch=["qos=high"])  # fmt: skip
    text = script.read_text()
    assert "#SBATCH --array=0-2\n" in text and "#SBATCH --partition=gpu\n" in text and "#SBATCH --qos=high\n" in text
    assert "-m dmo.cli train run" in text and "/opt/lf/cli" in text
    jobs = (out / "slurm" / "train.jobs").read_text().split()
    assert jobs == [f"{MIX.id}.seed{s}" for s in (0, 1, 2)]
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_cli_plan_only_and_missing_lf(tmp_path):
    src = make_sources(tmp_path, n_general=16)
    base = [sys.executable, "-m", "dmo.cli", "train", "experts", "--base", "org/m", "--data", str(src), "--out",
            "runs", "--domains", "ocr", "--budget", "16", "--batch", "8", "--per-device-batch", "8"]  # fmt: skip
    missing = subprocess.run([*base, "--lf-bin", "nope/llamafactory-cli"], cwd=tmp_path, capture_output=True,
                             text=True)  # fmt: skip
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "LLaMA-Factory not found" in missing.stderr and not (tmp_path / "runs").exists()
    ok = subprocess.run([*base, "--plan-only", "--manifest", "m.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "runs" / "configs" / "expert-ocr.yaml").is_file()
    slurm = subprocess.run([*base, "--slurm", "--slurm-script", "s.sbatch"], cwd=tmp_path, capture_output=True,
                           text=True)  # fmt: skip
    assert slurm.returncode == 0, slurm.stderr
    assert "sbatch" in slurm.stdout and (tmp_path / "s.sbatch").is_file()


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "dmo.cli", "--help"], capture_output=True, text=True).stdout
    assert all(c in out for c in ("data", "train", "ingest"))
    assert textwrap.dedent("x") == "x"
