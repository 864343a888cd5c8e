"""
sharelora.py against docs/METHOD.md: parameter counts (the table's formulas and its worked numbers),
that a shared component really is one tensor (one object, one optimizer entry, the sum of the layers'
gradients, stored once), initialisation (the model starts as the base, every component learns within two
steps), merging, saving and loading, configuration errors, a model that is not GPT-2, and adapter dropout.
"""
import copy
import json
import os
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import sharelora as sl
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")

PRESET_NAMES = ["lora", "sharea", "shareb", "shareab", "tied", "vera"]
ALL_TARGETS = ("q", "v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# docs/METHOD.md's table: trainable parameters per target, from L, d_in, d_out, r
FORMULAS = {
    "lora": lambda L, i, o, r: L * r * (i + o),
    "sharea": lambda L, i, o, r: r * i + L * r * o,
    "shareb": lambda L, i, o, r: L * r * i + r * o,
    "shareab": lambda L, i, o, r: r * (i + o),
    "tied": lambda L, i, o, r: r * (i + o) + L * (r + o),
    "vera": lambda L, i, o, r: L * (r + o),
}
# explicit specs (Tied-LoRA's other corners), with their counts written out by hand
SPEC_FORMULAS = {
    "A=shared/frozen B=layer": lambda L, i, o, r: L * r * o,
    "A=layer B=shared/frozen u=layer v=layer": lambda L, i, o, r: L * r * i + L * (r + o),
    "A=shared B=shared u=layer/frozen v=layer": lambda L, i, o, r: r * (i + o) + L * o,
    "A=shared B=shared/frozen u=layer": lambda L, i, o, r: r * i + L * r,
    "A=shared/frozen B=shared/frozen u=shared v=layer": lambda L, i, o, r: r + L * o,
}
SPECS = list(SPEC_FORMULAS)


def gpt2_dims(d):
    """(d_in, d_out) of every GPT-2 target, for width d."""
    return {"q": (d, d), "k": (d, d), "v": (d, d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d),
            "mlp.c_proj": (4 * d, d)}


TINY = dict(block_size=64, vocab_size=128, n_layer=3, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def tiny_base():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    with torch.no_grad():  # biases and gains off their trivial inits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def base(tiny_base):
    return copy.deepcopy(tiny_base)


def _ids(seed, shape=(2, 20), vocab=TINY["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def _batch(seed):
    idx = _ids(seed, (2, 21))
    return idx[:, :-1], idx[:, 1:]


def _unique_trainable(model):
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


@torch.no_grad()
def _randomize_adapters(model, seed, std=0.2):
    """Every adapter tensor (trainable or frozen) to non-zero random values; vectors around 1."""
    g = torch.Generator().manual_seed(seed)
    done = set()
    for m in sl.adapted_layers(model):
        for x in "ABuv":
            p = getattr(m, f"lora_{x}")
            if p is not None and id(p) not in done:
                done.add(id(p))
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if x in "uv" else 0.0))
    return model


def _config(preset_or_spec, **kw):
    if "=" in preset_or_spec:
        return sl.AdapterConfig(spec=preset_or_spec, **kw)
    return sl.AdapterConfig(preset=preset_or_spec, **kw)


def _adapted(base, preset, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("targets", ALL_TARGETS)
    return sl.add_adapters(copy.deepcopy(base), _config(preset, **kw))


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


# ---- counting -----------------------------------------------------------------------------------

def _meta_gpt(name):
    with torch.device("meta"):  # the full sizes, without allocating their weights
        return GPT(GPTConfig.from_name(name, vocab_size=256, block_size=64))


@pytest.mark.parametrize("size", ["gpt2", "gpt2-medium"])
@pytest.mark.parametrize("targets", [("q", "v"), ALL_TARGETS])
@pytest.mark.parametrize("preset", PRESET_NAMES + SPECS)
def test_counts_follow_method_formulas(size, targets, preset):
    L, _, d = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024)}[size]
    r = 8 if size == "gpt2" else 4
    model = sl.add_adapters(_meta_gpt(size), _config(preset, r=r, targets=targets))
    formula = FORMULAS.get(preset) or SPEC_FORMULAS[preset]
    dims = gpt2_dims(d)
    expected = {t: formula(L, *dims[t], r) for t in targets}
    total = sl.count_trainable(model)
    assert total == sum(expected.values())
    rows = sl.trainable_breakdown(model)
    assert len(rows) == len(targets)
    for row in rows:
        t = next(t for t in targets if row["target"].endswith("." + t))
        assert row["layers"] == L
        assert row["total"] == expected[t] == sum(row[x] for x in "ABuv"), row
    assert sum(row["total"] for row in rows) == total
    table = sl.parameter_table(model)
    assert isinstance(table, str) and f"{total:,}" in table


WORKED = [
    ("gpt2", 8, "lora", 294_912), ("gpt2", 8, "sharea", 159_744), ("gpt2", 8, "shareb", 159_744),
    ("gpt2", 8, "shareab", 24_576), ("gpt2", 8, "tied", 43_200), ("gpt2", 8, "vera", 18_624),
    ("gpt2-medium", 4, "lora", 393_216), ("gpt2-medium", 4, "sharea", 204_800),
    ("gpt2-medium", 4, "shareab", 16_384),
]


@pytest.mark.parametrize("size,r,preset,count", WORKED)
def test_worked_counts_of_method_md(size, r, preset, count):
    model = sl.add_adapters(_meta_gpt(size), sl.AdapterConfig(preset=preset, r=r, targets=("q", "v")))
    assert sl.count_trainable(model) == count


def test_counts_on_a_real_tiny_model(base):
    L, d, r = TINY["n_layer"], TINY["n_embd"], 4
    for preset, formula in FORMULAS.items():
        model = _adapted(base, preset, r=r)
        assert sl.count_trainable(model) == sum(formula(L, *gpt2_dims(d)[t], r) for t in ALL_TARGETS), preset
        # the base is frozen: only adapter tensors train
        assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad), preset


