"""sharelora.py in other people's models, used as a newcomer would: only sharelora's public functions,
on tiny models built here (transformers' Llama, Roberta classifier and GPT-2 with its Conv1D layers, a
nanoGPT-style block with a fused c_attn, torch's nn.TransformerEncoder).

For every preset on every model: the adapted model starts as the base; only adapters (and
modules_to_save) get gradients; a shared component is one object; the trainable count is METHOD.md's
formula; merge and unmerge are exact; save and load onto a fresh base is exact; PEFT loads the export
with the same outputs; the merged weights, loaded into a plain copy of the model, give the same
outputs. And the cases that cannot work are refused at add_adapters with one sentence."""
import copy

import pytest
import torch
import torch.nn as nn

import sharelora as sl
from conftest import hf_config, randomize_

PRESETS = list(sl.PRESETS)


# ---- the models ---------------------------------------------------------------------------------

class NanoBlock(nn.Module):
    """nanoGPT's attention block: one fused c_attn = [q; k; v] (an nn.Linear 32 -> 96), then c_proj."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.ln = heads, nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class NanoGPT(nn.Module):
    def __init__(self, vocab=64, d=32, layers=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(NanoBlock(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.head(x)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    return model, (torch.randint(0, 64, (2, 12)),), {"targets": ("q_proj", "v_proj")}, \
        {"q_proj": (2, 32, 32), "v_proj": (2, 32, 16)}, "CAUSAL_LM"


def roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = RobertaForSequenceClassification(cfg)
    return model, (torch.randint(3, 64, (2, 12)),), {"targets": ("query", "value"), "modules_to_save": ("classifier",)}, \
        {"query": (2, 32, 32), "value": (2, 32, 32)}, "SEQ_CLS"


def gpt2():
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config(vocab_size=64))  # Conv1D layers, lm_head tied to wte (not a target)
    return model, (torch.randint(0, 64, (2, 12)),), \
        {"targets": ("c_attn.q", "c_attn.v", "attn.c_proj"), "split": {"c_attn": ("q", "k", "v")}}, \
        {"c_attn.q": (2, 48, 48), "c_attn.v": (2, 48, 48), "attn.c_proj": (2, 48, 48)}, "CAUSAL_LM"


def nanogpt():
    torch.manual_seed(0)
    return NanoGPT(), (torch.randint(0, 64, (2, 12)),), \
        {"targets": ("c_attn.q", "c_attn.v"), "split": {"c_attn": ("q", "k", "v")}}, \
        {"c_attn.q": (2, 32, 32), "c_attn.v": (2, 32, 32)}, None


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), (torch.randn(2, 12, 32),), \
        {"targets": ("linear1", "linear2")}, {"linear1": (2, 32, 64), "linear2": (2, 64, 32)}, None


FAMILIES = {"llama": llama, "roberta": roberta, "gpt2": gpt2, "nanogpt": nanogpt, "encoder": encoder}


def build(family):
    model, inputs, kwargs, dims, task = FAMILIES[family]()
    randomize_(model, 7)  # biases and norms away from their defaults, so a mix-up would show
    return model.eval(), inputs, kwargs, dims, task


def out(model, inputs):
    y = model(*inputs)
    return y.logits if hasattr(y, "logits") else y


def expected_count(preset, dims, r):
    """METHOD.md's formulas, per target: (L, d_in, d_out)."""
    total = 0
    for L, d_in, d_out in dims.values():
        total += {"lora": L * r * (d_in + d_out), "sharea": r * d_in + L * r * d_out, "shareb": L * r * d_in + r * d_out,
                  "shareab": r * (d_in + d_out), "tied": r * (d_in + d_out) + L * (r + d_out), "vera": L * (r + d_out),
                  "shareqkv": L * r * d_out}[preset]
    if preset == "shareqkv":  # one A (r x d_in) for the targets that read the same input, across the layers
        total += r * next(iter(dims.values()))[1] * len({(d_in,) for _, d_in, _ in dims.values()})
    return total


def cases():
    for family in FAMILIES:
        for preset in PRESETS:
            if preset == "shareqkv" and family == "encoder":
                continue  # linear1 and linear2 read different inputs: refused, see below
            yield family, preset


