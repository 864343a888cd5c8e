"""train.py, sample.py and the data pipeline, end to end on CPU with tiny models.

Data: the copies shipped in data/*/source (a subset of E2E), prepared once per session (conftest)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
import train

from conftest import ROOT, TINY, run


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


def test_a_run_from_before_length_grouping_resumes_with_random_batches(data, tmp_path):
    """Checkpoints written before group_by_length existed hold no such option: they trained on random
    batches, and resume on them, exactly."""
    common = TINY + ["--adapter=lora", "--r=2", f"--data_dir={data['e2e']}", "--eval_interval=3",
                     "--group_by_length=False"]
    one = train.train(train.parse_args(common + [f"--out_dir={tmp_path / 'one'}", "--max_iters=6"]))
    first = train.train(train.parse_args(common + [f"--out_dir={tmp_path / 'two'}", "--max_iters=3"]))
    path = tmp_path / "two" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["group_by_length"]
    torch.save(ckpt, path)
    rest = train.train(train.parse_args(["--init_from=resume", f"--out_dir={tmp_path / 'two'}", "--max_iters=6"]))
    assert first + rest == one
    grouped = train.train(train.parse_args(common[:-1] + [f"--out_dir={tmp_path / 'three'}", "--max_iters=6"]))
    assert grouped != one  # the option changes the batches


@pytest.mark.parametrize("eval_interval", [1, 100])
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(data, tmp_path, eval_interval):
    # the eval at step 0 saves a checkpoint; an absurd learning rate then makes the weights and the loss
    # inf/nan. With eval_interval=1 the evaluation at step 1 sees it first (it used to save the ~1e30
    # weights over the good checkpoint), with 100 the next training step does.
    cfg = train.parse_args(TINY + ["--adapter=none", f"--data_dir={data['shakespeare']}", f"--out_dir={tmp_path}",
                                   "--max_iters=5", f"--eval_interval={eval_interval}", "--learning_rate=1e30",
                                   "--warmup_iters=0"])
    with pytest.raises(runtime.UserError, match=r"loss became (nan|inf).*the checkpoint of step 0 .* is kept"):
        train.train(cfg)
    assert runtime.read_checkpoint(tmp_path)["step"] == 0
    weights = runtime.load_model(out_dir=tmp_path, device="cpu", dtype="float32")[0].state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights)
    assert run("sample.py", f"--out_dir={tmp_path}", "--max_new_tokens=3", "--device=cpu").returncode == 0


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


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_is_an_exact_pause_even_in_a_background_job(data, tmp_path, sig):
    """Ctrl-C (or kill) mid-run, then resume, equals an uninterrupted run bit for bit, with dropout on;
    metrics.jsonl then has each step once. The child starts with SIGINT ignored, as `pytest &` or nohup
    start it: train.py must install its handler anyway."""
    import signal
    import time
    from safetensors.torch import load_file
    common = [*TINY, "--adapter=tied", "--r=4", f"--data_dir={data['e2e']}", "--adapter_dropout=0.1",
              "--dropout=0.1", "--eval_interval=100000", "--lr_decay_iters=400", "--learning_rate=5e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # as run() gives: other thread counts round differently
    paused = tmp_path / "paused"
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"--out_dir={paused}", "--max_iters=400"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = paused / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or sum(1 for _ in open(log)) < 6):
        time.sleep(0.05)  # a few training steps (the first line is the eval at step 0)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + getattr(signal, sig), err
    assert "continue with --init_from=resume" in out
    stopped_at = runtime.read_checkpoint(paused)["step"]
    assert 5 <= stopped_at < 400, stopped_at
    total = stopped_at + 5
    run("train.py", "--init_from=resume", f"--out_dir={paused}", f"--max_iters={total}")
    run("train.py", *common, f"--out_dir={tmp_path / 'straight'}", f"--max_iters={total}")
    ours, straight = (load_file(tmp_path / d / "adapter.safetensors") for d in ("paused", "straight"))
    assert ours.keys() == straight.keys() and all(torch.equal(ours[k], straight[k]) for k in ours)
    steps = [json.loads(l).get("step") for l in open(log) if '"loss"' in l]
    assert steps == list(range(1, total + 1))  # each step once: none repeated by the resume, none lost
