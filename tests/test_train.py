"""train.py, sample.py and the data pipeline, end to end on CPU with tiny models.

Data: ../shared/data when it is there (a subset of E2E), else small samples written here, so the suite
also passes in a clone with nothing beside it."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TINY = ["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--warmup_iters=2", "--device=cpu", "--dtype=float32"]


def run(script, *args, check=True):
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """{'shakespeare': dir, 'e2e': dir}, prepared by the real prepare scripts."""
    tmp = tmp_path_factory.mktemp("data")
    text, e2e = SHARED / "tinyshakespeare" / "input.txt", SHARED / "e2e"
    if not text.exists():
        text = tmp / "input.txt"
        lines = ["First Citizen:", "Before we proceed any further, hear me speak.", "All:", "Speak, speak.",
                 "You are all resolved rather to die than to famish?", "Resolved. resolved."]
        text.write_text("\n".join(lines * 400))
    if not (e2e / "trainset.csv").exists():
        e2e = tmp / "e2e"
        e2e.mkdir()
        foods = ["Italian", "French", "English", "Chinese", "Japanese"]
        for name, n in (("trainset.csv", 60), ("devset.csv", 12), ("testset_w_refs.csv", 12)):
            with open(e2e / name, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["mr", "ref"])
                for i in range(n):
                    food = foods[i % 5]
                    w.writerow([f"name[The Place {i % 7}], food[{food}]", f"The Place {i % 7} serves {food} food."])
    out = {"shakespeare": tmp / "shakespeare", "e2e": tmp / "e2e_prepared"}
    run("data/shakespeare/prepare.py", "--src", text, "--out", out["shakespeare"])
    run("data/e2e/prepare.py", "--src", e2e, "--out", out["e2e"], "--limit", 2000)
    return out


def val_losses(out_dir):
    rows = [json.loads(l) for l in open(out_dir / "metrics.jsonl")]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def test_pipeline_scratch_then_adapter_then_sample(data, tmp_path):
    base, adapted = tmp_path / "base", tmp_path / "adapted"
    run("train.py", *TINY, "--adapter=none", f"--data_dir={data['shakespeare']}", f"--out_dir={base}",
        "--max_iters=40", "--eval_interval=20", "--learning_rate=1e-2")
    losses = val_losses(base)
    assert losses[-1] < losses[0] - 1.0, losses  # from ~10.8 (uniform over 50,257 tokens) down
    assert (base / "model.safetensors").exists() and (base / "config.json").exists()

    run("train.py", *TINY[5:], f"--init_from={base}", "--adapter=sharea", "--r=4", "--targets=q,v,mlp.c_fc",
        f"--data_dir={data['e2e']}", "--dataset=e2e", f"--out_dir={adapted}", "--max_iters=30",
        "--eval_interval=15", "--learning_rate=1e-2")
    losses = val_losses(adapted)
    assert losses[-1] < losses[0], losses
    assert (adapted / "adapter.safetensors").stat().st_size < 100_000  # the adapter, not the base

    run("train.py", "--init_from=resume", f"--out_dir={adapted}", "--max_iters=40")
    assert torch.load(adapted / "ckpt.pt", weights_only=True)["step"] == 40

    p = run("sample.py", f"--out_dir={adapted}", "--start=name[The Place 1], food[French]", "--max_new_tokens=8",
            "--device=cpu")
    assert p.stdout.strip()  # the e2e format prints the generated sentence alone
    p = run("sample.py", f"--out_dir={base}", "--start=ROMEO:", "--max_new_tokens=8", "--num_samples=2",
            "--top_k=10", "--device=cpu")
    assert p.stdout.count("ROMEO:") == 2


def test_resume_is_exact(data, tmp_path):
    common = TINY + ["--adapter=tied", "--r=4", f"--data_dir={data['e2e']}", "--eval_interval=4",
                     "--lr_decay_iters=10", "--learning_rate=5e-3", "--adapter_dropout=0.1"]
    base = tmp_path / "base"
    train.train(train.parse_args(TINY + ["--adapter=none", f"--data_dir={data['shakespeare']}",
                                         f"--out_dir={base}", "--max_iters=2"]))
    common[0] = f"--init_from={base}"
    one = train.train(train.parse_args(common + [f"--out_dir={tmp_path / 'one'}", "--max_iters=10"]))
    first = train.train(train.parse_args(common + [f"--out_dir={tmp_path / 'two'}", "--max_iters=6"]))
    rest = train.train(train.parse_args(["--init_from=resume", f"--out_dir={tmp_path / 'two'}", "--max_iters=10"]))
    assert len(one) == 10 and first + rest == one  # bit-identical losses, dropout included


def test_atomic_checkpoint_survives_a_crash_mid_save(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    runtime.atomic_save({"step": 1}, path)

    def crash(obj, f):  # write half a file, then die, as a killed process would
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        runtime.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(data, tmp_path):
    # the eval at step 0 saves a checkpoint; an absurd learning rate then makes the loss inf/nan
    cfg = train.parse_args(TINY + ["--adapter=none", f"--data_dir={data['shakespeare']}", f"--out_dir={tmp_path}",
                                   "--max_iters=5", "--eval_interval=100", "--learning_rate=1e30", "--warmup_iters=0"])
    with pytest.raises(runtime.UserError, match="the loss became"):
        train.train(cfg)
    assert runtime.read_checkpoint(tmp_path)["step"] == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_paths(data, tmp_path, dtype):
    if dtype == "float16":
        try:  # CPU float16 autocast and GradScaler exist only in newer torch builds
            with torch.autocast("cpu", dtype=torch.float16):
                torch.ones(2, 2) @ torch.ones(2, 2)
            torch.amp.GradScaler("cpu")
        except Exception as e:
            pytest.skip(f"float16 autocast with a GradScaler does not run on this CPU torch: {e}")
    cfg = train.parse_args(TINY + ["--adapter=lora", "--r=4", f"--data_dir={data['e2e']}", f"--out_dir={tmp_path}",
                                   "--max_iters=6", "--eval_interval=3", f"--dtype={dtype}", "--learning_rate=1e-2"])
    cfg.init_from = "scratch"
    losses = train.train(cfg)
    assert len(losses) == 6 and all(map(lambda l: l == l and l < 20, losses))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["scaler"] == {} if dtype == "bfloat16" else ckpt["scaler"]["scale"] > 0  # scaler only for float16


def test_frozen_base_is_stored_low_precision_and_adapter_float32(tmp_path):
    from model import GPT, GPTConfig
    import sharelora
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=64, block_size=16))
    sharelora.add_adapters(model, sharelora.AdapterConfig(preset="sharea", r=2))
    runtime.place(model, "cpu", torch.bfloat16)
    assert model.transformer.h[0].attn.q.base.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.q.lora_A.dtype == torch.float32
    assert model.transformer.ln_f.weight.dtype == torch.float32  # vectors stay float32
    with runtime.autocast("cpu", torch.bfloat16):
        logits, loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)), return_logits=False)
    loss.backward()
    assert model.transformer.h[0].attn.q.lora_B.grad.dtype == torch.float32


def test_config_file_and_types(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("learning_rate = 3\nr = 16\nadapter = 'tied'\n")
    cfg = train.parse_args([str(f), "--r=4"])
    assert cfg.learning_rate == 3.0 and isinstance(cfg.learning_rate, float) and cfg.r == 4 and cfg.adapter == "tied"
    f.write_text("r = 2.5\n")
    with pytest.raises(runtime.UserError, match="must be a int"):
        train.parse_args([str(f)])
    f.write_text("lerning_rate = 1e-3\n")
    with pytest.raises(runtime.UserError, match="did you mean learning_rate"):
        train.parse_args([str(f)])
    for recipe in (ROOT / "config").glob("*.py"):  # every shipped recipe parses
        train.parse_args([str(recipe)])


def test_lr_schedule():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=10, max_iters=110, decay="linear")
    assert train.get_lr(0, cfg) == pytest.approx(0.1) and train.get_lr(9, cfg) == pytest.approx(1.0)
    assert train.get_lr(60, cfg) == pytest.approx(0.5) and train.get_lr(110, cfg) == 0.0
    cfg.decay = "cosine"
    assert train.get_lr(60, cfg) == pytest.approx(0.5) and train.get_lr(35, cfg) > 0.5


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny base written by train.py, and an adapter trained on it (for the bad-input cases)."""
    tmp = tmp_path_factory.mktemp("trained")
    run("train.py", *TINY, "--adapter=none", f"--data_dir={data['shakespeare']}", f"--out_dir={tmp / 'base'}",
        "--max_iters=1")
    run("train.py", *TINY[5:], f"--init_from={tmp / 'base'}", "--adapter=lora", "--r=2", f"--data_dir={data['e2e']}",
        f"--out_dir={tmp / 'adapted'}", "--max_iters=1")
    run("train.py", *TINY[:2], "--n_layer=3", *TINY[2:], "--adapter=none", f"--data_dir={data['shakespeare']}",
        f"--out_dir={tmp / 'other'}", "--max_iters=1")
    return tmp


