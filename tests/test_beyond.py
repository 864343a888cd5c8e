"""Beyond the papers' code: continual sharing across tasks, and the singular-value analysis."""
import copy

import pytest
import torch

from tools import analyze
import sharelora
from model import GPT, GPTConfig


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=97, block_size=32))


def train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    for _ in range(steps):
        x = torch.randint(0, 97, (4, 16))
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()


def test_second_task_keeps_the_shared_A_frozen_and_trains_only_B(tmp_path):
    base = tiny()
    task1 = sharelora.add_adapters(copy.deepcopy(base), sharelora.AdapterConfig(preset="sharea", r=4))
    train_steps(task1)
    sharelora.save_adapter(task1, tmp_path / "task1.safetensors")

    # train.py's init_adapter does exactly this: same keys, the spec decides what trains
    task2 = sharelora.add_adapters(copy.deepcopy(base), sharelora.AdapterConfig(r=4, spec="A=shared/frozen B=layer"))
    _, _, tensors = sharelora.read_adapter(tmp_path / "task1.safetensors")
    own = sharelora.adapter_state_dict(task2)
    with torch.no_grad():
        for key in own.keys() & tensors.keys():
            own[key].copy_(tensors[key])
    A_before = task2.transformer.h[0].attn.q.lora_A.detach().clone()
    train_steps(task2)
    assert torch.equal(task2.transformer.h[0].attn.q.lora_A, A_before)
    assert torch.equal(A_before, task1.transformer.h[0].attn.q.lora_A)
    L, r, d = 3, 4, 32
    assert sharelora.count_trainable(task2) == 2 * L * r * d  # per-layer B of q and v only: L·r·d_out each
    # the frozen A is not its seeded value any more, so task 2's file must carry it
    sharelora.save_adapter(task2, tmp_path / "task2.safetensors")
    reloaded = sharelora.load_adapter(copy.deepcopy(base), tmp_path / "task2.safetensors")
    assert torch.equal(reloaded.transformer.h[0].attn.q.lora_A, A_before)


def test_normalized_singular_values_and_effective_rank():
    model = sharelora.add_adapters(tiny(), sharelora.AdapterConfig(preset="lora", r=4))
    with torch.no_grad():
        for m in sharelora.adapted_layers(model):
            m.lora_B.normal_()
    svs = analyze.normalized_singular_values(model)
    assert len(svs) == 6
    for name, s in svs.items():
        expect = torch.linalg.svdvals(model.get_submodule(name).delta_weight())[:4]
        assert torch.allclose(s, expect / expect[0]) and s[0] == 1 and (s[:-1] >= s[1:]).all()
    assert analyze.effective_rank(torch.ones(4)) == pytest.approx(4)
    assert analyze.effective_rank(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1)
    assert "eff. rank" in analyze.table("x", svs)
    mean = sum(map(analyze.effective_rank, svs.values())) / len(svs)
    assert analyze.table("x", svs).endswith(f"mean effective rank {mean:.2f} of {len(next(iter(svs.values())))}")


def saved_adapter(tmp_path, preset):
    """An adapter file with non-zero B on a base saved to disk (the file names that base)."""
    tiny().save_pretrained(tmp_path / "base")
    model = sharelora.add_adapters(GPT.from_pretrained(tmp_path / "base"), sharelora.AdapterConfig(preset=preset, r=4))
    with torch.no_grad():
        for m in sharelora.adapted_layers(model):
            m.lora_B.normal_()
    sharelora.save_adapter(model, tmp_path / "a.safetensors")
    return str(tmp_path / "a.safetensors")


def test_analyze_cli_prints_a_table(tmp_path, capsys):
    analyze.main(["--adapter", saved_adapter(tmp_path, "sharea")])
    out = capsys.readouterr().out
    assert out.count("transformer.h.") == 6 and "σ_i/σ_1" in out


def test_vera_saved_from_a_bfloat16_base_still_rebuilds_its_frozen_matrices(tmp_path):
    import runtime
    base = tiny()
    model = sharelora.add_adapters(copy.deepcopy(base), sharelora.AdapterConfig(preset="vera", r=4))
    runtime.place(model, "cpu", torch.bfloat16)  # what train.py does on a GPU: frozen A, B in bfloat16
    assert model.transformer.h[0].attn.q.lora_A.dtype == torch.bfloat16
    sharelora.save_adapter(model, tmp_path / "v.safetensors")
    _, meta, tensors = sharelora.read_adapter(tmp_path / "v.safetensors")
    assert not any(k.endswith(("lora_A", "lora_B")) for k in tensors) and len(meta["regenerated"]) == 4
    loaded = sharelora.load_adapter(copy.deepcopy(base), tmp_path / "v.safetensors")
    assert torch.equal(loaded.transformer.h[0].attn.q.lora_A.to(torch.bfloat16), model.transformer.h[0].attn.q.lora_A)


def test_analyze_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="analyze.py --png needs matplotlib (requirements-dev.txt has it)")
    analyze.main(["--adapter", saved_adapter(tmp_path, "lora"), "--png", str(tmp_path / "sv.png")])
    assert (tmp_path / "sv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
