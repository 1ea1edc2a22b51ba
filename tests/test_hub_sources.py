"""Hub repositories and folders in the DMO paper's download layout as expert sources, and ``dmo score`` (issue 26).

The world tests lay the small tiny world's models out as the paper names them, once in a hub cache built here
(``models--<owner>--<name>/{blobs,refs,snapshots}``, read by ``huggingface_hub`` with ``HF_HUB_OFFLINE=1``) and once as
the paper's download scripts leave them (``checkpoints/sft_models/exp_<model>_<budget>/<model id>``), and check every
score against the accuracy the world's build measured for the same model (``world.json``): a model read as the wrong
mixture or seed scores otherwise.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dmo.analysis.correlate import correlate
from dmo.errors import DmoError
from dmo.hub import HubAccessDenied, HubNotCached, HubRepoNotFound, fetch, list_folders
from dmo.manifest import ExpertManifest, load_manifest
from dmo.mixture import Mixture
from dmo.paper_names import trained_folder
from dmo.presets import PAPER_BUDGET, PRESETS
from dmo.results import ResultsTable

ROOT = Path(__file__).resolve().parents[1]
TAG = "tiny_1m_lora"  # the tiny world's models, named like the paper's <family>_<size>_<ft>
OWNER = "dmotest"

# --------------------------------------------------------------------------------------------------- names (pure)


@pytest.mark.parametrize(
    ("name", "weights", "seed"),
    [
        ("qwen2_2b_lora_mixed_general-25600++ocr-76800", {"general": 0.25, "ocr": 0.75}, 0),
        ("qwen2_2b_lora_mixed_general-25600++ocr-76800_seed1", {"general": 0.25, "ocr": 0.75}, 1),
        ("qwen2_2b_lora_mixed_general-25600++ocr-76800.seed2", {"general": 0.25, "ocr": 0.75}, 2),
        ("qwen2_7b_lora_mixed_general-89600++ocr-12800-seed3", {"general": 0.875, "ocr": 0.125}, 3),
        ("intern35_8b_lora_mixed_counting-12800++general-12800++ocr-76800",
         {"counting": 0.125, "general": 0.125, "ocr": 0.75}, 0),
        # the paper's first 4-domain mixture: counts round(w * 102400) map back to its published weights exactly
        ("qwen2_2b_lora_mixed_chart-33249++counting-32307++general-32973++ocr-3871",
         {"chart": 0.3247, "counting": 0.3155, "general": 0.322, "ocr": 0.0378}, 0),
    ],
)  # fmt: skip
def test_trained_folder_reads_the_papers_names(name: str, weights: dict[str, float], seed: int) -> None:
    mixture, got_seed = trained_folder(name, budget=PAPER_BUDGET)
    assert got_seed == seed
    assert mixture.as_dict() == pytest.approx(weights, abs=1e-12)
    assert sorted(mixture.domains) == sorted(weights)


def test_trained_folder_counts_off_every_published_mixture_divide_by_the_budget() -> None:
    """A name whose counts are no published mixture's is read as n_i / budget (here: a 60/40 split)."""
    mixture, _ = trained_folder("qwen2_2b_lora_mixed_general-61440++ocr-40960", budget=PAPER_BUDGET)
    assert mixture.as_dict() == {"general": 61440 / PAPER_BUDGET, "ocr": 40960 / PAPER_BUDGET}


def test_every_published_mixture_round_trips_through_its_name() -> None:
    """The name the paper's training scripts give each mixture (counts printf %.0f of w * 102400, domains in the
    scripts' order) reads back as that mixture, so trained rows pair with the proxies of the same id."""
    n = 0
    for make in PRESETS.values():
        for m in make(False):
            name = f"qwen2_2b_lora_mixed_{'++'.join(f'{d}-{round(w * PAPER_BUDGET)}' for d, w in m.as_dict().items())}"
            got, seed = trained_folder(name, budget=PAPER_BUDGET)
            assert (got.id, seed) == (m.id, 0), name
            n += 1
    assert n == 7 + 21 + 20


