"""
Smoke test of bench.py on a tiny GPT-2 (2 layers, 64 wide): every section runs and prints its table
with the expected rows; both sides of the training comparison count the same tokens in the loss; the
CPU memory probe returns a figure. No timing is asserted (the machine may be busy).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("peft")

TINY = ["--model", "tiny", "--device", "cpu", "--batch_size", "2", "--block_size", "16", "--repeats", "1",
        "--warmup", "0", "--gen_tokens", "4", "--prompt_len", "4", "--gen_repeats", "1", "--threads", "1"]


def tiny_env(memory=False):
    return bench.Env("tiny", torch.device("cpu"), torch.float32, batch_size=2, block_size=16, warmup=0,
                     repeats=1, memory=memory)


def test_every_section_prints_its_table(capsys):
    bench.main(TINY + ["--memory", "off"])
    out = capsys.readouterr().out
    assert out.count("machine: ") == 5  # one description per table
    for row in ["| (a) same modules", "| (b) usual setting, equal params", "| (c) E2E-shaped, loss on half",
                "| (a)     | tokens/s, ours / PEFT", "| (c)     | tokens/s, ours / PEFT",
                "| base (no adapters)", "| lora, merged", "| transformers generate (KV cache)",
                "| ours, KV cache", "| ours, no cache"]:
        assert row in out, row
    for preset in bench.PRESET_ORDER:
        assert f"| {preset} " in out and f"| {preset}, unmerged" in out
    assert "294,912" not in out  # tiny model: not the 124M counts
    assert out.count("| (a) same modules") == 2 + 2 + 1  # train: ours + PEFT; bound: ours + PEFT; ceiling
    assert "goal within ceiling" in out
    assert ">= 1.35x" in out and ">= 1.60x" in out and "<= 1.25x" in out and "<= 1.10x" in out


def test_only_selects_sections(capsys):
    bench.main(TINY + ["--memory", "off", "--only", "presets"])
    out = capsys.readouterr().out
    assert out.count("machine: ") == 1 and "| vera " in out and "PEFT" not in out
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "nonsense"])


@pytest.mark.parametrize("supervision", ["all", "half"])
def test_both_sides_supervise_the_same_tokens(tmp_path, supervision):
    """Same weights on both sides (ours written in the Hugging Face layout, read by transformers): ours
    with targets and return_logits=False, transformers with labels, give the same loss."""
    from transformers import GPT2LMHeadModel
    env = tiny_env()
    ours = bench.ours_model(env).eval()
    ours.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids, targets, labels = bench.make_batch(env, supervision)
    n = int((targets != -100).sum())
    assert n == env.batch_size * ((env.block_size - 1) if supervision == "all" else env.block_size // 2)
    assert int((labels != -100).sum()) - (0 if supervision == "half" else env.batch_size) == n
    with torch.no_grad():
        a = ours(ids, targets, return_logits=False)[1]
        b = hf(input_ids=ids, labels=labels, use_cache=False).loss
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)


def test_equal_trainable_parameters_in_setting_b():
    env = tiny_env()
    key, _, ours_t, peft_t, sup = bench.SETTINGS[1]
    ours = bench.train_contender(env, {"side": "ours", "targets": list(ours_t), "supervision": sup})
    peft = bench.train_contender(env, {"side": "peft", "targets": list(peft_t), "supervision": sup})
    assert ours.trainable == peft.trainable > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_cpu_memory_probe_gives_a_figure():
    env = tiny_env(memory=True)
    b = bench.training_memory(env, {"side": "ours", "targets": ["q", "v"], "supervision": "all", "preset": "lora"})
    assert b is not None and 0 <= b < 2**30
