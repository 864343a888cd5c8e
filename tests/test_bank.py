"""
The adapter bank (bank.py): built from adapters trained around one A, refused when they differ, tasks
added, removed and exported alone; mixed batches whose rows of different tasks give the same logits
and tokens (greedy and beam search, with the KV cache) as each task alone through sharelora.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import bank
import sharelora
from conftest import ROOT, hf_model
from data.common import UserError
from model import GPT, GPTConfig
from tools import evaluate_e2e as ev

SPECS = {"sharea": "A=shared/frozen B=layer",  # task k + 1 of train.py --init_adapter, A frozen
         "tied": "A=shared/frozen B=shared u=layer v=layer"}  # Tied-LoRA: every task its own B, u, v


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    yield


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def train_like(preset, seed, A_from=None, make=tiny_gpt):
    """A base with an adapter whose trainable tensors are random (as if trained), A copied from A_from
    for the tasks after the first, as train.py's init_adapter does."""
    model = make()
    spec = None if A_from is None else SPECS[preset]
    sharelora.add_adapters(model, sharelora.AdapterConfig(preset=preset, spec=spec, r=4, targets=("q", "v"), seed=seed))
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for key, p in sharelora.adapter_state_dict(model).items():
            if A_from is not None and key.endswith("lora_A"):
                p.copy_(A_from[key])
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(params=list(SPECS))
def adapters(request, tmp_path):
    """Three task files around one A: {name: path}."""
    first = train_like(request.param, 0)
    A = {k: t for k, t in sharelora.adapter_state_dict(first).items() if k.endswith("lora_A")}
    paths = {}
    for i, name in enumerate(["e2e", "parse", "poems"]):
        m = first if i == 0 else train_like(request.param, i, A_from=A)
        paths[name] = tmp_path / f"{name}.safetensors"
        sharelora.save_adapter(m, paths[name], base="tiny")
    return paths


def alone(path):
    return sharelora.load_adapter(tiny_gpt(), path).eval()


def test_bank_file_round_trip_and_export(adapters, tmp_path):
    b = bank.Bank.build(adapters)
    b.save(tmp_path / "bank.safetensors")
    read = bank.Bank.read(tmp_path / "bank.safetensors")
    assert read.names == ["e2e", "parse", "poems"]
    # A once: the bank is smaller than the three files together, by two copies of A
    a_bytes = sum(t.numel() * 4 for t in read.shared.values())
    total = sum(p.stat().st_size for p in adapters.values())
    assert (tmp_path / "bank.safetensors").stat().st_size < total - 1.5 * a_bytes
    read.export("parse", tmp_path / "parse_alone.safetensors")
    x = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(alone(tmp_path / "parse_alone.safetensors")(x)[0], alone(adapters["parse"])(x)[0],
                               rtol=0, atol=0)
    meta = sharelora._read_safetensors(tmp_path / "bank.safetensors")[1]
    listing = json.loads(meta["tasks"])
    assert [e["count"] for e in listing] == [sum(t.numel() for t in read.tasks[n]["tensors"].values()) for n in read.names]


def test_add_and_remove_leave_the_other_tasks_alone(adapters, tmp_path):
    b = bank.Bank.build({k: adapters[k] for k in ("e2e", "poems")})
    before = {n: dict(t["tensors"]) for n, t in b.tasks.items()}
    b.add("parse", adapters["parse"]).remove("e2e")
    assert b.names == ["poems", "parse"]
    assert all(torch.equal(before["poems"][k], t) for k, t in b.tasks["poems"]["tensors"].items())
    with pytest.raises(ValueError, match="a task of the bank already"):
        b.add("parse", adapters["parse"])
    with pytest.raises(ValueError, match="no task 'e2e'"):
        b.export("e2e", tmp_path / "x.safetensors")


