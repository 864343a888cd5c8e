"""
bench.py: how fast and how lean this project's adapters train and run, measured against the reference
everyone knows, transformers' GPT-2 + PEFT LoRA.

    python tools/bench.py                          # every section, GPT-2 124M, batch 4 x 256, float32 on CPU
    python tools/bench.py --only train,bound       # some sections: train, presets, infer, generate, bound
    python tools/bench.py --only job               # the E2E job: job_train, job_decode, job_scale (bench_job.py)
    python tools/bench.py --only quant             # a quantized base (none / int8 / nf4): memory, speed, quality (bench_quant.py)
    python tools/bench.py --device cuda            # bfloat16 base weights, float32 adapters, autocast (the default there)
    python tools/bench.py --model tiny --repeats 2 --warmup 1 --gen_tokens 8     # seconds: a smoke test

Sections (each prints a markdown pipe table, a one-line machine description above it, and every goal
next to the measured ratio with whether it is met):
  train     training step, ours vs PEFT: (a) the same modules (attn.c_proj + mlp.c_fc, r = 8), every position
            supervised; (b) each side's usual GPT-2 setting at equal trainable parameters (ours q, v; PEFT's
            fused c_attn; r = 8: 294,912 both); (c) E2E-shaped batches, the loss on the second half of each row
  presets   the training table for every preset (lora, sharea, shareb, shareab, tied, vera on q, v, r = 8)
  infer     inference forward (eval, no grad): base model vs unmerged adapters (every preset) vs merged
  generate  greedy generation at batch 1: ours with and without the KV cache vs transformers' generate
  bound     the step against the time of its matrix products alone (same shapes, same dtype)
  job_*     the real job, only when asked (--only job): E2E training steps through train.py's loop, beam-10
            decoding of test MRs, and one step's cost from gpt2 to gpt2-xl; see bench_job.py
  quant     only when asked: the frozen base in float, int8 and nf4 (quantize.py); see bench_quant.py

Method. Contenders of one comparison are built side by side, at the same model size, batch, sequence
length, dtype and device, with random weights (speed does not depend on the values) and dropout off
on both sides (transformers' GPT2Config enables 0.1 by default; it is set to 0 here). After warm-up
steps the contenders take turns (ours, PEFT, ours, PEFT, ...) for --repeats rounds; each reports the
median of its own times, so a slow spell of a busy machine hits both sides alike. tokens/s = B*T / median
step time (the tokens processed, also in setting (c) where only half of them count in the loss).

Training memory = the peak during a training step minus the memory held just before it (model, frozen
weights, optimizer state: all built, and one warm-up step done so that lazily created state exists),
i.e. activations, logits, gradients and temporaries. On CUDA: torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), minus memory_allocated() before the step. On CPU torch has no peak counter,
so each measurement runs in a fresh process (`bench.py --_memory_probe SPEC`) and reads the kernel's
resident-set counters: after the warm-up step, writing "5" to /proc/self/clear_refs resets the peak
VmHWM to the current VmRSS; the step runs; training memory = VmHWM - VmRSS before. This is sound
because (1) a fresh process holds nothing of other contenders, and (2) the probe runs with glibc's
MALLOC_MMAP_THRESHOLD_=65536, so every tensor over 64 KB is its own mmap, returned to the kernel when
freed: memory freed after the warm-up step cannot sit in the heap, counted in VmRSS before and silently
reused (which would under-count: without it PEFT's setting-(b) step reads 589 MiB instead of 1,417 MiB).
Pages are counted once written, which a tensor always is. As a check, the table prints the size of
one batch's float32 logits (B*T*vocab*4 bytes: 206 MB = 196 MiB at the defaults): transformers holds
the logits, their log-softmax and their gradients (several of those), ours one 166-row chunk (32 MiB).

transformers' side: GPT2LMHeadModel with its default attention (sdpa), use_cache=False in training (a
KV cache is no use there), and the loss from `labels`, which transformers shifts by one internally. Both
sides get the same supervised tokens: ours `targets[t] = ids[t + 1]` where the loss counts and -100
elsewhere (including the last position, which has no next token); transformers `labels = ids` with -100
where the token is not predicted, i.e. at our -100 positions shifted by one. tests/test_bench.py checks
that the two give the same loss on the same weights.
"""
import argparse
import gc
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)
from data.common import TEXT, THREADS, Bound, Parser  # noqa: E402
from tools import bench_job, bench_quant  # noqa: E402
import sharelora  # noqa: E402
from tools.bench_lib import (ALPHA, MODELS, PRESET_ORDER, R, SETTINGS, fmt_mb, gemm_replay, goal, goal_if_set,  # noqa: E402
                             hf_attention, hf_model, machine_line, make_batch, make_env, memory_method, ours_model,
                             race, record_gemms, step_memory, table, train_contender, training_memory)