# ---- the update is docs/METHOD.md's formula ------------------------------------------------------

@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_adapted_linear_computes_the_method_formula(base, preset):
    model = _randomize_adapters(_adapted(base, preset, r=4, alpha=12), 1)
    m = model.transformer.h[1].mlp.c_fc
    W, b = m.base.weight, m.base.bias
    A, B = m.lora_A, m.lora_B
    u = m.lora_u if m.lora_u is not None else torch.ones(A.size(0))
    v = m.lora_v if m.lora_v is not None else torch.ones(B.size(0))
    assert (m.lora_u is None) == (preset not in ("tied", "vera"))
    s = 1.0 if preset == "vera" else 12 / 4
    x = torch.randn(3, 5, W.size(1))
    delta = s * torch.diag(v) @ B @ torch.diag(u) @ A
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ (W + delta).T + b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.delta_weight(), delta, atol=1e-6, rtol=1e-5)


# ---- sharing is real -------------------------------------------------------------------------------

def test_sharea_shares_one_object_per_target(base):
    model = _adapted(base, "sharea", targets=("q", "v"))
    L = TINY["n_layer"]
    qs = [model.transformer.h[i].attn.q for i in range(L)]
    vs = [model.transformer.h[i].attn.v for i in range(L)]
    assert all(isinstance(m, sl.AdaptedLinear) for m in qs + vs)
    assert all(m.lora_A is qs[0].lora_A for m in qs)
    assert all(m.lora_A is vs[0].lora_A for m in vs)
    assert qs[0].lora_A is not vs[0].lora_A
    assert len({id(m.lora_B) for m in qs + vs}) == 2 * L  # B per layer and per target
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len({id(p) for p in params}) == 2 + 2 * L