def bad_inputs(tmp):
    foreign = tmp / "foreign"
    if tmp.exists():
        foreign.mkdir(exist_ok=True)
        torch.save({"weights": torch.zeros(2)}, foreign / "ckpt.pt")
    return {
        "unknown key": ("train.py", "--lerning_rate=1e-3"),
        "wrong type": ("train.py", "--max_iters=many"),
        "unknown preset": ("train.py", f"--init_from={tmp / 'base'}", "--adapter=sharez"),
        "r <= 0": ("train.py", f"--init_from={tmp / 'base'}", "--r=0"),
        "missing data": ("train.py", f"--init_from={tmp / 'base'}", f"--data_dir={tmp / 'nowhere'}"),
        "missing checkpoint": ("train.py", "--init_from=resume", f"--out_dir={tmp / 'nowhere'}"),
        "foreign checkpoint": ("train.py", "--init_from=resume", f"--out_dir={foreign}"),
        "offline hub name": ("train.py", "--init_from=gpt2-medium"),
        "adapter for another base": ("sample.py", f"--adapter={tmp / 'adapted' / 'adapter.safetensors'}",
                                     f"--init_from={tmp / 'other'}", "--device=cpu"),
        "sample without checkpoint": ("sample.py", f"--out_dir={tmp / 'nowhere'}"),
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("/unused"))))
def test_bad_input_exits_2_with_one_sentence(trained, case):
    script, *args = bad_inputs(trained)[case]
    p = run(script, *args, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) > 30, p.stderr


def test_ctrl_c_writes_a_checkpoint_before_exiting(data, tmp_path):
    import signal
    import time
    args = [sys.executable, str(ROOT / "train.py"), *TINY, "--adapter=none", f"--data_dir={data['shakespeare']}",
            f"--out_dir={tmp_path}", "--max_iters=100000", "--eval_interval=100000"]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or sum(1 for _ in open(log)) < 4):
        time.sleep(0.2)  # wait for a few training steps (the first line is the eval at step 0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "continue with --init_from=resume" in out
    assert runtime.read_checkpoint(tmp_path)["step"] >= 3
