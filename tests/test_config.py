from pathlib import Path

import pytest
import yaml

from dmo.config import load_space, parse_space
from dmo.errors import DmoError
from dmo.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


def test_smallest_space_has_defaults():
    space = parse_space({"domains": ["general", "ocr"], "mixtures": [{"general": 0.25, "ocr": 0.75}]})
    assert [m.id for m in space.candidates()] == ["general-0.25+ocr-0.75"]
    assert space.merge.method == "linear" and space.sampler.name == "tpe" and space.objective.aggregate == "mean"


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"domains": ["general", "ocr"], "mixtures": [{"general": 0.3, "ocr": 0.8}]}, "mixtures.0: weights"),
        ({"domains": ["general", "ocr"], "mixtures": [{"general": 0.5, "chart": 0.5}]}, "unknown domain 'chart'"),
        ({"domains": ["general", "ocr"], "mixtures": [{"general": -0.5, "ocr": 1.5}]}, ">= 0"),
        ({"domains": ["general", "ocr"], "mixtures": {"lattice": {"resolution": 0}}}, "mixtures.lattice.resolution"),
        ({"domains": ["general", "ocr"], "mixtures": {"latice": {"resolution": 4}}}, "mixtures.latice: unknown key"),
        ({"domains": ["general", "ocr"], "mixtures": {"preset": "paper-3d"}}, "preset 'paper-3d' has domains"),
        ({"domains": ["general"], "mixtures": [{"general": 1}], "sampler": "bogus"}, "sampler.name"),
        ({"domain": ["general"]}, "domains: required key is missing"),
        ({"domains": ["general"], "mixtures": [{"general": 1}], "objective": "weighted"}, "needs 'weights"),
        ({"domains": ["general", "general"], "mixtures": [{"general": 1}]}, "listed twice"),
    ],
)
def test_bad_spaces_give_one_line_naming_the_key(data, needle):
    with pytest.raises(DmoError) as exc:
        parse_space(data, "space.yaml")
    msg = str(exc.value)
    assert msg.startswith("space.yaml: ") and needle in msg and "\n" not in msg


def test_generators():
    lat = parse_space({"domains": ["a", "b", "c"], "mixtures": {"lattice": {"resolution": 4, "drop_vertices": True}}})
    assert len(lat.candidates()) == 12
    dir_ = parse_space({"domains": ["a", "b"], "mixtures": {"dirichlet": {"n": 5, "seed": 3}}})
    assert len(dir_.candidates()) == 5
    pre = parse_space(
        {"domains": ["counting", "general", "ocr"], "mixtures": {"preset": "paper-3d", "with_uniform": True}}
    )
    assert len(pre.candidates()) == 22


def test_objective_aggregates():
    space = parse_space(
        {"domains": ["a"], "mixtures": [{"a": 1}], "objective": {"aggregate": "weighted", "weights": {"x": 3, "y": 1}}}
    )
    assert space.objective({"x": 1.0, "y": 0.0}) == pytest.approx(0.75)
    assert (
        parse_space({"domains": ["a"], "mixtures": [{"a": 1}], "objective": "min"}).objective({"x": 1, "y": 0.2}) == 0.2
    )


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")))
def test_shipped_spaces_load(path):
    space = load_space(path)
    assert space.candidates()
    assert space.name == path.stem


def test_manifest_paths_resolve_and_missing_folder_is_reported(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "experts" / "ocr").mkdir(parents=True)
    doc = {
        "name": "m",
        "base": {"path": "base"},
        "experts": {"ocr": "./experts/ocr", "general": {"path": "experts/general"}},
    }
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(DmoError, match=r"expert 'general' points at missing folder .*experts/general"):
        load_manifest(f)
    (tmp_path / "experts" / "general").mkdir()
    m = load_manifest(f)
    assert m.experts["ocr"].path == (tmp_path / "experts" / "ocr").resolve()
    assert m.base.path.is_absolute() and m.kind == "lora"


