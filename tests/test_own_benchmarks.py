"""Your own benchmarks: a space names lmms-eval task folders and metric entries of its own, and a study runs from it.

The manifest is not the tiny world's: a small Qwen2-VL-shaped base model (the tiny world's architecture, random
weights) with two LoRA experts of domains the tiny world does not have, and a benchmark whose task YAML, data and
hooks this test writes (shaped like dmo.scoring.tasks' tiny-world tasks), scored by a metric, ``acc``, that the
shipped metric map does not know.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from dmo.config import load_space
from dmo.errors import DmoError
from dmo.results import ResultsTable
from dmo.tinyworld.config import WorldConfig

pytest.importorskip("lmms_eval")

DOMAINS = ("charts", "docs")
TASK = "acme_count"

TASK_YAML = f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/test.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  num_beams: 1
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
UTILS_PY = """\
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    with Image.open(HERE / "data" / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"acc": float(results[0].strip() == doc["answer"])}
"""


def write_task_folder(folder: Path, size: int, n: int = 3) -> Path:
    (folder / "data" / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 90, 200 - 30 * i)).save(folder / "data" / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "question": "how many dots ?", "answer": str(i)})
    (folder / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML)
    (folder / "utils.py").write_text(UTILS_PY)
    return folder


@pytest.fixture(scope="module")
def mine(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A project of one's own: base model, two LoRA experts, a manifest, a task folder, a space naming them."""
    from peft import LoraConfig, get_peft_model

    from dmo.tinyworld.model import init_model
    from dmo.tinyworld.tokenizer import build_processor

    root = tmp_path_factory.mktemp("mine")
    config = WorldConfig.small()
    processor = build_processor(config)
    model = init_model(config, processor.tokenizer).eval()
    model.save_pretrained(root / "models" / "base")
    processor.save_pretrained(root / "models" / "base")
    for i, domain in enumerate(DOMAINS):
        torch.manual_seed(20 + i)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(model), lora)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(root / "models" / domain)
    manifest = {"name": "acme", "base": "./models/base", "experts": {d: f"./models/{d}" for d in DOMAINS}}
    (root / "acme.yaml").write_text(yaml.safe_dump(manifest))
    write_task_folder(root / "my_tasks", config.image_size)
    space = {
        "domains": list(DOMAINS),
        "experts": "./acme.yaml",
        "mixtures": [{"charts": 0.5, "docs": 0.5}, {"charts": 0.25, "docs": 0.75}],
        "benchmarks": [TASK],
        "sampler": {"name": "grid"},
        "scoring": {
            "backend": "hf",
            "device": "cpu",
            "limit": 2,
            "batch_size": 4,
            "tasks": ["./my_tasks"],  # relative to this file
            "metrics": {TASK: {"metric": "acc"}},
        },
    }
    # the same space in a folder of its own: its relative paths start from there
    elsewhere = copy.deepcopy(space)
    elsewhere["experts"], elsewhere["scoring"]["tasks"] = "../acme.yaml", ["../my_tasks"]
    (root / "spaces").mkdir()
    (root / "spaces" / "acme.yaml").write_text(yaml.safe_dump(elsewhere))
    return SimpleNamespace(root=root, space=space)


def write_space(path: Path, space: dict, **changes) -> Path:
    data = copy.deepcopy(space)
    for key, value in changes.items():
        if key.startswith("scoring_"):
            data["scoring"][key.removeprefix("scoring_")] = value
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def dmo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DMO_RESULTS": str(cwd / "results"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("DMO_LMMS_EVAL_LOGS", None)
    return subprocess.run([sys.executable, "-m", "dmo.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_a_study_from_the_space_file_alone(mine):
    """`dmo study spaces/acme.yaml`: task folder and metric from the space (paths relative to it), own manifest."""
    out = dmo("study", "spaces/acme.yaml", cwd=mine.root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "best mixture" in out.stdout
    assert "DEBUG" not in out.stdout + out.stderr  # lmms-eval's task loader stays quiet
    rows = ResultsTable(mine.root / "results" / "acme" / "scores.jsonl").records()
    proxies = [r for r in rows if r["kind"] == "proxy"]
    assert {r["mixture"] for r in proxies} == {"charts-0.5+docs-0.5", "charts-0.25+docs-0.75"}
    assert all(r["status"] == "ok" and r["benchmark"] == TASK for r in proxies), proxies
    assert all(0.0 <= r["score"] <= 1.0 for r in proxies)


def test_space_fields_resolve_against_the_space_file(mine):
    space = load_space(mine.root / "spaces" / "acme.yaml")
    assert space.scoring.tasks == [(mine.root / "my_tasks").resolve()]
    merged = space.scoring.metric_map()
    assert merged[TASK].keys == ("acc",) and "gqa" in merged  # merged over the shipped map
    bad = write_space(mine.root / "bad_metric.yaml", mine.space, scoring_metrics={TASK: {"metrik": "acc"}})
    with pytest.raises(DmoError, match=r"scoring.metrics.*unknown field\(s\) \['metrik'\]"):
        load_space(bad)


def test_tasks_dir_on_the_command_line(mine):
    """--tasks-dir adds a folder (relative to where the command runs) to the space's, for study and demo alike."""
    from dmo.session import Session

    path = write_space(mine.root / "no_tasks.yaml", mine.space, scoring_tasks=[])
    cwd = Path.cwd()
    os.chdir(mine.root)
    try:
        session = Session.open(path, tasks=[Path("my_tasks")])
    finally:
        os.chdir(cwd)
    assert session.space.scoring.tasks == [(mine.root / "my_tasks").resolve()]
    assert session.scorer.include_path == (mine.root / "my_tasks").resolve()  # checked: acme_count is found there
    assert session.scorer.metric_map[TASK].keys == ("acc",)
    assert session.scorer.settings()["metrics"]  # one's own metric is part of every score's cache key
    help_text = dmo("study", "--help", cwd=mine.root).stdout + dmo("demo", "--help", cwd=mine.root).stdout
    assert help_text.count("--tasks-dir") == 2


NO_METRIC = f"no score metric known for benchmark '{TASK}': add it to the space's scoring section, 'metrics: {{{TASK}: "
UNKNOWN_TASK = "unknown benchmark 'acme_typo'.*scoring.tasks \\(or --tasks-dir\\)"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scoring_tasks": ["./nope"]}, "task folder .*nope does not exist: write your lmms-eval task YAMLs there"),
        ({"scoring_metrics": {}}, NO_METRIC),
        ({"benchmarks": ["acme_typo"], "scoring_metrics": {"acme_typo": {"metric": "acc"}}}, UNKNOWN_TASK),
    ],
    ids=["missing-folder", "no-metric", "unknown-task"],
)
def test_bad_input_is_one_line(mine, changes, message):
    write_space(mine.root / "bad.yaml", mine.space, **changes)
    out = dmo("study", "bad.yaml", cwd=mine.root)
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert re.search(message, out.stderr), out.stderr
