"""Result rows: appends from several processes lose nothing; old files are read and upgraded; outputs are
checked for writability before any work."""

import csv
import json
import multiprocessing as mp
import os
import sys

import pytest

from ropekit.files import check_writable
from ropekit.results import COLUMNS, append_rows, make_row, provenance, read_rows

PROV = {"git_sha": "x", "device": "cpu", "versions": "{}", "timestamp": "t"}


def _appender(path, worker, appends):
    for i in range(appends):
        rows = [make_row(experiment="c", variant=f"w{worker}", metric="m", context_length=i, value=j, n=1, seed=0,
                         prov=PROV) for j in range(4)]  # fmt: skip
        append_rows(path, rows)


def test_concurrent_appends_from_two_processes_keep_every_row(tmp_path):
    path = tmp_path / "rows.csv"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_appender, args=(path, w, 50)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = read_rows(path)
    assert len(rows) == 2 * 50 * 4
    assert {(r["variant"], r["context_length"], r["value"]) for r in rows} == {
        (f"w{w}", str(i), str(float(j))) for w in range(2) for i in range(50) for j in range(4)
    }
    with open(path) as fh:
        assert sum(line.startswith("experiment,") for line in fh) == 1  # one header


def test_a_file_with_an_older_header_is_upgraded_not_corrupted(tmp_path):
    path = tmp_path / "old.csv"
    old_columns = [c for c in COLUMNS if c not in ("position", "depth")]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old_columns)
        w.writeheader()
        w.writerow({c: "1" for c in old_columns})
    assert read_rows(path)[0]["position"] == ""  # read: missing columns are empty
    append_rows(path, [make_row(experiment="e", variant="v", metric="position_loss", context_length=512, position=65,
                                value=2.0, n=1, seed=0, prov=PROV)])  # fmt: skip
    rows = read_rows(path)
    assert len(rows) == 2 and rows[1]["position"] == "65" and rows[1]["context_length"] == "512"
    assert open(path).readline().strip() == ",".join(COLUMNS)


def test_rows_need_every_column(tmp_path):
    with pytest.raises(ValueError, match="lacks columns"):
        append_rows(tmp_path / "r.csv", [{"experiment": "e"}])


def test_check_writable_refuses_directories_and_read_only_places(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        check_writable(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is a file"):
        check_writable(tmp_path / "file", kind="folder")
    if sys.platform == "linux":  # /proc refuses new files even to root: a read-only place everyone has
        with pytest.raises(ValueError, match="cannot write output"):
            check_writable("/proc/ropekit-rows.csv")
    assert check_writable(tmp_path / "new" / "rows.csv").parent.is_dir()


def test_per_position_rows_of_older_files_are_read_with_their_window(tmp_path):
    path = tmp_path / "old.csv"
    old_columns = [c for c in COLUMNS if c not in ("position", "depth")]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old_columns)
        w.writeheader()
        for window in (256, 2048):  # the old schema: bin start in context_length, window in the config
            config = json.dumps({"window": window})
            old = {"metric": "position_loss", "context_length": "129", "value": "4.0", "config": config}
            w.writerow({c: "" for c in old_columns} | old)
    rows = read_rows(path)
    assert [(r["context_length"], r["position"]) for r in rows] == [("256", "129"), ("2048", "129")]


def test_a_partial_last_line_of_an_append_in_progress_is_not_read(tmp_path):
    path = tmp_path / "rows.csv"
    append_rows(path, [make_row(experiment="e", variant="v", metric="m", context_length=1, value=1.0, n=1, seed=0,
                                prov=PROV)])  # fmt: skip
    with open(path, "a") as fh:
        fh.write("e,v,m,2,,,2.0,1,0,x,cpu,{},t,{")  # another process is half way through a line
    rows = read_rows(path)
    assert len(rows) == 1 and rows[0]["value"] == "1.0"


def _row(value=1.0):
    return make_row(experiment="e", variant="v", metric="m", context_length=1, value=value, n=1, seed=0, prov=PROV)


def test_a_csv_ropekit_did_not_write_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "foreign.csv"
    path.write_text("model,accuracy,notes\nllama,0.5,first\nqwen,0.7,second\n")
    path.chmod(0o444)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="not a ropekit result CSV.*model,accuracy,notes"):
        append_rows(path, [_row()])
    with pytest.raises(ValueError, match="not a ropekit result CSV"):
        read_rows(path)
    assert path.read_bytes() == before and path.stat().st_mode & 0o777 == 0o444


