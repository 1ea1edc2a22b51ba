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
from data_sources import make_sources, rows_of
from PIL import Image

from dmo.errors import DmoError
from dmo.groundtruth.data_mix import DataFolder
from dmo.groundtruth.llamafactory import plan_runs, train_runs, validate
from dmo.groundtruth.recipe import LORA_DEFAULTS, PAPER_DEFAULTS, Recipe, parse_overrides
from dmo.groundtruth.register import register
from dmo.groundtruth.runs import RunFolder
from dmo.groundtruth.slurm import write_slurm
from dmo.manifest import load_manifest
from dmo.mixture import Mixture

MIX = Mixture(("general", "ocr"), (0.25, 0.75))


def test_paper_recipe_in_one_place(tmp_path):
    r = Recipe(base="Qwen/Qwen2-VL-2B", template="qwen2_vl")
    assert (r.budget, r.global_batch, r.max_steps, r.accumulation) == (102_400, 128, 800, 32)
    cfg = r.config(dataset_dir=tmp_path, data={"dataset": "x"}, output_dir=tmp_path / "o", seed=1, run="x")
    assert cfg["lora_rank"] == 16 and cfg["lora_alpha"] == 32 and cfg["lora_target"] == "all"
    assert cfg["learning_rate"] == 2e-5 and cfg["lr_scheduler_type"] == "cosine" and cfg["warmup_ratio"] == 0.1
    assert cfg["bf16"] is True and cfg["freeze_vision_tower"] is True and cfg["freeze_multi_modal_projector"] is False
    assert cfg["cutoff_len"] == 4096 and cfg["image_max_pixels"] == 518_400
    assert cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"] == 128
    assert cfg["max_steps"] * 128 == 102_400 and cfg["seed"] == 1 and cfg["finetuning_type"] == "lora"
    assert "eval_dataset" not in cfg and "eval_strategy" not in cfg  # no validation split: no evaluation
    full = Recipe(base="b", template="intern_vl", method="full", gpus=8).config(
        dataset_dir=tmp_path, data={"dataset": "x"}, output_dir=tmp_path, seed=0, run="x"
    )
    assert not set(LORA_DEFAULTS) & set(full) and full["finetuning_type"] == "full"
    assert full["gradient_accumulation_steps"] == 4  # 128 / (4 per device x 8 GPUs)
    assert set(PAPER_DEFAULTS) <= set(full) and set(PAPER_DEFAULTS) <= set(cfg)


# The DMO paper's training config for its Qwen2-VL-2B LoRA runs, LLaMA-Factory/training_configs/qwen2_2b_lora.yaml of
# github.com/BerasiDavide/mLLMs_merging_4_DMO, with the values its scripts pass on the command line
# (scripts/simple/train.sh for an expert: dataset, eval_dataset, output_dir, run_name, max_steps, save_steps=100000).
PAPER_EXPERT_OCR = {
    "model_name_or_path": "../checkpoints/base_models/Qwen2-VL-2B",
    "image_max_pixels": 518400,
    "trust_remote_code": True,
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "lora",
    "freeze_vision_tower": True,
    "freeze_multi_modal_projector": False,
    "freeze_language_model": False,
    "lora_rank": 16,
    "lora_target": "all",
    "dataset": "expert_ocr-102400",
    "template": "qwen2_vl",
    "cutoff_len": 4096,
    "overwrite_cache": True,
    "preprocessing_num_workers": 16,
    "dataloader_num_workers": 4,
    "output_dir": "/scratch/checkpoints/sft_models/exp_qwen2_2b_100k/qwen2_2b_lora_expert_ocr-102400",
    "logging_steps": 10,
    "save_steps": 100000,
    "plot_loss": True,
    "overwrite_output_dir": True,
    "save_only_model": True,
    "report_to": "wandb",
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 4,
    "learning_rate": 2.0e-05,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "bf16": True,
    "ddp_timeout": 180000000,
    "resume_from_checkpoint": None,
    "eval_dataset": "expert_ocr-102400_eval_small",
    "per_device_eval_batch_size": 8,
    "eval_strategy": "steps",
    "eval_steps": 0.125,
    "run_name": "qwen2_2b_lora_expert_ocr-102400",
    "max_steps": 800,
}
# scripts/simple/train_mixed.sh (through scripts/mixed4/train_mixed4.sh) for the first of the paper's 4-domain
# mixtures: the same config, with these keys changed.
PAPER_MIXED_4D_0 = {
    **PAPER_EXPERT_OCR,
    "dataset": "expert_chart-102400,expert_counting-102400,expert_general-102400,expert_ocr-102400",
    "mix_strategy": "interleave_under",
    "interleave_probs": "0.3247,0.3155,0.322,0.0378",
    "eval_dataset": "expert_chart-102400_eval_small,expert_counting-102400_eval_small,"
    "expert_general-102400_eval_small,expert_ocr-102400_eval_small",
    "output_dir": "/scratch/checkpoints/sft_models/exp_qwen2_2b_100k/"
    "qwen2_2b_lora_mixed_chart-33249++counting-32307++general-32973++ocr-3871",
    "run_name": "qwen2_2b_lora_chart-102400,counting-102400,general-102400,ocr-102400",
    "save_steps": 10000,
}
_ABSENT = object()