def memory_probe_main(env, spec):
    """spec: a train_contender spec, or a job_train one (bench_job), which also gives warmup_steps and
    measure_steps: the peak over that many consecutive steps (its batches differ) rather than one step."""
    if spec.get("job"):
        c = bench_job.contender(env, spec)
    else:
        c = train_contender(env, spec)
    for _ in range(spec.get("warmup_steps", 2)):  # optimizer state, oneDNN / MKL buffers, autograd's first use
        c.step()
    n = spec.get("measure_steps")
    try:
        b = step_memory(env, c.step) if n is None else step_memory(env, lambda: [c.step() for _ in range(n)], measures=1)
    except OSError as e:  # no clear_refs (not Linux, or not permitted): no sound CPU figure
        print(f"no peak counter: {e}", file=sys.stderr)
        return
    print("MEMPROBE " + json.dumps({"bytes": b}), flush=True)


# ---- section 1: training, ours vs PEFT -----------------------------------------------------------

def setting_specs(ours_t, peft_t, sup):
    """The two contenders of one SETTINGS row: our LoRA on ours_t, PEFT's LoRA on peft_t."""
    return {"ours": {"side": "ours", "targets": list(ours_t), "supervision": sup, "preset": "lora"},
            "PEFT": {"side": "peft", "targets": list(peft_t), "supervision": sup}}


def section_train(env):
    rows, ratios = [], []
    for key, title, ours_t, peft_t, sup in SETTINGS:
        specs = setting_specs(ours_t, peft_t, sup)
        cs = {k: train_contender(env, s) for k, s in specs.items()}
        t = race(env, {k: c.step for k, c in cs.items()})
        mem = {k: training_memory(env, specs[k], cs[k]) for k in cs}
        for k, c in cs.items():
            rows.append([f"({key}) {title}", k, ", ".join(specs[k]["targets"]), f"{c.trainable:,}",
                         f"{c.loss_tokens:,}", f"{t[k] * 1e3:,.0f}",
                         f"{env.batch_size * env.block_size / t[k]:,.0f}", fmt_mb(mem[k])])
        speed = t["PEFT"] / t["ours"]
        g = goal_if_set(f"{key}_speed", speed)
        ratios.append([f"({key})", "tokens/s, ours / PEFT", f"{speed:.2f}x", *g])
        if mem["ours"] and mem["PEFT"]:
            m = mem["ours"] / mem["PEFT"]
            g = goal_if_set(f"{key}_mem", m)
            ratios.append([f"({key})", "training memory, ours / PEFT", f"{m:.2f}x", *g])
        del cs
        gc.collect()
    V = env.cfg["vocab_size"]
    out = [f"### Training step: ours vs transformers + PEFT LoRA (r = {R})", machine_line(env), "",
           table(["setting", "side", "adapted modules", "trainable", "loss tokens", "step ms", "tokens/s",
                  "train mem MiB"], rows), "",
           table(["setting", "measure", "ratio", "goal", "met"], ratios), "",
           f"Training memory: {memory_method(env)}. For scale: one batch's float32 logits are B*T*vocab*4 = "
           f"{fmt_mb(env.batch_size * env.block_size * V * 4)} MiB. PEFT side: GPT2LMHeadModel "
           f"(attention {hf_attention(env)}), labels, use_cache=False; ours: return_logits=False."]
    return "\n".join(out)


# ---- section 2: every preset ---------------------------------------------------------------------

