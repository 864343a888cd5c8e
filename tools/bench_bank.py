"""
Serving a batch that mixes tasks: bank.py's mixed batch (A x once, each row's B) against PEFT's mixed
batch (adapter_names=, every present adapter's A and B on its rows) and against each task's merged
model run on its rows in turn, on one transformers GPT-2-shaped base with random weights.

    python tools/bench_bank.py                 # the table of docs/bank.md (3 min 44 s on 2 busy cores)
    python tools/bench_bank.py --products      # the two ways of applying each row's B (bank.py's comment)

Every contender runs the same generation loop (transformers' generate, greedy, KV cache) on the same
prompts; before timing, the bank's tokens are checked equal to PEFT's (same adapters, exported with
sharelora.export_peft) and to each task's merged model. The bound is the base alone on the whole batch:
its own products, which no adapter method can beat. Memory: the adapter bytes each way holds in memory
and in files, for N tasks.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import bank  # noqa: E402
import sharelora  # noqa: E402

# GPT-2's width and heads (768, 12) with 4 of its 12 layers and a smaller vocabulary, so that a run fits in
# about a minute on 2 CPU cores; the adapter: ShareA, r = 8, on attn.c_attn and attn.c_proj (maps that
# PEFT adapts alike: no fused-part rows, the same products on both sides).
BASE = dict(n_layer=4, n_head=12, n_embd=768, vocab_size=8192, n_positions=128)
ADAPTER = dict(preset="sharea", r=8, alpha=16, targets=("attn.c_attn", "attn.c_proj"))


def base_model(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(**BASE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                        eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def task_files(n, folder):
    """n adapter files around one A (task k > 0 as train.py's init_adapter with A frozen makes them),
    random B's, as bank tasks and as PEFT folders. -> ([adapter files], [PEFT folders])."""
    files, pefts, A = [], [], None
    for k in range(n):
        model = base_model()
        spec = None if A is None else "A=shared/frozen B=layer"
        sharelora.add_adapters(model, sharelora.AdapterConfig(**ADAPTER, spec=spec, seed=0))
        g = torch.Generator().manual_seed(k)
        for key, p in sharelora.adapter_state_dict(model).items():
            p.copy_(A[key] if A is not None and key.endswith("lora_A") else torch.randn(p.shape, generator=g) * 0.02)
        A = A or {key: t.clone() for key, t in sharelora.adapter_state_dict(model).items() if key.endswith("lora_A")}
        files.append(os.path.join(folder, f"task{k}.safetensors"))
        sharelora.save_adapter(model, files[-1], base="random-gpt2-4l")
        pefts.append(os.path.join(folder, f"peft{k}"))
        sharelora.export_peft(model, pefts[-1])
    return files, pefts


def contenders(n, folder):
    """{name: (model, generate(prompts, tasks) -> tokens)} for n tasks."""
    from peft import PeftModel
    files, pefts = task_files(n, folder)
    names = [f"t{k}" for k in range(n)]
    ours = bank.attach(base_model(), bank.Bank.build(dict(zip(names, files))))
    peft = PeftModel.from_pretrained(base_model(), pefts[0], adapter_name=names[0])
    for name, path in zip(names[1:], pefts[1:]):
        peft.load_adapter(path, adapter_name=name)
    peft.eval()
    merged = []
    for path in files:
        m = sharelora.load_adapter(base_model(), path)
        merged.append(sharelora.merge(m))
    plain = base_model()
    kw = dict(do_sample=False, use_cache=True)

    def run_bank(idx, new, tasks):
        with bank.tasks(ours, tasks):
            return ours.generate(idx, max_new_tokens=new, min_new_tokens=new, **kw)

    def run_peft(idx, new, tasks):
        return peft.generate(input_ids=idx, max_new_tokens=new, min_new_tokens=new,
                             adapter_names=[names[t] for t in tasks], **kw)

    def run_merged(idx, new, tasks):  # each task's merged model on its own rows, in turn
        out = torch.empty(idx.size(0), idx.size(1) + new, dtype=torch.long)
        index = torch.tensor(tasks)
        for t in index.unique().tolist():
            rows = (index == t).nonzero().squeeze(1)
            out[rows] = merged[t].generate(idx[rows], max_new_tokens=new, min_new_tokens=new, **kw)
        return out

    def run_base(idx, new, tasks):
        return plain.generate(idx, max_new_tokens=new, min_new_tokens=new, **kw)

    return {"bank": run_bank, "peft": run_peft, "merged": run_merged, "base": run_base}, (files, pefts, ours, peft)


def adapter_bytes(ours, peft, files, pefts, folder):
    """In memory (float32 adapter tensors) and on disk, the bank against N separate adapters."""
    in_bank = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if ".lora_" in n)
    in_peft = sum(p.numel() * p.element_size() for n, p in peft.named_parameters() if "lora_" in n)
    path = os.path.join(folder, "bank.safetensors")
    bank.Bank.build({f"t{k}": f for k, f in enumerate(files)}).save(path)
    on_disk = lambda paths: sum(os.path.getsize(os.path.join(p, "adapter_model.safetensors")) if os.path.isdir(p)
                                else os.path.getsize(p) for p in paths)
    return {"memory bank": in_bank, "memory peft": in_peft, "file bank": os.path.getsize(path),
            "files sharea": on_disk(files), "files peft": on_disk(pefts)}


