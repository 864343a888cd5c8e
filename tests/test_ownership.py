"""
One owner per folder, and every output complete or absent, with real processes and real limits (no
monkeypatch): two train.py on one out_dir (the second is refused, naming the first, which carries on
unharmed); sampling and loading a run while it writes a checkpoint every step (training never fails);
compare.py killed (its train.py child goes with it); and a file-size limit (`ulimit -f`, the way a full
disk shows to a process) hit while writing a checkpoint, an export, evaluation results and prepared data:
exit 2, one sentence naming the file, and the previous files intact and loadable.

Every run is a tiny model from conftest (TINY, `trained`, `data`): each test takes seconds.
"""
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import runtime
from conftest import ROOT, TINY

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": os.path.dirname(sys.executable)}


def start(script, *args, preexec_fn=None):
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)


def finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def script(name, *args, preexec_fn=None):
    return finish(start(name, *args, preexec_fn=preexec_fn))


def one_error(err):
    """The message of a refusal: exactly one `error:` line, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def digest(folder):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))
            if (folder / n).is_file() and n != ".lock"}


def adapter_run(trained, data, out, *extra):
    return [*TINY[1:], f"--init_from={trained / 'base'}", "--adapter=lora", "--r=2", f"--data_dir={data['e2e']}",
            f"--out_dir={out}", *extra]


def logged_steps(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]


# ---- one owner per run folder --------------------------------------------------------------------

def test_a_second_writer_is_refused_and_the_first_is_unharmed(trained, data, tmp_path):
    out = tmp_path / "run"
    first = start("train.py", *adapter_run(trained, data, out, "--max_iters=100000", "--eval_interval=5"))
    wait_for(lambda: runtime.has_checkpoint(out) and (out / ".lock").exists(), "the first checkpoint")
    for second in (adapter_run(trained, data, out, "--max_iters=50"),  # a fresh run into it
                   ["--init_from=resume", f"--out_dir={out}", "--max_iters=100001"]):  # a resume while it trains
        code, _, err = script("train.py", *second)
        message = one_error(err)
        assert code == 2 and f"being written by process {first.pid}" in message and "train.py" in message, err
    assert first.poll() is None  # the refusals did not stop it
    wait_for(lambda: runtime.read_checkpoint(out)["step"] >= 10, "two more checkpoints")
    first.send_signal(signal.SIGINT)
    code, stdout, err = finish(first)
    assert code == 130 and "continue with --init_from=resume" in stdout, err
    steps = logged_steps(out)
    assert steps == list(range(1, len(steps) + 1))  # each step once, from one writer
    assert not (out / ".lock").exists()  # a normal end removes the lock file


def test_a_lock_is_released_when_its_owner_is_killed(trained, data, tmp_path):
    """kill -9 leaves the lock file, but no lock: the next writer takes the folder."""
    out = tmp_path / "run"
    first = start("train.py", *adapter_run(trained, data, out, "--max_iters=100000", "--eval_interval=5"))
    wait_for(lambda: runtime.has_checkpoint(out), "the first checkpoint")
    first.kill()
    first.wait()
    assert (out / ".lock").exists()
    step = runtime.read_checkpoint(out)["step"]
    code, _, err = script("train.py", "--init_from=resume", f"--out_dir={out}", f"--max_iters={step + 2}")
    assert code == 0, err


def test_reading_a_run_while_it_trains_never_disturbs_it(trained, data, tmp_path):
    """A checkpoint every step, while sample.py and runtime.load_model read the run over and over: the
    readers always find a complete checkpoint, and training ends normally."""
    out = tmp_path / "run"
    trainer = start("train.py", *adapter_run(trained, data, out, "--max_iters=60", "--eval_interval=1"))
    wait_for(lambda: runtime.has_checkpoint(out), "the first checkpoint")
    sampler = start("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=2", "--device=cpu")
    reads = 0
    while trainer.poll() is None:
        model, info = runtime.load_model(out_dir=str(out), device="cpu", dtype="float32")
        assert runtime.read_checkpoint(out)["step"] >= 0 and info["adapter"] is not None
        reads += 1
        if sampler.poll() is not None:
            code, _, err = finish(sampler)
            assert code == 0, err
            sampler = start("sample.py", f"--out_dir={out}", "--max_new_tokens=2", "--device=cpu")
    code, _, err = finish(trainer)
    assert code == 0, err
    assert finish(sampler)[0] == 0
    assert reads >= 3, reads
    assert runtime.read_checkpoint(out)["step"] == 60
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "ckpt.pt", "metrics.jsonl"]


def test_a_set_read_while_its_owner_moves_it_finds_its_base(trained, data, tmp_path):
    """A checkpoint committed but not yet moved into place (its owner between the two renames, or killed
    there) is read inside .committed, and the adapter's base, named relative to the run folder, is found
    from there: the window the test above hits about once in a few runs, made to last."""
    out = tmp_path / "run"
    assert script("train.py", *adapter_run(trained, data, out, "--max_iters=2"))[0] == 0
    (out / runtime.COMMITTED).mkdir()
    for name in ("adapter.safetensors", "ckpt.pt"):
        os.replace(out / name, out / runtime.COMMITTED / name)
    before = digest(out)
    model, info = runtime.load_model(out_dir=str(out), device="cpu", dtype="float32")
    assert info["adapter"].endswith(os.path.join(runtime.COMMITTED, "adapter.safetensors"))
    assert runtime.read_checkpoint(out)["step"] == 2
    assert digest(out) == before  # the reader moved nothing


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_killed_comparison_takes_its_training_run_with_it(trained, data, tmp_path, sig):
    """SIGTERM: compare.py passes it on and waits for train.py to save; SIGKILL: Linux sends train.py
    SIGTERM as its parent dies (PR_SET_PDEATHSIG). Either way no train.py is left training, and the
    comparison run again continues the saved run."""
    out = tmp_path / "cmp"
    argv = [f"--init_from={trained / 'base'}", f"--data_dir={data['e2e']}", "--presets=lora", "--max_iters=100000",
            "--batch_size=2", "--eval_mrs=0", "--r=2", f"--out={out}", "--device=cpu",
            "--", "--eval_iters=1", "--block_size=32", "--dtype=float32"]
    p = start("tools/compare.py", *argv)
    run = out / "lora" / "seed1"
    wait_for(lambda: children(p.pid) and runtime.has_checkpoint(run), "the training run's first checkpoint")
    (child,) = children(p.pid)
    assert alive(child)
    p.send_signal(getattr(signal, sig))
    code, _, err = finish(p)
    assert code == (128 + signal.SIGTERM if sig == "SIGTERM" else -signal.SIGKILL), err
    wait_for(lambda: not alive(child), "train.py to end with its parent", timeout=60)
    step = runtime.read_checkpoint(run)["step"]
    code, _, err = script("train.py", "--init_from=resume", f"--out_dir={run}", f"--max_iters={step + 1}")
    assert code == 0, err  # nothing holds the folder any more


# ---- a real full disk: a file-size limit, no monkeypatch ---------------------------------------------

def size_limit(nbytes):
    """For preexec_fn: files of this process may not grow beyond nbytes (ulimit -f). SIGXFSZ ignored, as
    Python does by default: the write then fails with EFBIG, as on a full disk with ENOSPC."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))
    return apply