@pytest.mark.parametrize("preset,shared", [("shareb", "B"), ("shareab", "AB"), ("tied", "AB"), ("vera", "AB")])
def test_other_presets_share_what_they_say(base, preset, shared):
    model = _adapted(base, preset, targets=("q", "mlp.c_fc"))
    L = TINY["n_layer"]
    for t in ("attn.q", "mlp.c_fc"):
        ms = [model.get_submodule(f"transformer.h.{i}.{t}") for i in range(L)]
        for x in "AB":
            ids = {id(getattr(m, f"lora_{x}")) for m in ms}
            assert len(ids) == (1 if x in shared else L), (t, x)
        for x in "uv":
            vecs = [getattr(m, f"lora_{x}") for m in ms]
            if preset in ("tied", "vera"):
                assert len({id(p) for p in vecs}) == L  # per-layer vectors
            else:
                assert all(p is None for p in vecs)
    a_q = model.transformer.h[0].attn.q.lora_A
    a_fc = model.transformer.h[0].mlp.c_fc.lora_A
    assert a_q is not a_fc


def test_shared_gradient_is_the_sum_of_the_layers_gradients(base):
    """sharea vs a lora model whose every layer holds a copy of the same A: the shared A's gradient is
    the sum of the copies' gradients, and every B gets the same gradient in both."""
    L = TINY["n_layer"]
    shared = _randomize_adapters(_adapted(base, "sharea", targets=("q", "v")), 2)
    copies = _adapted(base, "lora", targets=("q", "v"))
    with torch.no_grad():
        for i in range(L):
            for t in ("q", "v"):
                s, c = getattr(shared.transformer.h[i].attn, t), getattr(copies.transformer.h[i].attn, t)
                c.lora_A.copy_(s.lora_A)
                c.lora_B.copy_(s.lora_B)
    idx, tgt = _batch(3)
    l1 = shared(idx, tgt)[1]
    l2 = copies(idx, tgt)[1]
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=0)
    l1.backward()
    l2.backward()
    for t in ("q", "v"):
        A = getattr(shared.transformer.h[0].attn, t).lora_A
        total = sum(getattr(copies.transformer.h[i].attn, t).lora_A.grad for i in range(L))
        assert A.grad.abs().max() > 1e-5
        torch.testing.assert_close(A.grad, total, atol=1e-6, rtol=1e-5)
        # a single layer's contribution is not the whole gradient
        assert (A.grad - getattr(copies.transformer.h[0].attn, t).lora_A.grad).abs().max() > 1e-6
        for i in range(L):
            torch.testing.assert_close(getattr(shared.transformer.h[i].attn, t).lora_B.grad,
                                       getattr(copies.transformer.h[i].attn, t).lora_B.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_adapter_file_stores_each_shared_tensor_once(base, tmp_path, preset):
    model = _randomize_adapters(_adapted(base, preset, targets=("q", "v", "mlp.c_fc")), 4)
    path = tmp_path / "adapter.safetensors"
    sl.save_adapter(model, path)
    trainable_bytes = sum(p.numel() * p.element_size() for p in _unique_trainable(model))
    # (a frozen A/B that is not its seeded value anymore is stored too; for vera, randomize moved them)
    frozen = {id(p): p for m in sl.adapted_layers(model) for p in (m.lora_A, m.lora_B) if not p.requires_grad}
    frozen_bytes = sum(p.numel() * p.element_size() for p in frozen.values())
    size = os.path.getsize(path)
    assert 0 < size - trainable_bytes - frozen_bytes < 8192
    _, _, tensors = sl.read_adapter(path)
    L = TINY["n_layer"]
    for x in "AB":
        keys = [k for k in tensors if k.endswith(f".lora_{x}")]
        shared = x == "A" and preset in ("sharea", "shareab", "tied", "vera") or \
            x == "B" and preset in ("shareb", "shareab", "tied", "vera")
        assert len(keys) == (3 if shared else 3 * L), (x, keys)


@pytest.mark.parametrize("preset", ["sharea", "shareab", "tied"])
def test_adapter_file_size_is_the_trainable_tensors(base, tmp_path, preset):
    model = _adapted(base, preset, targets=("q", "v"))
    path = tmp_path / "a.safetensors"
    sl.save_adapter(model, path)
    trainable_bytes = sum(p.numel() * 4 for p in _unique_trainable(model))
    assert 0 < os.path.getsize(path) - trainable_bytes < 8192
    _, _, tensors = sl.read_adapter(path)
    a_keys = [k for k in tensors if k.endswith("lora_A")]
    assert len(a_keys) == 2  # one A per target group (q and v)
    assert sum(t.numel() for t in tensors.values()) == sl.count_trainable(model)


# ---- initialisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESET_NAMES + SPECS)
def test_adapted_model_starts_exactly_as_the_base(base, preset):
    idx = _ids(5)
    model = _adapted(base, preset)
    assert torch.equal(_logits(model, idx), _logits(base, idx))


def test_initial_values_follow_method_md(base):
    r = 4
    for preset in PRESET_NAMES:
        model = _adapted(base, preset, r=r)
        for m in sl.adapted_layers(model):
            d_out, d_in = m.base.weight.shape
            bound = 1 / d_in ** 0.5  # Kaiming-uniform, a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert m.lora_A.shape == (r, d_in) and 0.5 * bound < m.lora_A.abs().max() <= bound
            if m.lora_B.requires_grad:
                assert torch.equal(m.lora_B, torch.zeros(d_out, r)), preset
            else:  # frozen B: Kaiming-uniform over its fan-in r
                assert 0.5 / r ** 0.5 < m.lora_B.abs().max() <= 1 / r ** 0.5
            if preset == "tied":
                assert torch.equal(m.lora_u, torch.ones(r)) and torch.equal(m.lora_v, torch.ones(d_out))
            if preset == "vera":
                assert torch.equal(m.lora_u, torch.full((r,), 0.1)) and torch.equal(m.lora_v, torch.zeros(d_out))
                assert m.scale == 1.0
            elif preset != "vera":
                assert m.scale == 16.0 / r
    # frozen random matrices are rebuilt by the seed, and depend on it
    a = _adapted(base, "vera", seed=3)
    b = _adapted(base, "vera", seed=3)
    c = _adapted(base, "vera", seed=4)
    for x, y, z in zip(sl.adapted_layers(a), sl.adapted_layers(b), sl.adapted_layers(c)):
        assert torch.equal(x.lora_A, y.lora_A) and torch.equal(x.lora_B, y.lora_B)
        assert not torch.equal(x.lora_A, z.lora_A)


def test_lora_first_gradient_of_A_is_exactly_zero(base):
    model = _adapted(base, "lora")
    idx, tgt = _batch(6)
    model(idx, tgt)[1].backward()
    for m in sl.adapted_layers(model):
        assert torch.count_nonzero(m.lora_A.grad) == 0
        assert m.lora_B.grad.abs().max() > 0


def _train(model, steps, lr=1e-2, seed=7):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for s in range(steps):
        idx, tgt = _batch(seed + s)
        loss = model(idx, tgt)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("preset", PRESET_NAMES + SPECS)
def test_every_trainable_tensor_moves_within_two_steps(base, preset):
    model = _adapted(base, preset)
    trainable = _unique_trainable(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    frozen_before = [p.detach().clone() for p in frozen]
    assert len(trainable) > 0
    _train(model, 2)
    for p, b in zip(trainable, before):
        changed = (p.detach() != b).float().mean().item()
        assert changed > 0.9, (tuple(p.shape), changed)
    for p, b in zip(frozen, frozen_before):
        assert torch.equal(p, b)


# ---- merging ----------------------------------------------------------------------------------------

def _flops(model, idx):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(idx)
    return fc.get_total_flops()


@pytest.mark.parametrize("preset", PRESET_NAMES + SPECS[:2])
def test_merge_unmerge(base, preset):
    model = _randomize_adapters(_adapted(base, preset), 8)
    idx = _ids(9)
    unmerged = _logits(model, idx)
    base_logits = _logits(base, idx)
    assert (unmerged - base_logits).abs().max() > 1e-3
    weights = {m.name: m.base.weight.detach().clone() for m in sl.adapted_layers(model)}
    assert _flops(model, idx) > _flops(base, idx)

    sl.merge(model)
    assert all(m.merged for m in sl.adapted_layers(model))
    merged = _logits(model, idx)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert _flops(model, idx) == _flops(base, idx)  # no adapter work left
    for m in sl.adapted_layers(model):
        assert (m.base.weight - weights[m.name]).abs().max() > 0  # ΔW went into every W

    after_one = {k: v.clone() for k, v in model.state_dict().items()}
    sl.merge(model)  # idempotent
    for k, v in model.state_dict().items():
        assert torch.equal(v, after_one[k]), k
    assert torch.equal(_logits(model, idx), merged)

    # train()/eval() never merge or unmerge
    model.eval()
    model.train()
    assert all(m.merged for m in sl.adapted_layers(model))
    with pytest.raises(RuntimeError, match="merged"):
        model(idx, idx)
    model.eval()

    sl.unmerge(model)
    assert not any(m.merged for m in sl.adapted_layers(model))
    for m in sl.adapted_layers(model):
        torch.testing.assert_close(m.base.weight, weights[m.name], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, idx), unmerged, atol=1e-5, rtol=0)
    sl.unmerge(model)  # idempotent too
    for m in sl.adapted_layers(model):
        torch.testing.assert_close(m.base.weight, weights[m.name], atol=1e-6, rtol=0)
    # and training works again
    _train(model, 1)


# ---- saving and loading -----------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESET_NAMES + SPECS[:3])
def test_save_load_reproduces_logits_exactly(base, tmp_path, preset):
    model = _adapted(base, preset, seed=5)
    _train(model, 2)
    model.eval()
    idx = _ids(10)
    expected = _logits(model, idx)
    path = tmp_path / "adapter.safetensors"
    sl.save_adapter(model, path)

    fresh = copy.deepcopy(base)
    sl.load_adapter(fresh, path)
    assert torch.equal(_logits(fresh.eval(), idx), expected)
    assert sl.count_trainable(fresh) == sl.count_trainable(model)
    # the sharing is rebuilt, not L copies
    for a, b in zip(sl.adapted_layers(model), sl.adapted_layers(fresh)):
        assert a.name == b.name
        for x in "ABuv":
            pa, pb = getattr(a, f"lora_{x}"), getattr(b, f"lora_{x}")
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert torch.equal(pa, pb) and pa.requires_grad == pb.requires_grad
    first = sl.adapted_layers(fresh)[0]
    same_group = [m for m in sl.adapted_layers(fresh) if m.group == first.group]
    assert len(same_group) == TINY["n_layer"]
    a_shared = sl.AdapterConfig(**{k: getattr(model.transformer.h[0].attn.q.config, k)
                                   for k in ("preset", "spec")}).components()["A"][0] == "shared"
    assert all((m.lora_A is first.lora_A) == a_shared for m in same_group[1:])

    # loading into a model that already carries the same (untrained) adapters works too
    other = _adapted(base, preset, seed=5)
    sl.load_adapter(other, path)
    assert torch.equal(_logits(other.eval(), idx), expected)


def test_vera_file_holds_no_matrices_and_still_loads_exactly(base, tmp_path):
    model = _adapted(base, "vera", seed=9)
    _train(model, 2)
    model.eval()
    path = tmp_path / "vera.safetensors"
    sl.save_adapter(model, path)
    _, _, tensors = sl.read_adapter(path)
    assert tensors and not [k for k in tensors if k.endswith(("lora_A", "lora_B"))]
    assert all(k.endswith(("lora_u", "lora_v")) for k in tensors)
    fresh = copy.deepcopy(base)
    sl.load_adapter(fresh, path)
    idx = _ids(11)
    assert torch.equal(_logits(fresh.eval(), idx), _logits(model, idx))
    for a, b in zip(sl.adapted_layers(model), sl.adapted_layers(fresh)):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def _has_adapters(model):
    return any(isinstance(m, sl.AdaptedLinear) for m in model.modules())


def test_loading_into_a_wider_base_raises_and_leaves_it_untouched(base, tmp_path):
    model = _randomize_adapters(_adapted(base, "sharea"), 12)
    path = tmp_path / "a.safetensors"
    sl.save_adapter(model, path)
    torch.manual_seed(1)
    wider = GPT(GPTConfig(**{**TINY, "n_embd": 64}))
    state = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match=r"32x32.*64x64"):
        sl.load_adapter(wider, path)
    assert not _has_adapters(wider)
    assert all(p.requires_grad for p in wider.parameters())
    for k, v in wider.state_dict().items():
        assert torch.equal(v, state[k])


