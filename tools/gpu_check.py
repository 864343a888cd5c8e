"""
tools/gpu_check.py: the CUDA path, end to end, on the GPUs of this machine, in about 5 minutes.

    python tools/gpu_check.py          # or: make gpu-check
    python tools/gpu_check.py --keep   # keep the work folder (runs, logs) and print its path

Prints one table, a row per check, and exits 1 when any check failed (0 when none did; 2, with one
sentence, on a machine where torch sees no CUDA GPU). The checks, on GPT-2-sized models (12 layers,
768 wide) with random weights and this project's shipped data:

  train bf16, train fp16   the whole model, 30 steps: the loss falls, every step finite (fp16: GradScaler)
  resume after a stop      an adapter run with dropout, stopped by SIGINT: two resumes from its
                           checkpoint agree bit for bit, and the losses stay within 1% of the same run
                           uninterrupted (bit for bit there is reported, not required: see docs/gpu.md)
  nf4 base, int8 base      an adapter trained on a quantized base (bitsandbytes), then sample.py
  greedy GPU = CPU         greedy tokens of a float32 model on the GPU (TF32 off) and on the CPU
  torchrun NCCL            train.py under torchrun, one process per GPU present
  --compile                train.py with --compile=True
  job benchmark            bench.py's training job row: train.py's step against transformers + PEFT, bf16,
                           reference tokens/s and training memory (informative: it fails only on errors)

Each check runs the project's own commands (train.py, sample.py, torchrun) in a fresh process, so that
what is tested is what a user runs. Nothing is downloaded.
"""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GPT2_SIZE = ["--n_layer=12", "--n_head=12", "--n_embd=768"]
COMMON = ["--block_size=256", "--batch_size=8", "--eval_iters=2", "--eval_interval=1000", "--log_interval=1",
          "--warmup_iters=5", "--device=cuda"]
DEVICE, BASE_SIZE = "cuda", {}  # --smoke: the CPU and a tiny model (the checks' own test, tests/test_gpu_check.py)
STEP_TIMEOUT_S = 240  # one command; the whole check is meant to take about 5 minutes


class Failed(Exception):
    """A check that did not hold: its message is the table's detail."""


class Skipped(Exception):
    """A check that could not run here (an optional package missing): not a failure."""


# ---- running the project's commands ------------------------------------------------------------

def python(*args, timeout=STEP_TIMEOUT_S, env=None):
    """Run `python *args` from the repository root; the completed process, or Failed with its last lines."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if p.returncode != 0:
        raise Failed(f"{os.path.basename(str(args[0]))} exited {p.returncode}: {last_line(p.stderr or p.stdout)}")
    return p


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-200:] if lines else "(no output)"


def losses(out_dir):
    """The training losses train.py logged in out_dir/metrics.jsonl, in step order."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if "loss" in r]


def finite(values, what):
    if not values or not all(math.isfinite(v) for v in values):
        raise Failed(f"{what}: {len(values)} losses, not all finite: {values[:8]}")
    return values


# ---- the checks ----------------------------------------------------------------------------------

def check_training(w, dtype):
    out = os.path.join(w.dir, f"train-{dtype}")
    python("train.py", "--init_from=scratch", *GPT2_SIZE, *COMMON, "--adapter=none", f"--dtype={dtype}",
           f"--data_dir={w.shakespeare}", f"--out_dir={out}", "--max_iters=30", "--learning_rate=1e-3")
    ls = finite(losses(out), dtype)
    first, last = sum(ls[:5]) / 5, sum(ls[-5:]) / 5
    if not last < first - 0.5:
        raise Failed(f"the loss did not fall: {first:.3f} over the first 5 steps, {last:.3f} over the last 5")
    if dtype == "bfloat16":
        w.trained = out  # a base that has learned something, for the greedy comparison
    return f"loss {first:.2f} -> {last:.2f} over 30 steps, all finite"


def adapter_run(w, name, *extra):
    return ["train.py", f"--init_from={w.base}", *COMMON, "--adapter=lora", f"--data_dir={w.e2e}",
            f"--out_dir={os.path.join(w.dir, name)}", "--learning_rate=1e-3", *extra]


