"""`dmo data mix`: exact, seeded mixture training sets in LLaMA-Factory's format, and the interleave alternative."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_sources import make_sources, rows_of, write_image

from dmo.errors import DmoError
from dmo.groundtruth.data_mix import SHAREGPT_ENTRY, DataFolder, draw, mix, mixture_name, paper_name, read_name
from dmo.groundtruth.pools import read_pool
from dmo.mixture import Mixture, from_paper_name

ROOT = Path(__file__).resolve().parent.parent


def test_paper_names_round_trip():
    m = Mixture(("general", "ocr"), (0.25, 0.75))
    assert mixture_name(m, 102_400) == "general-25600++ocr-76800"
    assert read_name("general-25600++ocr-76800") == from_paper_name("general-25600++ocr-76800")
    back = read_name("general-25600++ocr-76800", ["general", "ocr", "chart"])
    assert back.as_dict() == {"general": 0.25, "ocr": 0.75, "chart": 0.0}
    assert read_name("ocr-102400").as_dict() == {"ocr": 1.0}
    assert read_name("general=0.5,ocr=0.5").id == "general-0.5+ocr-0.5"
    assert paper_name({"ocr": 3, "chart": 0, "general": 1}) == "general-1++ocr-3"
    with pytest.raises(DmoError):
        paper_name({"ocr": 0})


def test_exact_counts_seeded_and_nested(tmp_path):
    src = make_sources(tmp_path)
    m1 = Mixture(("general", "ocr"), (0.25, 0.75))
    m2 = Mixture(("general", "ocr"), (0.5, 0.5))
    out = tmp_path / "out"
    records = mix(src, out, [m1, m2], budget=16, seed=3)
    assert [r.name for r in records] == ["general-4++ocr-12", "general-8++ocr-8"]
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"general", "ocr", "general-4++ocr-12", "general-8++ocr-8"}
    assert info["general-4++ocr-12"] == {"file_name": "mixtures/general-4++ocr-12.jsonl", **SHAREGPT_ENTRY}
    a = rows_of(out / "mixtures" / "general-4++ocr-12.jsonl")
    assert len(a) == 16
    # every image resolves against the dataset folder (LLaMA-Factory's default media_dir) and exists
    for r in a:
        assert len(r["images"]) == 1 and (out / r["images"][0]).is_file()
        assert r["messages"][0]["role"] == "user" and r["messages"][0]["content"].startswith("<image>")
    ocr_rows = [r for r in a if "read" in r["messages"][0]["content"]]
    assert len(ocr_rows) == 12 and len({json.dumps(r) for r in ocr_rows}) == 12  # no repeats
    # nested: the mixture with more general data holds every general row of the one with less
    b = rows_of(out / "mixtures" / "general-8++ocr-8.jsonl")
    gen = lambda rows: {json.dumps(r) for r in rows if "read" not in r["messages"][0]["content"]}  # noqa: E731
    assert gen(a) <= gen(b)
    record = json.loads((out / "mixtures" / "general-4++ocr-12.json").read_text())
    assert record["counts"] == {"general": 4, "ocr": 12} and record["seed"] == 3 and record["repeated"] == {}
    # deterministic: the same call again writes the same bytes; another seed another sample
    before = (out / "mixtures" / "general-4++ocr-12.jsonl").read_bytes()
    mix(src, tmp_path / "again", [m1], budget=16, seed=3)
    assert (tmp_path / "again" / "mixtures" / "general-4++ocr-12.jsonl").read_bytes() == before
    mix(src, tmp_path / "other", [m1], budget=16, seed=4)
    assert (tmp_path / "other" / "mixtures" / "general-4++ocr-12.jsonl").read_bytes() != before
    # re-running into the same folder is a no-op; another seed there is refused
    mix(src, out, [m1], budget=16, seed=3)
    with pytest.raises(DmoError, match="already describes"):
        mix(src, out, [m1], budget=16, seed=4)


def test_too_small_refused_unless_repeats_allowed(tmp_path):
    src = make_sources(tmp_path, n_general=3)
    m = Mixture(("general", "ocr"), (0.5, 0.5))
    out = tmp_path / "out"
    with pytest.raises(DmoError, match=r"needs 8 samples of 'general' but its pool has only 3.*--allow-repeats"):
        mix(src, out, [m], budget=16)
    assert not out.exists()  # nothing half-written
    (record,) = mix(src, out, [m], budget=16, allow_repeats=True)
    assert record.repeated == {"general": {"pool": 3, "requested": 8}}
    assert any("repeated" in n for n in record.notes())
    rows = rows_of(out / "mixtures" / "general-8++ocr-8.jsonl")
    gen = [json.dumps(r) for r in rows if "read" not in r["messages"][0]["content"]]
    assert len(gen) == 8 and len(set(gen)) == 3
    assert sorted(gen.count(g) for g in set(gen)) == [2, 3, 3]  # each row 2 or 3 times, not at random


def test_draw_is_exact_and_seeded():
    d = draw({"a": 5, "b": 0}, {"a": 10, "b": 4}, seed=1, allow_repeats=False)
    assert list(d.indices) == ["a"] and len(set(d.indices["a"].tolist())) == 5
    again = draw({"a": 5}, {"a": 10}, seed=1, allow_repeats=False)
    assert d.indices["a"].tolist() == again.indices["a"].tolist()


def test_interleave_writes_no_data_but_the_config(tmp_path):
    src = make_sources(tmp_path)
    out = tmp_path / "out"
    (record,) = mix(src, out, [Mixture(("general", "ocr"), (0.25, 0.75))], budget=16, strategy="interleave")
    assert record.llamafactory == {
        "dataset": "general,ocr",
        "mix_strategy": "interleave_under",
        "interleave_probs": "0.25,0.75",
    }
    assert not (out / "mixtures" / "general-4++ocr-12.jsonl").exists()
    assert (out / "mixtures" / "general-4++ocr-12.interleave.json").is_file()
    assert set(json.loads((out / "dataset_info.json").read_text())) == {"general", "ocr"}
    # a pool smaller than its expected share is said, since interleave_under stops at the first exhausted pool
    (short,) = mix(src, tmp_path / "o2", [Mixture(("general", "ocr"), (0.5, 0.5))], 64, strategy="interleave")
    assert short.notes() and "stops after about 24 of 64" in short.notes()[0]


def test_formats_alpaca_and_sharegpt_messages(tmp_path):
    write_image(tmp_path / "img.png", 5)
    alpaca = tmp_path / "chart.jsonl"
    alpaca.write_text(
        json.dumps({"instruction": "<image>What?", "input": "tell", "output": "x", "images": ["img.png"]}) + "\n"
    )
    pool = read_pool(alpaca, "chart")
    assert pool.rows[0]["messages"] == [
        {"role": "user", "content": "<image>What?\ntell"},
        {"role": "assistant", "content": "x"},
    ]
    sharegpt = tmp_path / "doc.json"
    sharegpt.write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "<image>q"},
                        {"role": "assistant", "content": "a"},
                    ],
                    "images": [str(tmp_path / "img.png")],
                }
            ]
        )
    )
    pool = read_pool(sharegpt, "doc")
    assert pool.rows[0]["messages"][0] == {"role": "system", "content": "be brief"}
    assert pool.rows[0]["images"] == [str((tmp_path / "img.png").resolve())]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "answer": "a", "image": "missing.png"}, "missing image file"),
        (
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "images": ["img.png"],
            },
            "1 image\\(s\\) but 0 <image> placeholder",
        ),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "alternate user/assistant"),
        ({"text": "hello"}, "unknown format"),
    ],
)
def test_bad_sources_are_refused(tmp_path, row, message):
    write_image(tmp_path / "img.png", 1)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DmoError, match=message):
        read_pool(path, "d")


def test_data_folder_refuses_changed_source(tmp_path):
    src = make_sources(tmp_path)
    out = tmp_path / "out"
    mix(src, out, [Mixture(("general", "ocr"), (0.5, 0.5))], budget=8)
    rows = rows_of(src / "general" / "train.jsonl")
    rows[0]["answer"] = "changed"
    (src / "general" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DmoError, match="made from other data"):
        mix(src, out, [Mixture(("general", "ocr"), (0.25, 0.75))], budget=8)
    assert not (out / "mixtures" / "general-2++ocr-6.jsonl").exists()
    # a dmo data folder is itself a valid source
    (r,) = mix(out, tmp_path / "copy", [Mixture(("general", "ocr"), (0.25, 0.75))], budget=8)
    assert DataFolder(tmp_path / "copy").pool_sizes(["general", "ocr"]) == {"general": 12, "ocr": 20}
    assert len(rows_of(tmp_path / "copy" / "mixtures" / f"{r.name}.jsonl")) == 8


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmo.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_mix_and_bad_input(tmp_path):
    src = make_sources(tmp_path)
    ok = _cli("data", "mix", "--data", str(src), "--out", "out", "--mixture", "general-4++ocr-12", "--budget", "16",
              cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "general-4++ocr-12" in ok.stdout
    bad = _cli("data", "mix", "--data", str(src), "--out", "out2", "--mixture", "general=0.9,ocr=0.1", "--budget",
               "100", cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--allow-repeats" in bad.stderr
    assert not (tmp_path / "out2").exists()
    name = _cli("data", "name", "general-25600++ocr-76800", cwd=tmp_path)
    assert name.returncode == 0 and "general-0.25+ocr-0.75" in name.stdout
