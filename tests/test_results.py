import multiprocessing as mp
import os

import pytest

from dmo.errors import DmoError
from dmo.results import ResultsTable, ScoreRow, cache_key


def _writer(path: str, worker: int, n: int) -> None:
    t = ResultsTable(path)
    for i in range(n):
        t.append([ScoreRow("proxy", f"m{worker}-{i}", "b", float(i), key=cache_key(w=worker, i=i))])


def test_concurrent_appends_from_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "scores.jsonl")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    df = ResultsTable(path).frame()
    assert len(df) == 200 and df["mixture"].nunique() == 200


def test_torn_last_line_is_skipped_and_next_append_is_intact(tmp_path):
    t = ResultsTable(tmp_path / "scores.jsonl")
    t.append([ScoreRow("proxy", "m1", "b", 0.5, key="k1")])
    with open(t.path, "a") as fh:
        fh.write('{"kind": "proxy", "mixture": "torn')  # a writer killed mid-line
    t.append([ScoreRow("proxy", "m2", "b", 0.7, key="k2")])
    df = t.frame()
    assert sorted(df["mixture"]) == ["m1", "m2"]
    assert t.cached("k2")["score"] == 0.7 and t.cached("missing") is None


def test_latest_row_wins_and_failed_rows_are_not_cache_hits(tmp_path):
    t = ResultsTable(tmp_path / "scores.jsonl")
    t.append([ScoreRow("proxy", "m", "b", None, status="failed", error="oom", key="k")])
    assert t.cached("k") is None
    t.append([ScoreRow("proxy", "m", "b", 0.4, key="k")])
    assert t.cached("k")["score"] == 0.4
    df = t.frame()
    assert len(df) == 1 and df.iloc[0]["status"] == "ok"
    assert len(t.frame(latest=False)) == 2


def test_weights_become_columns_and_bad_kind_is_refused(tmp_path):
    t = ResultsTable(tmp_path / "scores.jsonl")
    t.append([ScoreRow("trained", "a-0.5+b-0.5", "x", 0.1, weights={"a": 0.5, "b": 0.5}, seed=1)])
    df = t.frame()
    assert df.loc[0, "w_a"] == 0.5 and df.loc[0, "seed"] == 1
    with pytest.raises(DmoError, match="result kind"):
        ScoreRow("model", "m", "b", 0.0)


def test_unwritable_folder_is_one_actionable_line(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # tests run as root in CI, so a permission bit would not stop the write
    t = ResultsTable(blocker / "sub" / "scores.jsonl")
    with pytest.raises(DmoError, match="cannot write .*not-a-folder/sub/scores.jsonl") as exc:
        t.append([ScoreRow("proxy", "m", "b", 0.1)])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_outputs_get_the_mode_a_plain_write_would(tmp_path, umask):
    from dmo.atomic import atomic_dir, write_text

    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("z")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "d").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