def test_trained_folder_passes_over_the_papers_experts() -> None:
    assert trained_folder("qwen2_2b_lora_expert_ocr-102400", budget=PAPER_BUDGET) is None
    assert trained_folder("qwen2_2b_lora_mixed_ocr-102400", budget=PAPER_BUDGET) is None  # one domain: an expert


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("my-model", "folder 'my-model' is not named as the DMO paper names mixture-trained models"),
        ("general-0.25+ocr-0.75", "is not named as the DMO paper names"),
        ("qwen2_2b_lora_merged_general-25600++ocr-76800--ties", "is a merged proxy, not a model trained"),
        ("qwen2_2b_lora_mixed_general-1000++ocr-3000", "names 4000 samples in all, not the budget 102400"),
        ("qwen2_2b_lora_mixed_general-100++general-102300", "names domain 'general' twice"),
    ],
)
def test_trained_folder_refuses_other_names_in_one_line(name: str, match: str) -> None:
    with pytest.raises(DmoError, match=match) as info:
        trained_folder(name, budget=PAPER_BUDGET)
    assert "\n" not in str(info.value) and repr(name) in str(info.value)


# ------------------------------------------------------------------------------------------------------ manifests


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """huggingface_hub offline, on an empty cache of this test's own, and its calls recorded: returns the cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_collections_validate_without_fetching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dmo.hub

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("validating a manifest fetched or listed something")

    monkeypatch.setattr(dmo.hub, "fetch", refuse)
    monkeypatch.setattr(dmo.hub, "list_folders", refuse)
    f = tmp_path / "m.yaml"
    f.write_text(
        "name: m\nbase: org/base\nexperts: {ocr: {hub: org/experts, subfolder: ocr}, general: org/general}\n"
        "trained: org/mixed\n"
    )
    m = load_manifest(f)
    assert m.experts["ocr"].hub == "org/experts" and m.experts["ocr"].subfolder == "ocr"
    assert str(m.experts["ocr"]) == "org/experts@main/ocr"
    assert [(t.hub, t.is_collection) for t in m.trained] == [("org/mixed", True)]
    f.write_text("name: m\nbase: org/base\nexperts: {ocr: org/ocr}\ntrained: [./runs, {hub: a/b, subfolder: x}]\n")
    m = load_manifest(f)
    assert m.trained[0].path == (tmp_path / "runs").resolve() and m.trained[1].subfolder == "x"
    bad = {
        "trained: {hub: a/b, seed: 1}": "reads each model's seed from its name",
        "trained: {path: ./x, subfolder: y}": "'subfolder' goes with 'hub'",
        "trained: {hub: a/b, subfolder: ../up}": "must be a folder inside the repository",
        "trained: [{mixture: {ocr: 1}, hub: a/b, path: ./c}]": "give exactly one of 'path' or 'hub'",
    }
    for line, match in bad.items():
        f.write_text(f"name: m\nbase: org/base\nexperts: {{ocr: org/ocr}}\n{line}\n")
        with pytest.raises(DmoError, match=match):
            load_manifest(f)


#: manifest -> the paper's model key, and the base folder its utils/download_base_model.sh makes (utils/model_paths.py)
PAPER_MANIFESTS = {
    "paper-qwen2vl-2b.yaml": ("qwen2_2b", "Qwen2-VL-2B"),
    "paper-qwen2vl-7b.yaml": ("qwen2_7b", "Qwen2-VL-7B"),
    "paper-internvl3.5-2b.yaml": ("intern35_2b", "InternVL3_5-2B-Pretrained-HF"),
    "paper-internvl3.5-8b.yaml": ("intern35_8b", "InternVL3_5-8B-Pretrained-HF"),
}


@pytest.mark.parametrize("file", sorted(PAPER_MANIFESTS))
def test_paper_manifests_validate_and_name_the_released_checkpoints(file: str, no_network: Path) -> None:
    """Each manifest loads (no network, nothing fetched) and names the repositories the paper's download scripts
    download: daviBera/<model>_<sft>_expert_<domain>-<N> and daviBera/<model>_<sft>_mixed-<N>, N = 800 x 128."""
    key, base = PAPER_MANIFESTS[file]
    m = load_manifest(ROOT / "experts" / file, check_paths=False)
    assert isinstance(m, ExpertManifest) and m.kind == "lora" and m.budget == 800 * 128
    assert {d: r.hub for d, r in m.experts.items()} == {
        d: f"daviBera/{key}_lora_expert_{d}-{800 * 128}" for d in ("chart", "counting", "general", "ocr")
    }
    assert [(t.hub, t.is_collection) for t in m.trained] == [(f"daviBera/{key}_lora_mixed-{800 * 128}", True)]
    assert m.base.path == (ROOT / "checkpoints" / "base_models" / base).resolve()
    assert not no_network.exists()  # nothing was fetched, not even an empty cache made
    from dmo.config import load_space

    space = load_space(ROOT / "search_spaces" / "paper-3d.yaml")
    assert set(space.domains) <= set(m.domains)


def _blob_repo(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """One repository in huggingface_hub's cache layout: content-addressed blobs, a snapshot of symlinks, refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    for rel, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return folder / "snapshots" / commit