def section_presets(env):
    specs = {p: {"side": "ours", "targets": ["q", "v"], "supervision": "all", "preset": p} for p in PRESET_ORDER}
    cs = {p: train_contender(env, s) for p, s in specs.items()}
    t = race(env, {p: c.step for p, c in cs.items()})
    mem = {p: training_memory(env, specs[p], cs[p]) for p in cs}
    rows = []
    for p, c in cs.items():
        speed = t["lora"] / t[p]
        g = goal("preset_speed", speed)
        rows.append([p, sharelora.AdapterConfig(preset=p).describe(), f"{c.trainable:,}", f"{t[p] * 1e3:,.0f}",
                     f"{env.batch_size * env.block_size / t[p]:,.0f}", f"{speed:.2f}x", *g, fmt_mb(mem[p]),
                     f"{mem[p] / mem['lora']:.2f}x" if mem[p] and mem["lora"] else "n/a"])
    del cs
    gc.collect()
    return "\n".join([f"### Training step for every preset (ours, targets q, v, r = {R}, every position supervised)",
                      machine_line(env), "",
                      table(["preset", "spec", "trainable", "step ms", "tokens/s", "speed vs lora", "goal", "met",
                             "train mem MiB", "mem vs lora"], rows), "",
                      f"Training memory: {memory_method(env)}. Goal: sharing costs no speed "
                      f"(read here as within 5% of lora's tokens/s)."])


# ---- section 3: inference overhead -------------------------------------------------------------

def section_infer(env):
    ids, _, _ = make_batch(env, "all")
    models = {"base (no adapters)": ours_model(env)}
    for p in PRESET_ORDER:
        models[f"{p}, unmerged"] = ours_model(env, sharelora.AdapterConfig(preset=p, r=R, alpha=ALPHA, targets=("q", "v")))
    merged = ours_model(env, sharelora.AdapterConfig(preset="lora", r=R, alpha=ALPHA, targets=("q", "v")))
    models["lora, merged"] = sharelora.merge(merged)
    for m in models.values():
        m.eval()

    def forward(m):
        def f():
            with torch.no_grad(), env.autocast():
                m(ids)  # full logits (B, T, vocab), as a plain forward returns them
        return f

    t = race(env, {k: forward(m) for k, m in models.items()})
    base = t["base (no adapters)"]
    rows = []
    for k in models:
        ratio = t[k] / base
        g = ("-", "-") if k.startswith("base") else goal("merged" if k.endswith(", merged") else "unmerged", ratio)
        rows.append([k, f"{t[k] * 1e3:,.1f}", f"{env.batch_size * env.block_size / t[k]:,.0f}", f"{ratio:.3f}x", *g])
    del models
    gc.collect()
    return "\n".join([f"### Inference forward (eval, no grad, full logits), adapters on q, v, r = {R}",
                      machine_line(env), "",
                      table(["model", "forward ms", "tokens/s", "time vs base", "goal", "met"], rows)])


# ---- section 4: generation ------------------------------------------------------------------------

def section_generate(env, new_tokens, prompt_len, repeats):
    V = env.cfg["vocab_size"]
    prompt = torch.randint(0, V, (1, prompt_len), generator=torch.Generator().manual_seed(7)).to(env.device)
    ours = ours_model(env).eval()
    adapted = ours_model(env, sharelora.AdapterConfig(preset="sharea", r=R, alpha=ALPHA, targets=("q", "v"))).eval()
    hf = hf_model(env).eval()
    mask = torch.ones_like(prompt)

    def run_ours(m, cache):
        def f(n=new_tokens):
            with env.autocast():
                out = m.generate(prompt, n, temperature=0, use_cache=cache)
            assert out.size(1) == prompt_len + n
        return f

    def run_hf(n=new_tokens):
        with env.autocast():
            out = hf.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=V - 1, eos_token_id=V - 1)
        assert out.size(1) == prompt_len + n

    fns = {"transformers generate (KV cache)": run_hf, "ours, KV cache": run_ours(ours, True),
           "ours, no cache": run_ours(ours, False), "ours + sharea adapters unmerged, KV cache": run_ours(adapted, True)}
    for f in fns.values():  # warm-up: short runs (the no-cache path at full length takes minutes on a CPU)
        for _ in range(max(1, env.warmup)):
            f(n=min(8, new_tokens))
    t = race(env, fns, warmup=0, repeats=repeats)
    ref = t["transformers generate (KV cache)"]
    rows = []
    for k in fns:
        speed = ref / t[k]
        g = goal("generate", speed) if k == "ours, KV cache" else ("-", "-")
        rows.append([k, f"{t[k]:,.2f}", f"{new_tokens / t[k]:,.1f}", f"{speed:.2f}x", *g])
    del ours, adapted, hf
    gc.collect()
    return "\n".join([f"### Greedy generation, batch 1, prompt {prompt_len} tokens, {new_tokens} new tokens "
                      f"(median of {repeats})", machine_line(env, shape="batch 1"), "",
                      table(["contender", "seconds", "tokens/s", "speed vs transformers", "goal", "met"], rows)])


