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
from tools import bench, bench_lib  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("peft")

TINY = ["--model", "tiny", "--device", "cpu", "--batch_size", "2", "--block_size", "16", "--repeats", "1",
        "--warmup", "0", "--gen_tokens", "4", "--prompt_len", "4", "--gen_repeats", "1", "--threads", "1"]


def tiny_env(memory=False):
    return bench_lib.Env("tiny", torch.device("cpu"), torch.float32, batch_size=2, block_size=16, warmup=0,
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
    for preset in bench_lib.PRESET_ORDER:
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
    ours = bench_lib.ours_model(env).eval()
    ours.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids, targets, labels = bench_lib.make_batch(env, supervision)
    n = int((targets != -100).sum())
    assert n == env.batch_size * ((env.block_size - 1) if supervision == "all" else env.block_size // 2)
    assert int((labels != -100).sum()) - (0 if supervision == "half" else env.batch_size) == n
    with torch.no_grad():
        a = ours(ids, targets, return_logits=False)[1]
        b = hf(input_ids=ids, labels=labels, use_cache=False).loss
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)


def test_equal_trainable_parameters_in_setting_b():
    env = tiny_env()
    key, _, ours_t, peft_t, sup = bench_lib.SETTINGS[1]
    ours = bench_lib.train_contender(env, {"side": "ours", "targets": list(ours_t), "supervision": sup})
    peft = bench_lib.train_contender(env, {"side": "peft", "targets": list(peft_t), "supervision": sup})
    assert ours.trainable == peft.trainable > 0


def test_replay_counts_attention_as_matmuls_or_as_torch_kernels():
    """attention="bmm" stands six batched matmuls in for each layer's fused attention (2 forward, 4
    backward); attention="kernel" keeps the fused forward and backward kernels themselves, and GELU's,
    on copies of their real arguments; every other product is recorded alike, and both replays run."""
    env = tiny_env()
    c = bench_lib.train_contender(env, {"side": "ours", "targets": ["q", "v"], "supervision": "all"})
    c.step()
    as_bmm = bench_lib.record_gemms(env, c.step)
    as_kernel = bench_lib.record_gemms(env, c.step, attention="kernel")
    kernels = [call for call in as_kernel if call[0] == "kernel"]
    n_layer = bench_lib.MODELS["tiny"]["n_layer"]
    names = sorted(call[1].overloadpacket.__name__ for call in kernels)
    assert len(kernels) == 4 * n_layer and sum(n.endswith("_backward") for n in names) == 2 * n_layer, names
    assert names.count("gelu") == names.count("gelu_backward") == n_layer, names
    others = [call for call in as_kernel if call[0] != "kernel"]
    assert len(as_bmm) - len(others) == 6 * n_layer
    assert others == [call for call in as_bmm if call[0] != "bmm"]  # our GPT's only bmm: attention's stand-ins
    q = kernels[0][2][0]
    assert q.grad_fn is None and not q.requires_grad  # a copy, not the step's own tensor
    for calls in (as_bmm, as_kernel):
        run, gflop = bench_lib.gemm_replay(env, calls)
        run()
        assert gflop > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_cpu_memory_probe_gives_a_figure():
    env = tiny_env(memory=True)
    b = bench_lib.training_memory(env, {"side": "ours", "targets": ["q", "v"], "supervision": "all", "preset": "lora"})
    assert b is not None and 0 <= b < 2**30


# ---- the job sections (bench_job.py) on the E2E subset the tests prepare ----------------------------

def test_job_sections_print_their_tables(data, capsys):
    bench.main(TINY + ["--memory", "off", "--only", "job", "--job_data_dir", str(data["e2e"]), "--job_rounds", "1",
                       "--job_steps", "1", "--job_mrs", "3", "--job_decode_repeats", "1", "--job_sizes", "tiny",
                       "--job_scale_repeats", "1"])
    out = capsys.readouterr().out
    assert out.count("machine: ") == 3
    for row in ["| ours, length-grouped ", "| ours, random batches ", "| PEFT, random batches ",
                "| PEFT, LengthGroupedSampler ", "| beam 10  | ours ", "| greedy   | transformers ", "| tiny  | 3M "]:
        assert row in out, row
    assert ">= 1.80x" in out and ">= 1.30x" in out and ">= 1.50x" in out and ">= 1.20x" in out
    assert "| model | our matmuls ms | speed ceiling |" in out  # job_scale's bound at each size
    assert "| + attention, GELU ms | ceiling with them |" in out
    # random weights never emit eos: both sides decode the full 64 tokens, the same ones
    assert "| greedy   | ours         |" in out and "3/3" in out


def test_job_loops_learn_from_the_same_tokens(data):
    """The PEFT loop's collated batch of some examples and train.py's batch of the same examples give
    the same loss on the same weights, and count the same reference tokens."""
    from transformers import GPT2LMHeadModel
    from tools import bench_job
    from data.loader import Batches
    env = tiny_env()
    ours = bench_lib.ours_model(env).eval()
    folder = data["e2e"].parent / "job_same_tokens"
    ours.save_pretrained(folder)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    b = Batches(data["e2e"], 16, 1024, group_by_length=False)
    x, y = b.get("train", 3)
    tokens = b.tokens["train"].tolist()
    features = [bench_job.hf_example(tokens, *b.examples["train"][k].tolist()) for k in b.batch_examples("train", 3)]
    batch = bench_job.pad_collate(features)
    assert int((batch["labels"][:, 1:] != -100).sum()) == int((y != -100).sum()) > 0
    assert int(batch["attention_mask"].sum()) - len(features) == b.positions("train", 3)[0]
    with torch.no_grad():
        a = ours(x, y, return_logits=False)[1]
        theirs = hf(**batch, use_cache=False).loss
    assert torch.allclose(a, theirs, rtol=1e-5, atol=1e-5), (a, theirs)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_job_memory_probe_gives_a_figure(data):
    from tools import bench_job
    env = tiny_env(memory=True)
    spec = bench_job.job_specs(str(data["e2e"]))["ours, length-grouped"]
    b = bench_job.job_memory(env, spec, steps=2)
    assert b is not None and 0 < b < 2**30


def test_job_needs_prepared_data(tmp_path):
    from tools import bench_job
    with pytest.raises(bench_job.runtime.UserError, match="prepare.py"):
        bench_job.section_job_train(tiny_env(), 1, 1, data_dir=str(tmp_path))
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "job", "--job_sizes", "gpt3"])