def test_a_paper_manifest_lists_every_published_mixture_from_a_hub_cache(no_network: Path) -> None:
    """The mixed repository's folders, named by the paper's training scripts (here with empty adapter files, and the
    experts and README that the download leaves next to them), read back into the 48 published mixtures."""
    names = {}
    for make in PRESETS.values():
        for m in make(False):
            counts = "++".join(f"{d}-{round(w * PAPER_BUDGET)}" for d, w in m.as_dict().items())
            names[f"qwen2_2b_lora_mixed_{counts}"] = m
    files = {f"{n}/adapter_config.json": b"{}" for n in names}
    files |= {"qwen2_2b_lora_expert_ocr-102400/adapter_config.json": b"{}", "README.md": b"# models"}
    files["qwen2_2b_lora_mixed_general-25600++ocr-76800_seed1/adapter_config.json"] = b"{}"
    _blob_repo(no_network, "daviBera/qwen2_2b_lora_mixed-102400", files)
    m = load_manifest(ROOT / "experts" / "paper-qwen2vl-2b.yaml", check_paths=False)
    found = {(mix.id, seed): ref for mix, seed, ref in m.trained_mixtures()}
    want = {(Mixture.from_mapping(x.as_dict(), m.domains).id, 0) for x in names.values()}
    want.add((Mixture.from_mapping({"general": 0.25, "ocr": 0.75}, m.domains).id, 1))
    assert set(found) == want and len(found) == 49
    ref = found[(Mixture.from_mapping({"general": 0.25, "ocr": 0.75}, m.domains).id, 1)]
    assert (ref.hub, ref.subfolder) == ("daviBera/qwen2_2b_lora_mixed-102400",
                                        "qwen2_2b_lora_mixed_general-25600++ocr-76800_seed1")  # fmt: skip
    assert (ref.local("x") / "adapter_config.json").read_text() == "{}"  # read from the cache, offline


# ----------------------------------------------------------------------------------------------------- hub errors