def test_refusals_name_what_differs(adapters, tmp_path):
    b = bank.Bank.build({"e2e": adapters["e2e"]})
    own_A = train_like(b.tasks["e2e"]["config"].preset, 7)  # trained with its own A
    sharelora.save_adapter(own_A, tmp_path / "own.safetensors", base="tiny")
    with pytest.raises(ValueError, match="A .* is not the bank's: train the task with --init_adapter"):
        b.add("own", tmp_path / "own.safetensors")
    sharelora.save_adapter(own_A, tmp_path / "other_base.safetensors", base="another")
    with pytest.raises(ValueError, match="base 'another'.*one base"):
        b.add("x", tmp_path / "other_base.safetensors")
    lora = tiny_gpt()
    sharelora.add_adapters(lora, sharelora.AdapterConfig(preset="lora", r=4, targets=("q", "v")))
    sharelora.save_adapter(lora, tmp_path / "lora.safetensors", base="tiny")
    with pytest.raises(ValueError, match="one layout"):
        b.add("lora", tmp_path / "lora.safetensors")
    # a flipped byte in a task's tensors is caught by its fingerprint
    b.save(tmp_path / "bank.safetensors")
    data = bytearray((tmp_path / "bank.safetensors").read_bytes())
    data[-3] ^= 0x40
    (tmp_path / "bad.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="bad.safetensors is not a readable adapter bank.*fingerprint"):
        bank.Bank.read(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="an adapter file, not a bank"):
        bank.Bank.read(adapters["e2e"])


def mixed_model(adapters):
    return bank.attach(tiny_gpt(), bank.Bank.build(adapters))


def test_mixed_forward_equals_each_task_alone(adapters):
    model = mixed_model(adapters)
    names = ["poems", "e2e", "parse", "e2e", "poems", "poems"]
    x = torch.randint(0, 64, (len(names), 9), generator=torch.Generator().manual_seed(3))
    with bank.tasks(model, names):
        mixed = model(x)[0]
    singles = {n: alone(p)(x)[0] for n, p in adapters.items()}
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], rtol=1e-4, atol=1e-4)  # float rounding: other sums
    assert not torch.allclose(singles["e2e"], singles["parse"], atol=1e-3)  # the tasks really differ
    with pytest.raises(ValueError, match="wrap the call in `with bank.tasks"):
        model(x)
    with pytest.raises(ValueError, match="no task 'nope'"):
        with bank.tasks(model, ["nope"]):
            pass


def test_both_products_agree():
    """The two ways tools/bench_bank.py --products compares compute the same thing."""
    from tools.bench_bank import gathered_product, per_task_product
    g = torch.Generator().manual_seed(0)
    h, B = torch.randn(7, 3, 4, generator=g), torch.randn(5, 6, 4, generator=g)
    index = torch.tensor([4, 0, 4, 2, 2, 0, 1])
    torch.testing.assert_close(per_task_product(h, B, index), gathered_product(h, B, index))
    torch.testing.assert_close(gathered_product(h, B, index)[3], h[3] @ B[2].t())


def run_bench_bank(*args):
    """tools/bench_bank.py as a user runs it (one torch thread: the tiny models are faster so, on 2 cores)."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench_bank.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def test_bench_bank_on_a_stand_in_base(tmp_path):
    """A tiny benchmark on a base folder in train.py's layout (config.json + model.safetensors): a row of
    the table per task count, the same rows in --json, with every contender's tokens/s, and a PNG."""
    base = tmp_path / "base"
    hf_model(vocab_size=211, n_positions=64, n_embd=48, n_layer=2, n_head=4).save_pretrained(base)
    (base / "generation_config.json").unlink(missing_ok=True)  # train.py writes none
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    p = run_bench_bank(f"--init_from={base}", "--tasks=1,2", "--rows=4", "--new=2", "--repeats=1", "--device=cpu",
                   f"--json={out_json}", f"--png={out_png}")
    assert p.returncode == 0, p.stderr
    header = p.stdout.splitlines()[0]
    assert header.startswith(f"base: {base} (2 layers, 48 wide, 4 heads, vocabulary 211") and "device cpu" in header
    rows = [line.split() for line in p.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"] and all(len(r) == 17 for r in rows), p.stdout  # 5 columns in KiB
    result = json.loads(out_json.read_text())
    assert [r["tasks"] for r in result["rows"]] == [1, 2]
    for r, printed in zip(result["rows"], rows):
        assert set(r["tokens_per_s"]) == {"bank", "peft", "merged", "base"} and min(r["tokens_per_s"].values()) > 0
        assert f"{r['tokens_per_s']['bank']:.0f}" == printed[1]
        assert r["same_tokens"] == {"peft": True, "merged": True}  # the same tokens from every way
    assert result["settings"]["base"] == str(base) and result["settings"]["rows"] == 4
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bank_waits_for_the_gpu_before_each_clock(monkeypatch):
    """On CUDA (emulated: torch.cuda's calls recorded) the clock is read only after synchronize(), on
    both sides of the work, and the peak reported is the memory allocated beyond what was there before."""
    from tools import bench_bank
    events, allocated = [], {"now": 100}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 350)
    monkeypatch.setattr(bench_bank.time, "perf_counter", lambda: events.append("clock") or 0.0)
    seconds, peak = bench_bank.timed(lambda: events.append("work"), "cuda:0")
    assert events == ["reset", "synchronize", "clock", "work", "synchronize", "clock"]
    assert (seconds, peak) == (0.0, 250)
    events.clear()
    assert bench_bank.timed(lambda: events.append("work"), "cpu")[1] is None and "synchronize" not in events