def test_loading_into_a_shallower_base_raises(base, tmp_path):
    model = _adapted(base, "sharea")
    path = tmp_path / "a.safetensors"
    sl.save_adapter(model, path)
    shallower = GPT(GPTConfig(**{**TINY, "n_layer": 2}))
    with pytest.raises(ValueError, match="missing"):
        sl.load_adapter(shallower, path)
    assert not _has_adapters(shallower)


@pytest.mark.parametrize("preset", ["sharea", "shareab"])
def test_loading_into_a_deeper_base_raises_and_leaves_it_untouched(base, tmp_path, preset):
    """A 3-layer adapter on a 4-layer base of the same width is the wrong base too
    (docs/METHOD.md: the file records the base's identity; load_adapter's docstring: "leaving the model
    untouched if the adapter was made for another one")."""
    model = _randomize_adapters(_adapted(base, preset), 13)
    path = tmp_path / "a.safetensors"
    sl.save_adapter(model, path)
    deeper = GPT(GPTConfig(**{**TINY, "n_layer": 4}))
    with pytest.raises(ValueError):
        sl.load_adapter(deeper, path)
    assert not _has_adapters(deeper)


def test_unreadable_files(base, tmp_path):
    model = _adapted(base, "tied")
    good = tmp_path / "good.safetensors"
    sl.save_adapter(model, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).tolist()))
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"transformer.h.0.attn.q.lora_A": torch.zeros(4, 32)}, foreign)
    for path, match in ((truncated, "truncated|corrupt|not a readable"), (garbage, "truncated|corrupt|not a readable"),
                        (foreign, "not a sharelora")):
        fresh = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            sl.load_adapter(fresh, path)
        assert not _has_adapters(fresh)
    with pytest.raises(FileNotFoundError):
        sl.load_adapter(copy.deepcopy(base), tmp_path / "missing.safetensors")
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