def test_offline_and_not_cached_is_one_line(no_network: Path) -> None:
    with pytest.raises(HubNotCached) as info:
        fetch("nobody/nothing")
    text = str(info.value)
    assert "hub repository nobody/nothing is not in the hub cache" in text and "HF_HUB_OFFLINE=1" in text
    assert "\n" not in text
    snapshot = _blob_repo(no_network, "nobody/partial", {"a/x.json": b"{}"})
    assert fetch("nobody/partial", subfolder="a") == snapshot / "a"
    with pytest.raises(HubNotCached, match=r"nobody/partial \(folder b\) is not in the hub cache"):
        fetch("nobody/partial", subfolder="b")
    assert list_folders("nobody/partial") == ["a"]


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers as the hub does for a missing (or private) repository and for a gated one."""

    def _answer(self) -> None:
        gated = "/gated" in self.path
        self.send_response(403 if gated else 401)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access denied" if gated else "Repository not found")
        self.send_header("Content-Length", "2")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"{}")

    do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    try:
        yield endpoint
    finally:
        server.shutdown()


def test_missing_private_and_gated_repositories_are_one_line(fake_hub: str, tmp_path: Path) -> None:
    with pytest.raises(HubRepoNotFound) as info:
        fetch("nobody/missing")
    assert "hub repository nobody/missing does not exist or is private" in str(info.value)
    with pytest.raises(HubAccessDenied, match="nobody/gated is gated: accept its terms"):
        fetch("nobody/gated")
    with pytest.raises(HubRepoNotFound, match="nobody/missing-mix does not exist or is private"):
        list_folders("nobody/missing-mix")
    f = tmp_path / "m.yaml"
    f.write_text("name: m\nbase: ./b\nexperts: {ocr: ./e}\ntrained: nobody/missing-mixed\n")
    with pytest.raises(HubRepoNotFound, match="^trained models: hub repository nobody/missing-mixed does not exist"):
        load_manifest(f, check_paths=False).trained_mixtures()
    (tmp_path / "b").mkdir()
    (tmp_path / "e").mkdir()
    f.write_text("name: m\nbase: nobody/missing-base\nexperts: {ocr: ./e}\n")
    out = _dmo("merge", "--experts", str(f), "--weights", "ocr=1", "--out", str(tmp_path / "o"), cwd=tmp_path,
               env={"HF_ENDPOINT": fake_hub, "HF_HUB_CACHE": str(tmp_path / "c"), "HF_HUB_OFFLINE": "0"})  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "hub repository nobody/missing-base does not exist or is private" in lines[0], lines


# ------------------------------------------------------------------- the tiny world from a hub cache and a folder


def _reference(info: dict, kind: str, label: str, seed: int | None, benchmark: str) -> float:
    """The accuracy the world's build measured for a model, on one of its dmo_tiny_<domain> benchmarks."""
    domain = benchmark.removeprefix("dmo_tiny_")
    acc = info["accuracy"]
    if kind == "base":
        return acc["base"][domain]
    if kind == "expert":
        return acc["experts"][label][domain]
    (row,) = [r for r in acc["trained"]["2d"] if r["id"] == label]
    return row["seeds"][str(seed)][domain]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small tiny world with its 2-domain ground truth, built where ``experts: tinyworld-small`` finds it under
    ``DMO_CACHE``; and two of its trained mixtures whose seeds score apart (so a seed mix-up shows)."""
    from dmo.scoring.tasks import write_tiny_tasks
    from dmo.tinyworld.build import build_world
    from dmo.tinyworld.config import WorldConfig

    cache = tmp_path_factory.mktemp("dmo-cache")
    config = WorldConfig.small()
    w = build_world(config, root=cache / "tinyworld" / config.key(), ground_truth=("2d",), progress=False)
    write_tiny_tasks(w.root / "data", w.root / "tasks", list(config.domains), max_new_tokens=config.max_new_tokens)
    info = json.loads(w.info_path.read_text())
    rows = info["accuracy"]["trained"]["2d"]
    apart = [r for r in rows if r["seeds"]["0"] != r["seeds"]["1"]]
    assert len(apart) >= 2, "the small world's seeds score alike on every mixture: pick another check"
    chosen = [Mixture.from_mapping(r["mixture"]) for r in apart[:2]]
    return {"world": w, "cache": cache, "info": info, "chosen": chosen, "budget": config.budget}


#: what an adapter trained with the paper's scripts records as its base: its local folder there
TRAINED_ON = "checkpoints/base_models/tiny-base"


def _model_files(folder: Path) -> dict[str, bytes]:
    """A model's files, an adapter's with the base it records as the paper's training runs record theirs."""
    out = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    if "adapter_config.json" in out:
        config = json.loads(out["adapter_config.json"])
        config["base_model_name_or_path"] = TRAINED_ON
        out["adapter_config.json"] = json.dumps(config).encode()
    return out


def _copy_model(src: Path, dst: Path) -> None:
    for rel, data in _model_files(src).items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(data)


def _paper_name(mixture: Mixture, budget: int) -> str:
    return f"{TAG}_mixed_" + "++".join(f"{d}-{n}" for d, n in mixture.counts(budget).items() if n > 0)


