"""Progress of long work: a bar on a terminal, plain lines now and then elsewhere, nothing when quiet."""
from __future__ import annotations

import io
import sys

from onnxslim_yolo import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(n: int = 5, **kw) -> None:
    for _ in progress.bar(range(n), total=n, desc="calibration", **kw):
        pass


def test_lines_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    _run()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and lines, err
    assert all(line.startswith("calibration:") for line in lines), lines
    assert "5/5" in lines[-1] and err.isascii()


def test_short_work_prints_nothing_off_a_terminal(capsys):
    assert progress.LINE_EVERY >= 10
    _run()
    assert capsys.readouterr().err == ""


def test_quiet_prints_nothing(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    _run(enabled=False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    _run(enabled=False)
    assert sys.stderr.getvalue() == ""
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_bar_redraws_in_place_on_a_terminal(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    _run()
    assert "\rcalibration:" in term.getvalue()


def test_monitor_redraw_is_not_followed_by_a_second_line(monkeypatch, capsys):
    """tqdm's monitor thread redraws a bar whose updates are slow without marking it drawn; the
    update after it drew again at once: two lines a moment apart in a log."""
    import time

    monkeypatch.setattr(progress, "LINE_EVERY", 0.2)
    b = progress.bar(total=10, desc="pruning")
    b.update(1)                 # within the delay: nothing
    time.sleep(0.25)
    b.refresh()                 # what the monitor does once maxinterval passed
    b.update(1)                 # last drawn (for tqdm) long ago: draws again
    time.sleep(0.25)
    b.update(2)                 # a whole interval later (past tqdm's dynamic miniters): a line
    b.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("|")[-1].split()[0] for line in lines] == ["1/10", "4/10"], lines
