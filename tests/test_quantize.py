"""
A quantized frozen base (quantize.py: QLoRA's NF4, and int8) under every adapter preset: the quantized
layers compute F.linear(x, dequant(W)) exactly, in training and evaluation alike; every preset trains on
an NF4 base; an adapter trained there saves, loads and runs on the same quantized base; merge refuses
and export_merged writes dequant(W) + ΔW; and on one bitsandbytes-quantized GPT-2 our logits match
transformers + PEFT's LoRA on transformers' own load_in_4bit layers. bitsandbytes is an optional
extra: without it these tests skip, except under CI (CI=true), where they fail.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import quantize as qz
import runtime
import sharelora as sl
from conftest import hf_model, run
from model import GPT, GPTConfig

if os.environ.get("CI"):
    import bitsandbytes as bnb  # CI installs requirements-quant.txt: a missing library is a failure there
else:
    bnb = pytest.importorskip("bitsandbytes", reason="optional: pip install -r requirements-quant.txt")

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")

VOCAB = 300
# n_embd 128: every row of W is two NF4 blocks of 64, so q, k and v quantize alike whether they are
# stored apart (here) or as one fused c_attn (transformers)
CFG = dict(n_layer=2, n_head=2, n_embd=128, block_size=32, vocab_size=VOCAB)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CFG))


def dequantized(layer):
    """W as bitsandbytes itself defines it, from the layer's packed state (before its first forward:
    Linear8bitLt moves CB and SCB into its state object when it first runs)."""
    w = layer.weight
    if isinstance(w, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return w.CB.float().mul_(w.SCB.unsqueeze(1).mul(1.0 / 127.0))  # MatMul8bitFp's formula


def ids(seed, shape=(2, 16)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---- the quantized layer ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_linear_is_f_linear_of_dequantized_weight(kind):
    model = qz.quantize(tiny(), kind)
    layer = model.transformer.h[0].mlp.c_fc
    assert not layer.weight.is_floating_point() and sl.quantization(layer) == kind
    W, b = dequantized(layer), layer.bias
    assert W.shape == (4 * 128, 128)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    # training mode with gradients, evaluation mode without, and training again: bitsandbytes' CPU paths
    # depend on the mode (see quantize.py); ours must not
    for mode in ("train", "eval", "train"):
        layer.train(mode == "train")
        xg = x.clone().requires_grad_(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            y = layer(xg)
        assert torch.equal(y, F.linear(x, W, b)), mode
        if mode == "train":
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
            y.backward(g)
            assert torch.equal(xg.grad, g @ W)
    assert torch.equal(sl.applied_weight(layer), W)  # what export_merged writes


def test_only_the_block_linears_are_quantized_and_memory_falls():
    plain = tiny()
    before = qz.stored_bytes(plain)
    counted = lambda m: sl.parameter_table(sl.add_adapters(m, sl.AdapterConfig(r=2))).splitlines()[-1]
    assert counted(tiny()) == counted(qz.quantize(tiny(), "nf4"))  # "of N parameters": W's count, not the packing's
    model = qz.quantize(tiny(), "nf4")
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == {f"transformer.h.{i}.{t}" for i in range(2) for t in qz.BLOCK_LINEARS}
    assert model.transformer.wte.weight.dtype == torch.float32 and model.lm_head.weight is model.transformer.wte.weight
    block = sum(p.numel() * 4 for n, p in plain.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    saved = before - qz.stored_bytes(model)
    assert 0.85 * block < saved < block  # 4 bytes -> about half a byte per block weight (plus scales)


def test_quantize_refuses_what_it_cannot_do(monkeypatch):
    with pytest.raises(ValueError, match="quantize must be one of none, nf4, int8"):
        qz.quantize(tiny(), "fp8")
    adapted = sl.add_adapters(tiny(), sl.AdapterConfig(preset="sharea", r=2))
    with pytest.raises(ValueError, match="quantize the base before adding adapters"):
        qz.quantize(adapted, "nf4")
    model = qz.quantize(tiny(), "nf4")
    with pytest.raises(ValueError, match="quantized .nf4. already"):
        qz.quantize(model, "int8")
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ValueError, match="pip install -r requirements-quant.txt"):
        qz.quantize(tiny(), "nf4")


# ---- training on a quantized base ------------------------------------------------------------------

def train_steps(model, steps, seed=0, lr=1e-2):
    x = ids(seed, (4, 24))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("preset", list(sl.PRESETS))
def test_every_preset_trains_on_an_nf4_base(preset):
    model = qz.quantize(tiny(), "nf4")
    sl.add_adapters(model, sl.AdapterConfig(preset=preset, r=4, alpha=8, targets=("q", "v", "c_fc")))
    frozen = {n: p.detach().clone() for n, p in model.state_dict().items() if "lora_" not in n}
    losses = train_steps(model, 25, lr=3e-2 if preset == "vera" else 1e-2)
    assert losses[-1] < losses[0] - 0.3, losses  # memorising one batch: ln(300) = 5.7 falls clearly
    for n, p in model.state_dict().items():  # the packed base did not move
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n


def test_int8_base_trains():
    model = qz.quantize(tiny(), "int8")
    sl.add_adapters(model, sl.AdapterConfig(preset="sharea", r=4, alpha=8))
    losses = train_steps(model, 25)
    assert losses[-1] < losses[0] - 0.3, losses


# ---- saving, loading, merging, exporting -----------------------------------------------------------

@pytest.fixture
def trained_nf4(tmp_path):
    """(model, base folder, adapter file): ShareA trained 10 steps on the NF4 base of a saved GPT."""
    base = tmp_path / "base"
    tiny(3).save_pretrained(base)
    model = qz.quantize(GPT.from_pretrained(base), "nf4")
    sl.add_adapters(model, sl.AdapterConfig(preset="sharea", r=4, alpha=8, targets=("q", "v", "c_fc")))
    train_steps(model, 10)
    path = tmp_path / "adapter.safetensors"
    sl.save_adapter(model, path, base=str(base))
    return model.eval(), base, path


def test_adapter_trained_on_nf4_records_it_and_loads_onto_the_same_base(trained_nf4):
    model, base, path = trained_nf4
    assert sl.read_adapter(path)[1]["base_quantized"] == "nf4"
    x = ids(5)
    with torch.no_grad():
        want = model(x)[0]
    loaded, info = runtime.load_model(adapter=str(path), device="cpu", dtype="float32")  # quantize=auto
    assert info["quantize"] == info["trained_on"] == "nf4"
    assert isinstance(loaded.transformer.h[1].attn.q.base, bnb.nn.Linear4bit)
    assert not any(m.merged for m in sl.adapted_layers(loaded))  # a quantized base keeps it unmerged
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], want)
    plain, info = runtime.load_model(adapter=str(path), device="cpu", dtype="float32", quantize="none")
    assert info["quantize"] == "none" and info["trained_on"] == "nf4"
    with torch.no_grad():
        other = plain(x)[0]
    assert 1e-4 < (other - want).abs().max() < 1.0  # the float base: close, not the same


def test_merge_refuses_and_export_merged_writes_dequantized_plus_delta(trained_nf4, tmp_path):
    model, base, path = trained_nf4
    x = ids(6)
    with torch.no_grad():
        want = model(x)[0]
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.q has a quantized base \(nf4\).*export_merged"):
        sl.merge(model)
    assert not any(m.merged for m in sl.adapted_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x)[0], want)  # untouched
    sl.export_merged(model, tmp_path / "merged")
    merged = GPT.from_pretrained(tmp_path / "merged").eval()
    k = model.transformer.h[1].attn.k  # not adapted: exactly dequant(W)
    assert torch.equal(merged.transformer.h[1].attn.k.weight, sl.applied_weight(k))
    q = model.transformer.h[1].attn.q  # adapted: dequant(W) + ΔW
    torch.testing.assert_close(merged.transformer.h[1].attn.q.weight, sl.applied_weight(q.base) + q.delta_weight(),
                               atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], want, atol=2e-5, rtol=0)


# ---- against transformers + PEFT on transformers' own 4-bit layers ---------------------------------

@pytest.mark.parametrize("preset", ["lora", "sharea"])
def test_logits_match_peft_lora_on_load_in_4bit(tmp_path, preset):
    """Both sides quantize the same checkpoint with bitsandbytes NF4, blocks of 64, scales in float32
    (transformers' default: no double quantization); ours through quantize.py, theirs through
    from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True)). Our adapter goes over
    with export_peft. Tolerance 2e-5 on logits of size ~1: the same products summed in another order."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel
    hf_model(seed=11, std=0.05, vocab_size=VOCAB, n_positions=32, n_embd=128, n_layer=2, n_head=2).save_pretrained(tmp_path / "base")
    ours = qz.quantize(GPT.from_pretrained(tmp_path / "base"), "nf4", double_quant=False)
    sl.add_adapters(ours, sl.AdapterConfig(preset=preset, r=4, alpha=8, targets=("q", "v", "c_fc")))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in sl.adapter_state_dict(ours).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    sl.export_peft(ours, tmp_path / "peft", fused={"attn.c_attn": ("attn.q", "attn.k", "attn.v")}, fan_in_fan_out=False)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "base", device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    for m in theirs.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # the same float32 products as ours (see quantize.py)
    c_attn = theirs.transformer.h[1].attn.c_attn
    assert isinstance(c_attn, bnb.nn.Linear4bit)
    assert torch.equal(dequantized(c_attn)[:128], dequantized(ours.transformer.h[1].attn.q.base))  # one quantized base
    theirs = PeftModel.from_pretrained(theirs, tmp_path / "peft").eval()
    x = ids(7)
    with torch.no_grad():
        mine, ref = ours.eval()(x)[0], theirs(input_ids=x).logits
        plain = GPT.from_pretrained(tmp_path / "base").eval()(x)[0]
    assert (mine - plain).abs().max() > 1e-2  # quantization and the adapter both change the output
    torch.testing.assert_close(mine, ref, atol=2e-5, rtol=0)