# ---- the safetensors format, written and read without the safetensors package -----------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_our_safetensors_files_and_the_packages_read_each_other(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"a.lora_A": torch.randn(3, 5, generator=g).to(dtype), "b": torch.randn(7, generator=g).to(dtype),
               "scalar": torch.tensor(2.5, dtype=dtype), "empty": torch.zeros(0, 4, dtype=dtype),
               "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3)}  # a wider element after narrower ones
    meta = {"format": "sharelora", "config": '{"r": 8}'}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    sl._write_safetensors(ours, tensors, meta)
    with safe_open(ours, framework="pt") as f:
        assert f.metadata() == meta
        back = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, theirs, metadata=meta)
    read, read_meta = sl._read_safetensors(theirs)
    assert read_meta == meta
    for got in (back, read):
        assert sorted(got) == sorted(tensors)
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    assert ours.read_bytes()[8:9] == b"{" and int.from_bytes(ours.read_bytes()[:8], "little") % 8 == 0


def _safetensors_file(path, header, body=b"", length=None):
    if header is None:  # no header at all, only these bytes
        return path.write_bytes(body) and path
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + body)
    return path


MALFORMED = {  # name -> (header, body, declared header length or None)
    "shorter than the length field": (None, b"\x01\x02", None),
    "header longer than the file": (b"{}", b"", 1000),
    "huge declared header": (b"{}", b"", 2 ** 62),
    "header not JSON": (b"{not json", b"", None),
    "header not UTF-8": (b'{"\xff": 1}', b"", None),
    "header nested too deep": (b"[" * 100_000, b"", None),
    "header a list": ([1, 2], b"", None),
    "metadata not strings": ({"__metadata__": {"format": 5}}, b"", None),
    "entry without dtype": ({"t": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), None),
    "unknown dtype": ({"t": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None),
    "negative shape": ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None),
    "offsets out of range": ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), None),
    "offsets backwards": ({"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8), None),
    "offsets not the shape's size": ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None),
    "huge declared shape": ({"t": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 8]}},
                            bytes(8), None),
    "overlapping tensors": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), None),
    "bytes left unaccounted for": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), None),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_safetensors_headers_give_one_sentence(base, tmp_path, case):
    header, body, length = MALFORMED[case]
    path = _safetensors_file(tmp_path / "bad.safetensors", header, body, length)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="is not a readable adapter file") as e:
        sl.load_adapter(fresh, path)
    assert "\n" not in str(e.value) and not _has_adapters(fresh)