def _space(path: Path, world: dict, experts: Path, name: str) -> Path:
    mixtures = [m.as_dict() for m in world["chosen"]]
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "domains": ["general", "ocr"],
                "experts": str(experts),
                "mixtures": mixtures,
                "benchmarks": ["dmo_tiny_general", "dmo_tiny_ocr"],
                "sampler": {"name": "grid"},
                "scoring": {"backend": "hf", "tasks": [str(world["world"].root / "tasks")]},
            }
        )
    )
    return path


def _check_against_the_build(rows: list[dict], info: dict, want: set[tuple[str, str, int | None]]) -> None:
    refs = [r for r in rows if r["kind"] != "proxy"]
    assert {(r["kind"], r["mixture"], r["seed"]) for r in refs} == want
    for r in refs:
        assert r["status"] == "ok", r
        assert r["score"] == pytest.approx(
            _reference(info, r["kind"], r["mixture"], r["seed"], r["benchmark"]), abs=1e-9
        ), r


@pytest.fixture(scope="module")
def hub_cache(world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The world's base, experts and two trained mixtures (both seeds) in a hub cache built here, named as the paper
    names its repositories; the mixed repository also holds an expert and a README, as the paper's does."""
    w, budget = world["world"], world["budget"]
    cache = tmp_path_factory.mktemp("hf") / "hub"
    _blob_repo(cache, f"{OWNER}/tiny-base", _model_files(w.base_dir))
    for d in ("general", "ocr"):
        _blob_repo(cache, f"{OWNER}/{TAG}_expert_{d}-{budget}", _model_files(w.expert_dir(d)))
    files: dict[str, bytes] = {"README.md": b"# mixed"}
    for m in world["chosen"]:
        for seed, suffix in ((0, ""), (1, "_seed1")):
            for rel, data in _model_files(w.trained_dir(m, seed)).items():
                files[f"{_paper_name(m, budget)}{suffix}/{rel}"] = data
    for rel, data in _model_files(w.expert_dir("ocr")).items():
        files[f"{TAG}_expert_ocr-{budget}/{rel}"] = data
    _blob_repo(cache, f"{OWNER}/{TAG}_mixed-{budget}", files)
    root = cache.parent
    (root / "experts.yaml").write_text(
        f"name: tiny-hub\nbase: {OWNER}/tiny-base\nkind: lora\nbudget: {budget}\n"
        f"experts:\n  general: {OWNER}/{TAG}_expert_general-{budget}\n  ocr: {OWNER}/{TAG}_expert_ocr-{budget}\n"
        f"trained: {OWNER}/{TAG}_mixed-{budget}\n"
    )
    return {"cache": cache, "root": root, "manifest": root / "experts.yaml"}


def _dmo(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "DMO_RESULTS": str(cwd / "results"), **env}
    full.pop("DMO_LMMS_EVAL_LOGS", None)
    return subprocess.run([sys.executable, "-m", "dmo.cli", *args], cwd=cwd, env=full, capture_output=True, text=True)


def test_a_study_on_experts_and_trained_mixtures_from_a_hub_cache_offline(world: dict, hub_cache: dict) -> None:
    """``dmo score``, ``dmo study`` and ``dmo correlate`` with ``HF_HUB_OFFLINE=1`` and the hub's address pointing
    nowhere: every model comes out of the hub cache built above, each scoring as the build measured it."""
    root = hub_cache["root"]
    space = _space(root / "space.yaml", world, hub_cache["manifest"], "tiny-hub")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache["cache"]), "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    out = _dmo("score", str(space), cwd=root, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "7 evaluated now, 0 from the cache, 0 failed" in " ".join(out.stdout.split())
    out = _dmo("study", str(space), cwd=root, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    table = ResultsTable(root / "results" / "tiny-hub" / "scores.jsonl")
    assert set(correlate(table.frame(), n_boot=10, n_perm=10)["n"]) == {2}  # both trained mixtures pair with proxies
    rows = table.records()
    info = world["info"]
    want = {("base", "base", None), ("expert", "general", None), ("expert", "ocr", None)}
    want |= {("trained", m.id, s) for m in world["chosen"] for s in (0, 1)}
    _check_against_the_build(rows, info, want)
    assert {r["mixture"] for r in rows if r["kind"] == "proxy"} == {m.id for m in world["chosen"]}


def test_a_study_on_a_folder_in_the_papers_download_layout(world: dict, tmp_path: Path, monkeypatch) -> None:
    """checkpoints/base_models/<base>, checkpoints/sft_models/exp_<model>_<budget>/<model id> (experts and trained
    mixtures side by side, with hf download's .cache folder): scored, then resumed from the cache, then studied."""
    from dmo.session import Session, score_references

    w, budget = world["world"], world["budget"]
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(w.base_dir, ckpt / "base_models" / "tiny-base")
    exp = ckpt / "sft_models" / f"exp_{TAG.removesuffix('_lora')}_{budget}"
    for d in ("general", "ocr"):
        _copy_model(w.expert_dir(d), exp / f"{TAG}_expert_{d}-{budget}")
    for m in world["chosen"]:
        _copy_model(w.trained_dir(m, 0), exp / _paper_name(m, budget))
        _copy_model(w.trained_dir(m, 1), exp / f"{_paper_name(m, budget)}_seed1")
    (exp / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "experts").mkdir()
    manifest = tmp_path / "experts" / "tiny.yaml"
    manifest.write_text(
        f"name: tiny-paper-layout\nbase: ../checkpoints/base_models/tiny-base\nbudget: {budget}\nexperts:\n"
        + "".join(
            f"  {d}: ../checkpoints/sft_models/{exp.name}/{TAG}_expert_{d}-{budget}\n" for d in ("general", "ocr")
        )
        + f"trained: ../checkpoints/sft_models/{exp.name}\n"
    )
    monkeypatch.setenv("DMO_RESULTS", str(tmp_path / "results"))
    space = _space(tmp_path / "space.yaml", world, manifest, "tiny-folder")
    session = Session.open(space)
    scored = score_references(session, ("trained", "experts"), progress=False)
    assert (scored.targets, scored.evaluated, scored.failed) == (6, 6, [])
    rows = session.table.records()
    want = {("expert", "general", None), ("expert", "ocr", None)}
    want |= {("trained", m.id, s) for m in world["chosen"] for s in (0, 1)}
    _check_against_the_build(rows, world["info"], want)
    again = score_references(session, ("base", "experts", "trained"), progress=False)
    assert (again.targets, again.evaluated) == (7, 1)  # only the base is new
    result = session.run_study(progress=False)
    assert result.best is not None and result.best.id in {m.id for m in world["chosen"]}


def test_dmo_score_scores_the_tiny_worlds_references(world: dict, tmp_path: Path) -> None:
    """``dmo score --workers 2`` on a space of the tiny world (``experts: tinyworld-small``): the base, both experts
    and every trained mixture of the space's domains, each scored once, as the build measured it; a bad --targets is
    one line."""
    space = tmp_path / "tiny.yaml"
    space.write_text(
        "name: tiny-score\ndomains: [general, ocr]\nexperts: tinyworld-small\nmixtures: {preset: paper-2d}\n"
        "benchmarks: [dmo_tiny_general, dmo_tiny_ocr]\nscoring: {backend: hf}\n"
    )
    env = {"DMO_CACHE": str(world["cache"]), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = _dmo("score", str(space), "--targets", "base,experts,proxies", cwd=tmp_path, env=env)
    assert out.returncode == 2 and "--targets: unknown target 'proxies'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _dmo("score", str(space), "--workers", "2", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "17 evaluated now, 0 from the cache, 0 failed" in " ".join(out.stdout.split())
    rows = ResultsTable(tmp_path / "results" / "tiny-score" / "scores.jsonl").records()
    assert len(rows) == 17 * 2 and len({r["key"] for r in rows}) == 17 * 2  # no target scored twice
    trained = {("trained", r["id"], s) for r in world["info"]["accuracy"]["trained"]["2d"] for s in (0, 1)}
    _check_against_the_build(rows, world["info"], {("base", "base", None), ("expert", "general", None),
                                                   ("expert", "ocr", None), *trained})  # fmt: skip
