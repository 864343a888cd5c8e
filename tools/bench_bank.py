"""
Serving a batch that mixes tasks: bank.py's mixed batch (A x once, each row's B) against PEFT's mixed
batch (adapter_names=, every present adapter's A and B on its rows) and against each task's merged
model run on its rows in turn, on one transformers GPT-2-shaped base (random weights, or a stand-in base).

    python tools/bench_bank.py --repeats=7     # the first table of docs/bank.md (2 min 43 s, 2 idle cores)
    python tools/bench_bank.py --products      # three ways of applying each row's B (bank.py's comment)
    python tools/bench_bank.py --device cuda --png bank.png --json bank.json    # on a GPU, with a figure
    python tools/bench_bank.py --init_from out-e2e-base     # a base train.py trained (config/e2e_base.py)
    python tools/bench_bank.py --tasks 1,2 --rows 4 --new 2 --repeats 1         # seconds: a smoke test
    python tools/bench_bank.py --threads 1     # a CPU other jobs share: 2 threads can wait for each other

Every contender runs the same generation loop (transformers' generate, greedy, KV cache) on the same
prompts, on the same device, in float32; before timing, each runs once and the bank's tokens are checked
equal to PEFT's (same adapters, exported with sharelora.export_peft) and to each task's merged model. The
bound is the base alone on the whole batch: its own products, which no adapter method can beat. Memory:
the adapter bytes each way holds in memory and in files, for N tasks; on CUDA also the memory each
contender's generation needs beyond the models (torch.cuda.max_memory_allocated).
"""
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import namedtuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.common import (TEXT, THREADS, Bound, Parser, check, check_record, committed_path, distinct_numbers,  # noqa: E402
                         quiet_ctrl_c, read_json_file, write_binary, write_json)
from data.common import run as run_early  # noqa: E402
from train_options import BOUNDS, MAX_TASKS  # noqa: E402

# GPT-2's width and heads (768, 12) with 4 of its 12 layers and a smaller vocabulary, so that a run fits in
# about a minute on 2 CPU cores; the adapter: ShareA, r = 8, on attn.c_attn and attn.c_proj (maps that
# PEFT adapts alike: no fused-part rows, the same products on both sides).
BASE = dict(n_layer=4, n_head=12, n_embd=768, vocab_size=8192, n_positions=128)
ADAPTER = dict(preset="sharea", r=8, alpha=16, targets=("attn.c_attn", "attn.c_proj"))
CONTENDERS = ("bank", "peft", "merged", "base")  # the order of the columns, of the turns, of the figure's lines


# ---- the command line, checked before torch loads -------------------------------------------------

TASK_COUNT = Bound(int, 1, MAX_TASKS)  # a bank's tasks
TASK_COUNTS = Bound(str, test=lambda v: distinct_numbers(v, TASK_COUNT) is not None,
                    what=f"whole numbers in [1, {MAX_TASKS}] separated by commas, each once, like 1,2,4,8")


def options(argv=None):
    p = Parser(prog="bench_bank.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=TASK_COUNTS, default="1,2,4,8,16",
                   help="numbers of tasks mixed in the batch, a row of the table each (default 1,2,4,8,16)")
    p.add_argument("--rows", type=Bound(int, 1, 1024), default=32, help="the batch: rows spread evenly over the tasks")
    p.add_argument("--prompt", type=Bound(int, 1, 2**16), default=16, help="prompt tokens per row")
    p.add_argument("--new", type=Bound(int, 1, 2**16), default=16, help="new tokens per row (greedy)")
    p.add_argument("--repeats", type=Bound(int, 1, 1000), default=3, help="timed rounds, the contenders taking turns")
    p.add_argument("--device", type=BOUNDS["device"], default="auto",
                   help="auto (default): a GPU if there is one, as tools/bench.py; cpu, cuda, cuda:N")
    p.add_argument("--threads", type=THREADS, help="torch.set_num_threads (default: torch's own); on a "
                   "busy machine 1 thread can be much faster than 2 that wait for each other")
    p.add_argument("--init_from", type=TEXT, help="a stand-in base instead of the random one: a folder with "
                   "config.json and model.safetensors, as train.py writes (e.g. out-e2e-base)")
    p.add_argument("--png", type=TEXT, help="also draw tokens/s against the number of tasks into this file (needs matplotlib)")
    p.add_argument("--json", type=TEXT, help="also write every measured row and the settings into this file")
    p.add_argument("--targets", type=TEXT, default=",".join(ADAPTER["targets"]),
                   help="the adapted maps, comma-separated (transformers GPT-2 names; default attn.c_attn,attn.c_proj)")
    p.add_argument("--products", action="store_true", help="only the three ways of the per-row product (on the CPU)")
    args = p.parse_args(argv)
    args.tasks = distinct_numbers(args.tasks, TASK_COUNT)
    args.targets = tuple(t.strip() for t in args.targets.split(","))
    # every task needs a row, or the batch would mix fewer tasks than the row of the table says
    check(args.rows >= max(args.tasks), f"--rows {args.rows} is fewer than {max(args.tasks)} tasks (--tasks): "
          "every task needs at least one row of the batch; raise --rows or lower --tasks")
    positions = stand_in_config(args.init_from)["n_positions"] if args.init_from else BASE["n_positions"]
    check(args.prompt + args.new <= positions, f"--prompt {args.prompt} + --new {args.new} tokens are more than the "
          f"base's {positions} positions: shorten one of them")
    for option, ending in (("png", ".png"), ("json", ".json")):
        path = getattr(args, option)
        if path is not None:  # checked now rather than after minutes of measuring
            check(path.endswith(ending) and not os.path.isdir(path),
                  f"--{option} {path} must be a file name ending in {ending}")
            check(not os.path.exists(path) or ours(path), f"--{option} {path} exists and is not a figure or table "
                  "that bench_bank.py wrote: choose another name (nothing is overwritten)")
            check(os.path.isdir(os.path.dirname(path) or "."),
                  f"--{option} {path}: its folder does not exist; create it first")
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--png needs matplotlib: pip install matplotlib (or leave out --png)")
    return args


