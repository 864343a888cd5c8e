"""
bench_lib.py: what bench.py's sections measure with, shared with bench_job.py and bench_quant.py: the
environment (device, dtype, shapes), the contenders (our GPT and transformers + PEFT, random weights),
turn-taking timers, the training-memory probe (a fresh `bench.py --_memory_probe` process on a CPU) and
the matrix-product replay of the bound. bench.py's docstring says how each figure is measured.
"""
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)
import sharelora  # noqa: E402
from model import GPT, SIZES, GPTConfig  # noqa: E402
from quantize import quantize as quantize_base  # noqa: E402

# GPT-2's four sizes (random weights) and a tiny one for the smoke tests, all with GPT-2's vocabulary
MODELS = {name: dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, block_size=1024)
          for name, (n_layer, n_head, n_embd) in SIZES.items()}
MODELS["tiny"] = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=50257, block_size=1024)
PRESET_ORDER = ["lora", "sharea", "shareb", "shareab", "tied", "vera"]
R, ALPHA = 8, 16.0

# The three training comparisons of section 1: (key, title, our targets, PEFT's target_modules, supervision)
SETTINGS = [
    ("a", "same modules", ("attn.c_proj", "mlp.c_fc"), ("attn.c_proj", "mlp.c_fc"), "all"),
    ("b", "usual setting, equal params", ("q", "v"), ("c_attn",), "all"),
    ("c", "E2E-shaped, loss on half", ("q", "v"), ("c_attn",), "half"),
]
GOALS = {  # {ratio: (comparison, threshold)}, from the issue; preset_speed is our reading of "costs no speed"
    "a_speed": (">=", 1.35), "a_mem": ("<=", 0.40), "c_speed": (">=", 1.6),
    "bound": ("<=", 1.25), "unmerged": ("<=", 1.10), "merged": ("<=", 1.02),
    "generate": (">=", 1.0), "preset_speed": (">=", 0.95),
    # the job (issue 12): reference tokens/s against PEFT's plain and length-grouped loops, memory against
    # the grouped one; beam-10 decoding; one step at every GPT-2 size
    "job_plain": (">=", 1.8), "job_grouped": (">=", 1.3), "job_mem": ("<=", 0.40), "decode": (">=", 1.5),
    "scale_speed": (">=", 1.2), "scale_mem": ("<=", 0.40),
}


# ---- the environment: device, dtype, shapes --------------------------------------------------------

@dataclass
class Env:
    model: str
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    block_size: int
    warmup: int
    repeats: int
    memory: bool

    @property
    def cfg(self):
        return MODELS[self.model]

    def autocast(self):
        """float32: nothing. bfloat16: frozen bf16 weights, float32 adapters, autocast: both sides alike."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def make_env(args):
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return Env(args.model, device, dtype, args.batch_size, args.block_size, args.warmup, args.repeats,
               args.memory == "auto")


def machine_line(env, shape=None):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import peft
    import transformers
    gpu = f" ({torch.cuda.get_device_name(env.device)})" if env.device.type == "cuda" else ""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"machine: {cpu}, torch uses {torch.get_num_threads()} threads of {os.cpu_count()} cores; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
            f"device {env.device.type}{gpu}; dtype {str(env.dtype).removeprefix('torch.')}; "
            f"model {env.model}, {shape or f'batch {env.batch_size} x {env.block_size}'}; load average {load}")


def table(headers, rows):
    """A markdown pipe table, columns padded so that it also reads well as plain text."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def goal(key, ratio):
    """-> (goal text, 'yes' / 'NO') for a measured ratio."""
    op, x = GOALS[key]
    met = ratio >= x if op == ">=" else ratio <= x
    return f"{op} {x:.2f}x", "yes" if met else "NO"


def goal_if_set(key, ratio):
    """goal(), or dashes for a ratio the issue sets no goal for (setting (b), most memory ratios)."""
    return goal(key, ratio) if key in GOALS else ("-", "-")


def fmt_mb(b):
    if b is None:
        return "n/a"
    mb = b / 2**20
    return f"{mb:,.0f}" if mb >= 100 else f"{mb:.1f}"


# ---- building the contenders ---------------------------------------------------------------------

def ours_model(env, adapter=None, quantize="none"):
    torch.manual_seed(0)
    c = env.cfg
    model = GPT(GPTConfig(**c, dropout=0.0)).to(env.device, env.dtype)  # frozen base in env.dtype
    quantize_base(model, quantize, compute_dtype=env.dtype)  # none, nf4, int8: the quant section
    if adapter is not None:
        sharelora.add_adapters(model, adapter)  # adapters are float32 whatever the base dtype
    return model