# ---- bad configurations -----------------------------------------------------------------------------

def test_bad_presets_specs_and_ranks():
    with pytest.raises(ValueError, match="preset"):
        sl.AdapterConfig(preset="loha")
    for spec, match in [("A=everywhere", "A=everywhere"), ("C=layer", "C=layer"), ("A=off", "A=off"),
                        ("B=off", "B=off"), ("u=off/frozen", "u=off/frozen"), ("A=layer/sometimes", "sometimes"),
                        ("A=shared A=layer", "twice"), ("A=layer B=shared B=layer", "twice"),
                        ("A=layer/frozen B=layer/frozen", "nothing would train|freezes"),
                        ("A=shared/frozen B=shared/frozen u=layer/frozen v=off", "nothing would train|freezes"),
                        ("scale=2", "scale=2")]:
        with pytest.raises(ValueError, match=match):
            sl.AdapterConfig(spec=spec)
        with pytest.raises(ValueError):
            sl.parse_spec(spec)
    for r in (0, -1):
        with pytest.raises(ValueError, match="r must be|rank"):
            sl.AdapterConfig(preset="lora", r=r)
    with pytest.raises(ValueError, match="targets"):
        sl.AdapterConfig(targets=())


def test_every_preset_is_an_explicit_spec():
    for name, spec in sl.PRESETS.items():
        assert sl.AdapterConfig(preset=name).components() == sl.AdapterConfig(spec=spec).components()
    assert sl.parse_spec("A=shared") == sl.parse_spec(sl.PRESETS["sharea"])
    assert sl.parse_spec(sl.PRESETS["vera"]) == {"A": ("shared", False), "B": ("shared", False),
                                                 "u": ("layer", True), "v": ("layer", True), "scale": "1",
                                                  "share": "layers"}