def test_export_merged_refuses_a_transformers_model_loaded_in_4bit(tmp_path):
    """transformers' save_pretrained of a load_in_4bit model writes its own quantized weights, so the
    export refuses with a way out; merged_state_dict still gives dequant(W) + ΔW."""
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel
    hf_model(seed=2, vocab_size=VOCAB, n_positions=32, n_embd=128, n_layer=2, n_head=2).save_pretrained(tmp_path / "base")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base", device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    sl.add_adapters(model, sl.AdapterConfig(preset="sharea", r=4, targets=("c_attn",)))
    with torch.no_grad():
        for p in sl.adapter_state_dict(model).values():
            p.normal_(std=0.1)  # B starts at 0: make ΔW show
    with pytest.raises(ValueError, match="loaded quantized by transformers.*merged_state_dict"):
        sl.export_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    c_attn = model.transformer.h[0].attn.c_attn
    state = sl.merged_state_dict(model)
    assert torch.equal(state["transformer.h.0.attn.c_attn.weight"], sl.applied_weight(c_attn.base) + c_attn.delta_weight())
    assert not any(k.startswith("transformer.h.0.attn.c_attn.weight.") for k in state)  # no packing state left


# ---- the command line ------------------------------------------------------------------------------

def test_train_resume_sample_on_an_nf4_base(data, trained, tmp_path):
    from conftest import TINY
    out = tmp_path / "run"
    common = [*TINY[5:], f"--init_from={trained / 'base'}", "--adapter=sharea", "--quantize=nf4",
              f"--data_dir={data['e2e']}", "--eval_interval=2", "--decay=constant"]  # the same rates for 4 or 6 steps
    p = run("train.py", *common, f"--out_dir={out}", "--max_iters=4")
    assert "block weights in nf4" in p.stdout
    assert sl.read_adapter(out / "adapter.safetensors")[1]["base_quantized"] == "nf4"
    run("train.py", "--init_from=resume", f"--out_dir={out}", "--max_iters=6")  # rebuilt on the same 4-bit base
    p = run("train.py", "--init_from=resume", f"--out_dir={out}", "--max_iters=8", "--quantize=none", check=False)
    assert p.returncode == 2 and "quantize cannot change when a run resumes" in p.stderr, p.stderr  # none included
    resumed = runtime.read_checkpoint(str(out))
    straight = tmp_path / "straight"  # six steps without a pause: the same adapter, bit for bit
    run("train.py", *common, f"--out_dir={straight}", "--max_iters=6")
    for k, t in runtime.read_checkpoint(str(straight))["adapter"].items():
        assert torch.equal(resumed["adapter"][k], t), k
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=4", "--start=name[Aromi]", "--quantize=none")
    assert "the adapter was trained with quantize=nf4" in p.stderr  # (auto, the default: load_model's test above)