def ours(path):
    """Whether path holds what an earlier run of this benchmark wrote (a PNG; a JSON of settings and
    rows), which a new run may replace."""
    with open(path, "rb") as f:
        head = f.read(8)
    if path.endswith(".png"):
        return head == b"\x89PNG\r\n\x1a\n"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError):
        return False
    return isinstance(data, dict) and {"settings", "rows"} <= data.keys()


def stand_in_folder(path):
    """Where a base folder's newest complete files are: train.py moves a new checkpoint's set into place
    from .committed (data.common.write_set), so a base still being trained is read from there meanwhile."""
    return os.path.dirname(committed_path(path, "model.safetensors"))


def stand_in_config(path):
    """config.json of a stand-in base folder, checked (torch-free, so a wrong folder shows at once)."""
    fix = "give a folder that train.py wrote for a base (python train.py config/e2e_base.py writes out-e2e-base)"
    check(os.path.isdir(path), f"--init_from {path} is not a folder: {fix}")
    folder = stand_in_folder(path)
    for name in ("config.json", "model.safetensors"):
        check(os.path.isfile(os.path.join(folder, name)), f"--init_from {path} has no {name}: {fix}")
    where = os.path.join(folder, "config.json")
    config = read_json_file(where, "model configuration", fix)
    check_record(config, {"n_positions": Bound(int, 1, 2**20), "vocab_size": Bound(int, 2, 2**20)}, where, fix,
                 required=("n_positions", "vocab_size"))
    check(config.get("model_type") == "gpt2",
          f"{where} is not a GPT-2 model (model_type {config.get('model_type')!r}): {fix}")
    return config


if __name__ == "__main__":
    quiet_ctrl_c()  # until runtime.run: Ctrl-C while torch loads ends quietly
    run_early(options, sys.argv[1:])  # a mistake in the options shows before the seconds torch takes to load

import torch  # noqa: E402

import bank  # noqa: E402
import runtime  # noqa: E402
import sharelora  # noqa: E402


# ---- the base: random weights in GPT-2's shape, or a stand-in base from a folder ---------------------

Base = namedtuple("Base", "make name description")  # make(): a fresh copy; name: recorded in the adapter files