@pytest.mark.parametrize("args, phrase", [(["--tasks=1,0"], "--tasks must be whole numbers in [1, 64]"),
                                          (["--rows=0"], "--rows must be a whole number in [1, 1,024]"),
                                          (["--tasks=8", "--rows=4"], "--rows 4 is fewer than 8 tasks"),
                                          (["--init_from=no/such/folder"], "--init_from no/such/folder is not a folder"),
                                          (["--new=200"], "more than the base's 128 positions")])
def test_bench_bank_refuses_a_bad_option_in_one_line(args, phrase):
    p = run_bench_bank(*args)  # refused before torch loads: a fraction of a second each
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: ") and phrase in p.stderr, p.stderr


def test_greedy_generation_of_a_mixed_batch(adapters):
    model = mixed_model(adapters)
    names = ["parse", "e2e", "poems", "parse", "e2e"]
    idx = torch.randint(0, 64, (len(names), 6), generator=torch.Generator().manual_seed(4))
    with bank.tasks(model, names):
        out = model.generate(idx, 12, temperature=0)
    singles = {n: alone(p).generate(idx, 12, temperature=0) for n, p in adapters.items()}
    for i, n in enumerate(names):
        assert out[i].tolist() == singles[n][i].tolist()
    assert len({tuple(singles[n][0].tolist()) for n in singles}) == 3  # the tasks write different tokens


def test_beam_search_of_a_mixed_batch(adapters):
    model = mixed_model(adapters)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (4 + k % 3,), generator=g).tolist() for k in range(6)]  # left-padded
    names = ["e2e", "poems", "parse", "parse", "e2e", "poems"]
    kw = dict(beam_size=3, max_new_tokens=8, eos_token=9)
    with bank.tasks(model, names):
        mixed = ev.beam_search_batch(model, prompts, **kw)
    singles = {n: alone(p) for n, p in adapters.items()}
    for p, n, got in zip(prompts, names, mixed):
        assert got == ev.beam_search_batch(singles[n], [p], **kw)[0]


def test_parts_of_a_fused_map(tmp_path):
    """transformers' GPT-2: q and v are parts of c_attn (rows), wrapped twice; each row gets its task."""
    cfg = dict(preset="sharea", r=4, targets=("c_attn.q", "c_attn.v"), split={"c_attn": ("q", "k", "v")})
    paths, A = {}, None
    for i, name in enumerate("abc"):
        m = hf_model()
        sharelora.add_adapters(m, sharelora.AdapterConfig(**cfg, spec=None if A is None else SPECS["sharea"]))
        with torch.no_grad():
            for key, p in sharelora.adapter_state_dict(m).items():
                p.copy_(A[key] if A is not None and key.endswith("lora_A") else torch.randn(p.shape) * 0.3)
        A = A or {k: t.detach().clone() for k, t in sharelora.adapter_state_dict(m).items() if k.endswith("lora_A")}
        paths[name] = tmp_path / f"{name}.safetensors"
        sharelora.save_adapter(m, paths[name], base="hf")
    model = bank.attach(hf_model(), bank.Bank.build(paths))
    x = torch.randint(0, 211, (3, 5))
    with bank.tasks(model, ["c", "a", "b"]):
        mixed = model(x).logits
    for i, n in enumerate("cab"):
        single = sharelora.load_adapter(hf_model(), paths[n])(x).logits
        torch.testing.assert_close(mixed[i], single[i], rtol=1e-5, atol=1e-5)


def test_command_line(adapters, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "bank.py"), *map(str, a)], capture_output=True, text=True)
    out = tmp_path / "cli.safetensors"
    p = run("build", out, f"e2e={adapters['e2e']}", f"parse={adapters['parse']}")
    assert p.returncode == 0 and "e2e" in p.stdout and "shared A" in p.stdout, p.stderr
    assert run("add", out, f"poems={adapters['poems']}").returncode == 0
    assert run("remove", out, "e2e").returncode == 0
    assert bank.Bank.read(out).names == ["parse", "poems"]
    p = run("add", out, f"again={adapters['parse']}", "broken")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "NAME=ADAPTER_FILE" in p.stderr
    p = run("export", out, "e2e", tmp_path / "e.safetensors")
    assert p.returncode == 2 and "no task 'e2e'" in p.stderr and "Traceback" not in p.stderr


@pytest.fixture
def served(tmp_path):
    """A bank of three tasks on a tiny base over GPT-2's vocabulary, saved as train.py would leave it:
    -> (bank file, {task: adapter file})."""
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, block_size=64)).save_pretrained(tmp_path / "base")
    make = lambda: GPT.from_pretrained(str(tmp_path / "base")).eval()
    first = train_like("sharea", 0, make=make)
    A = {k: t for k, t in sharelora.adapter_state_dict(first).items() if k.endswith("lora_A")}
    files = {}
    for i, name in enumerate(["one", "two", "three"]):
        files[name] = tmp_path / name / "adapter.safetensors"
        files[name].parent.mkdir()
        sharelora.save_adapter(first if i == 0 else train_like("sharea", i, A_from=A, make=make), files[name],
                               base="../base")  # as train.py names a local base: relative to the run's folder
    (tmp_path / "served").mkdir()
    bank.Bank.build(files).save(tmp_path / "served" / "bank.safetensors")
    return tmp_path / "served" / "bank.safetensors", files