def test_an_older_header_is_rewritten_keeping_the_files_mode(tmp_path):
    path = tmp_path / "old.csv"
    old_columns = [c for c in COLUMNS if c not in ("position", "depth")]
    path.write_text(",".join(old_columns) + "\n" + ",".join("1" for _ in old_columns) + "\n")
    path.chmod(0o640)
    append_rows(path, [_row()])
    assert path.stat().st_mode & 0o777 == 0o640 and len(read_rows(path)) == 2


def test_a_read_only_result_file_is_refused(tmp_path):
    path = tmp_path / "rows.csv"
    append_rows(path, [_row()])
    path.chmod(0o444)
    with pytest.raises(ValueError, match="read-only"):
        append_rows(path, [_row(2.0)])


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "rows.csv"
    append_rows(path, [_row()])
    before = path.read_bytes()
    real_fsync = os.fsync

    def full_disk(fd):  # the write reached the page cache; the disk is full when it is flushed
        real_fsync(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(ValueError, match="No space left on device; the file is as it was"):
        append_rows(path, [_row(2.0), _row(3.0)])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == before
    append_rows(path, [_row(2.0), _row(3.0)])  # the rerun lands each row once
    assert [r["value"] for r in read_rows(path)] == ["1.0", "2.0", "3.0"]


def test_a_row_cut_off_by_an_interrupted_append_is_dropped_with_its_line(tmp_path):
    path = tmp_path / "rows.csv"
    append_rows(path, [_row()])
    with open(path, "a") as fh:
        fh.write('e,v,m,2,,,2.0,1,0,x,cpu,"{""a"": 1}",t,"{""cut')  # the process died here
    with pytest.warns(UserWarning, match="dropped line 3, a row cut off"):
        append_rows(path, [_row(2.0)])
    assert [r["value"] for r in read_rows(path)] == ["1.0", "2.0"]


def test_a_complete_last_row_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "rows.csv"
    append_rows(path, [_row()])
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # a hand edit dropped the final newline
    assert [r["value"] for r in read_rows(path)] == ["1.0"]  # read, not hidden
    append_rows(path, [_row(2.0)])
    assert [r["value"] for r in read_rows(path)] == ["1.0", "2.0"]


@pytest.mark.parametrize(
    "torn",
    [
        'e,v,m,2,,,2.0,1,0,x,cpu,"{""a"": ""\xc3',  # cut inside a two-byte UTF-8 character
        "e,v,m,2,,,2.0,1,0,x,cpu,{},t,",  # cut right after the comma before the config
    ],
)
def test_cutting_a_torn_row_leaves_the_row_before_it_whole(tmp_path, torn):
    path = tmp_path / "rows.csv"
    append_rows(path, [make_row(experiment="e", variant="v", metric="m", context_length=1, value=1.0, n=1, seed=0,
                                config={"note": "Zürich"}, prov=PROV)])  # fmt: skip
    with open(path, "ab") as fh:
        fh.write(torn.encode("latin-1"))
    with pytest.warns(UserWarning, match="dropped line 3"):
        append_rows(path, [_row(2.0)])
    rows = read_rows(path)
    assert [r["value"] for r in rows] == ["1.0", "2.0"] and json.loads(rows[0]["config"]) == {"note": "Zürich"}


def test_a_damaged_row_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.csv"
    append_rows(path, [_row(), _row(2.0)])
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace(",{}\n", ',"{""cut"\n')  # the config of row 1 (line 2) no longer parses
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"rows.csv', line 2: a damaged row \(its \w+ is not valid JSON\)"):
        read_rows(path)


def test_one_writer_at_a_time_and_a_nested_hold_names_this_process(tmp_path):
    from ropekit.files import sole_writer

    from .conftest import held_by_another_process

    with held_by_another_process(tmp_path / "rows.csv", "file") as pid:
        with pytest.raises(ValueError, match=rf"another ropekit process \(pid {pid} on"):
            with sole_writer(tmp_path / "rows.csv", kind="file"):
                pass
    with sole_writer(tmp_path / "rows.csv", kind="file"):  # released when its holder died (killed)
        with pytest.raises(ValueError, match="already being written by this process"):
            with sole_writer(tmp_path / "rows.csv", kind="file"):
                pass


def test_a_value_that_is_not_a_number_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.csv"
    append_rows(path, [_row(), _row(2.0)])
    path.write_text(path.read_text().replace(",2.0,", ",abc,"))
    with pytest.raises(ValueError, match=r"line 3: a damaged row \(its value 'abc' is not a number\)"):
        read_rows(path)


def test_two_calls_begun_in_the_same_second_have_their_own_timestamps():
    # a bench call's rows share its timestamp, which names the call when runs are paired
    import time

    first = provenance()["timestamp"]
    time.sleep(0.02)  # longer than a 15.6 ms Windows clock tick
    second = provenance()["timestamp"]
    assert first < second  # ISO strings: ordered in time, as the readers order them