def base_model(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(**BASE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                        eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def stand_in(path):
    """A base folder in the Hugging Face layout, loaded once: dropout off, eval mode, and no end-of-text
    token, so that every contender generates exactly --new tokens (as with the random base)."""
    import transformers
    transformers.logging.disable_progress_bar()  # a progress bar would break up the table's output
    transformers.logging.set_verbosity_error()  # the missing tensors are checked below, in one sentence
    fix = "give a folder that train.py wrote for a base, or train it again"
    try:
        model, loaded = transformers.GPT2LMHeadModel.from_pretrained(
            stand_in_folder(path), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, output_loading_info=True)
    except Exception as e:  # a damaged file: safetensors, transformers and torch each raise their own kind
        runtime.fail(f"--init_from {path} cannot be loaded as GPT-2 ({type(e).__name__}: {str(e)[:160]}): {fix}")
    # transformers fills a tensor the file lacks with random values, and says so only in a warning
    missing = sorted(loaded["missing_keys"]) + sorted(loaded["mismatched_keys"])
    runtime.check(not missing, f"--init_from {path} lacks {', '.join(map(str, missing[:3]))} or holds it in another "
                               f"shape: {fix}")
    model.generation_config.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return model.eval()


def the_base(init_from):
    if init_from is None:
        return Base(base_model, "random-gpt2-4l", str(BASE))
    template = stand_in(init_from)
    c = template.config
    return Base(lambda: copy.deepcopy(template), os.path.abspath(init_from),  # a copy: no reading the file N times
                f"{init_from} ({c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads, vocabulary {c.vocab_size:,}, "
                f"{c.n_positions} positions)")


# ---- the contenders ------------------------------------------------------------------------------

@torch.no_grad()
def task_files(n, folder, base, targets):
    """n adapter files around one A (task k > 0 as train.py's init_adapter with A frozen makes them),
    random B's, as bank tasks and as PEFT folders. -> ([adapter files], [PEFT folders])."""
    files, pefts, A = [], [], None
    for k in range(n):
        model = base.make()
        spec = None if A is None else "A=shared/frozen B=layer"
        sharelora.add_adapters(model, sharelora.AdapterConfig(**{**ADAPTER, "targets": targets}, spec=spec, seed=0))
        g = torch.Generator().manual_seed(k)
        for key, p in sharelora.adapter_state_dict(model).items():
            p.copy_(A[key] if A is not None and key.endswith("lora_A") else torch.randn(p.shape, generator=g) * 0.02)
        A = A or {key: t.clone() for key, t in sharelora.adapter_state_dict(model).items() if key.endswith("lora_A")}
        files.append(os.path.join(folder, f"task{k}.safetensors"))
        sharelora.save_adapter(model, files[-1], base=base.name)
        pefts.append(os.path.join(folder, f"peft{k}"))
        sharelora.export_peft(model, pefts[-1])
    return files, pefts


def contenders(n, folder, base, device, targets):
    """{name: generate(prompts, tasks) -> tokens} for n tasks, every model on `device`."""
    from peft import PeftModel
    files, pefts = task_files(n, folder, base, targets)
    names = [f"t{k}" for k in range(n)]
    ours = bank.attach(base.make(), bank.Bank.build(dict(zip(names, files)))).to(device)
    peft = PeftModel.from_pretrained(base.make(), pefts[0], adapter_name=names[0])
    for name, path in zip(names[1:], pefts[1:]):
        peft.load_adapter(path, adapter_name=name)
    peft.to(device).eval()
    merged = []
    for path in files:
        m = sharelora.load_adapter(base.make(), path)
        merged.append(sharelora.merge(m).to(device))
    # frozen, as every adapted model's base is: torch.matmul folds (batch, 1, C) @ W into one product only
    # when W requires grad or the input is contiguous, and transformers gives lm_head the prompt's last
    # position as a strided view, so a frozen lm_head's first step expands W per row (17 ms of a 157 ms
    # generation here) and a trainable one's does not: the bound would win by that alone
    plain = base.make().requires_grad_(False).to(device)
    kw = dict(do_sample=False, use_cache=True)

    def run_bank(idx, new, tasks):
        with bank.tasks(ours, tasks):
            return ours.generate(idx, max_new_tokens=new, min_new_tokens=new, **kw)

    def run_peft(idx, new, tasks):
        return peft.generate(input_ids=idx, max_new_tokens=new, min_new_tokens=new,
                             adapter_names=[names[t] for t in tasks], **kw)

    def run_merged(idx, new, tasks):  # each task's merged model on its own rows, in turn
        out = torch.empty(idx.size(0), idx.size(1) + new, dtype=torch.long, device=idx.device)
        index = torch.tensor(tasks)  # on the CPU: finding each task's rows needs no device synchronisation
        for t in index.unique().tolist():
            rows = (index == t).nonzero().squeeze(1).to(idx.device)
            out[rows] = merged[t].generate(idx[rows], max_new_tokens=new, min_new_tokens=new, **kw)
        return out

    def run_base(idx, new, tasks):
        return plain.generate(idx, max_new_tokens=new, min_new_tokens=new, **kw)

    runs = {"bank": run_bank, "peft": run_peft, "merged": run_merged, "base": run_base}
    return runs, (files, pefts, ours, peft)


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


# ---- timing -----------------------------------------------------------------------------------------

def clock(device):
    """time.perf_counter() once the device is done: CUDA runs kernels asynchronously, so without the
    synchronisation a clock would read when the work was queued, not when it ended."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":  # Apple's GPUs queue their work too
        torch.mps.synchronize()
    return time.perf_counter()


def timed(run, device):
    """(seconds, bytes) of one call of run(): on CUDA the peak memory it allocated beyond what was
    allocated before it (the KV cache, activations, logits), else None (CPU torch has no peak counter)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = clock(device)
    run()
    seconds = clock(device) - start
    return seconds, (torch.cuda.max_memory_allocated(device) - before) if cuda else None


def measure(n, args, base, device):
    """One row: {tokens_per_s, adapter_bytes, cuda_peak_bytes, same_tokens} for n tasks mixed in the batch."""
    with tempfile.TemporaryDirectory() as folder:
        runs, (files, pefts, ours, peft) = contenders(n, folder, base, device, args.targets)
        vocab = ours.config.vocab_size
        g = torch.Generator().manual_seed(1)  # on the CPU: the same prompts on every device
        idx = torch.randint(1, vocab, (args.rows, args.prompt), generator=g).to(device)
        tasks = [i % n for i in range(args.rows)]
        # a first, untimed run of each: warm-up (kernels chosen, caches allocated), and the check
        out = {name: run(idx, new=args.new, tasks=tasks) for name, run in runs.items()}
        same = {name: torch.equal(out[name], out["bank"]) for name in ("peft", "merged")}
        for name, ok in same.items():
            if not ok:
                print(f"note: {name}'s tokens differ from the bank's at {n} tasks", file=sys.stderr)
        seconds, peak = {name: [] for name in runs}, {name: [] for name in runs}
        for _ in range(args.repeats):  # in turns, so that a change in the machine's load hits every contender
            for name, run in runs.items():
                s, b = timed(lambda: run(idx, args.new, tasks), device)
                seconds[name].append(s)
                peak[name].append(b)
        memory = adapter_bytes(ours, peft, files, pefts, folder)
    return {"tasks": n, "tokens_per_s": {k: args.rows * args.new / statistics.median(s) for k, s in seconds.items()},
            "seconds": seconds, "adapter_bytes": memory, "same_tokens": same,
            "cuda_peak_bytes": {k: max(b) for k, b in peak.items()} if device.startswith("cuda") else None}


# ---- bank.py's choice of product -----------------------------------------------------------------

def per_task_product(h, B, index):
    """The way bank.py does not take: one product per task present, on its rows (as PEFT's mixed batch)."""
    out = h.new_empty(h.shape[:-1] + (B.size(1),))
    for t in index.unique().tolist():
        rows = (index == t).nonzero().squeeze(1)
        out.index_copy_(0, rows, torch.nn.functional.linear(h.index_select(0, rows), B[t]))
    return out


def gathered_product(h, B, index):
    """Every row's B gathered, one batched product: the gather in every call."""
    return torch.bmm(h, B[index].transpose(1, 2))


def products(rows=64, d_out=768, r=8, n_tasks=(2, 8, 16), positions=(1, 32), repeats=200):
    """Microseconds per call (the median of 5 timings) of three ways of adding each row's B_t h to the
    base map's output y: a loop over the tasks present, a gather in every call, and bank.py's way (the
    rows' B_t gathered once per set of tasks, bank.TaskRows.factor; each call one baddbmm onto y)."""
    g = torch.Generator().manual_seed(0)
    print(f"{rows} rows, d_out {d_out}, r {r}, torch threads {torch.get_num_threads()}: microseconds per map")
    print(f"{'tasks':>5} {'positions':>9} {'per task':>9} {'gathered':>9} {'kept':>9}")
    for tasks in n_tasks:
        B, index = torch.randn(tasks, d_out, r, generator=g), torch.arange(rows) % tasks
        kept = B[index].transpose(1, 2).contiguous()
        for T in positions:
            h, y = torch.randn(rows, T, r, generator=g), torch.randn(rows, T, d_out, generator=g)
            ways = (lambda: y + per_task_product(h, B, index), lambda: y + gathered_product(h, B, index),
                    lambda: torch.baddbmm(y, h, kept))
            us = [_median_us(f, max(repeats // T, 5)) for f in ways]
            print(f"{tasks:>5} {T:>9} {us[0]:>9.0f} {us[1]:>9.0f} {us[2]:>9.0f}")


def _median_us(f, calls):
    f()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


# ---- the outputs: the table, --json, --png -------------------------------------------------------

def kib(b):
    return f"{b / 1024:,.0f} KiB"


def print_row(row):
    speed, mem = row["tokens_per_s"], row["adapter_bytes"]
    print(f"{row['tasks']:>5} {speed['bank']:>8.0f} {speed['peft']:>8.0f} {speed['merged']:>8.0f} {speed['base']:>8.0f} "
          f"{speed['bank'] / speed['peft']:>8.2f}x {speed['bank'] / speed['base']:>8.2f}x {kib(mem['memory bank']):>12} "
          f"{kib(mem['memory peft']):>12} {kib(mem['file bank']):>10} {kib(mem['files sharea']):>10} "
          f"{kib(mem['files peft']):>10}", flush=True)


def print_cuda_memory(rows):
    print("\nCUDA memory a generation allocates beyond the models (max_memory_allocated during it, less what "
          "was allocated before), MiB:")
    print(f"{'tasks':>5}" + "".join(f" {name:>8}" for name in CONTENDERS))
    for row in rows:
        print(f"{row['tasks']:>5}" + "".join(f" {row['cuda_peak_bytes'][k] / 2**20:>8.1f}" for k in CONTENDERS))


def settings(args, base, device):
    """What a row was measured with, for --json (and the figure's title)."""
    import peft
    import transformers
    random = f"random GPT-2 shape ({BASE['n_layer']} layers, {BASE['n_embd']} wide)"
    return {"base": args.init_from or random, "base_description": base.description, "base_name": base.name,
            "adapter": {**ADAPTER, "targets": list(args.targets)}, "rows": args.rows, "prompt": args.prompt,
            "new": args.new, "repeats": args.repeats, "tasks": args.tasks, "device": device, "dtype": "float32",
            "machine": runtime.machine(device), "torch_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                         "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tokens_per_s": "rows x new tokens / median seconds"}


def plot(result, path):
    """tokens/s against the number of tasks (log 2 axis), one line per contender; `result` is what --json
    writes, so a figure can be drawn again from the file: plot(json.load(open(FILE)), "bank.png")."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    rows = sorted(result["rows"], key=lambda r: r["tasks"])
    counts = [r["tasks"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    labels = {"bank": "bank (A x once)", "peft": "PEFT (adapter_names=)", "merged": "merged, task by task",
              "base": "base alone (the bound)"}
    for name in CONTENDERS:
        ax.plot(counts, [r["tokens_per_s"][name] for r in rows], marker="o", label=labels[name],
                linestyle="--" if name == "base" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])  # the measured counts, not powers of 2 it did not measure
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tasks mixed in the batch (log 2)")
    ax.set_ylabel("tokens/s (new tokens / median seconds)")
    s = result["settings"]
    ax.set_title(f"{s['base']}, ShareA r = {s['adapter']['r']} on {', '.join(s['adapter']['targets'])}\n"
                 f"batch {s['rows']} rows x ({s['prompt']} + {s['new']}) tokens, {s['device']}", fontsize=9)
    ax.legend()
    write_binary(path, lambda f: fig.savefig(f, dpi=110, bbox_inches="tight", format="png"))  # whole or not at all
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------

def bench(args):
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.products:
        return products()
    device = runtime.pick_device(args.device)
    base = the_base(args.init_from)
    sharelora.add_adapters(base.make(), sharelora.AdapterConfig(**{**ADAPTER, "targets": args.targets}))  # bad targets: now
    print(f"base: {base.description}; adapter: {dict(ADAPTER, targets=args.targets)}; batch {args.rows} rows x ({args.prompt} prompt + {args.new} "
          f"new) tokens, greedy, KV cache; device {device}; torch threads {torch.get_num_threads()}; "
          "tokens/s = new tokens / median seconds")
    print(f"{'tasks':>5} {'bank':>8} {'peft':>8} {'merged':>8} {'base':>8} {'bank/peft':>9} {'bank/base':>9} "
          f"{'memory bank':>12} {'memory peft':>12} {'bank file':>10} {'N files':>10} {'N peft':>10}")
    result = {"settings": settings(args, base, device), "rows": []}
    for n in args.tasks:
        result["rows"].append(measure(n, args, base, device))
        print_row(result["rows"][-1])
        if args.json:  # after every row: a long run stopped halfway keeps what it measured
            write_json(args.json, result)
    if device.startswith("cuda"):
        print_cuda_memory(result["rows"])
    if args.png:
        plot(result, args.png)
    written = [p for p in (args.json, args.png) if p]
    if written:
        print(f"wrote {' and '.join(written)}")
    return result


def main(argv=None):
    args = options(sys.argv[1:] if argv is None else argv)
    return runtime.run(bench, args)  # a base that cannot be loaded, no GPU: one line, exit code 2


if __name__ == "__main__":
    main()
