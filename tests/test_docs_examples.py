"""Examples that cannot rot: every command line and YAML example of the documentation (``docs/``, the README and the
other READMEs) is checked against the code, and the reference pages generated from the code cover all of it.

- A ``dmo`` command is parsed by the real command line (a renamed or removed option, a bad value, a missing
  argument fails); the cheap ones whose files exist (``--help``, ``spaces show``, ``data name``, ``correlate``,
  ``compare``, ``suggest``, ``report``) are run for real in a folder holding the shipped spaces and results tables of
  the tiny world's spaces.
- A ``benchmarks/*.py`` command may only pass options the script declares; every script a command runs must exist;
  ``pip install`` extras must be extras of ``pyproject.toml``; any other program must be one listed here.
- A YAML block validates as a search space (a fragment is checked inside a minimal space), an expert manifest or
  metric-map entries: by its first line ``# dmo: space | manifest | metrics``, else by its keys.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from dmo.cli import app
from dmo.cli.reference import PAGES, field_docs, nested_models
from dmo.config import SearchSpace, parse_space
from dmo.configfile import validate
from dmo.manifest import ExpertManifest
from dmo.presets import paper_2d, paper_3d
from dmo.results import COLUMNS, ResultsTable, ScoreRow
from dmo.scoring.metrics import parse_metric_map

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: every markdown file whose examples are checked
FILES = sorted([ROOT / "README.md", ROOT / "results" / "README.md", ROOT / "scripts" / "slurm" / "README.md",
                *DOCS.rglob("*.md")])  # fmt: skip
SHELLS = {"bash", "sh", "shell", "console"}
DMO = {"dmo", ".venv/bin/dmo", ".venv-vllm/bin/dmo"}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv-vllm/bin/python"}
#: programs outside dmo that the docs may show (their command lines are not checked)
EXTERNAL = {"createdb", "mkdir", "export", "cd", "hf", "mv"}  # hf: huggingface_hub's command line
#: ``python -m`` modules the docs may run
MODULES = {"pytest", "mkdocs", "pip", "lmms_eval"}
#: subcommands cheap enough to run for real
CHEAP = {("spaces", "show"), ("data", "name"), ("correlate",), ("compare",), ("suggest",), ("report",)}
#: commands the run must include, so that a change of the fixture cannot quietly turn every run into a parse
MUST_RUN = {
    "dmo --help",
    "dmo spaces show search_spaces/tiny-3d.yaml",
    "dmo correlate results/tiny-3d --format markdown",
    "dmo compare results/tiny-2d --benchmark dmo_tiny_ocr",
    "dmo suggest results/tiny-3d --k 3 --space search_spaces/tiny-3d.yaml --format json",
    "dmo report results/tiny-2d",
    "dmo data name general-25600++ocr-76800",
}


@dataclass(frozen=True)
class Block:
    file: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w-]*)\s*$")
_SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$')


def _blocks(path: Path) -> Iterator[Block]:
    """The fenced code blocks of a markdown file, with snippet includes (``--8<-- "file"``) replaced by the file."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            text = lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j]
            snippet = _SNIPPET.match(text)
            body.extend((ROOT / snippet.group(1)).read_text().splitlines() if snippet else [text])
            j += 1
        assert j < len(lines), f"{path.relative_to(ROOT)}:{i + 1}: a code block is never closed"
        yield Block(path, i + 1, lang, "\n".join(body))
        i = j + 1


BLOCKS = [b for f in FILES for b in _blocks(f)]


