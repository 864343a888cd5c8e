"""
compare.py end to end on a tiny base: two presets x two seeds, the table of means and standard deviations,
results.json, the two plots, and a second run of the same command that trains nothing and reuses every
row; an interrupted comparison continued. The statistics helpers on numbers worked out by hand.

compare.py runs here without Java (PATH holds Python's folder only): BLEU and NIST are scored, and the
METEOR jar's 20 s start per process is saved. The Java metrics have their own tests (test_e2e_metrics.py).
"""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import TINY  # noqa: E402
from conftest import run as run_with_java  # noqa: E402

from tools import compare  # noqa: E402

NO_JAVA = {"PATH": str(Path(sys.executable).parent)}


def run(script, *args, check=True):
    return run_with_java(script, *args, check=check, env=NO_JAVA)


def test_spread_and_differs():
    assert compare.spread([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample standard deviation: sqrt(2 / 2)
    assert compare.spread([5.0]) == (5.0, 0.0)
    assert compare.differs((10.0, 1.0), (7.0, 1.0))  # 3 apart, spreads add to 2
    assert not compare.differs((10.0, 1.0), (8.5, 1.0))  # 1.5 apart: within the scatter
    assert not compare.differs((10.0, 0.0), (7.0, 0.0))  # a single seed has no spread to compare against


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A tiny base with room for E2E prompts (the test MRs are up to 52 tokens)."""
    out = tmp_path_factory.mktemp("cmpbase") / "base"
    argv = [a for a in TINY if not a.startswith("--block_size")]
    run("train.py", *argv, "--block_size=96", "--adapter=none", f"--data_dir={data['shakespeare']}",
        f"--out_dir={out}", "--max_iters=1")
    return out


def test_compare_seeds_table_plots_and_rerun(base, data, tmp_path):
    out = tmp_path / "cmp"
    argv = [f"--init_from={base}", f"--data_dir={data['e2e']}", "--presets=lora,sharea", "--seeds=1,2",
            "--max_iters=2", "--batch_size=2", "--eval_mrs=3", "--r=2", f"--out={out}", "--device=cpu", "--png",
            "--", "--eval_iters=1", "--dtype=float32"]
    first = run("tools/compare.py", *argv)
    rows = json.loads((out / "results.json").read_text())
    assert [(r["preset"], r["seed"]) for r in rows] == [("lora", 1), ("lora", 2), ("sharea", 1), ("sharea", 2)]
    for r in rows:
        assert r["mrs"] == 3 and {"bleu", "nist", "val_loss", "trainable"} <= set(r) and r["val_curve"]
        predictions = (out / r["preset"] / f"seed{r['seed']}" / "predictions.txt").read_text().splitlines()
        assert len(predictions) == 3  # the decoded texts, in the official layout beside the adapter
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # the seeds are different runs
    table = (out / "compare.md").read_text()
    assert table in first.stdout
    lora = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert lora.count(" ± ") == len([c for c in ("val_loss", "bleu", "nist", "meteor", "rouge_l", "cider")
                                     if c in rows[0]])
    assert "seeds 1,2" in table and "Mean ± sample standard deviation over the 2 seeds" in table
    for png in ("loss.png", "quality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = out / "lora" / "seed1" / "adapter.safetensors"
    before = adapter.stat().st_mtime_ns
    second = run("tools/compare.py", *argv)  # the same command again: nothing to train, the same table
    assert second.stdout.count("reused") == 4 and "== lora, seed 1: " + "finished earlier" in second.stdout
    assert adapter.stat().st_mtime_ns == before and (out / "compare.md").read_text() == table
    other = run("tools/compare.py", *argv[:-3], "--", "--eval_iters=2", "--dtype=float32", check=False)  # another command
    assert other.returncode == 2 and "holds a run of another comparison" in other.stderr
    assert adapter.stat().st_mtime_ns == before
    fewer = run("tools/compare.py", *[a if a != "--presets=lora,sharea" else "--presets=lora" for a in argv], check=False)
    assert fewer.returncode == 2 and "summarises runs this command does not make" in fewer.stderr
    assert (out / "compare.md").read_text() == table  # the full comparison's summary is kept


def test_compare_continues_an_interrupted_run_and_keeps_foreign_files(base, data, tmp_path):
    """A run stopped in training is resumed through train.py, a run trained but not scored is only
    scored, and an --out holding files compare.py did not write is refused before anything runs."""
    out = tmp_path / "cmp"
    argv = [f"--init_from={base}", f"--data_dir={data['e2e']}", "--presets=lora", "--seeds=1,2", "--max_iters=4",
            "--batch_size=2", "--eval_mrs=2", "--r=2", f"--out={out}", "--device=cpu", "--", "--eval_iters=1",
            "--dtype=float32"]
    run("tools/compare.py", *argv)
    one, two = out / "lora" / "seed1", out / "lora" / "seed2"
    val_one = json.loads((one / "compare_row.json").read_text())["val_loss"]
    (one / "compare_row.json").unlink()  # as if stopped after training, before scoring
    command = json.loads((two / "compare_command.json").read_text())
    for f in two.iterdir():  # as if stopped halfway through training: a checkpoint at step 2
        if f.name != "compare_command.json":
            f.unlink()
    run("train.py", *[a if not a.startswith("--max_iters") else "--max_iters=2" for a in command])
    again = run("tools/compare.py", *argv)
    assert "lora, seed 1: trained earlier" in again.stdout and "lora, seed 2: continuing" in again.stdout
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["val_loss"] == val_one and rows[1]["val_curve"][-1][0] == 4
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "compare.md").write_text("my notes\n")
    refused = run("tools/compare.py", *[a if not a.startswith("--out=") else f"--out={foreign}" for a in argv], check=False)
    assert refused.returncode == 2 and "no results.json of compare.py" in refused.stderr
    assert [p.name for p in foreign.iterdir()] == ["compare.md"] and (foreign / "compare.md").read_text() == "my notes\n"