def _differences(cfg: dict, paper: dict) -> set[str]:
    """Keys whose values differ between dmo's config and the paper's (absent on one side counts)."""
    return {k for k in set(cfg) | set(paper) if cfg.get(k, _ABSENT) != paper.get(k, _ABSENT)}


def paper_sources(root: Path, domains=("chart", "counting", "general", "ocr"), n: int = 8, val: int = 3) -> Path:
    """Per-domain sources in dmo's format, each with a held-out validation split (``<domain>/val.jsonl``)."""
    data = root / "src"
    for d in domains:
        for split, k in (("train", n), ("val", val)):
            rows = []
            for i in range(k):
                img = data / d / "images" / f"{split}{i}.png"
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4), (i, i, i)).save(img)
                rows.append({"image": f"images/{split}{i}.png", "question": f"{d} {split} {i}?", "answer": str(i)})
            (data / d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_config_key_by_key_against_the_papers(tmp_path):
    """Every key of the paper's config is written with the paper's value, except PAPER_DIFFERENCES (each said why);
    every key dmo adds is in DMO_ONLY_KEYS. Nothing else differs."""
    from dmo.groundtruth.recipe import DMO_ONLY_KEYS, PAPER_DIFFERENCES

    src = paper_sources(tmp_path)
    recipe = Recipe(base="Qwen/Qwen2-VL-2B", template="qwen2_vl", budget=102_400)
    out = tmp_path / "runs"
    plan_runs("experts", recipe, data=src, out=out, domains=["ocr"], allow_repeats=True)
    cfg = yaml.safe_load((out / "configs" / "expert-ocr.yaml").read_text())
    diff = _differences(cfg, PAPER_EXPERT_OCR)
    assert diff == (set(PAPER_DIFFERENCES) - {"mix_strategy", "interleave_probs"}) | set(DMO_ONLY_KEYS)
    for key in set(PAPER_EXPERT_OCR) - diff:  # the paper's own values
        assert cfg[key] == PAPER_EXPERT_OCR[key], key
    # the differences are the documented ones, with the values the documentation gives
    assert Path(cfg["model_name_or_path"]).name == Path(PAPER_EXPERT_OCR["model_name_or_path"]).name == "Qwen2-VL-2B"
    assert cfg["eval_dataset"] == "ocr-val" and cfg["dataset"] == "ocr-102400"
    assert (cfg["save_steps"], cfg["save_total_limit"], cfg["report_to"]) == (100, 1, "none")
    assert cfg["per_device_eval_batch_size"] == cfg["per_device_train_batch_size"] == 4
    assert cfg["gradient_accumulation_steps"] == 32 and cfg["max_steps"] == 800
    assert (cfg["lora_alpha"], cfg["lora_dropout"], cfg["eval_on_each_dataset"]) == (32, 0.0, True)
    assert not {"trust_remote_code", "save_only_model", "overwrite_output_dir", "num_train_epochs"} & set(cfg)
    assert "resume_from_checkpoint" not in cfg

    # The paper's GPU layout (8 per device x 4 GPUs) gives its batch keys exactly.
    layout = Recipe(base="Qwen/Qwen2-VL-2B", template="qwen2_vl", per_device_batch=8, gpus=4)
    same = layout.config(dataset_dir=tmp_path, data={"dataset": "x", "eval_dataset": "x-val"}, output_dir=tmp_path,
                         seed=0, run="x")  # fmt: skip
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        assert same[key] == PAPER_EXPERT_OCR[key], key

    # A mixture with the paper's strategy (interleave): its mixing keys are the paper's, weights verbatim.
    from dmo.presets import paper_4d

    first = paper_4d()[0]
    plan_runs("mixtures", recipe, data=src, out=out, mixtures=[first], strategy="interleave")
    (name,) = [p.stem for p in (out / "configs").glob("*-interleave.seed0.yaml")]
    mcfg = yaml.safe_load((out / "configs" / f"{name}.yaml").read_text())
    assert (mcfg["mix_strategy"], mcfg["interleave_probs"]) == (
        PAPER_MIXED_4D_0["mix_strategy"], PAPER_MIXED_4D_0["interleave_probs"],
    )  # fmt: skip
    assert mcfg["eval_dataset"] == "chart-val,counting-val,general-val,ocr-val"
    mdiff = _differences(mcfg, PAPER_MIXED_4D_0)
    assert mdiff == (set(PAPER_DIFFERENCES) - {"mix_strategy", "interleave_probs"}) | set(DMO_ONLY_KEYS)
    # the paper's name of that mixture's model is dmo's name of its data (chart-33249++counting-32307++...)
    assert PAPER_MIXED_4D_0["output_dir"].endswith("_mixed_" + first_counts_name(first))
    # dmo's default (exact counts) differs from it in exactly the two documented mixing keys, plus the data's name
    plan_runs("mixtures", recipe, data=src, out=out, mixtures=[first], allow_repeats=True)
    ecfg = yaml.safe_load((out / "configs" / f"{first.id}.seed0.yaml").read_text())
    assert _differences(ecfg, PAPER_MIXED_4D_0) == mdiff | {"mix_strategy", "interleave_probs"}
    assert ecfg["dataset"] == first_counts_name(first)


def first_counts_name(mixture) -> str:
    from dmo.groundtruth.data_mix import mixture_name

    return mixture_name(mixture, 102_400)


def test_validation_splits_are_registered_and_wired(tmp_path, monkeypatch):
    import dmo.groundtruth.data_mix

    monkeypatch.setattr(
        dmo.groundtruth.data_mix, "VAL_ROWS", 2
    )  # the paper keeps 500; the first VAL_ROWS rows are kept
    src = paper_sources(tmp_path, domains=("general", "ocr"), n=16, val=3)
    (src / "ocr" / "val.jsonl").rename(src / "ocr.val.jsonl")  # the other accepted place
    text = (src / "ocr.val.jsonl").read_text().replace('"images/', '"ocr/images/')
    (src / "ocr.val.jsonl").write_text(text)
    out = tmp_path / "runs"
    planned = plan_runs("experts", _recipe(), data=src, out=out, domains=["general", "ocr"])
    assert not planned.notes
    info = json.loads((out / "data" / "dataset_info.json").read_text())
    assert info["general-val"]["file_name"] == "validation/general.jsonl" and "ocr-val" in info
    val = rows_of(out / "data" / "validation" / "ocr.jsonl")
    assert [r["messages"][0]["content"] for r in val] == ["<image>ocr val 0?", "<image>ocr val 1?"]
    assert (out / "data" / val[0]["images"][0]).is_file()  # image paths relative to the data folder
    assert DataFolder(out / "data").domains() == ["general", "ocr"]  # a split is not a domain
    cfg = yaml.safe_load((out / "configs" / "expert-general.yaml").read_text())
    assert (cfg["eval_dataset"], cfg["eval_strategy"], cfg["eval_steps"]) == ("general-val", "steps", 0.125)
    plan_runs("mixtures", _recipe(), data=out / "data", out=out, mixtures=[MIX], strategy="interleave")
    mcfg = yaml.safe_load((out / "configs" / f"{MIX.id}-interleave.seed0.yaml").read_text())
    assert mcfg["eval_dataset"] == "general-val,ocr-val" and mcfg["eval_on_each_dataset"] is True

    # a domain without a validation split: its runs train without evaluation, and the plan says so
    (src / "ocr.val.jsonl").unlink()
    other = plan_runs("mixtures", _recipe(), data=src, out=tmp_path / "runs2", mixtures=[MIX])
    assert len(other.notes) == 1 and "no validation split for domain(s) ocr" in other.notes[0]
    cfg2 = yaml.safe_load((tmp_path / "runs2" / "configs" / f"{MIX.id}.seed0.yaml").read_text())
    assert "eval_dataset" not in cfg2 and "eval_strategy" not in cfg2
    single = plan_runs("experts", _recipe(), data=src, out=tmp_path / "runs2", domains=["general"])
    assert not single.notes
    assert yaml.safe_load((tmp_path / "runs2" / "configs" / "expert-general.yaml").read_text())["eval_dataset"]

    # a bad validation row is refused like a bad training row, before anything is written
    (src / "general" / "val.jsonl").write_text('{"question": "q", "answer": "a", "image": "nope.png"}\n')
    with pytest.raises(DmoError, match="missing image file"):
        plan_runs("experts", _recipe(), data=src, out=tmp_path / "runs3", domains=["general"])
    assert not (tmp_path / "runs3").exists()


def test_interleave_probs_sum_to_one_exactly():
    """datasets' sampler refuses probabilities off 1 by more than 1.5e-8: the counts' rounded shares were (15 of the
    paper's 20 four-domain mixtures); the mixture's own weights are not."""
    import numpy as np

    from dmo.groundtruth.data_mix import DataFolder as Folder
    from dmo.presets import paper_4d

    for m in paper_4d():
        record, _ = Folder("unused").plan_mix(m, 102_400, dict.fromkeys(m.domains, 10**6), strategy="interleave")
        probs = [float(p) for p in record.llamafactory["interleave_probs"].split(",")]
        assert probs == [m[d] for d in sorted(m.domains)]
        np.random.default_rng(0).choice(len(probs), size=4, p=probs)  # raises if they do not sum to 1


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


@pytest.mark.parametrize("option", [("--strategy", "uniform"), ("--method", "qlora")])
def test_cli_refuses_an_unknown_strategy_or_method(tmp_path, option):
    src = make_sources(tmp_path, n_general=16)
    cmd = [sys.executable, "-m", "dmo.cli", "train", "mixtures", "--base", "org/m", "--data", str(src), "--out", "runs",
           "--mixture", "general=0.5,ocr=0.5", "--budget", "16", "--batch", "8", "--per-device-batch", "8",
           "--plan-only", *option]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "unknown" in out.stderr and repr(option[1]) in out.stderr and not (tmp_path / "runs").exists()


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "dmo.cli", "--help"], capture_output=True, text=True).stdout
    assert all(c in out for c in ("data", "train", "ingest"))
    assert textwrap.dedent("x") == "x"