@torch.no_grad()
def perturb(model, seed=3):
    """Adapters away from their zero start, so that ΔW is not 0."""
    g = torch.Generator().manual_seed(seed)
    for p in sl.adapter_state_dict(model).values():
        p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family,preset", list(cases()))
def test_every_preset_on_other_peoples_models(family, preset, tmp_path, one_thread):
    model, inputs, kwargs, dims, task = build(family)
    if family == "gpt2" and preset == "shareqkv":
        kwargs = {**kwargs, "targets": ("c_attn.q", "c_attn.v")}  # q and v read one input; c_proj another
        dims = {k: v for k, v in dims.items() if k.startswith("c_attn")}
    base = copy.deepcopy(model)
    want = out(base, inputs)
    config = sl.AdapterConfig(preset=preset, r=4, alpha=8, **kwargs)
    sl.add_adapters(model, config)

    # starts as the base (exactly, but for torch's MultiheadAttention, which takes its fused kernel once
    # its weights are frozen: 1e-7 apart)
    torch.testing.assert_close(out(model, inputs), want, atol=1e-6, rtol=0)
    # only adapters (and modules_to_save) train, and every one of them gets a gradient after one step
    model.train()
    out(model, inputs).float().pow(2).mean().backward()
    saved = {f"{n}.{k}" for n, m in sl.saved_modules(model).items() for k, _ in m.named_parameters()}
    for name, p in model.named_parameters():
        is_adapter = ".lora_" in name or name in saved
        assert p.requires_grad == (is_adapter and p.requires_grad), name
        assert (p.grad is not None) <= is_adapter, f"{name} has a gradient"
    model.eval()
    # sharing: one object per group
    layers = sl.adapted_layers(model)
    comps = config.components()
    for x in ("A", "B"):
        if comps[x][0] == "shared":
            for m in layers:
                assert getattr(m, f"lora_{x}") is next(getattr(o, f"lora_{x}") for o in layers if o.group == m.group)
    # METHOD.md's count, plus what modules_to_save trains
    extra = sum(p.numel() for n in saved for p in [model.get_parameter(n)])
    assert sl.count_trainable(model) == expected_count(preset, dims, 4) + extra
    assert sum(r["total"] for r in sl.trainable_breakdown(model)) == sl.count_trainable(model)

    perturb(model)
    adapted = out(model, inputs)
    assert not torch.allclose(adapted, want, atol=1e-4)
    weights = {k: v.clone() for k, v in sl.base_state_dict(model).items()}
    sl.merge(model)  # merged equals unmerged; unmerge gives the base weights back
    torch.testing.assert_close(out(model, inputs), adapted, atol=1e-5, rtol=0)
    sl.unmerge(model)
    for k, v in sl.base_state_dict(model).items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(out(model, inputs), adapted, atol=1e-5, rtol=0)  # W + ΔW - ΔW rounds in float32

    # save, then load onto a fresh copy of the base
    sl.save_adapter(model, tmp_path / "adapter.safetensors", base=family)
    fresh = copy.deepcopy(base)
    sl.load_adapter(fresh, tmp_path / "adapter.safetensors")
    torch.testing.assert_close(out(fresh, inputs), adapted, atol=0, rtol=0)

    # the merged weights in a plain copy of the model
    plain = copy.deepcopy(base)
    plain.load_state_dict(sl.merged_state_dict(model))
    torch.testing.assert_close(out(plain, inputs), adapted, atol=1e-5, rtol=0)

    # PEFT's LoRA on a fresh copy of the base, from the export
    from peft import PeftModel
    sl.export_peft(model, tmp_path / "peft", task_type=task)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    if family == "encoder":  # PEFT's own LoRA is skipped by TransformerEncoderLayer's fused inference path (the
        theirs.train()       # trap add_adapters avoids, see the next test): compare in training mode, dropout 0
    torch.testing.assert_close(out(theirs, inputs), adapted, atol=1e-5, rtol=0)


def test_gpt2_conv1d_merged_export_loads_in_a_stock_gpt2(tmp_path):
    from transformers import GPT2LMHeadModel
    model, inputs, kwargs, _, _ = build("gpt2")
    sl.add_adapters(model, sl.AdapterConfig(preset="sharea", r=4, **kwargs))
    perturb(model)
    sl.export_merged(model, tmp_path / "merged")
    stock = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(out(stock, inputs), out(model, inputs), atol=1e-5, rtol=0)