def assert_refused_in_one_sentence(code, err, names):
    message = one_error(err)
    assert code == 2, err
    assert "could not write" in message and names in message and "kept" in message, message
    return message


def test_a_checkpoint_beyond_the_size_limit_keeps_the_last_one(trained, data, tmp_path):
    """The adapter file fits, ckpt.pt (optimizer state and random generators too) does not."""
    out = tmp_path / "run"
    code, _, err = script("train.py", *adapter_run(trained, data, out, "--max_iters=1"))
    assert code == 0, err
    before = digest(out)
    limit = (out / "adapter.safetensors").stat().st_size + 1024
    assert (out / "ckpt.pt").stat().st_size > limit
    code, _, err = script("train.py", "--init_from=resume", f"--out_dir={out}", "--max_iters=3",
                          preexec_fn=size_limit(limit))
    message = assert_refused_in_one_sentence(code, err, "ckpt.pt")
    assert "step 1 there is kept" in message and "ulimit -f" in message, message
    after = digest(out)
    assert {n: h for n, h in after.items() if n != "metrics.jsonl"} == \
        {n: h for n, h in before.items() if n != "metrics.jsonl"}
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "ckpt.pt", "metrics.jsonl"]
    assert runtime.read_checkpoint(out)["step"] == 1
    code, _, err = script("train.py", "--init_from=resume", f"--out_dir={out}", "--max_iters=2")
    assert code == 0, err  # and the run continues once there is room


