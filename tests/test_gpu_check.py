"""tools/gpu_check.py on a CPU: what can be checked without a GPU (its table, its exit codes, its
sentence on a machine without CUDA). `python tools/gpu_check.py --smoke` runs the checks themselves on
the CPU with a tiny model (about 4 minutes: not part of the suite)."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


@pytest.fixture
def a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Emulated GPU")


def broken(w):
    raise gpu_check.Failed("the loss did not fall")


def missing(w):
    raise gpu_check.Skipped("bitsandbytes is not installed")


def crashing(w):
    return 1 / 0


def test_one_table_and_exit_1_when_a_check_fails(a_gpu, capsys):
    checks = [("fine", lambda w: "all good"), ("broken", broken), ("missing", missing), ("crashing", crashing)]
    assert gpu_check.main([], checks=checks) == 1
    out = capsys.readouterr().out
    assert "Emulated GPU x 1" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "check" not in line]
    assert [r.split("|")[1:3] for r in rows] == [
        [" fine     ", " pass   "], [" broken   ", " FAIL   "], [" missing  ", " skip   "], [" crashing ", " FAIL   "]]
    assert "the loss did not fall" in rows[1] and "ZeroDivisionError" in rows[3]


def test_exit_0_when_nothing_fails(a_gpu, capsys):
    assert gpu_check.main([], checks=[("fine", lambda w: "ok"), ("missing", missing)]) == 0


def test_without_cuda_one_sentence_and_exit_2():
    p = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "sees no CUDA GPU" in lines[0]
