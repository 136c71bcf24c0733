"""Progress off a terminal: plain lines in a job's log, never tqdm's carriage-return bar frames (issue 31)."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import pytest

from ambient_ray.io import progress as progress_mod
from ambient_ray.models.features import Extractor

BAR_MARKS = ("\r", "%|", "█", "it/s", "s/it")


def _extract() -> None:
    ex = Extractor("flat", lambda x: x.flatten(1), batch_size=2)
    ex(np.zeros((8, 4, 4, 1), np.uint8), progress=True)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "INTERVAL_S", 0.0)  # a plain line on every update
    stderr = io.StringIO()  # not a terminal, even under `pytest -s` in one
    monkeypatch.setattr(sys, "stderr", stderr)
    _extract()
    out, err = capsys.readouterr()
    err += stderr.getvalue()
    assert not any(m in out + err for m in BAR_MARKS), repr(out + err)
    assert err == ""
    assert "  features (flat): 1/4 batches" in out and "3/4 batches" in out  # the plain progress lines


def test_a_bar_on_a_terminal(monkeypatch):
    """The same call with stderr a terminal draws tqdm's bar there (so the test above can fail)."""
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    _extract()
    assert "\r" in fake.getvalue() and "features (flat)" in fake.getvalue()


@pytest.mark.parametrize("label", ["sample", "feature net (rotation)"])
def test_a_job_log_gets_no_bar_frames(tmp_path, label):
    """A real process whose stdout and stderr go to a file, as in a job's log: lines only."""
    code = (
        "from ambient_ray.io import progress as r\n"
        "r.INTERVAL_S = 0.0\n"
        f"with r.Progress({label!r}, 3, 'steps') as bar:\n"
        "    for _ in range(3):\n"
        "        bar.set_postfix(loss='0.5')\n"
        "        bar.update()\n"
    )
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, check=True, timeout=120)
    text = log.read_text()
    assert not any(m in text for m in BAR_MARKS), repr(text)
    lines = text.splitlines()
    assert len(lines) == 2, lines
    for k, line in enumerate(lines, 1):
        assert re.fullmatch(rf"  {re.escape(label)}: {k}/3 steps \(\d+s\)  loss 0\.5", line), line