# ---- the quant section (bench_quant.py) -------------------------------------------------------------

def test_quant_section_prints_its_tables(data, trained, tmp_path, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from tools import bench_quant
    monkeypatch.setattr(bench_quant, "QUALITY_RUNS", [("sharea", "none"), ("sharea", "nf4")])  # two of the four runs
    bench.main(TINY + ["--memory", "off", "--only", "quant", "--quant_sizes", "tiny", "--quant_repeats", "1",
                       "--quant_base", str(trained / "base"), "--quant_steps", "2", "--quant_out", str(tmp_path / "q"),
                       "--job_data_dir", str(data["e2e"])])
    out = capsys.readouterr().out
    for row in ["| tiny  | none     |", "| tiny  | int8     |", "| tiny  | nf4      |",
                "| sharea  | none |", "| sharea  | nf4  |"]:
        assert row in out, row
    assert sorted(os.listdir(tmp_path / "q")) == ["sharea-nf4", "sharea-none"]


def test_quant_quality_says_how_to_make_a_missing_base(tmp_path):
    from tools import bench_quant
    text = bench_quant.section_quant_quality(tiny_env(), str(tmp_path / "nothing"), "data/e2e", str(tmp_path), 2)
    assert "skipped: no stand-in base" in text and "config/e2e_base_6l.py" in text