def hf_model(env, peft_targets=None):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
    c = env.cfg
    eos = c["vocab_size"] - 1  # <|endoftext|> = 50256 for GPT-2
    config = GPT2Config(vocab_size=c["vocab_size"], n_positions=c["block_size"], n_embd=c["n_embd"],
                        n_layer=c["n_layer"], n_head=c["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(env.device, env.dtype)
    if peft_targets:
        from peft import LoraConfig, get_peft_model
        lc = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(peft_targets),
                        fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")  # Conv1D: fan_in_fan_out
        model = get_peft_model(model, lc)  # autocast_adapter_dtype=True: float32 adapters on a bf16 base
    return model


def make_batch(env, supervision):
    """ids (B, T); ours: targets (B, T), -100 where the loss does not count; transformers: labels (B, T).
    supervision 'all': every position that has a next token; 'half': the first half of each row is the
    prompt (as in E2E, where the loss counts only the reference), only the second half is predicted."""
    B, T, V = env.batch_size, env.block_size, env.cfg["vocab_size"]
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.full((B, T), -100, dtype=torch.long)
    targets[:, :-1] = ids[:, 1:]
    labels = ids.clone()
    if supervision == "half":
        p = T // 2  # tokens 0..p-1 are the prompt: transformers' labels -100 there, ours one position earlier
        labels[:, :p] = -100
        targets[:, :p - 1] = -100
    return ids.to(env.device), targets.to(env.device), labels.to(env.device)


def train_contender(env, spec):
    """spec: {"side": "ours" | "peft", "targets": [...], "supervision": "all" | "half", "preset": ...}
    -> namespace with step() (one full training step: zero_grad, forward, backward, AdamW step)."""
    ids, targets, labels = make_batch(env, spec["supervision"])
    if spec["side"] == "ours":
        ac = sharelora.AdapterConfig(preset=spec.get("preset", "lora"), r=R, alpha=ALPHA, dropout=0.0,
                                     targets=tuple(spec["targets"]))
        model = ours_model(env, ac, spec.get("quantize", "none"))
        fwd = lambda: model(ids, targets, return_logits=False)[1]  # the loss only where it counts
    else:
        model = hf_model(env, spec["targets"])
        fwd = lambda: model(input_ids=ids, labels=labels, use_cache=False).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    def loss():
        with env.autocast():
            return fwd()

    return SimpleNamespace(model=model, step=step, loss=loss, opt=opt, spec=spec,
                           trainable=sum(p.numel() for p in params),
                           loss_tokens=int((targets != -100).sum()))


# ---- timing and memory ---------------------------------------------------------------------------

def take_turns(env, fns, warmup, repeats):
    """fns {name: callable}: warm-up, then take turns for `repeats` rounds
    -> {name: [(seconds, what the call returned) per round]}."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    rounds = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            gc.collect()
            env.sync()
            t0 = time.perf_counter()
            result = f()
            env.sync()
            rounds[k].append((time.perf_counter() - t0, result))
    return rounds


def race(env, fns, warmup=None, repeats=None):
    """take_turns (warm-up and repeats default to env's) -> {name: median seconds}."""
    rounds = take_turns(env, fns, env.warmup if warmup is None else warmup, env.repeats if repeats is None else repeats)
    return {k: statistics.median(t for t, _ in v) for k, v in rounds.items()}


def release_memory():
    """Free what the last contenders held, back to the operating system: gc, then glibc's malloc_trim.
    Without the trim, freed tensors stay in the heap (glibc raises its mmap threshold as large blocks are
    freed), and job_scale, holding gpt2-large's leftovers, was killed for memory building gpt2-xl's two
    6 GB models on a 23 GB machine."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _proc_status():
    with open("/proc/self/status") as f:
        s = f.read()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", s, re.M).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def step_memory(env, step, measures=2):
    """Training memory of one step, in bytes (see the module docstring). The caller has already run at
    least one warm-up step. The largest of `measures` steps."""
    out = []
    for _ in range(measures):
        gc.collect()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(env.device)
            before = torch.cuda.memory_allocated(env.device)
            step()
            torch.cuda.synchronize()
            out.append(torch.cuda.max_memory_allocated(env.device) - before)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            before = _proc_status()["VmRSS"]
            step()
            out.append(_proc_status()["VmHWM"] - before)
    return max(out)


def training_memory(env, spec, contender=None):
    """Bytes, or None where it cannot be measured (--memory off, or no /proc/self/clear_refs)."""
    if not env.memory:
        return None
    if env.device.type == "cuda":  # one process is fine: the CUDA counters see only torch's tensors
        if contender is None:
            contender = train_contender(env, spec)
            contender.step()
        return step_memory(env, contender.step)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"), "--_memory_probe", json.dumps(spec),
           "--model", env.model, "--device", "cpu", "--dtype", str(env.dtype).removeprefix("torch."),
           "--batch_size", str(env.batch_size), "--block_size", str(env.block_size),
           "--threads", str(torch.get_num_threads())]
    penv = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, env=penv)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("MEMPROBE "):
            return json.loads(line[len("MEMPROBE "):])["bytes"]
    print(f"(memory probe failed for {spec}: {res.stderr.strip()[-500:]})", flush=True)
    return None


def memory_method(env):
    if not env.memory:
        return "not measured (--memory off)"
    if env.device.type == "cuda":
        return "CUDA max_memory_allocated over one step minus memory_allocated before it"
    return "peak RSS (VmHWM, reset via /proc/self/clear_refs) over one step minus RSS before it, fresh process each"


def hf_attention(env):
    """transformers' default attention for GPT-2 here (sdpa unless the install says otherwise)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        config = GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=8, bos_token_id=7, eos_token_id=7)
        return GPT2LMHeadModel(config).config._attn_implementation


GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def record_gemms(env, step, attention="bmm"):
    """Run one step and return the matrix products it executes, in order: (op, [(shape, stride) or
    scalar...], dtype). Recorded below autograd and autocast (a TorchDispatchMode sees each aten call
    as it runs, forward and backward, with the dtype autocast chose). attention="bmm": fused attention
    kernels are replaced by the batched matmuls of standard attention: S = Q K^T and Y = P V forward;
    dV = P^T dY, dP = dY V^T, dQ = dS K, dK = dS^T Q backward (not halved for the causal mask).
    attention="kernel": the fused attention kernels themselves are kept, and so are GELU's forward and
    backward kernels, each as ("kernel", op, args, kwargs) with a copy of its real arguments (one copy
    per distinct call shape), so that a replay runs the kernels of torch that any GPT-2 step in torch
    calls besides its matrix products."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls, copies = [], {}

    def meta(a):
        return ("T", tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else ("S", a)

    def copy(name, args):
        key = (name, tuple(meta(a) for a in args))
        if key not in copies:
            copies[key] = [a.detach().clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor)
                           else a for a in args]
        return copies[key]

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            fused_attention = name.startswith("_scaled_dot_product") and "attention" in name
            if name in GEMM_OPS:
                calls.append((name, [meta(a) for a in args], dict(kwargs)))
            elif attention == "kernel" and (fused_attention or name in ("gelu", "gelu_backward")):
                calls.append(("kernel", func, copy(name, args), dict(kwargs)))
            elif fused_attention:
                backward = name.endswith("_backward")
                q, k = (args[1], args[2]) if backward else (args[0], args[1])
                B, H, Tq, hs = q.shape
                S = k.shape[-2]
                bh, dt = B * H, q.dtype
                mat = lambda r, c: ("T", (bh, r, c), (r * c, c, 1), dt)
                pairs = ([((Tq, S), (S, hs)), ((S, Tq), (Tq, hs)), ((Tq, S), (S, hs)), ((S, Tq), (Tq, hs))]
                         if backward else [((Tq, hs), (hs, S)), ((Tq, S), (S, hs))])
                for (a, b) in pairs:
                    calls.append(("bmm", [mat(*a), mat(*b)], {}))
            return func(*args, **kwargs)

    with Recorder():
        step()
    return calls


def gemm_replay(env, calls):
    """-> (run(): execute exactly those products on preallocated tensors with the recorded shapes,
    strides and dtypes, writing into preallocated outputs, and any recorded fused kernels on copies of
    their arguments; GFLOP of one run's matrix products)."""
    inputs, outs, jobs, flops = {}, {}, [], 0

    def tensor(m):
        _, shape, stride, dtype = m
        key = (shape, stride, dtype)
        if key not in inputs:
            size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
            buf = (torch.randn(size, device=env.device) * 0.02).to(dtype)
            inputs[key] = buf.as_strided(shape, stride)
        return inputs[key]

    for call in calls:
        if call[0] == "kernel":  # its own output, as in the step
            _, op, args, kwargs = call
            jobs.append((op, args, kwargs))
            continue
        name, args, kwargs = call
        a = [tensor(m) if m[0] == "T" else m[1] for m in args]
        fn = getattr(torch, name)
        res = fn(*a, **kwargs)
        key = (name, tuple(res.shape), res.dtype)
        if key not in outs:
            outs[key] = res
        jobs.append((fn, a, {**kwargs, "out": outs[key]}))
        m1, m2 = (a[1], a[2]) if name in ("addmm", "baddbmm") else (a[0], a[1])
        flops += 2 * m1.numel() * m2.shape[-1]

    def run():
        for fn, a, kwargs in jobs:
            fn(*a, **kwargs)

    return run, flops / 1e9