def check_resume(w):
    """A stop by SIGINT, then two resumes from copies of the same checkpoint: their first steps must be
    bit for bit the same (the state is restored exactly; forward kernels are deterministic), and every
    loss within 1% of the uninterrupted run's (backward kernels on a GPU are not all deterministic, so
    bit for bit against it is reported, not required)."""
    import shutil
    steps = ["--adapter_dropout=0.1", "--dtype=bfloat16"]
    python(*adapter_run(w, "whole", *steps, "--max_iters=16"))
    whole = finite(losses(os.path.join(w.dir, "whole")), "uninterrupted")
    stopped = os.path.join(w.dir, "stopped")
    p = subprocess.Popen([sys.executable, *adapter_run(w, "stopped", *steps, "--max_iters=16")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + STEP_TIMEOUT_S
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(os.path.join(stopped, "metrics.jsonl")) and len(losses(stopped)) >= 6:
            p.send_signal(signal.SIGINT)  # what Ctrl-C does: stop at the next step boundary, save
            break
        time.sleep(0.05)
    p.communicate(timeout=STEP_TIMEOUT_S)
    if p.returncode != 128 + signal.SIGINT:
        raise Failed(f"the stopped run exited {p.returncode}, not {128 + signal.SIGINT} (saved and stopped)")
    at = len(losses(stopped))
    again = shutil.copytree(stopped, stopped + "-again")
    python("train.py", "--init_from=resume", f"--out_dir={stopped}", "--max_iters=16")
    python("train.py", "--init_from=resume", f"--out_dir={again}", f"--max_iters={at + 1}")
    resumed = finite(losses(stopped), "resumed")
    if len(resumed) != 16:
        raise Failed(f"the stopped and resumed run logged {len(resumed)} steps, not 16")
    if losses(again)[at] != resumed[at]:
        raise Failed(f"two resumes from one checkpoint differ at their first step: {losses(again)[at]} "
                     f"against {resumed[at]}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(resumed, whole))
    if worst > 1e-2:
        raise Failed(f"the resumed run's losses drift from the uninterrupted run's by up to {worst:.2%}")
    return (f"stopped at step {at}; resumes agree bit for bit; against the uninterrupted run "
            + ("bit for bit" if resumed == whole else f"within {worst:.1e}"))


def check_quantized(w, kind):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skipped("bitsandbytes is not installed: pip install -r requirements-quant.txt") from None
    name = f"quant-{kind}"
    python(*adapter_run(w, name, f"--quantize={kind}", "--adapter=sharea", "--max_iters=10"))
    ls = finite(losses(os.path.join(w.dir, name)), kind)
    p = python("sample.py", f"--out_dir={os.path.join(w.dir, name)}", "--max_new_tokens=20", "--temperature=0",
               "--start=name[The Vaults], eatType[pub]")
    return f"10 steps, loss {ls[0]:.2f} -> {ls[-1]:.2f}; sample.py wrote {len(p.stdout.split())} words"


def check_greedy(w):
    import torch
    import runtime
    prompts = [[464, 3290, 286], [40, 716, 257, 1310], [13, 198], [50256]]
    out = {}
    for device in ("cpu", DEVICE):
        model, _ = runtime.load_model(out_dir=w.trained or w.base, device=device, dtype="float32")
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # float32 against float32, not TF32 (pick_dtype's)
        out[device] = [model.generate(torch.tensor([p], device=device), 24, temperature=0)[0].tolist() for p in prompts]
        if device == "cpu":
            cpu_model = model
    same = sum(a == b for a, b in zip(out["cpu"], out[DEVICE]))
    for prompt, a, b in zip(prompts, out["cpu"], out[DEVICE]):
        if a != b:  # a difference is acceptable only where the CPU's two best tokens (nearly) tie
            at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            logits = cpu_model(torch.tensor([a[:at]]))[0][0, -1]
            gap = (logits.topk(2).values[0] - logits.topk(2).values[1]).item()
            if gap > 1e-3:
                raise Failed(f"greedy tokens differ at position {at} of prompt {prompt}, where the CPU's best "
                             f"token leads by {gap:.2e}")
    return f"{same} of {len(prompts)} prompts give the same 24 tokens (any other differs at a near-tie)"


def check_torchrun(w):
    import torch
    n = torch.cuda.device_count() if DEVICE == "cuda" else 2
    out = os.path.join(w.dir, "torchrun")
    args = adapter_run(w, "torchrun", "--max_iters=10")[1:]
    python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py", *args)
    ls = finite(losses(out), "torchrun")
    return f"{n} process(es), {'NCCL' if DEVICE == 'cuda' else 'gloo'}, 10 steps, loss {ls[0]:.2f} -> {ls[-1]:.2f}"


def check_compile(w):
    t0 = time.time()
    python(*adapter_run(w, "compiled", "--compile=True", "--max_iters=10"))
    ls = finite(losses(os.path.join(w.dir, "compiled")), "compiled")
    return f"10 steps in {time.time() - t0:.0f} s with compilation, loss {ls[0]:.2f} -> {ls[-1]:.2f}"


def check_job_benchmark(w):
    import statistics
    import torch
    if DEVICE != "cuda":
        raise Skipped("the benchmark's GPT-2-sized models take minutes on a CPU")
    try:
        import bench
        import bench_job
    except ImportError as e:
        raise Skipped(f"the benchmark needs transformers and peft: pip install -r requirements-dev.txt ({e})") from None
    env = bench.make_env(bench.parse_args(["--device=cuda", "--dtype=bfloat16", f"--batch_size={bench_job.JOB_BATCH}"]))
    ours, peft = "ours, length-grouped", "PEFT, LengthGroupedSampler"
    specs = {k: s for k, s in bench_job.job_specs(w.e2e).items() if k in (ours, peft)}
    contenders = {k: bench_job.contender(env, s) for k, s in specs.items()}
    turns = bench_job.take_turns(env, contenders, rounds=3, steps=2)
    del contenders
    torch.cuda.empty_cache()
    rate = {k: statistics.median(r / t for t, r, _, _ in v) for k, v in turns.items()}
    mem = {k: bench_job.job_memory(env, s, 4) / 2**20 for k, s in specs.items()}
    return (f"reference tokens/s {rate[ours]:,.0f} vs PEFT {rate[peft]:,.0f} ({rate[ours] / rate[peft]:.2f}x); "
            f"training memory {mem[ours]:,.0f} vs {mem[peft]:,.0f} MiB ({mem[ours] / mem[peft]:.2f}x)")


CHECKS = [("train bf16", lambda w: check_training(w, "bfloat16")),
          ("train fp16", lambda w: check_training(w, "float16")),
          ("resume after a stop", check_resume),
          ("nf4 base", lambda w: check_quantized(w, "nf4")),
          ("int8 base", lambda w: check_quantized(w, "int8")),
          ("greedy GPU = CPU", check_greedy),
          ("torchrun NCCL", check_torchrun),
          ("--compile", check_compile),
          ("job benchmark", check_job_benchmark)]


# ---- the table ----------------------------------------------------------------------------------

def run_checks(checks, workspace):
    """-> rows (check, result, detail, seconds), each check run whatever the others did."""
    rows = []
    for name, check in checks:
        t0 = time.time()
        try:
            result, detail = "pass", check(workspace)
        except Skipped as e:
            result, detail = "skip", str(e)
        except Failed as e:
            result, detail = "FAIL", str(e)
        except Exception as e:  # a crash is a failure of that check, not the end of the table
            result, detail = "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        rows.append((name, result, detail, f"{time.time() - t0:.0f}"))
        print(f"{name}: {result} ({rows[-1][3]} s)", file=sys.stderr, flush=True)  # progress, off the table
    return rows


def table(rows):
    """A markdown pipe table, padded to read as plain text too."""
    cells = [("check", "result", "detail", "s")] + list(rows)
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def workspace(folder):
    """The data (prepared from the copies shipped in data/*/source) and a random GPT-2-sized base."""
    from types import SimpleNamespace
    import torch
    from model import GPT, GPTConfig
    w = SimpleNamespace(dir=folder, shakespeare=os.path.join(folder, "shakespeare"), e2e=os.path.join(folder, "e2e"),
                        base=os.path.join(folder, "base"), trained=None)
    python("data/shakespeare/prepare.py", "--out", w.shakespeare)
    python("data/e2e/prepare.py", "--out", w.e2e, "--limit", "2000")
    torch.manual_seed(0)
    GPT(GPTConfig(**BASE_SIZE)).save_pretrained(w.base)
    return w


def smoke():
    """--smoke: every check on the CPU with a tiny model, to test the checks themselves (not the GPU)."""
    global DEVICE, GPT2_SIZE, COMMON, BASE_SIZE
    DEVICE, BASE_SIZE = "cpu", dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
    GPT2_SIZE = ["--n_layer=2", "--n_head=2", "--n_embd=64"]
    COMMON = [a.replace("=256", "=64").replace("=cuda", "=cpu") for a in COMMON]


def main(argv=None, checks=None):
    argv = sys.argv[1:] if argv is None else argv
    import torch
    if "--smoke" in argv:
        smoke()
    elif not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU on this machine, so there is nothing to check: run it where "
              "`python -c 'import torch; print(torch.cuda.is_available())'` prints True", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="gpu-check-")
    machine = (f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}" if DEVICE == "cuda" else "the CPU (--smoke)")
    machine += f", torch {torch.__version__}"
    if checks is None:
        try:
            w = workspace(folder)
        except Failed as e:
            print(f"gpu_check: could not prepare the data and the base model in {folder}: {e}", file=sys.stderr)
            return 1
    rows = run_checks(CHECKS if checks is None else checks, w if checks is None else folder)
    print(f"gpu check on {machine}, {time.strftime('%Y-%m-%d')}\n\n{table(rows)}")
    if "--keep" in argv:
        print(f"\nthe runs and logs are in {folder}")
    else:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
