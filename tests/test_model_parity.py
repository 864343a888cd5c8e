"""
model.py against transformers' GPT2LMHeadModel (the reference implementation of GPT-2): loading every
checkpoint layout, logits, greedy generation, the KV cache, writing the layout back, the loss (including
the chunked LinearCrossEntropy path and its gradients), the LayerNorm that keeps its output for backward
(against nn.LayerNorm) and the sampling options.

Every reference is a GPT2LMHeadModel built from a GPT2Config with random weights (no download).
"""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import hf_model, randomize_
import model as model_py
import sharelora
from model import GPT, GPTConfig, sample_next

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")

ATOL = 1e-4


def _ids(vocab, shape, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_logits(hf, idx):
    return hf(input_ids=idx).logits


@torch.no_grad()
def _our_logits(model, idx):
    return model(idx)[0]


@torch.no_grad()
def _hf_greedy(hf, idx, n):
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert out.shape == (idx.size(0), idx.size(1) + n)  # transformers did not stop early
    return out


# ---- fixtures: a tiny and a full-size (124M) checkpoint written by transformers ------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # std 0.2: logits spread enough that greedy decoding has no near-ties between implementations
    hf = hf_model(seed=1, std=0.2)
    d = tmp_path_factory.mktemp("tiny_hf")
    hf.save_pretrained(d)
    return hf, d


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """transformers' GPT-2 124M config (12 layers, 768 wide, 12 heads, 50,257 tokens, 1024 positions),
    random weights, written with save_pretrained; plus a directory holding only the weights file."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_positions) == (12, 768, 12, 50257, 1024)
    torch.manual_seed(2)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2's init leaves biases 0 and gains 1: perturb them too
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("full_hf")
    hf.save_pretrained(d)
    bare = tmp_path_factory.mktemp("full_bare")
    try:
        os.link(d / "model.safetensors", bare / "model.safetensors")
    except OSError:
        shutil.copy(d / "model.safetensors", bare / "model.safetensors")
    return hf, d, bare


# ---- 1. loading -------------------------------------------------------------------------------------

def test_tiny_directory_logits_match_transformers(tiny):
    hf, d = tiny
    model = GPT.from_pretrained(d).eval()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (2, 4, 48, 211, 64)
    idx = _ids(211, (2, 40), 0)
    ours, ref = _our_logits(model, idx), _hf_logits(hf, idx)
    assert ref.abs().max() > 1.0  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_tiny_greedy_generation_matches_transformers(tiny):
    hf, d = tiny
    model = GPT.from_pretrained(d).eval()
    for batch in (1, 2):
        idx = _ids(211, (batch, 7), 10 + batch)
        ref = _hf_greedy(hf, idx, 20)
        assert torch.equal(model.generate(idx, 20, temperature=0), ref)
        assert torch.equal(model.generate(idx, 20, temperature=0, use_cache=False), ref)


def test_kv_cache_forward_matches_full_forward(tiny):
    """Feeding a sequence in pieces through a KVCache gives the logits of one full forward pass."""
    from model import KVCache
    _, d = tiny
    model = GPT.from_pretrained(d).eval()
    idx = _ids(211, (2, 30), 3)
    full_logits = _our_logits(model, idx)
    cache = KVCache(model.config.n_layer, 30)
    pieces = []
    with torch.no_grad():
        for s, e in ((0, 11), (11, 12), (12, 20), (20, 30)):
            pieces.append(model(idx[:, s:e], cache=cache)[0])
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full_logits, atol=1e-5, rtol=0)


def test_cache_and_no_cache_generation_agree_batch_of_two(tiny):
    _, d = tiny
    model = GPT.from_pretrained(d).eval()
    idx = _ids(211, (2, 9), 4)
    a = model.generate(idx, 25, temperature=0, use_cache=True)
    b = model.generate(idx, 25, temperature=0, use_cache=False)
    assert a.shape == (2, 34)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :9], idx)
    # each row of a batch is generated as if it were alone
    for i in range(2):
        assert torch.equal(model.generate(idx[i:i + 1], 25, temperature=0), a[i:i + 1])


def test_full_size_directory_logits_and_greedy_match_transformers(full):
    hf, d, _ = full
    model = GPT.from_pretrained(d).eval()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (12, 12, 768, 50257, 1024)
    idx = _ids(50257, (1, 16), 5)
    torch.testing.assert_close(_our_logits(model, idx), _hf_logits(hf, idx), atol=ATOL, rtol=0)
    ref = _hf_greedy(hf, idx, 20)
    assert torch.equal(model.generate(idx, 20, temperature=0), ref)
    assert torch.equal(model.generate(idx, 20, temperature=0, use_cache=False), ref)


def test_full_size_bare_safetensors_infers_heads_from_shapes(full):
    hf, _, bare = full
    assert not (bare / "config.json").exists()
    model = GPT.from_pretrained(bare / "model.safetensors").eval()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (12, 12, 768, 50257, 1024)
    idx = _ids(50257, (1, 16), 6)
    torch.testing.assert_close(_our_logits(model, idx), _hf_logits(hf, idx), atol=ATOL, rtol=0)


def test_tiny_bare_safetensors_without_config_raises_about_heads(tiny, tmp_path):
    _, d = tiny
    shutil.copy(d / "model.safetensors", tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="heads"):
        GPT.from_pretrained(tmp_path / "weights.safetensors")


def test_tiny_safetensors_file_with_config_beside_it(tiny):
    hf, d = tiny
    model = GPT.from_pretrained(d / "model.safetensors").eval()
    idx = _ids(211, (1, 20), 7)
    torch.testing.assert_close(_our_logits(model, idx), _hf_logits(hf, idx), atol=ATOL, rtol=0)


_SIDE_EFFECTS = []


def _record_side_effect():
    _SIDE_EFFECTS.append("code ran while loading")
    return "pwned"


class _Malicious:
    def __reduce__(self):
        return (_record_side_effect, ())


def test_pytorch_model_bin_loads_with_weights_only(tiny, tmp_path, monkeypatch):
    hf, d = tiny
    shutil.copy(d / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = GPT.from_pretrained(tmp_path).eval()
    assert calls == [True]
    idx = _ids(211, (2, 20), 8)
    torch.testing.assert_close(_our_logits(model, idx), _hf_logits(hf, idx), atol=ATOL, rtol=0)

    # and a pickle that would run code is refused rather than executed
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(d / "config.json", evil / "config.json")
    torch.save({"transformer.wte.weight": _Malicious()}, evil / "pytorch_model.bin")
    _SIDE_EFFECTS.clear()
    with pytest.raises(ValueError, match="not a readable weights file .UnpicklingError"):
        GPT.from_pretrained(evil)
    assert _SIDE_EFFECTS == []


def test_missing_path_raises_file_not_found_naming_a_directory(tmp_path):
    for missing in (tmp_path / "nope", str(tmp_path / "nope.safetensors"), "./no/such/dir"):
        with pytest.raises(FileNotFoundError, match="director"):
            GPT.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="director"):
        GPT.from_pretrained(empty)


def test_offline_hub_name_raises_file_not_found_naming_a_local_directory(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    try:  # huggingface_hub reads the variables when first imported: set its constants as well
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
        monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    except ImportError:
        pass
    for name in ("gpt2", "openai-community/gpt2-medium"):
        with pytest.raises(FileNotFoundError) as e:
            GPT.from_pretrained(name)
        msg = str(e.value)
        assert "local directory" in msg or "directory" in msg
        assert "gpt2" in msg
    # a base one of config/'s runs trains (config/cpu_demo_e2e.py's out-cpu-demo), missing: that run is named
    import runtime
    from data.common import UserError
    monkeypatch.chdir(tmp_path)
    for name in ("out-cpu-demo", "./out-e2e-base"):
        with pytest.raises(UserError, match=r"python train.py config/(cpu_demo|e2e_base).py` trains"):
            runtime.load_base(name)
    with pytest.raises(UserError, match="Hugging Face hub.*make demo"):  # a name no config writes
        runtime.load_base("out-nobody-trains")
    assert no_network == []


# ---- 2. writing the Hugging Face layout back ----------------------------------------------------

def test_save_pretrained_round_trip_through_transformers(tmp_path):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=173, n_layer=2, n_head=4, n_embd=32)).eval()
    randomize_(model, 3, std=0.1)  # biases, gains and q/k/v all differ from their inits
    model.save_pretrained(tmp_path)
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = _ids(173, (2, 50), 9)
    torch.testing.assert_close(_hf_logits(hf, idx), _our_logits(model, idx), atol=ATOL, rtol=0)
    # and back again into model.py
    again = GPT.from_pretrained(tmp_path).eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


# ---- 3. the loss ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_vocab():
    """50,257 tokens (the chunked loss then takes 2**23 // 50257 = 166 rows at a time), narrow model."""
    hf = hf_model(seed=4, std=0.05, vocab_size=50257, n_positions=320, n_embd=32, n_layer=2, n_head=4)
    model = GPT(GPTConfig(block_size=320, vocab_size=50257, n_layer=2, n_head=4, n_embd=32))
    model.load_hf_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, 50257, (2, 300), generator=g)
    targets = torch.randint(0, 50257, (2, 300), generator=g)
    targets[torch.rand(2, 300, generator=g) < 0.2] = -100
    targets[:, :5] = -100  # a prompt left out of the loss
    keep = targets != -100
    assert keep.sum() > 2 * (2**23 // 50257)  # at least three chunks
    return hf, model, idx, targets


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_matches_cross_entropy_of_transformers_logits(big_vocab, label_smoothing):
    hf, model, idx, targets = big_vocab
    model.eval()
    keep = targets != -100
    ref_logits = _hf_logits(hf, idx)
    ref = F.cross_entropy(ref_logits[keep], targets[keep], label_smoothing=label_smoothing)
    with torch.no_grad():
        logits, loss = model(idx, targets, label_smoothing=label_smoothing)
        none, chunked = model(idx, targets, label_smoothing=label_smoothing, return_logits=False)
    assert none is None
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-6)


def _grads(model, idx, targets, trainable, **kw):
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(trainable(n))
    logits, loss = model(idx, targets, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("which", ["blocks", "full"])
def test_chunked_loss_gives_same_loss_and_gradients(big_vocab, which, label_smoothing):
    """return_logits=False (LinearCrossEntropy) against return_logits=True (F.cross_entropy, autograd):
    'blocks' trains everything but the embeddings (the gradient flows to the hidden states only),
    'full' is a full fine-tune, where the tied wte gets gradient from the output layer as well."""
    _, model, idx, targets = big_vocab
    model.train()
    trainable = (lambda n: True) if which == "full" else (lambda n: ".h." in n)
    l1, g1 = _grads(model, idx, targets, trainable, label_smoothing=label_smoothing)
    l2, g2 = _grads(model, idx, targets, trainable, label_smoothing=label_smoothing, return_logits=False)
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 0
    assert ("transformer.wte.weight" in g1) == (which == "full")
    for n in g1:
        assert g1[n].abs().max() > 0, n
        torch.testing.assert_close(g2[n], g1[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


# ---- 3b. the LayerNorm that keeps its output for backward ---------------------------------------------

def _layer_norms(bias, seed=0):
    """An nn.LayerNorm with gains of both signs (|g| in [0.05, 2]) and biases in [-1, 1], and our
    LayerNorm with the same weights."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.nn.LayerNorm(48, bias=bias)
    with torch.no_grad():
        sign = torch.randint(0, 2, (48,), generator=g) * 2 - 1
        ref.weight.copy_(sign * (0.05 + 1.95 * torch.rand(48, generator=g)))
        if bias:
            ref.bias.copy_(torch.rand(48, generator=g) * 2 - 1)
    ours = model_py.LayerNorm(48, bias=bias)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _ln_grads(ln, x, dy):
    x = x.clone().requires_grad_()
    y = ln(x)
    (y * dy).sum().backward()
    grads = [x.grad] + [p.grad for p in ln.parameters()]
    ln.zero_grad(set_to_none=True)
    return y, grads


@pytest.mark.parametrize("bias", [True, False])
def test_output_saving_layer_norm_matches_nn_layer_norm(bias):
    ref, ours = _layer_norms(bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 48, generator=g) * 3 + 1
    dy = torch.randn(3, 40, 48, generator=g)
    y_ref, g_ref = _ln_grads(ref, x, dy)
    y, grads = _ln_grads(ours, x, dy)
    assert type(y.grad_fn).__name__.startswith("OutputSavingLayerNorm")  # the path under test ran
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    assert len(grads) == len(g_ref) == (3 if bias else 2)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_output_saving_layer_norm_over_several_dimensions():
    """A normalized_shape of more than one dimension, as nn.LayerNorm takes it."""
    ref, ours = torch.nn.LayerNorm((4, 8)), model_py.LayerNorm((4, 8))
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(3, 5, 4, 8, generator=g), torch.randn(3, 5, 4, 8, generator=g)
    y_ref, g_ref = _ln_grads(ref, x, dy)
    y, grads = _ln_grads(ours, x, dy)
    assert type(y.grad_fn).__name__.startswith("OutputSavingLayerNorm")
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_layer_norm_keeps_its_input_where_the_output_cannot_give_it_back():
    """A gain near zero (checked again after an in-place change), autocast, no-grad and other dtypes:
    the plain nn.LayerNorm, with its exact gradient."""
    ref, ours = _layer_norms(True)
    x, dy = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    path = lambda: type(ours(x.requires_grad_()).grad_fn).__name__
    assert path().startswith("OutputSavingLayerNorm")
    with torch.no_grad():
        ours.weight[7] = 1e-4
        ref.weight[7] = 1e-4
    assert path().startswith("NativeLayerNorm")
    _, g_ref = _ln_grads(ref, x.detach(), dy)
    _, grads = _ln_grads(ours, x.detach(), dy)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad():
        ours.weight[7] = 0.5
        ours.bias[3] = 1000.0  # |weight| <= 2 < 0.01 * |bias|: x̂ would come back with ~1e-4 of rounding error
    assert path().startswith("NativeLayerNorm")
    ours.bias.data[3] = 0.0
    assert path().startswith("OutputSavingLayerNorm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert path().startswith("NativeLayerNorm")
    assert ours.double()(x.double().requires_grad_()).grad_fn.name().startswith("NativeLayerNorm")


@pytest.mark.parametrize("saving", [True, False])
def test_adapted_block_keeps_the_layer_norm_output_once_and_not_its_input(saving, monkeypatch):
    """With adapters on q and v (which keep LayerNorm's output for their gradient), ln_1's input, the
    residual stream, is kept by nobody: one (T, C) tensor less per block. saving=False is nn.LayerNorm's
    behaviour, where the input is kept as well: the check can tell the two apart."""
    if not saving:
        monkeypatch.setattr(model_py.LayerNorm, "_invertible", lambda self: False)
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    m.requires_grad_(False)
    sharelora.add_adapters(m, sharelora.AdapterConfig(preset="sharea", r=4, targets=("q", "v")))
    seen = {}
    m.transformer.h[1].ln_1.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = m(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)), return_logits=False)
    ptr = lambda t: t.untyped_storage().data_ptr()
    assert ptr(seen["y"]) in kept  # the adapters' input
    assert (ptr(seen["x"]) in kept) == (not saving)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


# ---- 4. sampling ------------------------------------------------------------------------------------

def test_top_k_1_and_tiny_top_p_equal_greedy(tiny):
    _, d = tiny
    model = GPT.from_pretrained(d).eval()
    idx = _ids(211, (2, 6), 12)
    greedy = model.generate(idx, 15, temperature=0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, 15, temperature=1.0, top_k=1), greedy)
    torch.manual_seed(1)
    assert torch.equal(model.generate(idx, 15, temperature=1.0, top_p=1e-6), greedy)
    torch.manual_seed(2)
    assert torch.equal(model.generate(idx, 15, temperature=0.7, top_k=1, top_p=0.9, use_cache=False), greedy)


def test_sampling_stays_inside_top_k_and_top_p_sets():
    torch.manual_seed(0)
    logits = torch.randn(1, 60) * 2
    order = logits[0].argsort(descending=True)
    probs = logits[0].softmax(-1)[order]
    draws = torch.cat([sample_next(logits.expand(500, -1), 1.0, top_k=5) for _ in range(4)]).flatten()
    assert set(draws.tolist()) <= set(order[:5].tolist())
    assert len(set(draws.tolist())) > 1  # it does sample
    n = int((probs.cumsum(0) < 0.6).sum()) + 1  # the smallest set whose probability reaches 0.6
    draws = torch.cat([sample_next(logits.expand(500, -1), 1.0, top_p=0.6) for _ in range(4)]).flatten()
    assert set(draws.tolist()) <= set(order[:n].tolist())
    # plain sampling follows the softmax
    draws = torch.cat([sample_next(logits.expand(5000, -1), 1.0) for _ in range(4)]).flatten()
    freq = torch.bincount(draws, minlength=60).float() / draws.numel()
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.02


def _pad_after_eos(seq, prompt_len, eos):
    """The reference: what generate(eos_token=eos) should return, from a run without it."""
    out = seq.clone()
    firsts = []
    for row in out:
        hits = (row[prompt_len:] == eos).nonzero()
        if len(hits):
            f = prompt_len + int(hits[0])
            row[f:] = eos
            firsts.append(f)
        else:
            firsts.append(None)
    if all(f is not None for f in firsts):
        out = out[:, :max(firsts) + 1]
    return out


def test_eos_token_stops_rows_and_pads_them_with_eos(tiny):
    _, d = tiny
    model = GPT.from_pretrained(d).eval()
    idx = _ids(211, (2, 5), 13)
    free = model.generate(idx, 20, temperature=0)
    gen0 = free[0, 5:].tolist()
    # an eos that row 0 produces for the first time after a few steps
    k = next(i for i in range(2, 20) if gen0[i] not in gen0[:i])
    eos = gen0[k]
    out = model.generate(idx, 20, temperature=0, eos_token=eos)
    expected = _pad_after_eos(free, 5, eos)
    assert torch.equal(out, expected)
    assert (out[0, 5 + k:] == eos).all()
    # a single row stops as soon as it has produced eos
    out1 = model.generate(idx[:1], 20, temperature=0, eos_token=eos)
    assert out1.shape == (1, 5 + k + 1)
    assert torch.equal(out1, free[:1, :5 + k + 1])
    # the same without the cache
    assert torch.equal(model.generate(idx, 20, temperature=0, eos_token=eos, use_cache=False), expected)