@pytest.mark.parametrize("args, message", [
    (["--adapter=none", "--quantize=nf4"], "quantize must be none when adapter=none"),
    (["--quantize=fp8"], "quantize must be none, nf4 or int8, not 'fp8'"),
    (["--quantize=nf4"], "quantize must be none with init_from=scratch"),
])
def test_train_refuses_bad_quantize(data, tmp_path, args, message):
    from conftest import TINY
    p = run("train.py", *TINY, *args, f"--data_dir={data['e2e']}", f"--out_dir={tmp_path / 'run'}", check=False)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "run").exists()


def test_missing_bitsandbytes_is_one_sentence(data, trained, tmp_path):
    from conftest import TINY
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "bitsandbytes.py").write_text("raise ImportError('not installed here')\n")
    p = run("train.py", *TINY[5:], f"--init_from={trained / 'base'}", "--quantize=nf4", f"--data_dir={data['e2e']}", f"--out_dir={tmp_path / 'run'}",
            check=False, env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert p.returncode == 2 and "pip install -r requirements-quant.txt" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_bank_of_tasks_on_an_nf4_base(trained_nf4, tmp_path):
    """Tasks trained around one A on an NF4 base serve one mixed batch on that base (bank.load quantizes
    as the file records): each row as its task alone through runtime.load_model."""
    import bank
    first, base, path = trained_nf4
    second = qz.quantize(GPT.from_pretrained(base), "nf4")
    sl.add_adapters(second, sl.AdapterConfig(preset="sharea", spec="A=shared/frozen B=layer", r=4, alpha=8,
                                             targets=("q", "v", "c_fc")))
    mine = sl.adapter_state_dict(first)
    with torch.no_grad():
        for key, p in sl.adapter_state_dict(second).items():
            p.copy_(mine[key] if key.endswith("lora_A") else torch.randn_like(p) * 0.1)
    sl.save_adapter(second, tmp_path / "two.safetensors", base=str(base))
    bank.Bank.build({"one": path, "two": tmp_path / "two.safetensors"}).save(tmp_path / "bank.safetensors")
    model, info = bank.load(tmp_path / "bank.safetensors", device="cpu", dtype="float32")
    assert info["quantize"] == info["trained_on"] == "nf4"
    x = ids(7, (3, 12))
    with bank.tasks(model, ["two", "one", "two"]), torch.no_grad():
        mixed = model(x)[0]
    for i, (name, file) in enumerate([("two", tmp_path / "two.safetensors"), ("one", path), ("two", tmp_path / "two.safetensors")]):
        alone, _ = runtime.load_model(adapter=str(file), device="cpu", dtype="float32")
        with torch.no_grad():
            torch.testing.assert_close(mixed[i], alone(x[i:i + 1])[0][0], rtol=1e-4, atol=1e-4)
    with bank.tasks(model, ["one"] * 3), torch.no_grad():
        assert not torch.allclose(model(x)[0][0], mixed[0], atol=1e-3)  # the tasks differ
