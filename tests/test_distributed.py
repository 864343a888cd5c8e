"""
Data-parallel training under torchrun (distributed.py, train.py), on the CPU with gloo and 2 processes:
the same run as one process (per-step losses and final adapter tensors within 1e-5) for ShareA,
Tied-LoRA and VeRA on both kinds of data, the E2E ones with gradient accumulation (E2E rows hold
different numbers of reference tokens, so the loss must be weighed by tokens, not by process);
resume under torchrun and from 2 processes to 1; Ctrl-C; and the bad setups.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY
from data.common import UserError

import distributed  # noqa: E402
import sharelora  # noqa: E402
import train  # noqa: E402

PRESETS = ("sharea", "tied", "vera")
STEPS = ["--max_iters=4", "--eval_interval=2", "--learning_rate=1e-2"]  # big steps: a wrong gradient shows


def torchrun(*args, nproc=2, timeout=300, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout, **kwargs)


def config(data, kind, preset, out):
    extra = ["--grad_accum=2"] if kind == "e2e" else []
    return [*TINY, f"--data_dir={data[kind]}", f"--adapter={preset}", *STEPS, *extra, f"--out_dir={out}"]


def adapter(out):
    return sharelora.read_adapter(os.path.join(out, "adapter.safetensors"))[2]


def single(argv):
    torch.set_num_threads(1)
    return train.train(train.parse_args(argv))


@pytest.fixture(scope="module")
def launched(data, tmp_path_factory):
    """One torchrun launch of 2 processes running every distributed case; returns its folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    runs = [config(data, kind, preset, tmp / f"{kind}-{preset}") for kind in ("shakespeare", "e2e") for preset in PRESETS]
    resumed = config(data, "e2e", "sharea", tmp / "resumed")
    runs += [[*resumed, "--max_iters=2"], ["--init_from=resume", f"--out_dir={tmp / 'resumed'}", "--max_iters=4"],
             [*config(data, "e2e", "tied", tmp / "to-one"), "--max_iters=2"],
             ["--init_from=resume", f"--out_dir={tmp / 'from-one'}", "--max_iters=4"]]
    single([*config(data, "e2e", "vera", tmp / "from-one"), "--max_iters=2"])  # saved by one process
    runs.append(joint(data, tmp, tmp / "joint"))
    (tmp / "runs.json").write_text(json.dumps([[str(a) for a in r] for r in runs]))
    p = torchrun("tests/ddp_runs.py", tmp / "runs.json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp, p


@pytest.mark.parametrize("kind", ["shakespeare", "e2e"])
@pytest.mark.parametrize("preset", PRESETS)
def test_two_processes_train_as_one(launched, data, tmp_path, kind, preset):
    tmp, _ = launched
    one = single(config(data, kind, preset, tmp_path / "one"))
    two = json.loads((tmp / f"{kind}-{preset}" / "losses.json").read_text())
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, abs=1e-5), (one, two)
    a, b = adapter(tmp_path / "one"), adapter(tmp / f"{kind}-{preset}")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k
    assert one[0] != one[-1]  # it trained


def joint(data, tmp, out):
    """Two tasks trained jointly (one shared A, one B each; round-robin batches) on a tiny base that
    train.py wrote (made once, beside the runs)."""
    base = tmp.parent / "joint-base"
    if not (base / "model.safetensors").exists():
        single([*TINY, "--adapter=none", f"--data_dir={data['shakespeare']}", f"--out_dir={base}", "--max_iters=1"])
    return [f"--init_from={base}", *TINY[5:], "--adapter=sharea", *STEPS, "--grad_accum=2", "--eval_prompt=",
            f"--tasks=e2e={data['e2e']},shakespeare={data['shakespeare']}", f"--out_dir={out}"]


def test_two_processes_train_tasks_jointly_as_one(launched, data, tmp_path):
    import bank
    tmp, _ = launched
    one = single(joint(data, tmp, tmp_path / "one"))
    two = json.loads((tmp / "joint" / "losses.json").read_text())
    assert len(one) == 4 and one == pytest.approx(two, abs=1e-5), (one, two)
    a, b = (bank.Bank.read(d / bank.BANK_FILE) for d in (tmp_path / "one", tmp / "joint"))
    pairs = [(a.shared, b.shared)] + [(a.tasks[n]["tensors"], b.tasks[n]["tensors"]) for n in a.names]
    for x, y in pairs:
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-5, rtol=0) for k in x)
    assert not torch.equal(*(a.tasks[n]["tensors"]["transformer.h.0.attn.q.lora_B"] for n in a.names))


