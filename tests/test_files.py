"""Report files are replaced whole, and what the operator named stays what it was."""

import os
import stat
import threading

import pytest

from wecomctl.report.export import export
from wecomctl.report.files import atomic_text


def test_a_file_is_replaced_whole_keeping_its_mode_and_leaving_no_temp(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    os.chmod(target, 0o640)
    with atomic_text(str(target)) as fh:
        fh.write("new\n")
        assert target.read_text() == "old\n"  # readers see the old file until it is complete
    assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError):
        with atomic_text(str(target)) as fh:
            fh.write("half")
            raise RuntimeError("the export failed part-way")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["out.csv"]


def test_a_symlink_stays_a_symlink_and_a_fifo_is_written_not_replaced(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    assert export([{"phone": "+8613800138000"}], "jsonl", str(link), ["phone"]) == 1
    assert link.is_symlink() and real.read_text(encoding="utf-8") == '{"phone": "+8613800138000"}\n'

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, encoding="utf-8").read()))
    reader.start()
    export([{"phone": "+8613800138000"}], "jsonl", str(fifo), ["phone"])
    reader.join(5)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and got == ['{"phone": "+8613800138000"}\n']


def test_two_writers_of_one_file_do_not_write_into_each_other(tmp_path):
    target = str(tmp_path / "out.txt")
    with atomic_text(target) as a, atomic_text(target) as b:
        a.write("a" * 1000)
        b.write("b" * 10)
    assert open(target).read() == "a" * 1000  # the last to finish wins, whole