def test_sample_py_takes_a_bank_and_several_tasks(served, capsys):
    """sample.py --bank --tasks: each task's greedy text in the mixed batch is its text alone (--adapter)."""
    import sample
    path, files = served
    common = ["--start=ROMEO:", "--temperature=0", "--max_new_tokens=8", "--device=cpu", "--dtype=float32"]
    sample.main([f"--bank={path}", "--tasks=three,one", "--num_samples=2", *common])
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("]")[0] for line in lines] == ["[three", "[three", "[one", "[one"]
    alone = {}
    for name in ("one", "three"):
        sample.main([f"--adapter={files[name]}", "--no_merge", *common])
        alone[name] = capsys.readouterr().out.strip()
    assert lines[0] == f"[three] {alone['three']}" and lines[2] == f"[one] {alone['one']}"
    assert alone["one"] != alone["three"]
    with pytest.raises(SystemExit) as e:
        sample.main([f"--bank={path}", "--tasks=four", *common])
    assert e.value.code == 2 and "no task 'four'" in capsys.readouterr().err


def refs_folder(tmp_path, groups=None, name="e2e"):
    """A data folder evaluate_e2e.py reads (groups: test_evaluate_e2e's MRs and references unless
    given), meta.json last."""
    from test_evaluate_e2e import GROUPS
    data = tmp_path / name
    data.mkdir()
    (data / "test_refs.json").write_text(json.dumps(groups or GROUPS))
    (data / "meta.json").write_text(json.dumps({"kind": "examples", "separator": " ||"}))  # prepare.py's, last
    return data


@pytest.mark.parametrize("beam_size", [1, 3])
def test_evaluate_e2e_takes_a_bank_and_several_tasks(served, tmp_path, beam_size, capsys):
    """evaluate_e2e.py --bank --tasks: each task's predictions, decoded in mixed batches, are its own alone,
    on its own prompts (NAME=DATA_DIR; a bare NAME reads --data_dir)."""
    from test_evaluate_e2e import GROUPS
    path, files = served
    data = refs_folder(tmp_path)
    reversed_groups = [{"mr": ref, "refs": [g["mr"]]} for g in GROUPS for ref in g["refs"][:1]]  # as data/e2e_parse
    parse = refs_folder(tmp_path, reversed_groups, "e2e_parse")
    common = ["--beam_size", str(beam_size), "--max_new_tokens", "6", "--device", "cpu", "--dtype", "float32"]
    ev.main(["--bank", str(path), "--tasks", f"two,three={parse}", "--batch_size", "4", "--data_dir", str(data), *common])
    printed = capsys.readouterr().out  # a task's inputs are its prompts: a parsing task's are sentences, not MRs
    assert all(f"test ({name}): {len(GROUPS)} prompts," in printed for name in ("two", "three")), printed
    for name, folder, groups in (("two", data, GROUPS), ("three", parse, reversed_groups)):
        ev.main(["--adapter", str(files[name]), "--results_dir", str(tmp_path / f"alone_{name}"),
                 "--data_dir", str(folder), *common])
        mixed = path.parent / "e2e_test" / name
        assert (mixed / "predictions.txt").read_text() == (tmp_path / f"alone_{name}" / "predictions.txt").read_text()
        assert (mixed / "references.txt").read_text().split("\n\n")[0].split("\n")[0] == groups[0]["refs"][0]
        scores = json.loads((mixed / "scores.json").read_text())
        assert scores["task"] == name and scores["data_dir"] == str(folder) and scores["mrs"] == len(groups)
    assert "slot_f1" in scores and "slot_f1" not in json.loads((path.parent / "e2e_test" / "two" / "scores.json").read_text())
    assert not (path.parent / "e2e_test" / "one").exists()
    texts = [(path.parent / "e2e_test" / n / "predictions.txt").read_text() for n in ("two", "three")]
    assert texts[0] != texts[1]  # the tasks write different texts
    with pytest.raises(UserError, match="NAME=DATA_DIR"):  # a folder left empty: one sentence (exit 2 from the shell)
        ev.main(["--bank", str(path), "--tasks", "two,three=", *common])
    with pytest.raises(UserError, match=r"no prepared data in .*nowhere .*: prepare it for --tasks' task three"):  # not --data_dir's hint
        ev.main(["--bank", str(path), "--tasks", f"two,three={tmp_path / 'nowhere'}", "--data_dir", str(data), *common])
    assert "(from two/adapter.safetensors)" in bank.Bank.read(path).summary()  # its folder says which run it was