def test_bad_targets_rank_and_double_add(base):
    with pytest.raises(ValueError, match="larger"):
        _adapted(base, "lora", r=33, targets=("q",))
    with pytest.raises(ValueError, match="larger"):  # c_fc is 32 -> 128: r is bounded by the smaller side
        _adapted(base, "lora", r=40, targets=("mlp.c_fc",))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="matches no"):
        sl.add_adapters(model, sl.AdapterConfig(targets=("q", "attn.query")))
    assert not _has_adapters(model) and all(p.requires_grad for p in model.parameters())
    sl.add_adapters(model, sl.AdapterConfig(targets=("q",)))
    with pytest.raises(ValueError, match="already"):
        sl.add_adapters(model, sl.AdapterConfig(targets=("v",)))


class _Ragged(nn.Module):
    """Blocks whose `proj` maps differ in size: one group, maps of different shapes."""

    def __init__(self, ins=(8, 12, 16), outs=(6, 6, 6)):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(i, o)}) for i, o in zip(ins, outs))


def test_sharing_across_maps_of_different_shapes_raises():
    with pytest.raises(ValueError, match="cannot share A"):
        sl.add_adapters(_Ragged(), sl.AdapterConfig(spec="A=shared", r=2, targets=("proj",)))
    with pytest.raises(ValueError, match="cannot share B"):
        sl.add_adapters(_Ragged(ins=(8, 8, 8), outs=(6, 7, 8)), sl.AdapterConfig(spec="B=shared", r=2, targets=("proj",)))
    with pytest.raises(ValueError, match="cannot share v"):
        sl.add_adapters(_Ragged(ins=(8, 8, 8), outs=(6, 7, 8)),
                        sl.AdapterConfig(spec="A=shared B=layer v=shared", r=2, targets=("proj",)))
    # per-layer components are fine
    m = sl.add_adapters(_Ragged(), sl.AdapterConfig(preset="lora", r=2, targets=("proj",)))
    assert sl.count_trainable(m) == sum(2 * (i + 6) for i in (8, 12, 16))
    m = sl.add_adapters(_Ragged(), sl.AdapterConfig(spec="A=layer B=shared", r=2, targets=("proj",)))
    assert sl.count_trainable(m) == sum(2 * i for i in (8, 12, 16)) + 2 * 6