# ---- section 5: the step against its matrix products ----------------------------------------------


def section_bound(env):
    rows, ceilings = [], []
    for key, title, ours_t, peft_t, sup in SETTINGS:
        specs = setting_specs(ours_t, peft_t, sup)
        fns, info = {}, {}
        for side, spec in specs.items():
            c = train_contender(env, spec)
            c.step()
            calls = record_gemms(env, c.step)
            run, gflop = gemm_replay(env, calls)
            fns[side] = c.step
            fns[side + " matmuls"] = run
            info[side] = (len(calls), gflop)
        t = race(env, fns)
        for side in specs:
            ratio = t[side] / t[side + " matmuls"]
            g = goal("bound", ratio) if side == "ours" else ("-", "-")
            n, gflop = info[side]
            rows.append([f"({key}) {title}", side, f"{t[side] * 1e3:,.0f}", f"{t[side + ' matmuls'] * 1e3:,.0f}",
                         f"{n}", f"{gflop:,.0f}", f"{gflop / t[side + ' matmuls']:,.0f}", f"{ratio:.2f}x", *g])
        # The fastest our step could be is its matrix products with zero overhead: PEFT's step over that
        # time is the highest speed ratio this machine allows, whatever the rest of the step does.
        ceiling = t["PEFT"] / t["ours matmuls"]
        ceilings.append([f"({key}) {title}", f"{t['PEFT'] * 1e3:,.0f}", f"{t['ours matmuls'] * 1e3:,.0f}",
                         f"{ceiling:.2f}x", f"{t['PEFT'] / t['ours']:.2f}x", *goal_if_set(f"{key}_speed", ceiling)])
        del fns
        gc.collect()
    return "\n".join([
        "### Training step vs its matrix products alone (same shapes, strides and dtype, preallocated outputs)",
        machine_line(env), "",
        table(["setting", "side", "step ms", "matmuls ms", "matmul calls", "GFLOP", "matmul GFLOP/s",
               "step / matmuls", "goal", "met"], rows), "",
        "matmuls: exactly the products one step runs (recorded below autograd: forward and backward GEMMs of the "
        "blocks, adapters' small GEMMs, the lm_head forward and input-gradient), with fused attention counted as "
        "standard attention's batched matmuls (2 forward, 4 backward, full T x T, not halved for the causal mask).",
        "", "The speed ceiling: PEFT's step time over the time of our step's matrix products alone, the highest "
        "tokens/s ratio a step with zero overhead beyond its matrix products could reach here (same timed rounds "
        "as above).", "",
        table(["setting", "PEFT step ms", "our matmuls ms", "ceiling, ours / PEFT", "measured, ours / PEFT",
               "speed goal", "goal within ceiling"], ceilings)])


# ---- command line ------------------------------------------------------------------------------

SECTIONS = ("train", "presets", "infer", "generate", "bound")
JOB_SECTIONS = ("job_train", "job_decode", "job_scale")  # minutes to an hour on a CPU: only when asked
ASKED_SECTIONS = JOB_SECTIONS + ("quant",)  # quant: bench_quant.py, also minutes (gpt2-xl, four training runs)