def _commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` for every command line of a shell block (continuations joined, comments and prompts cut)."""
    out = []
    for block in BLOCKS:
        if block.lang not in SHELLS:
            continue
        joined = re.sub(r"\\\n\s*", " ", block.text)
        for k, line in enumerate(joined.splitlines()):
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"\s&&\s|\s;\s", line):
                argv = shlex.split(part, comments=True)
                if argv:
                    out.append((f"{block.where}+{k + 1}", argv))
    return out


COMMANDS = _commands()
DMO_COMMANDS = [(w, argv[1:]) for w, argv in COMMANDS if argv[0] in DMO]


def test_the_docs_have_examples_to_check() -> None:
    """The checks below would pass on no examples: make sure the extraction finds them."""
    assert len(FILES) > 30 and len(DMO_COMMANDS) > 40
    assert sum(b.lang == "yaml" for b in BLOCKS) > 10
    assert any(w.startswith("README.md") for w, _ in DMO_COMMANDS)


# ---------------------------------------------------------------------------------------------------------------------
# Command lines


def _resolve(args: list[str]) -> tuple[Any, Any, list[str], list[str]]:
    """``(leaf command, its parent context, its path, its arguments)`` of a ``dmo`` command line."""
    command: Any = get_command(app)
    path = ["dmo"]
    ctx = command.make_context("dmo", [], resilient_parsing=True)
    while hasattr(command, "list_commands") and args and not args[0].startswith("-"):
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"no command 'dmo {' '.join([*path[1:], args[0]])}'"
        path.append(args[0])
        args = args[1:]
        if hasattr(sub, "list_commands"):
            ctx = sub.make_context(" ".join(path), [], parent=ctx, resilient_parsing=True)
        command = sub
    return command, ctx, path, args


def _parse(args: list[str]) -> None:
    """Parse a command line as ``dmo`` would, without running it: raises what the command line would refuse."""
    command, ctx, path, rest = _resolve(list(args))
    assert not hasattr(command, "list_commands"), f"'{' '.join(path)}' is a group: name one of its commands"
    command.make_context(" ".join(path), rest, parent=ctx)


def _message(exc: BaseException) -> str:
    format_message = getattr(exc, "format_message", None)
    return format_message() if callable(format_message) else f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("where,args", [c for c in DMO_COMMANDS if "--help" not in c[1]], ids=lambda v: str(v))
def test_every_dmo_command_line_parses(where: str, args: list[str]) -> None:
    try:
        _parse(args)
    except Exception as exc:  # typer's own click raises its UsageError subclasses; any exception is a broken example
        pytest.fail(f"{where}: 'dmo {shlex.join(args)}' is refused by the command line: {_message(exc)}")


def test_a_renamed_option_or_a_bad_value_fails_the_check() -> None:
    """The check above can fail: the parser refuses what the real command line refuses."""
    _parse(["study", "search_spaces/tiny-3d.yaml", "--sampler", "tpe", "--n-trials", "20"])
    for bad in (
        ["study", "search_spaces/tiny-3d.yaml", "--n-trial", "20"],  # a renamed option
        ["study", "search_spaces/tiny-3d.yaml", "--n-trials", "twenty"],  # a bad value
        ["study", "search_spaces/tiny-3d.yaml", "--workers", "0"],  # out of range
        ["merge", "--weights", "general=1", "--out", "x"],  # a required option missing
        ["spaces", "show"],  # a required argument missing
    ):
        with pytest.raises(Exception):  # noqa: B017 - typer's click exceptions have no public base to name
            _parse(bad)
    with pytest.raises(AssertionError, match="no command"):
        _parse(["stduy", "x.yaml"])


def _declared_options(script: Path) -> set[str]:
    """Every option string a script passes to ``add_argument`` (argparse), read from its source."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            out |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return out | {"-h", "--help"}


def _extras() -> set[str]:
    """The extras of ``pyproject.toml`` (its ``[project.optional-dependencies]`` keys; tomllib is Python 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def _check_other(where: str, argv: list[str]) -> None:
    program, args = argv[0], argv[1:]
    if program in PYTHONS:
        if args[:1] == ["-m"]:
            assert args[1] in MODULES, f"{where}: python -m {args[1]}: add it to MODULES if it belongs in the docs"
            if args[1] == "pip":
                _check_other(where, ["pip", *args[2:]])
            for token in args[2:]:
                if token.startswith(("tests/", "benchmarks/")):
                    assert (ROOT / token).exists(), f"{where}: {token} does not exist"
            return
        script = ROOT / args[0]
        assert script.is_file(), f"{where}: {args[0]} does not exist"
        declared = _declared_options(script)
        used = {t.split("=", 1)[0] for t in args[1:] if t.startswith("-")}
        assert used <= declared, f"{where}: {args[0]} declares no option {sorted(used - declared)}"
    elif program == "bash":
        assert (ROOT / args[0]).is_file(), f"{where}: {args[0]} does not exist"
    elif program == "sbatch":
        scripts = [t for t in args if t.endswith(".sbatch")]
        # a script that 'dmo train ... --slurm' writes (scripts/slurm/train_<what>-<name>.sbatch) exists only later
        written = re.compile(r"scripts/slurm/train_(experts|mixtures)-[\w.-]+\.sbatch")
        found = all((ROOT / s).is_file() or written.fullmatch(s) for s in scripts)
        assert scripts and found, f"{where}: no such sbatch script {scripts}"
    elif program == "pip":
        for token in args:
            for extras in re.findall(r"\[([\w,-]+)\]", token):
                unknown = set(extras.split(",")) - _extras()
                assert not unknown, f"{where}: pyproject.toml has no extra {sorted(unknown)}"
    else:
        assert program in EXTERNAL, f"{where}: unknown program {program!r} (add it to EXTERNAL if it belongs)"


@pytest.mark.parametrize("where,argv", [c for c in COMMANDS if c[1][0] not in DMO], ids=lambda v: str(v))
def test_every_other_command_line_names_what_exists(where: str, argv: list[str]) -> None:
    _check_other(where, argv)


def test_a_benchmark_option_that_does_not_exist_fails_the_check() -> None:
    _check_other("here", [".venv/bin/python", "benchmarks/suggest_eval.py", "--sims", "5"])
    with pytest.raises(AssertionError, match="declares no option"):
        _check_other("here", [".venv/bin/python", "benchmarks/suggest_eval.py", "--simulations", "5"])
    with pytest.raises(AssertionError, match="no extra"):
        _check_other("here", ["pip", "install", "-e", ".[eval,gpu]"])


# ---------------------------------------------------------------------------------------------------------------------
# Running the cheap commands


def _score(weights: dict[str, float], benchmark: str, domains: list[str]) -> float:
    """A smooth accuracy-like surface: each benchmark rises with its own domain's weight."""
    own = benchmark.removeprefix("dmo_tiny_")
    return 0.2 + 0.6 * weights.get(own, 0.0) ** 0.5 + 0.1 * sum(weights.values()) / len(domains)


def _results(folder: Path, domains: list[str], mixtures: list[Any], rng: np.random.Generator) -> None:
    """A results table shaped like ``dmo demo``'s: base, experts, linear proxies of every mixture, and every other
    mixture trained with two seeds (so that ``dmo suggest`` has candidates left)."""
    benchmarks = [f"dmo_tiny_{d}" for d in domains]
    rows = []
    for b in benchmarks:
        rows.append(ScoreRow("base", "base", b, 0.1, metric="exact_match"))
        rows += [ScoreRow("expert", d, b, _score({d: 1.0}, b, domains), metric="exact_match") for d in domains]
        for i, m in enumerate(mixtures):
            w = m.as_dict()
            proxy = _score(w, b, domains) + float(rng.normal(0, 0.03))
            rows.append(ScoreRow("proxy", m.id, b, proxy, metric="exact_match", weights=w, method="linear"))
            for seed in (0, 1) if i % 2 == 0 else ():
                trained = _score(w, b, domains) + float(rng.normal(0, 0.02))
                rows.append(ScoreRow("trained", m.id, b, trained, metric="exact_match", weights=w, seed=seed))
    ResultsTable(folder / "scores.jsonl").append(rows)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkout-like folder: the shipped spaces and manifests, and results tables for tiny-2d and tiny-3d."""
    root = tmp_path_factory.mktemp("docs")
    for folder in ("search_spaces", "experts"):
        (root / folder).mkdir()
        for f in (ROOT / folder).iterdir():
            (root / folder / f.name).write_bytes(f.read_bytes())
    rng = np.random.default_rng(26)
    _results(root / "results" / "tiny-2d", ["general", "ocr"], paper_2d(), rng)
    _results(root / "results" / "tiny-3d", ["counting", "general", "ocr"], paper_3d(), rng)
    return root


def _cheap(args: list[str], workdir: Path) -> bool:
    """Whether to run a command for real: help, or a cheap command whose files all exist in ``workdir``."""
    if "--help" in args:
        return True
    _, _, path, rest = _resolve(list(args))
    if tuple(path[1:]) not in CHEAP:
        return False
    paths = [t for t in rest if "/" in t and not t.startswith("-")]
    return all((workdir / p).exists() for p in paths)


def test_the_cheap_commands_run(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("DMO_RESULTS", str(workdir / "results"))
    monkeypatch.setenv("COLUMNS", "200")
    ran = set()
    for where, args in DMO_COMMANDS:
        line = shlex.join(["dmo", *args])
        if line in ran or not _cheap(args, workdir):
            continue
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{where}: '{line}' failed:\n{result.output[-3000:]}"
        assert "error" not in result.output.lower().split("\n", 1)[0], f"{where}: '{line}': {result.output[:500]}"
        ran.add(line)
    assert MUST_RUN <= ran, f"these documented commands did not run: {sorted(MUST_RUN - ran)}"
    assert (workdir / "results" / "tiny-2d" / "report.html").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# YAML examples

_MINIMAL_SPACE = {"domains": ["general", "ocr"], "mixtures": [{"general": 0.5, "ocr": 0.5}]}
_KIND = re.compile(r"^#\s*dmo:\s*(space|manifest|metrics)\s*$")


def _kind(block: Block, data: dict[str, Any]) -> str:
    first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
    marked = _KIND.match(first)
    if marked:
        return marked.group(1)
    if "domains" in data:
        return "space"
    if {"base", "experts"} <= set(data):
        return "manifest"
    if set(data) <= set(SearchSpace.model_fields):
        return "space fragment"
    raise AssertionError(f"{block.where}: a YAML block that is no space, manifest or metric map: mark it")


def _validate_yaml(block: Block) -> str:
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block.where}: expected a mapping"
    kind = _kind(block, data)
    if kind == "space":
        space = parse_space(data, block.where)
        assert space.candidates()
    elif kind == "space fragment":
        parse_space({**_MINIMAL_SPACE, **data}, block.where)
    elif kind == "manifest":
        validate(ExpertManifest, data, block.where)
    else:
        parse_metric_map(data, block.where)
    return kind


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("yaml", "yml")], ids=lambda b: b.where)
def test_every_yaml_example_validates_against_its_schema(block: Block) -> None:
    _validate_yaml(block)


def test_a_yaml_example_with_a_misspelt_key_fails_the_check() -> None:
    good = Block(ROOT / "README.md", 1, "yaml", "domains: [a, b]\nmixtures: [{a: 1}]\nsampler: {name: tpe}\n")
    assert _validate_yaml(good) == "space"
    for text in (
        "domains: [a, b]\nmixtures: [{a: 1}]\nsampler: {nmae: tpe}\n",
        "scoring: {backend: vllm, vllm: {max_lora: 4}}\n",
        "# dmo: manifest\nname: x\nbase: ./b\nexperts: {a: ./a}\ntrianed: []\n",
        "# dmo: metrics\nacme: {metrc: acc}\n",
    ):
        with pytest.raises(Exception):  # noqa: B017 - a DmoError or the pydantic error behind it
            _validate_yaml(Block(ROOT / "README.md", 1, "yaml", text))
    with pytest.raises(AssertionError, match="mark it"):
        _validate_yaml(Block(ROOT / "README.md", 1, "yaml", "colour: blue\n"))


# ---------------------------------------------------------------------------------------------------------------------
# The README, the module table and the generated reference


def test_the_readme_is_a_front_page_whose_links_exist() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert len(local) > 20
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
    nav = (ROOT / "mkdocs.yml").read_text()
    unlisted = [p for p in DOCS.rglob("*.md") if str(p.relative_to(DOCS)) not in nav]
    assert not unlisted, f"pages missing from the nav of mkdocs.yml: {unlisted}"


def test_the_module_table_names_every_module_and_package() -> None:
    """The architecture page's table of stages and modules stays accurate: every module of ``dmo/`` and every
    subpackage is named in it."""
    text = (DOCS / "contributing" / "architecture.md").read_text()
    named = set(re.findall(r"`(dmo/[\w/.]+)`", "\n".join(line for line in text.splitlines() if line.startswith("|"))))
    package = ROOT / "dmo"
    wanted = {f"dmo/{p.name}" for p in package.glob("*.py") if not p.name.startswith("_")}
    wanted |= {f"dmo/{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert wanted - named == set(), f"add to the module table of docs/contributing/architecture.md: {wanted - named}"
    stale = {n for n in named if not (ROOT / n).exists()}
    assert not stale, f"the module table names what does not exist: {stale}"


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return {path: render() for path, render in PAGES.items()}


def test_the_generated_pages_are_in_the_nav(pages: dict[str, str]) -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(path in nav and not (DOCS / path).exists() for path in pages)


def test_the_cli_reference_lists_every_command_and_option(pages: dict[str, str]) -> None:
    text = pages["reference/cli.md"]
    headings = set(re.findall(r"^## (dmo.*)$", text, flags=re.M))
    root: Any = get_command(app)

    def walk(command: Any, path: list[str], parent: Any) -> Iterator[tuple[list[str], Any, Any]]:
        ctx = command.make_context(" ".join(path), [], parent=parent, resilient_parsing=True)
        yield path, command, ctx
        for name in getattr(command, "list_commands", lambda _: [])(ctx):
            yield from walk(command.get_command(ctx, name), [*path, name], ctx)

    commands = list(walk(root, ["dmo"], None))
    assert len(commands) > 15
    for path, command, ctx in commands:
        assert " ".join(path) in headings
        section = text.split(f"## {' '.join(path)}\n", 1)[1].split("\n## ", 1)[0]
        for param in command.get_params(ctx):
            if param.name != "help" and param.param_type_name == "option":
                assert f"`{param.opts[0]}`" in section, f"{' '.join(path)}: {param.opts[0]} not documented"
    merge = text.split("## dmo merge\n", 1)[1].split("\n## ", 1)[0]
    assert "Merge method: dare, dare_ties," in merge  # the help that dmo merge completes only when it is shown


def test_every_field_of_a_space_or_a_manifest_is_documented(pages: dict[str, str]) -> None:
    from dmo.scoring.base import backend, scorer_names

    space = nested_models(SearchSpace) + [backend(n).options for n in scorer_names()]
    manifest = nested_models(ExpertManifest)
    for models, page in ((space, pages["reference/space.md"]), (manifest, pages["reference/manifest.md"])):
        undocumented = [f"{m.__name__}.{k}" for m in models for k, doc in field_docs(m).items() if not doc.strip()]
        assert not undocumented, f"give these fields a '#:' comment or a Field(description=...): {undocumented}"
        missing = [f"{m.__name__}.{k}" for m in models for k in m.model_fields if f"| `{k}` |" not in page]
        assert not missing, f"missing from the reference: {missing}"


def test_field_docs_read_comments_and_descriptions() -> None:
    from dmo.scoring.backends import ReplayOptions, VLLMOptions

    assert field_docs(ReplayOptions)["nearest"].startswith("whether the nearest recorded mixture")  # a '#:' comment
    assert field_docs(VLLMOptions)["max_loras"] == "adapters (proxies) in flight together"  # a Field description


def test_the_results_table_reference_has_every_column(pages: dict[str, str]) -> None:
    fields = set(ScoreRow.__dataclass_fields__) - {"weights"}
    assert set(COLUMNS) == fields
    assert all(f"| `{c}` |" in pages["reference/results-table.md"] for c in [*COLUMNS, "w_<domain>"])


def test_the_metric_map_and_merge_method_references_are_complete(pages: dict[str, str]) -> None:
    from dmo.merge.registry import get_method, method_names
    from dmo.scoring.metrics import load_metric_map

    for name in load_metric_map():
        assert f"| `{name.replace('|', chr(92) + '|')}` |" in pages["reference/metric-map.md"], name
    text = pages["reference/merge-methods.md"]
    for name in method_names():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert all(f"`{k}={v}`" in row for k, v in get_method(name).defaults.items()), row
    assert "`--param weighted=false` `--param density=0.2`" in text  # ties, the paper's settings