# ---- a model that is not GPT-2 ----------------------------------------------------------------------

class _MLPStack(nn.Module):
    def __init__(self, d=16, h=40, L=4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(d, h), "fc2": nn.Linear(h, d)}) for _ in range(L))
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](F.gelu(b["fc1"](x)))
        return self.out(x)


def test_works_on_a_model_that_is_not_gpt2():
    torch.manual_seed(0)
    d, h, L, r = 16, 40, 4, 3
    base = _MLPStack(d, h, L)
    model = sl.add_adapters(copy.deepcopy(base), sl.AdapterConfig(preset="sharea", r=r, targets=("fc1", "fc2")))
    assert sl.count_trainable(model) == FORMULAS["sharea"](L, d, h, r) + FORMULAS["sharea"](L, h, d, r)
    A1 = model.blocks[0]["fc1"].lora_A
    assert all(b["fc1"].lora_A is A1 for b in model.blocks)
    assert model.blocks[0]["fc2"].lora_A is not A1
    x = torch.randn(64, d)
    y = torch.sin(x.sum(-1, keepdim=True))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    A1_before = A1.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert not torch.equal(A1, A1_before)
    assert all(b["fc1"].lora_A is A1 for b in model.blocks)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        sl.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
        assert not torch.equal(model(x), base(x))


# ---- dropout ----------------------------------------------------------------------------------------

def test_adapter_dropout_is_random_in_train_mode_only(base):
    model = _randomize_adapters(_adapted(base, "tied", dropout=0.5), 14)
    idx = _ids(15)
    model.train()
    torch.manual_seed(0)
    a, b = _logits(model, idx), _logits(model, idx)
    assert (a - b).abs().max() > 1e-4
    model.eval()
    c, e = _logits(model, idx), _logits(model, idx)
    assert torch.equal(c, e)
    # in eval mode dropout is the identity: the same as the model without dropout
    no_dropout = copy.deepcopy(model)
    for m in sl.adapted_layers(no_dropout):
        m.dropout = nn.Identity()
    assert torch.equal(_logits(no_dropout, idx), c)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            sl.AdapterConfig(dropout=bad)