def test_joint_training_of_three_tasks_around_one_A(tmp_path):
    """fresh + attach(trainable) + collect: three tasks (task t: always answer token 10 + t) trained in
    mixed batches, one A for all; each task learns its own answer, and exported alone it computes what
    it did in the mixed model."""
    torch.manual_seed(0)
    model = tiny_gpt()
    config = sharelora.AdapterConfig(preset="sharea", r=4, targets=("q", "v"))
    b = bank.fresh(model, config, ["t0", "t1", "t2"])
    bank.attach(model, b, trainable=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [p.shape for p in trainable].count((32, 4)) == 12  # 2 layers x (q, v) x 3 tasks: each task's own B
    assert [p.shape for p in trainable].count((4, 32)) == 2 and len(trainable) == 14  # the q and v A's
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    g = torch.Generator().manual_seed(0)
    names = ["t0", "t1", "t2"] * 4

    def loss_of(x):
        targets = (10 + torch.tensor([int(n[1]) for n in names]))[:, None].expand_as(x)
        with bank.tasks(model, names):
            return torch.nn.functional.cross_entropy(model(x)[0].transpose(1, 2), targets, reduction="none").mean(1)

    first = None
    for step in range(60):
        loss = loss_of(torch.randint(0, 64, (len(names), 8), generator=g))
        first = loss.detach() if first is None else first
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    last = loss.detach()
    for t in range(3):  # every task's rows learned
        assert last[t::3].mean() < 0.5 * first[t::3].mean()
    bank.collect(model, b)
    b.save(tmp_path / "joint.safetensors")
    x = torch.randint(0, 64, (3, 8), generator=g)
    with bank.tasks(model, ["t0", "t1", "t2"]), torch.no_grad():
        mixed = model(x)[0]
    assert mixed.argmax(-1).tolist() == [[10 + t] * 8 for t in range(3)]  # each row answers as its task
    for i, name in enumerate(["t0", "t1", "t2"]):
        bank.Bank.read(tmp_path / "joint.safetensors").export(name, tmp_path / f"{name}.safetensors")
        torch.testing.assert_close(alone(tmp_path / f"{name}.safetensors")(x[i:i + 1])[0][0], mixed[i],
                                   rtol=1e-4, atol=1e-4)


def test_joint_training_refuses_v_before_changing_the_model():
    model = tiny_gpt()
    b = bank.fresh(model, sharelora.AdapterConfig(preset="tied", r=4, targets=("q", "v")), ["a", "b"])
    with pytest.raises(ValueError, match="cannot train v"):
        bank.attach(model, b, trainable=True)
    assert not sharelora.adapted_layers(model)
    bank.attach(model, b)  # for inference, v folds into B


def test_train_py_trains_tasks_jointly(data, tmp_path, monkeypatch):
    """train.py --tasks with two tiny folders (E2E and E2E reversed) on a tiny base that knows only
    Shakespeare: one shared A, one B per task; both
    tasks' validation losses are logged and fall; the bank saved with the checkpoint loads, and each task
    exported alone runs and computes what the bank computes for it; a run stopped halfway resumes exactly."""
    from conftest import TINY, run
    import train
    folders = {}
    for name, reverse in (("e2e", ()), ("parse", ("--reverse",))):
        folders[name] = tmp_path / name
        run("data/e2e/prepare.py", "--out", folders[name], "--limit", 120, *reverse)
    base, out = tmp_path / "base", tmp_path / "joint"
    train.train(train.parse_args(TINY + ["--adapter=none", f"--data_dir={data['shakespeare']}", f"--out_dir={base}",
                                         "--max_iters=30", "--eval_interval=30", "--learning_rate=1e-2"]))
    tasks = f"--tasks=e2e={folders['e2e']},parse={folders['parse']}"
    joint = [f"--init_from={base}", *TINY[5:], "--adapter=sharea", "--r=8", "--targets=q,v,mlp.c_fc", tasks,
             "--eval_interval=12", "--lr_decay_iters=24", "--learning_rate=3e-2", "--adapter_dropout=0.1"]
    losses = train.train(train.parse_args(joint + [f"--out_dir={out}", "--max_iters=24"]))
    assert len(losses) == 24
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "val_loss" in r]
    assert [e["step"] for e in evals] == [0, 12, 24]
    for name in ("e2e", "parse"):
        assert evals[-1][f"val_loss_{name}"] < evals[0][f"val_loss_{name}"] - 0.2, evals  # measured: -0.43 (e2e), -1.47 (parse)
    assert evals[0]["val_loss_e2e"] != evals[0]["val_loss_parse"]  # each on its own data
    assert evals[-1]["val_loss"] == pytest.approx((evals[-1]["val_loss_e2e"] + evals[-1]["val_loss_parse"]) / 2,
                                                  abs=1e-4)
    b = bank.Bank.read(out / bank.BANK_FILE)
    assert b.names == ["e2e", "parse"]
    assert not torch.equal(*(b.tasks[n]["tensors"]["transformer.h.0.attn.q.lora_B"] for n in b.names))
    mixed, _ = bank.load(out / bank.BANK_FILE, device="cpu", dtype="float32")
    x = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(0))
    with bank.tasks(mixed, ["parse", "e2e"]), torch.no_grad():
        both = mixed(x)[0]
    for i, name in enumerate(["parse", "e2e"]):
        b.export(name, tmp_path / f"{name}.safetensors")
        model = sharelora.load_adapter(GPT.from_pretrained(str(base)), tmp_path / f"{name}.safetensors").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x[i:i + 1])[0][0], both[i], rtol=1e-4, atol=1e-4)
    # stopped at step 10 and resumed, from another current folder, the run is the same run bit for bit:
    # its losses (dropout included), and every tensor of the bank (the shared A, each task's B)
    half = tmp_path / "half"
    first = train.train(train.parse_args(joint + [f"--out_dir={half}", "--max_iters=10"]))
    monkeypatch.chdir(tmp_path)
    rest = train.train(train.parse_args(["--init_from=resume", f"--out_dir={half}", "--max_iters=24"]))
    assert first + rest == losses
    again = bank.Bank.read(half / bank.BANK_FILE)
    assert again.names == b.names and all(torch.equal(again.shared[k], t) for k, t in b.shared.items())
    assert all(torch.equal(again.tasks[n]["tensors"][k], t) for n in b.names for k, t in b.tasks[n]["tensors"].items())
    # a new task trained around that bank's A, frozen, joins the bank: trained jointly (here alone) or alone
    frozen = [o for o in joint if o != tasks] + ["--spec=A=shared/frozen B=layer", "--max_iters=2",
                                                 f"--init_adapter={out / bank.BANK_FILE}"]
    train.train(train.parse_args(frozen + [f"--tasks=more={folders['parse']}", f"--out_dir={tmp_path / 'more'}"]))
    bank.Bank.read(tmp_path / "more" / bank.BANK_FILE).export("more", tmp_path / "more.safetensors")
    train.train(train.parse_args(frozen + [f"--data_dir={folders['parse']}", f"--out_dir={tmp_path / 'alone'}"]))
    b.add("more", tmp_path / "more.safetensors").add("alone", tmp_path / "alone" / "adapter.safetensors")
    assert b.names == ["e2e", "parse", "more", "alone"]
    # tasks drawn by their sizes: stopped and resumed, the same run too
    mix = [o for o in joint if o != "--adapter_dropout=0.1"] + ["--task_mix=proportional"]
    drawn = train.train(train.parse_args(mix + [f"--out_dir={tmp_path / 'drawn'}", "--max_iters=8"]))
    part = train.train(train.parse_args(mix + [f"--out_dir={tmp_path / 'part'}", "--max_iters=3"]))
    assert part + train.train(train.parse_args(["--init_from=resume", f"--out_dir={tmp_path / 'part'}",
                                                "--max_iters=8"])) == drawn
    p = run("train.py", f"--init_from={base}", *TINY[5:], "--task_mix=proportional", f"--out_dir={tmp_path / 'y'}",
            check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "task_mix" in p.stderr, p.stderr
    # other adapters are refused before anything loads
    p = run("train.py", f"--init_from={base}", *TINY[5:], "--adapter=lora", tasks, f"--out_dir={tmp_path / 'x'}",
            check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "one shared A" in p.stderr, p.stderr




def test_shareqkv_bank_computes_a_x_once_per_layer(monkeypatch, tmp_path):
    """Shareqkv (one A for q, k and v of every layer): a mixed batch computes A x once per layer, for
    all three maps and every task, with each row's outputs those of its task alone; the layers' memos
    are empty once the call is over."""
    def task(seed, A=None):
        model = tiny_gpt()
        spec = "A=shared B=layer share=all" if A is None else "A=shared/frozen B=layer share=all"
        sharelora.add_adapters(model, sharelora.AdapterConfig(spec=spec, r=4, targets=("q", "k", "v"), seed=0))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, p in sharelora.adapter_state_dict(model).items():
                p.copy_(A[key] if A is not None and key.endswith("lora_A") else torch.randn(p.shape, generator=g) * 0.5)
        return model.eval()
    first = task(0)
    A = {k: t for k, t in sharelora.adapter_state_dict(first).items() if k.endswith("lora_A")}
    models = {"a": first, "b": task(1, A), "c": task(2, A)}
    for n, m in models.items():
        sharelora.save_adapter(m, tmp_path / f"{n}.safetensors", base="tiny")
    model = bank.attach(tiny_gpt(), bank.Bank.build({n: tmp_path / f"{n}.safetensors" for n in models}))
    shared = {id(m.lora_A) for m in model.modules() if isinstance(m, bank.MixedLinear)}
    assert len(shared) == 1
    names = ["c", "a", "b", "a"]
    x = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(5))
    products, real = [], torch.nn.functional.linear
    monkeypatch.setattr(sharelora.F, "linear", lambda i, w, *a: (products.append(w.shape == (4, 32)), real(i, w, *a))[1])
    with bank.tasks(model, names), torch.no_grad():
        mixed = model(x)[0]
    monkeypatch.undo()
    assert sum(products) == 2  # 2 layers, one A x each (three per layer without the memo)
    assert all(not m.memo for m in model.modules() if isinstance(m, bank.MixedLinear))
    for i, n in enumerate(names):
        with torch.no_grad():
            torch.testing.assert_close(mixed[i], models[n].eval()(x[i:i + 1])[0][0], rtol=1e-4, atol=1e-4)


def test_joint_training_applies_adapter_dropout():
    """A trainable bank's maps drop the adapter's input as AdaptedLinear does: in training only."""
    config = sharelora.AdapterConfig(preset="sharea", r=4, targets=("q", "v"), dropout=0.5)
    model = tiny_gpt()
    b = bank.fresh(model, config, ["a", "b"])
    bank.attach(model, b, trainable=True)
    with torch.no_grad():
        for key, p in model.bank_tensors.items():
            p.normal_()
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model.task_rows.set(1)
    model.train()
    torch.manual_seed(0)
    one, two = model(x)[0], model(x)[0]
    assert not torch.allclose(one, two)  # two masks
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_gathered_rows_follow_the_tasks_and_b(adapters):
    """Each row's B is gathered once per set of tasks and reused (every decoding step), never stale:
    a change to B inside the same tasks shows at once, and nothing is kept after them."""
    model = mixed_model(adapters)
    x = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    with bank.tasks(model, ["parse", "e2e", "poems"]), torch.no_grad():
        first = model(x)[0]
        assert model.task_rows.gathered  # kept for the next call
        torch.testing.assert_close(model(x)[0], first, rtol=0, atol=0)
        for m in model.modules():
            if isinstance(m, bank.MixedLinear):
                m.lora_B.mul_(2)
        assert not torch.allclose(model(x)[0], first, atol=1e-4)
    assert model.task_rows.gathered == {}


class _Recorded:
    """A stand-in for data.loader.Batches: `size` training tokens; get() returns its calls."""
    def __init__(self, name, size):
        self.data_dir, self.tokens = name, {"train": [0] * size}

    def get(self, split, i):
        return (self.data_dir, split, i)


@pytest.mark.parametrize("mix", ["round_robin", "proportional"])
def test_joint_batches_take_turns_or_draw_by_size(mix):
    """Each task's batches are its own 0, 1, 2, ... in order, whatever the mix; proportional draws the
    tasks by their training tokens (3:1 here), the same schedule on every run, resumed or not."""
    rows = bank.TaskRows(["big", "small"])
    make = lambda: bank.JointBatches({"big": _Recorded("big", 3000), "small": _Recorded("small", 1000)},
                                     grad_accum=2, mix=mix, seed=7)
    joint = make()
    joint.steer(rows)
    got = [joint.get("train", i) for i in range(8000)]
    for name in ("big", "small"):
        mine = [i for n, _, i in got if n == name]
        assert mine == list(range(len(mine)))  # its own batches, none skipped or repeated
    share = sum(n == "big" for n, _, _ in got) / len(got)
    assert share == (0.5 if mix == "round_robin" else pytest.approx(0.75, abs=0.03))
    assert all(got[2 * s][0] == got[2 * s + 1][0] for s in range(4000))  # micro-batches of a step: one task
    late = make()
    late.steer(rows)
    assert [late.get("train", i) for i in range(5000, 5010)] == got[5000:5010]  # a resumed run: the same
    assert rows.index in (0, 1)


def test_a_step_of_one_task_leaves_the_others_alone():
    """Joint training: each task's B and u are Parameters of their own, so a step on task 0's batch
    leaves task 1's exactly as they were, even with weight decay and the momentum of task 1's own
    earlier step (a stacked tensor would take both on every step)."""
    model = tiny_gpt()
    b = bank.fresh(model, sharelora.AdapterConfig(preset="sharea", spec="A=shared B=layer u=layer", r=4,
                                                  targets=("q", "v")), ["a", "b"])
    bank.attach(model, b, trainable=True)
    A0 = {k: t.clone() for k, t in b.shared.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    for task in (1, 0, 0, 0):
        if task == 0 and "kept" not in locals():
            kept = {k: p.detach().clone() for k, p in model.bank_tensors.items() if k.startswith("tasks.b.")}
            assert any(t.abs().sum() > 0 for t in kept.values())  # task b has trained
        model.task_rows.set(task)
        opt.zero_grad()
        model(x, x)[1].backward()
        opt.step()
    after = {k: p.detach() for k, p in model.bank_tensors.items() if k.startswith("tasks.b.")}
    assert kept.keys() == after.keys() and len(kept) == 8  # 2 layers x (q, v) x (B, u)
    assert all(torch.equal(kept[k], after[k]) for k in kept)
    assert all(not torch.equal(A0[k], model.bank_tensors[k].detach()) for k in A0)  # the shared A trained on


def test_commands_that_would_lose_or_hide_something_are_refused(adapters, tmp_path):
    """Found by an outside tester: export over an existing file (the bank itself, another run's adapter),
    a name given twice, remove without names: each one line, exit 2, every file as it was."""
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "bank.py"), *map(str, a)], capture_output=True, text=True)
    out = tmp_path / "tasks.safetensors"
    assert run("build", out, f"e2e={adapters['e2e']}", f"parse={adapters['parse']}").returncode == 0
    before = {p: p.read_bytes() for p in (out, adapters["e2e"])}
    for args in [("export", out, "e2e", out), ("export", out, "parse", adapters["e2e"]),
                 ("export", out, "e2e", tmp_path / "nowhere" / "x.safetensors"), ("export", out, "e2e", tmp_path),
                 ("build", tmp_path / "new.safetensors", f"e2e={adapters['e2e']}", f"e2e={adapters['parse']}"),
                 ("add", out, f"x={adapters['poems']}", f"x={adapters['poems']}"), ("remove", out),
                 ("build", tmp_path, f"e2e={adapters['e2e']}")]:
        p = run(*args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (args, p.stderr)
    assert all(p.read_bytes() == b for p, b in before.items()) and not (tmp_path / "new.safetensors").exists()


def test_every_flipped_byte_of_a_bank_header_is_refused(adapters, tmp_path):
    """A bank's metadata is checksummed as its tensors are fingerprinted: a flip anywhere in the header
    that still reads as JSON (alpha 16.0 -> 36.0, a shape, the base's path) is refused too."""
    import struct
    path = tmp_path / "tasks.safetensors"
    bank.Bank.build(adapters).save(path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    g = torch.Generator().manual_seed(0)
    spots = sorted(set(torch.randint(8, 8 + n, (300,), generator=g).tolist()))
    text = data[8:8 + n].decode()
    alpha = text.index("alpha")
    spots += [8 + text.index("1", alpha), 8 + text.index("32", text.index("shapes"))]  # digits that stay valid JSON
    for i in spots:
        for bit in (0x01, 0x10):
            damaged = tmp_path / "damaged.safetensors"
            damaged.write_bytes(data[:i] + bytes([data[i] ^ bit]) + data[i + 1:])
            try:
                b = bank.Bank.read(damaged)
            except ValueError:
                continue
            raise AssertionError(f"byte {i} ^ {bit:#x} ({chr(data[i])!r}) was read: {b.summary()}")


def test_a_bank_on_another_base_is_refused(adapters):
    """Its maps' shapes are the bank's record of its base: another one is refused before any batch."""
    other = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=64, block_size=64))
    with pytest.raises(ValueError, match="not those the bank's tasks were trained on"):
        bank.attach(other, bank.Bank.build(adapters))


def test_a_moved_bank_names_init_from_and_runs_with_it(served, tmp_path):
    """A bank copied away from its base: refused in one sentence that says to pass the base, and with
    --init_from evaluated as where it was made."""
    import shutil
    import runtime
    path, _ = served
    moved = tmp_path / "elsewhere" / "deep" / "bank.safetensors"
    moved.parent.mkdir(parents=True)
    shutil.copy(path, moved)
    data = refs_folder(tmp_path)
    common = ["--data_dir", str(data), "--beam_size", "1", "--max_new_tokens", "4", "--device", "cpu", "--dtype", "float32"]
    with pytest.raises(runtime.UserError, match="pass the base with --init_from"):
        ev.main(["--bank", str(moved), *common])
    ev.main(["--bank", str(moved), "--init_from", str(tmp_path / "base"), *common])
    ev.main(["--bank", str(path), *common])
    for name in ("one", "two", "three"):
        assert (moved.parent / "e2e_test" / name / "predictions.txt").read_text() == \
            (path.parent / "e2e_test" / name / "predictions.txt").read_text()