@pytest.mark.parametrize("to", ["hf", "peft"])
def test_an_export_beyond_the_size_limit_keeps_the_previous_export(trained, tmp_path, to):
    adapter, dest = trained / "adapted" / "adapter.safetensors", tmp_path / "export"
    code, _, err = script("tools/export.py", f"--adapter={adapter}", f"--to={to}", f"--dest={dest}")
    assert code == 0, err
    before = digest(dest)
    weights = "model.safetensors" if to == "hf" else "adapter_model.safetensors"
    code, _, err = script("tools/export.py", f"--adapter={adapter}", f"--to={to}", f"--dest={dest}",
                          preexec_fn=size_limit((dest / weights).stat().st_size // 2))
    message = assert_refused_in_one_sentence(code, err, str(dest))  # safetensors leaves no file to name
    assert "ulimit -f" in message and f"{dest} is kept as it was" in message, message
    assert digest(dest) == before
    assert load_file(dest / weights)  # loads, whole
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left beside it


def test_an_export_never_replaces_a_folder_it_did_not_write(trained, tmp_path):
    """A folder holding the run's base as a .safetensors file (or anything else) is not an export."""
    import shutil
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(trained / "base" / "model.safetensors", home / "base.safetensors")
    shutil.copy(trained / "base" / "config.json", home / "config.json")
    before = digest(home)
    code, _, err = script("tools/export.py", f"--adapter={trained / 'adapted' / 'adapter.safetensors'}",
                          f"--init_from={home / 'base.safetensors'}", "--to=hf", f"--dest={home}")
    assert code == 2 and "base.safetensors, which this command did not write" in one_error(err), err
    assert digest(home) == before


def test_evaluation_results_beyond_the_size_limit_keep_the_previous_set(data, tmp_path):
    run = tmp_path / "run"  # a base from scratch with its adapter, with room for E2E's MRs (up to 52 tokens)
    options = [a for a in TINY if not a.startswith("--block_size")]
    code, _, err = script("train.py", *options, "--block_size=96", "--adapter=lora", "--r=2",
                          f"--data_dir={data['e2e']}", f"--out_dir={run}", "--max_iters=1")
    assert code == 0, err
    adapter, results = run / "adapter.safetensors", tmp_path / "results"
    common = [f"--adapter={adapter}", f"--data_dir={data['e2e']}", "--beam_size=1", "--device=cpu",
              f"--results_dir={results}"]
    code, _, err = script("tools/evaluate_e2e.py", *common, "--limit=2")
    assert code == 0, err
    before = digest(results)
    code, _, err = script("tools/evaluate_e2e.py", *common, "--limit=40",
                          preexec_fn=size_limit((results / "references.txt").stat().st_size + 10))
    message = assert_refused_in_one_sentence(code, err, str(results))
    assert "ulimit -f" in message and f"{results} is kept as it was" in message, message
    assert digest(results) == before  # the three files of the first run, together
    assert json.loads((results / "scores.json").read_text())["mrs"] == 2
    assert len((results / "predictions.txt").read_text().splitlines()) == 2


def test_prepared_data_beyond_the_size_limit_keeps_the_previous_data(data, tmp_path):
    out = tmp_path / "shakespeare"
    code, _, err = script("data/shakespeare/prepare.py", "--out", out)
    assert code == 0, err
    before = digest(out)
    code, _, err = script("data/shakespeare/prepare.py", "--out", out,
                          preexec_fn=size_limit((out / "train.bin").stat().st_size // 2))
    assert_refused_in_one_sentence(code, err, "train.bin")
    assert digest(out) == before
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    from data.loader import Batches
    assert Batches(str(out), 2, 8).max_token() < 50257  # the previous data still loads


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_the_libraries_own_write_errors_become_one_sentence(tmp_path, writer):
    """torch.save given a path writes through its C++ writer, which raises RuntimeError ("unexpected pos")
    when a write fails; safetensors raises SafetensorError. Inside write_set (as a checkpoint's or the
    data's files are written) both are reported as a write error, and the previous set is kept."""
    code = f'''
import os, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from data.common import run, write_set
from safetensors.torch import save_file
big = {{"w": torch.zeros(1 << 16)}}
def files(folder):
    path = os.path.join(folder, "weights")
    torch.save(big, path) if {writer!r} == "torch.save" else save_file(big, path)
run(write_set, sys.argv[1], files, "weights")
'''
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "weights").write_text("previous")
    p = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=ENV,
                       preexec_fn=size_limit(2**16), timeout=120)
    message = assert_refused_in_one_sentence(p.returncode, p.stderr, str(folder))
    assert "ulimit -f" in message, message
    assert sorted(os.listdir(folder)) == ["weights"] and (folder / "weights").read_text() == "previous"


# ---- class 10: what a message promises works --------------------------------------------------------

def test_the_demo_run_again_after_ctrl_c_continues_the_interrupted_run(data, tmp_path):
    """demo.py's training step after a Ctrl-C: the next `make demo` resumes the run the Ctrl-C saved
    (it used to say the folder "holds a training run already"), then reuses it; a run finished without
    demo_seconds.txt (a kill just after training) shows its time as unknown instead of a traceback."""
    from tools import demo
    out = tmp_path / "demo" / "base"
    options = [*TINY, "--adapter=none", f"--data_dir={data['shakespeare']}", "--eval_interval=100000",
               "--max_iters=100000"]
    p = start("train.py", *options, f"--out_dir={out}")
    wait_for(lambda: (out / "metrics.jsonl").exists() and sum(1 for _ in open(out / "metrics.jsonl")) >= 3,
             "a few steps")
    p.send_signal(signal.SIGINT)
    assert finish(p)[0] == 130
    stopped = runtime.read_checkpoint(out)["step"]
    options[-1] = f"--max_iters={stopped + 2}"
    seconds = demo.train_once(str(out), options)  # resumes: a new run there would be refused
    assert seconds is not None and runtime.read_checkpoint(out)["step"] == stopped + 2
    before = digest(out)
    assert demo.train_once(str(out), options) == seconds  # finished: reused, nothing trained or written
    assert digest(out) == before
    (out / "demo_seconds.txt").unlink()
    assert demo.train_once(str(out), options) is None and demo.seconds(None) == "?"
