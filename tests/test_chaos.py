"""A shortened chaos run (bench/chaos.py): SIGKILL workers, then the whole run, then finish.

Every lead ends in exactly one outcome per stage, `wecomctl check` passes, nobody is
greeted twice, and ambiguous dead letters stay within the number of kills.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from chaos import chaos  # noqa: E402


@pytest.mark.parametrize("provider", ["msg_template", "gateway"])
def test_kills_lose_nothing_and_greet_nobody_twice(tmp_path, provider):
    r = chaos(leads=300, workers=2, kills=4, rate=60, seed=2, provider=provider, workdir=str(tmp_path), log=lambda *a: None)
    assert r["worker_kills"] >= 3, r  # the run lasted long enough to be hurt
    assert r["check_ok"], r["check_problems"]
    assert all(r["holds"].values()), r["holds"]
    assert r["duplicate_welcomes"] == 0 and r["ambiguous"] <= r["kills"]
    assert r["stages"]["add"]["done"] == r["sim_adds"]