def test_manifest_hub_ids_and_bad_trained(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text(
        yaml.safe_dump({"name": "m", "base": "Qwen/Qwen2-VL-2B-Instruct", "experts": {"ocr": "org/ocr-expert"}})
    )
    m = load_manifest(f)
    assert m.base.hub == "Qwen/Qwen2-VL-2B-Instruct" and m.base.path is None
    f.write_text(
        yaml.safe_dump(
            {
                "name": "m",
                "base": "a/b",
                "experts": {"ocr": "a/c"},
                "trained": [{"mixture": {"chart": 1.0}, "path": "x"}],
            }
        )
    )
    with pytest.raises(DmoError, match="unknown domain 'chart'"):
        load_manifest(f)
    f.write_text(yaml.safe_dump({"name": "../evil", "base": "a/b", "experts": {"ocr": "a/c"}}))
    with pytest.raises(DmoError, match="invalid manifest name"):
        load_manifest(f)


def test_invalid_yaml_is_reported_with_line(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("domains: [general, ocr\nmixtures: x\n")
    with pytest.raises(DmoError, match=r"s\.yaml: line \d+: not valid YAML"):
        load_space(f)


def test_backend_options_come_from_the_registered_backend() -> None:
    """Each backend's own keys sit under its name and are checked by the options model of its registry entry, not
    by a list in config."""
    from dmo.scoring.backends import ReplayOptions, VLLMOptions
    from dmo.scoring.base import backend, scorer_names

    assert {"hf", "replay", "vllm"} <= set(scorer_names())
    base = {"name": "s", "domains": ["a", "b"], "mixtures": [{"a": 0.5, "b": 0.5}]}
    replay = parse_space({**base, "scoring": {"backend": "replay", "replay": {"table": "t.jsonl", "nearest": True}}})
    assert replay.scoring.backend_options() == ReplayOptions(table=Path("t.jsonl"), nearest=True)
    vllm = parse_space({**base, "scoring": {"backend": "vllm", "vllm": {"max_loras": 2}}})
    opts = vllm.scoring.backend_options()
    assert isinstance(opts, VLLMOptions) and opts.max_loras == 2 and backend("vllm").options is VLLMOptions
    assert parse_space(vllm.model_dump()).scoring.backend_options() == opts  # a dumped space reads back the same
    # one spelling per meaning: defaults given or left out make the same space (and so the same study)
    same = [parse_space({**base, "scoring": {"backend": "vllm", **extra}}) for extra in ({}, {"vllm": {}})]
    same.append(parse_space({**base, "scoring": {"backend": "vllm", "vllm": {"max_loras": 4, "dtype": "auto"}}}))
    assert all(s.model_dump() == same[0].model_dump() for s in same)
    assert parse_space({**base, "scoring": {"backend": "hf"}}).scoring.backend_options() == backend("hf").options()
    with pytest.raises(DmoError, match=r"scoring: 'replay' holds options of the replay backend, but the backend is hf"):
        parse_space({**base, "scoring": {"backend": "hf", "replay": {"table": "t.jsonl"}}})
    with pytest.raises(DmoError, match=r"vllm\.max_loras: Input should be greater than 0 \(an option of the vllm"):
        parse_space({**base, "scoring": {"backend": "vllm", "vllm": {"max_loras": 0}}})
    with pytest.raises(DmoError, match=r"replay\.tabel: not an option of the replay backend \(its options: table, "):
        parse_space({**base, "scoring": {"backend": "replay", "replay": {"tabel": "t.jsonl"}}})
    with pytest.raises(DmoError, match=r"scoring: unknown key 'table': neither a scoring option nor a backend's name"):
        parse_space({**base, "scoring": {"backend": "replay", "table": "t.jsonl"}})  # the layout before issue 23
    with pytest.raises(DmoError, match=r"unknown scoring backend 'nope': choose one of hf, replay, vllm"):
        parse_space({**base, "scoring": {"backend": "nope"}})


def test_a_backend_s_relative_paths_resolve_against_the_space_file(tmp_path) -> None:
    from dmo.scoring.backends import ReplayOptions

    (tmp_path / "spaces").mkdir()
    text = "domains: [a, b]\nmixtures: [{a: 1}]\nscoring: {backend: replay, replay: {table: ../rec/scores.jsonl}}\n"
    (tmp_path / "spaces" / "s.yaml").write_text(text)
    space = load_space(tmp_path / "spaces" / "s.yaml")
    assert space.scoring.backend_options() == ReplayOptions(table=(tmp_path / "rec" / "scores.jsonl").resolve())
    assert load_space(tmp_path / "spaces" / "s.yaml").model_dump() == space.model_dump()