def parse_args(argv=None):
    """The options, each bounded: a bad value is one line and exit code 2 (data.common.Parser)."""
    count, small = Bound(int, 1, 10**6), Bound(int, 1, 2**16)
    p = Parser(prog="tools/bench.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on CUDA (frozen base weights; adapters stay float32; autocast), float32 on CPU")
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS), help="gpt2: 124M config, random weights")
    p.add_argument("--batch_size", type=small, default=4)
    context = min(m["block_size"] for m in MODELS.values())  # every model of the benchmark: 1,024
    p.add_argument("--block_size", type=Bound(int, 1, context), default=256, help=f"at most the models' context, {context:,}")
    p.add_argument("--repeats", type=count, default=10, help="timed rounds, contenders taking turns")
    p.add_argument("--warmup", type=Bound(int, 0, 10**6), default=2)
    p.add_argument("--only", type=TEXT, default=",".join(SECTIONS),
                   help="comma list of sections: " + ",".join(SECTIONS + ASKED_SECTIONS) + "; job = the three job_ sections")
    p.add_argument("--gen_tokens", type=small, default=256, help="new tokens per generation")
    p.add_argument("--prompt_len", type=small, default=16)
    p.add_argument("--gen_repeats", type=count, default=3, help="timed generations per contender")
    p.add_argument("--threads", type=THREADS, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--job_data_dir", type=TEXT, default=os.path.join(ROOT, "data", "e2e"),
                   help="job_train, job_decode: the prepared E2E data (python data/e2e/prepare.py)")
    p.add_argument("--job_rounds", type=count, default=5, help="job_train: timed rounds per loop")
    p.add_argument("--job_steps", type=count, default=2, help="job_train: optimizer steps per round")
    p.add_argument("--job_mrs", type=count, default=100, help="job_decode: the first N test MRs")
    p.add_argument("--job_decode_repeats", type=count, default=2, help="job_decode: timed decodings per side")
    p.add_argument("--job_run", default="", help="job_decode: a training run folder (its base + adapter) "
                                                 "instead of random weights")
    p.add_argument("--job_sizes", type=TEXT, default="gpt2,gpt2-medium,gpt2-large,gpt2-xl", help="job_scale: model sizes")
    p.add_argument("--job_scale_repeats", type=count, default=3, help="job_scale: timed steps per side and size")
    p.add_argument("--quant_sizes", type=TEXT, default="gpt2,gpt2-xl", help="quant: model sizes")
    p.add_argument("--quant_repeats", type=count, default=3, help="quant: timed steps per base and size")
    p.add_argument("--quant_base", type=TEXT, default=os.path.join(ROOT, "out-e2e-base-6l"),
                   help="quant: the stand-in base the quality runs train on (config/e2e_base_6l.py)")
    p.add_argument("--quant_steps", type=count, default=300, help="quant: training steps of each quality run")
    p.add_argument("--quant_out", type=TEXT, default=os.path.join(ROOT, "out-bench-quant"), help="quant: the quality runs' folders")
    p.add_argument("--memory", default="auto", choices=["auto", "off"], help="off: skip the memory probes")
    p.add_argument("--_memory_probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = ",".join(",".join(JOB_SECTIONS) if name == "job" else name for name in args.only.split(","))
    bad = set(args.only.split(",")) - set(SECTIONS + ASKED_SECTIONS)
    if bad:
        p.error(f"unknown section(s) {sorted(bad)}: choose from {', '.join(SECTIONS + ASKED_SECTIONS)} or job")
    for option in ("job_sizes", "quant_sizes"):
        bad = set(getattr(args, option).split(",")) - set(MODELS)
        if bad:
            p.error(f"unknown --{option} {sorted(bad)}: choose from {', '.join(MODELS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = make_env(args)
    if args._memory_probe is not None:
        memory_probe_main(env, json.loads(args._memory_probe))
        return
    only = args.only.split(",")
    for name in SECTIONS + ASKED_SECTIONS:
        if name not in only:
            continue
        t0 = time.perf_counter()
        if name == "quant":
            text = (bench_quant.section_quant_speed(env, args.quant_sizes.split(","), args.quant_repeats) + "\n\n"
                    + bench_quant.section_quant_quality(env, args.quant_base, args.job_data_dir, args.quant_out,
                                                        args.quant_steps))
        elif name.startswith("job_"):
            text = {"job_train": lambda: bench_job.section_job_train(env, args.job_rounds, args.job_steps,
                                                                     args.job_data_dir),
                    "job_decode": lambda: bench_job.section_job_decode(env, args.job_mrs, args.job_decode_repeats,
                                                                       args.job_run or None, args.job_data_dir),
                    "job_scale": lambda: bench_job.section_job_scale(env, args.job_sizes.split(","),
                                                                     args.job_scale_repeats)}[name]()
        elif name == "train":
            text = section_train(env)
        elif name == "presets":
            text = section_presets(env)
        elif name == "infer":
            text = section_infer(env)
        elif name == "generate":
            text = section_generate(env, args.gen_tokens, args.prompt_len, args.gen_repeats)
        else:
            text = section_bound(env)
        print(text + f"\n\n({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    import runtime
    runtime.run(main)  # a missing E2E preparation or --job_run folder: one line, exit code 2
