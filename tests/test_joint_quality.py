"""tools/joint_quality.py: tasks trained separately, in sequence around the first one's A and jointly,
scored per task; a second run of the same command reuses every finished run; bad options exit 2."""
import json

import pytest

from conftest import TINY, run


@pytest.fixture(scope="module")
def setting(data, tmp_path_factory):
    """A tiny base with room to decode E2E prompts (128 positions), and the reversed task, small."""
    tmp = tmp_path_factory.mktemp("joint_quality")
    base, parse = tmp / "base", tmp / "parse"
    run("train.py", *[o for o in TINY if not o.startswith("--block_size")], "--block_size=128", "--adapter=none",
        f"--data_dir={data['shakespeare']}", f"--out_dir={base}", "--max_iters=1")
    run("data/e2e/prepare.py", "--out", parse, "--limit", 60, "--reverse")
    return tmp, base, parse


def test_three_ways_per_task_and_reuse(setting):
    tmp, base, parse = setting
    out = tmp / "out"
    # two tasks on the same reversed data (slot scores: no Java needed), 3 steps each, one seed
    cmd = ["tools/joint_quality.py", f"--init_from={base}", f"--tasks=a={parse},b={parse}", "--seeds=4",
           "--max_iters=3", "--batch_size=2", "--eval_prompts=3", "--device=cpu", f"--out={out}"]
    first = run(*cmd)
    assert first.stdout.count("training in") == 4, first.stdout  # a, b separately; b in sequence; joint
    rows = json.loads((out / "results.json").read_text())
    assert sorted((r["way"], r["task"]) for r in rows) == [("joint", "a"), ("joint", "b"), ("separate", "a"),
                                                          ("separate", "b"), ("sequence", "b")]
    assert all(r["prompts"] == 3 and 0 <= r["slot_f1"] <= 100 and r["val_loss"] > 0 for r in rows)
    table = (out / "quality.md").read_text()
    assert "| joint |" in table and "| sequence |" in table and "slot F1" in table
    # the sequence run's A is the first task's, frozen: equal tensors in both adapter files
    import sharelora
    a = sharelora.read_adapter(out / "separate" / "seed4" / "a" / "adapter.safetensors")[2]
    b = sharelora.read_adapter(out / "sequence" / "seed4" / "b" / "adapter.safetensors")[2]
    assert all((a[k] == b[k]).all() for k in a if k.endswith("lora_A"))
    again = run(*cmd)
    assert "training" not in again.stdout and json.loads((out / "results.json").read_text()) == rows
    assert len((out / "joint" / "seed4" / "b_predictions.txt").read_text().splitlines()) == 3
    other = run(*[c if c != "--max_iters=3" else "--max_iters=4" for c in cmd], check=False)
    assert other.returncode == 2 and "holds a run of other options" in other.stderr, other.stderr
    assert json.loads((out / "results.json").read_text()) == rows  # untouched
    row = out / "separate" / "seed4" / "a" / "a_quality_row.json"
    row.write_text(row.read_text().replace('"slot_f1": ', '"slot_f1": "x", "was": '))
    damaged = run(*cmd, check=False)
    assert damaged.returncode == 2 and "a_quality_row.json has slot_f1" in damaged.stderr, damaged.stderr


@pytest.mark.parametrize("option", ["--seeds=1,1", "--seeds=x", "--tasks=a=data/e2e", "--max_iters=0",
                                    "--eval_prompts=-1", "--batch_size=0"])
def test_bad_options_get_one_line(option):
    p = run("tools/joint_quality.py", "--init_from=x", option, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr


def test_an_out_folder_of_other_files_is_refused(setting, tmp_path):
    tmp, base, parse = setting
    (tmp_path / "notes.txt").write_text("mine")
    p = run("tools/joint_quality.py", f"--init_from={base}", f"--tasks=a={parse},b={parse}", "--seeds=1",
            "--max_iters=1", f"--out={tmp_path}", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "which this command did not write" in p.stderr, p.stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == ["notes.txt"]


def test_a_task_folder_without_data_names_the_task(setting, tmp_path):
    """The folder --tasks gives a task is that task's to prepare (joint_quality has no --data_dir to point at)."""
    tmp, base, parse = setting
    p = run("tools/joint_quality.py", f"--init_from={base}", f"--tasks=a={parse},b={tmp_path / 'none'}", "--seeds=1",
            "--max_iters=1", f"--out={tmp_path / 'out'}", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "for --tasks' task b" in p.stderr, p.stderr
    assert "--data_dir" not in p.stderr and not (tmp_path / "out").exists()
