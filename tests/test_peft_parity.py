"""
sharelora.py against Hugging Face PEFT on transformers' GPT-2: the `lora` preset against PEFT's LoRA and
the `vera` preset against PEFT's VeRA (same tensors in, same logits and gradients out), and the two ways
out of this project: export_peft (loaded by PeftModel.from_pretrained) and export_merged (loaded by
GPT2LMHeadModel.from_pretrained). All models are tiny and built from configs; nothing is downloaded.
"""
import pytest
import torch

import sharelora as sl
from conftest import hf_model
from model import GPT

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")

FUSED = {"attn.c_attn": ("attn.q", "attn.k", "attn.v")}  # transformers' c_attn = our q, k, v
TARGETS = ("attn.c_proj", "mlp.c_fc")  # single modules in both models (Conv1D there, nn.Linear here)
N_LAYER, VOCAB, R = 2, 157, 4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_base")
    hf_model(seed=7, std=0.05, vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=N_LAYER, n_head=4).save_pretrained(d)
    return d


def _hf(base_dir):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(base_dir).eval()


def _ours(base_dir):
    return GPT.from_pretrained(base_dir).eval()


def _ids(seed, shape=(2, 24)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _hf_module(peft_model, layer, target):
    m = peft_model.base_model.model.transformer.h[layer]
    for part in target.split("."):
        m = getattr(m, part)
    return m


def _our_module(model, layer, target):
    return model.get_submodule(f"transformer.h.{layer}.{target}")


def _loss(logits, seed):
    """A loss that weights every logit differently, so every gradient entry is exercised."""
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return (logits * w).sum() / logits.numel() ** 0.5


@torch.no_grad()
def _randomize_adapters(model, seed, std=0.2):
    """Non-zero values in every trainable adapter tensor (B starts at zero, so ΔW would be 0)."""
    g = torch.Generator().manual_seed(seed)
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return model


# ---- LoRA: sharelora's `lora` preset is PEFT's LoraConfig ------------------------------------------

def test_lora_preset_matches_peft_lora_logits_and_gradients(base_dir):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    peft_model = get_peft_model(_hf(base_dir), LoraConfig(
        r=R, lora_alpha=8, target_modules=list(TARGETS), fan_in_fan_out=True, lora_dropout=0.0)).eval()
    ours = sl.add_adapters(_ours(base_dir), sl.AdapterConfig(preset="lora", r=R, alpha=8, targets=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(N_LAYER):
            for t in TARGETS:
                theirs, mine = _hf_module(peft_model, i, t), _our_module(ours, i, t)
                A, B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight  # (r, in), (out, r)
                assert A.shape == mine.lora_A.shape and B.shape == mine.lora_B.shape
                assert theirs.scaling["default"] == mine.scale == 2.0
                mine.lora_A.copy_(A)
                B.copy_(torch.randn(B.shape, generator=g) * 0.3)
                mine.lora_B.copy_(B)
    idx = _ids(0)
    base_logits = _ours(base_dir)(idx)[0].detach()
    ref = peft_model(input_ids=idx).logits
    out = ours(idx)[0]
    assert (out - base_logits).abs().max() > 1e-2  # the adapters do change the output
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

    _loss(ref, 5).backward()
    _loss(out, 5).backward()
    n = 0
    for i in range(N_LAYER):
        for t in TARGETS:
            theirs, mine = _hf_module(peft_model, i, t), _our_module(ours, i, t)
            for ref_p, p in ((theirs.lora_A["default"].weight, mine.lora_A), (theirs.lora_B["default"].weight, mine.lora_B)):
                assert ref_p.grad.abs().max() > 1e-4
                torch.testing.assert_close(p.grad, ref_p.grad, atol=1e-5, rtol=1e-4)
                n += 1
    assert n == 2 * N_LAYER * len(TARGETS)


# ---- VeRA: sharelora's `vera` preset is PEFT's VeraConfig ------------------------------------------

def test_vera_preset_matches_peft_vera_logits_and_gradients(base_dir):
    from peft import VeraConfig, get_peft_model
    torch.manual_seed(0)
    peft_model = get_peft_model(_hf(base_dir), VeraConfig(
        r=R, target_modules=list(TARGETS), projection_prng_key=0, vera_dropout=0.0, d_initial=0.1,
        save_projection=True, fan_in_fan_out=True)).eval()
    ours = sl.add_adapters(_ours(base_dir), sl.AdapterConfig(preset="vera", r=R, targets=TARGETS))
    # PEFT: ONE vera_A (r, max d_in) and ONE vera_B (max d_out, r) for every target, sliced per module.
    # Ours: one frozen A and B per target group; give each group PEFT's slices.
    any_layer = _hf_module(peft_model, 0, TARGETS[0])
    vA, vB = any_layer.vera_A["default"], any_layer.vera_B["default"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in TARGETS:
            first = _our_module(ours, 0, t)
            d_out, d_in = first.base.weight.shape
            assert not first.lora_A.requires_grad and not first.lora_B.requires_grad
            first.lora_A.copy_(vA[:, :d_in])
            first.lora_B.copy_(vB[:d_out, :])
            for i in range(N_LAYER):
                theirs, mine = _hf_module(peft_model, i, t), _our_module(ours, i, t)
                assert mine.lora_A is first.lora_A and mine.lora_B is first.lora_B
                assert mine.scale == 1.0
                assert theirs.vera_A["default"] is vA  # PEFT shares one pair too
                lam_d, lam_b = theirs.vera_lambda_d["default"], theirs.vera_lambda_b["default"]
                assert lam_d.shape == mine.lora_u.shape and lam_b.shape == mine.lora_v.shape
                # the initial values agree: u = lambda_d = 0.1, v = lambda_b = 0
                torch.testing.assert_close(mine.lora_u, lam_d, atol=0, rtol=0)
                torch.testing.assert_close(mine.lora_v, lam_b, atol=0, rtol=0)
                lam_d.copy_(torch.randn(lam_d.shape, generator=g))
                lam_b.copy_(torch.randn(lam_b.shape, generator=g))
                mine.lora_u.copy_(lam_d)
                mine.lora_v.copy_(lam_b)
    idx = _ids(1)
    base_logits = _ours(base_dir)(idx)[0].detach()
    ref = peft_model(input_ids=idx).logits
    out = ours(idx)[0]
    assert (out - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

    _loss(ref, 6).backward()
    _loss(out, 6).backward()
    for i in range(N_LAYER):
        for t in TARGETS:
            theirs, mine = _hf_module(peft_model, i, t), _our_module(ours, i, t)
            for ref_p, p in ((theirs.vera_lambda_d["default"], mine.lora_u), (theirs.vera_lambda_b["default"], mine.lora_v)):
                assert ref_p.grad.abs().max() > 1e-4
                torch.testing.assert_close(p.grad, ref_p.grad, atol=1e-5, rtol=1e-4)
            assert mine.lora_A.grad is None and mine.lora_B.grad is None  # frozen


# ---- export_peft: our adapters in PEFT's LoRA layout -----------------------------------------------

@pytest.mark.parametrize("preset,targets", [
    ("lora", ("q", "v")),
    ("lora", TARGETS),
    ("lora", ("k", "attn.c_proj", "mlp.c_proj")),
    ("tied", ("q", "v")),
    ("tied", TARGETS),
    ("sharea", ("q", "v")),
    ("vera", ("q", "k", "v", "mlp.c_fc")),
])
def test_export_peft_loads_in_peft_with_same_logits(base_dir, tmp_path, preset, targets):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    ours = sl.add_adapters(_ours(base_dir), sl.AdapterConfig(preset=preset, r=R, alpha=8, targets=targets))
    _randomize_adapters(ours, 11)
    idx = _ids(2)
    with torch.no_grad():
        expected = ours(idx)[0]
        base_logits = _ours(base_dir)(idx)[0]
    assert (expected - base_logits).abs().max() > 1e-2
    sl.export_peft(ours, tmp_path / "peft", base_model_name_or_path=str(base_dir), fused=FUSED, fan_in_fan_out=True)
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(input_ids=idx).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the export did not touch the model
    with torch.no_grad():
        assert torch.equal(ours(idx)[0], expected)


# ---- export_merged: a plain transformers GPT-2 ------------------------------------------------------

@pytest.mark.parametrize("preset", ["sharea", "tied", "vera", "lora"])
def test_export_merged_loads_in_transformers_with_same_logits(base_dir, tmp_path, preset):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    targets = ("q", "v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ours = sl.add_adapters(_ours(base_dir), sl.AdapterConfig(preset=preset, r=R, alpha=8, targets=targets))
    _randomize_adapters(ours, 12)
    idx = _ids(3)
    with torch.no_grad():
        expected = ours(idx)[0]
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    sl.export_merged(ours, tmp_path / "merged")
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        got = hf.eval()(input_ids=idx).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the model itself is left as it was: unmerged, same weights, same outputs
    assert all(not m.merged for m in sl.adapted_layers(ours))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, base[k]), k
    # exporting an already merged model writes the same weights
    sl.merge(ours)
    sl.export_merged(ours, tmp_path / "merged2")
    hf2 = GPT2LMHeadModel.from_pretrained(tmp_path / "merged2").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf2(input_ids=idx).logits, expected, atol=1e-5, rtol=0)