def test_resume_under_torchrun_with_another_number_of_processes(launched, data, tmp_path):
    tmp, _ = launched
    # saved at step 2 by 2 processes, resumed to 4 by 2 processes: as one uninterrupted process
    one = single(config(data, "e2e", "sharea", tmp_path / "one"))
    resumed = json.loads((tmp / "resumed" / "losses.json").read_text())
    assert resumed == pytest.approx(one[2:], abs=1e-5)
    ref = adapter(tmp_path / "one")
    for k, v in adapter(tmp / "resumed").items():
        assert torch.allclose(v, ref[k], atol=1e-5, rtol=0), k
    # saved at step 2 by one process, resumed to 4 by 2
    full = single(config(data, "e2e", "vera", tmp_path / "vera-one"))
    assert json.loads((tmp / "from-one" / "losses.json").read_text()) == pytest.approx(full[2:], abs=1e-5)
    # saved at step 2 by 2 processes, resumed to 4 by one
    full = single(config(data, "e2e", "tied", tmp_path / "tied-one"))
    rest = single(["--init_from=resume", f"--out_dir={tmp / 'to-one'}", "--max_iters=4"])
    assert rest == pytest.approx(full[2:], abs=1e-5)
    ref = adapter(tmp_path / "tied-one")
    for k, v in adapter(tmp / "to-one").items():
        assert torch.allclose(v, ref[k], atol=1e-5, rtol=0), k


def test_only_process_zero_speaks_and_writes(launched):
    tmp, p = launched
    assert p.stdout.count("done: 4 steps") == 9  # 6 runs to step 4, 2 resumed ones, the joint one: once each
    assert "2 processes, each 2 rows of every batch of 4" in p.stdout
    log = [json.loads(line) for line in (tmp / "e2e-sharea" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # one line per step, not one per process


def test_batch_that_does_not_split_is_refused(data, tmp_path):
    p = torchrun("train.py", *TINY, "--batch_size=3", f"--data_dir={data['shakespeare']}", f"--out_dir={tmp_path / 'x'}")
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: batch_size 3 does not split among 2 processes: give a batch_size that 2 divides "
                     "(it is the global batch, the same whatever the number of processes)"], p.stderr[-2000:]
    assert "Traceback" not in p.stderr.split("error:")[0]  # no worker traceback before torchrun's own report
    assert not (tmp_path / "x").exists()


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    group = distributed.setup()
    assert isinstance(group, distributed.Group) and not group.main
    with pytest.raises(UserError, match="nproc_per_node=1 or fewer"):
        group.device("cuda")
    assert group.device("cpu") == "cpu"


def test_ctrl_c_under_torchrun_saves_one_checkpoint_and_every_process_exits(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
           f"--data_dir={data['shakespeare']}", "--adapter=sharea", "--max_iters=100000", "--eval_interval=100000",
           f"--out_dir={out}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count('"loss"') >= 3):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the group gets it
    stdout, stderr = p.communicate(timeout=120)
    assert "interrupted: saved step" in stdout, stdout[-2000:] + stderr[-2000:]
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 3
    assert f"interrupted: saved step {step} to" in stdout
    rest = single(["--init_from=resume", f"--out_dir={out}", f"--max_iters={step + 1}"])
    assert len(rest) == 1


def test_each_process_resumes_its_own_random_state(data, tmp_path):
    """With dropout, each process draws its own masks (seed + rank) and a resumed run continues every
    process's own generator: a run stopped at step 2 and resumed is the uninterrupted one, bit for bit."""
    dropout = [*config(data, "e2e", "sharea", tmp_path / "full"), "--adapter_dropout=0.1"]
    runs = [dropout, [*config(data, "e2e", "sharea", tmp_path / "resumed"), "--adapter_dropout=0.1", "--max_iters=2"],
            ["--init_from=resume", f"--out_dir={tmp_path / 'resumed'}", "--max_iters=4"]]
    (tmp_path / "runs.json").write_text(json.dumps([[str(a) for a in r] for r in runs]))
    p = torchrun("tests/ddp_runs.py", tmp_path / "runs.json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    full = json.loads((tmp_path / "full" / "losses.json").read_text())
    assert json.loads((tmp_path / "resumed" / "losses.json").read_text()) == full[2:]
    states = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