def measure(n, rows, prompt, new, repeats):
    with tempfile.TemporaryDirectory() as folder:
        runs, (files, pefts, ours, peft) = contenders(n, folder)
        idx = torch.randint(1, BASE["vocab_size"], (rows, prompt), generator=torch.Generator().manual_seed(1))
        tasks = [i % n for i in range(rows)]
        reference = runs["bank"](idx, new, tasks)
        for name in ("peft", "merged"):
            same = torch.equal(runs[name](idx, new, tasks), reference)
            if not same:
                print(f"note: {name}'s tokens differ from the bank's at {n} tasks", file=sys.stderr)
        seconds = {name: [] for name in runs}
        for _ in range(repeats):  # in turns, so that a change in the machine's load hits every contender
            for name, run in runs.items():
                start = time.perf_counter()
                run(idx, new, tasks)
                seconds[name].append(time.perf_counter() - start)
        memory = adapter_bytes(ours, peft, files, pefts, folder)
    return {name: rows * new / statistics.median(s) for name, s in seconds.items()}, memory


def per_task_product(h, B, index):
    """The way bank.py does not take: one product per task present, on its rows (as PEFT's mixed batch)."""
    out = h.new_empty(h.shape[:-1] + (B.size(1),))
    for t in index.unique().tolist():
        rows = (index == t).nonzero().squeeze(1)
        out.index_copy_(0, rows, torch.nn.functional.linear(h.index_select(0, rows), B[t]))
    return out


def gathered_product(h, B, index):
    """bank.MixedLinear's way: every row's B gathered, one batched product."""
    return torch.bmm(h, B[index].transpose(1, 2))


def products(rows=64, d_out=768, r=8, n_tasks=(2, 8, 16), positions=(1, 32), repeats=200):
    """Microseconds per call (the median of 5 timings) of the two ways of applying each row's B_t."""
    g = torch.Generator().manual_seed(0)
    print(f"{rows} rows, d_out {d_out}, r {r}, torch threads {torch.get_num_threads()}: microseconds per map")
    print(f"{'tasks':>5} {'positions':>9} {'per task':>9} {'gathered':>9}")
    for tasks in n_tasks:
        B, index = torch.randn(tasks, d_out, r, generator=g), torch.arange(rows) % tasks
        for T in positions:
            h = torch.randn(rows, T, r, generator=g)
            us = [_median_us(lambda: f(h, B, index), max(repeats // T, 5)) for f in (per_task_product, gathered_product)]
            print(f"{tasks:>5} {T:>9} {us[0]:>9.0f} {us[1]:>9.0f}")


def _median_us(f, calls):
    f()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_bank.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="1,2,4,8,16", help="numbers of tasks mixed in the batch")
    p.add_argument("--rows", type=int, default=32, help="the batch: rows spread evenly over the tasks")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=16, help="new tokens per row (greedy)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--products", action="store_true", help="only the two per-row products")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.products:
        return products()
    print(f"base: {BASE}; adapter: {ADAPTER}; batch {args.rows} rows x ({args.prompt} prompt + {args.new} new) tokens, "
          f"greedy, KV cache; torch threads {torch.get_num_threads()}; tokens/s = new tokens / median seconds")
    print(f"{'tasks':>5} {'bank':>8} {'peft':>8} {'merged':>8} {'base':>8} {'bank/peft':>9} {'bank/base':>9} "
          f"{'memory bank':>12} {'memory peft':>12} {'bank file':>10} {'N files':>10} {'N peft':>10}")
    for n in map(int, args.tasks.split(",")):
        speed, mem = measure(n, args.rows, args.prompt, args.new, args.repeats)
        kb = lambda b: f"{b / 1024:,.0f} KiB"
        print(f"{n:>5} {speed['bank']:>8.0f} {speed['peft']:>8.0f} {speed['merged']:>8.0f} {speed['base']:>8.0f} "
              f"{speed['bank'] / speed['peft']:>8.2f}x {speed['bank'] / speed['base']:>8.2f}x {kb(mem['memory bank']):>12} "
              f"{kb(mem['memory peft']):>12} {kb(mem['file bank']):>10} {kb(mem['files sharea']):>10} "
              f"{kb(mem['files peft']):>10}", flush=True)


if __name__ == "__main__":
    main()