def test_transformer_encoder_inference_path_sees_the_adapter():
    """In eval mode without gradients torch's TransformerEncoderLayer takes a fused path that reads
    linear1.weight itself; the adapter must not be skipped there."""
    model, inputs, kwargs, _, _ = build("encoder")
    sl.add_adapters(model, sl.AdapterConfig(preset="lora", r=4, **kwargs))
    perturb(model)
    model.train()
    training = out(model, inputs)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out(model, inputs), training, atol=1e-5, rtol=0)


def test_a_fused_part_counts_as_its_own_target_and_merges_into_its_rows():
    model, inputs, kwargs, _, _ = build("nanogpt")
    before = model.h[0].c_attn.weight.detach().clone()
    sl.add_adapters(model, sl.AdapterConfig(preset="sharea", r=4, **kwargs))
    groups = sorted(r["target"] for r in sl.trainable_breakdown(model))
    assert groups == ["h.*.c_attn.q", "h.*.c_attn.v"]
    perturb(model)
    sl.merge(model)
    after = model.h[0].c_attn.weight.detach()
    assert torch.equal(after[32:64], before[32:64])  # k's rows untouched
    assert not torch.equal(after[:32], before[:32]) and not torch.equal(after[64:], before[64:])


def test_shareqkv_computes_a_x_once_per_layer(monkeypatch):
    """q, k and v of a layer share A and read one input: A x is one product, not three, with the same
    outputs and gradients as computing it three times."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    sl.add_adapters(model, sl.AdapterConfig(preset="shareqkv", r=4, targets=("q", "k", "v")))
    perturb(model)
    A = model.transformer.h[0].attn.q.lora_A
    assert all(m.lora_A is A for m in sl.adapted_layers(model))  # one A for q, k, v of every layer
    assert sl.count_trainable(model) == 4 * 32 + 3 * 3 * 4 * 32  # r·d + 3·L·r·d
    x = torch.randint(0, 64, (2, 8))
    products = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(sl.F, "linear", lambda i, w, *a: (products.append(w.shape == A.shape), real(i, w, *a))[1])
    loss = model(x, x)[1]
    loss.backward()
    assert sum(products) == 3  # one A x per layer
    grad = A.grad.clone()
    monkeypatch.undo()
    for m in sl.adapted_layers(model):
        m.memo = None  # three products again
    A.grad = None
    again = model(x, x)[1]
    again.backward()
    torch.testing.assert_close(again, loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(A.grad, grad, atol=1e-6, rtol=0)


def test_sequential_blocks_share_per_position_not_across_positions():
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(3)])
    sl.add_adapters(blocks, sl.AdapterConfig(preset="sharea", r=2, targets=("0", "2")))
    assert [r["target"] for r in sl.trainable_breakdown(blocks)] == ["*.0", "*.2"]
    assert blocks[0][0].lora_A is blocks[2][0].lora_A and blocks[0][0].lora_A is not blocks[0][2].lora_A


def test_layer_pattern_groups_maps_named_without_a_digit_part():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.block_a, self.block_b = nn.Linear(8, 8), nn.Linear(8, 8)
    model = Blocks()
    sl.add_adapters(model, sl.AdapterConfig(preset="sharea", r=2, targets=("block_a", "block_b"),
                                            layer_pattern=r"(?<=block_)[a-z]"))
    assert [r["target"] for r in sl.trainable_breakdown(model)] == ["block_*"]
    assert model.block_a.lora_A is model.block_b.lora_A


@pytest.mark.parametrize("name,make,message", [
    ("MultiheadAttention", lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                                         enable_nested_tensor=False), "reads its weights directly"),
    ("tied lm_head", lambda: _tied(), "tied weights"),
])
def test_what_cannot_work_is_refused_before_any_change(name, make, message):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ("out_proj",) if name == "MultiheadAttention" else ("head",)
    with pytest.raises(ValueError, match=message):
        sl.add_adapters(model, sl.AdapterConfig(preset="lora", r=2, targets=targets))
    assert not sl.adapted_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # not even frozen


def _tied():
    model = NanoGPT()
    model.head.weight = model.wte.weight
    return model


def test_shareqkv_on_maps_with_other_inputs_is_refused():
    model, _, kwargs, _, _ = build("encoder")
    with pytest.raises(ValueError, match="cannot share A .* different numbers of inputs"):
        sl.add_adapters(model, sl.AdapterConfig(preset="shareqkv", r=2, **kwargs))


def test_a_target_that_is_not_linear_says_what_it_is():
    model, _, _, _, _ = build("nanogpt")
    with pytest.raises(ValueError, match=r"h.0.ln is a LayerNorm, not a linear layer"):
        sl.add_adapters(model, sl.AdapterConfig(preset="lora", r=2, targets=("ln",)))


def test_an_unsaved_trainable_module_is_refused_by_save_adapter(tmp_path):
    model, _, kwargs, _, _ = build("roberta")
    sl.add_adapters(model, sl.AdapterConfig(preset="sharea", r=2, targets=kwargs["targets"]))
    model.classifier.requires_grad_(True)  # unfrozen by hand, not declared
    assert any(r["target"] == "(other trainable)" for r in sl.trainable_breakdown(model))
    with pytest.raises(ValueError, match="modules_to_save"):
        sl.save_adapter(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_merged_export_of_a_model_without_save_pretrained(tmp_path):
    from safetensors.torch import load_file
    model, inputs, kwargs, _, _ = build("nanogpt")
    base = copy.deepcopy(model)
    sl.add_adapters(model, sl.AdapterConfig(preset="tied", r=4, **kwargs))
    perturb(model)
    sl.export_merged(model, tmp_path / "merged.safetensors")
    base.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    torch.testing.assert_close(out(base, inputs), out(model, inputs), atol=1e-5, rtol=0)


def test_share_targets_is_shareqkv_per_layer():
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    sl.add_adapters(model, sl.AdapterConfig(spec="A=shared share=targets", r=4, targets=("q", "k", "v")))
    h = model.transformer.h
    assert h[0].attn.q.lora_A is h[0].attn.v.lora_A and h[0].attn.q.lora_A is not h[1].attn.q.lora_A
    assert sl.count_trainable(model) == 3 * 4 * 32 + 3 * 3 * 4 * 32  # L·r·d + 3·L·r·d
    assert sl.trainable_breakdown(model)[0]["target"] == "transformer.h.0.attn.q+k+v"


def test_transformer_encoder_with_a_padding_mask_in_eval(one_thread):
    """nn.TransformerEncoder's nested-tensor path (eval, a padding mask) reads linear1's bias itself."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()
    sl.add_adapters(enc, sl.AdapterConfig(preset="tied", r=4, targets=("linear1", "linear2")))
    perturb(enc)
    x, mask = torch.randn(2, 5, 32), torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    with torch.no_grad():
        adapted = enc(x, src_key_padding_mask=mask)
        sl.merge(enc)
        merged = enc(x, src_key_padding_mask=mask)
    torch.testing.assert_close(adapted[~mask], merged[~mask], atol=1e-5, rtol=0)


def test_a_model_that_reads_an_adapted_bias_itself_gets_a_clear_error():
    class ReadsWeights(nn.Module):  # as WavLM's attention passes q_proj.weight, .bias to a functional
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)

        def forward(self, x):
            return nn.functional.linear(x, self.q_proj.weight, self.q_proj.bias)
    model = ReadsWeights()
    sl.add_adapters(model, sl.AdapterConfig(preset="lora", r=2, targets=("q_proj",)))
    with pytest.raises(AttributeError, match="reads its weight and bias itself"):
        model(torch.randn(2, 8))


def test_a_tied_module_to_save_and_an_unsaved_tensor_in_export_are_refused(tmp_path):
    from transformers import GPT2LMHeadModel
    with pytest.raises(ValueError, match="tied weights"):
        sl.add_adapters(GPT2LMHeadModel(hf_config(vocab_size=64)), sl.AdapterConfig(
            preset="sharea", targets=("c_attn.q",), split={"c_attn": ("q", "k", "v")}, modules_to_save=("lm_head",)))
    model, _, kwargs, _, _ = build("llama")
    sl.add_adapters(model, sl.AdapterConfig(preset="sharea", r=2, **kwargs))
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="modules_to_save"):
        sl.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
