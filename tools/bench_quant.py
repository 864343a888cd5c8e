"""
bench_quant.py: bench.py's section `quant` (`python tools/bench.py --only quant`): what a quantized frozen base
(quantize.py: none, int8, nf4) saves and costs.

  1. Memory and speed, side by side in one run: for each --quant_sizes configuration (random weights,
     ShareA on q, v, r = 8, batch 1 x 256, every position supervised) the three bases take turns
     (none, int8, nf4, none, ...); each reports the bytes its weights are stored in, the median
     training step and the training memory (bench.py's probe, a fresh process each).
  2. Quality, on the stand-in base (--quant_base, default out-e2e-base-6l: config/e2e_base_6l.py):
     train.py trains ShareA and LoRA (q, v, r = 8, the comparison's recipe: 300 steps of 8 E2E
     examples) once on the float32 base and once on its NF4 copy (QShareA and QLoRA, the ShareLoRA
     paper's comparison). Reported: the validation loss of each base alone (step 0, where B = 0) and
     after training (the best of the evaluations). Skipped, with a line saying how to make the base,
     when it is missing.
"""
import json
import os
import subprocess
from dataclasses import replace

import quantize
from tools import bench_job, compare
from tools import bench_lib as bench

KINDS = ("none", "int8", "nf4")
QUALITY_RUNS = [(preset, kind) for preset in ("sharea", "lora") for kind in ("none", "nf4")]


def section_quant_speed(env, sizes, repeats):
    rows = []
    for size in sizes:
        e = replace(env, model=size, batch_size=1, block_size=256)
        specs = {k: {"side": "ours", "targets": ["q", "v"], "supervision": "all", "preset": "sharea", "quantize": k}
                 for k in KINDS}
        cs = {k: bench.train_contender(e, s) for k, s in specs.items()}
        stored = {k: quantize.stored_bytes(c.model) for k, c in cs.items()}
        t = bench.race(e, {k: c.step for k, c in cs.items()}, warmup=1, repeats=repeats)
        del cs  # the probes run in fresh processes: free this one's copies first
        bench.release_memory()
        mem = {k: bench.training_memory(e, s) for k, s in specs.items()}
        for k in KINDS:
            rows.append([size, k, bench.fmt_mb(stored[k]), f"{stored[k] / stored['none']:.2f}x", f"{t[k] * 1e3:,.0f}",
                         f"{t['none'] / t[k]:.2f}x", bench.fmt_mb(mem[k])])
    return "\n".join([
        f"### A quantized frozen base: weights, step time and training memory (ShareA q, v, r = {bench.R}, "
        f"batch 1 x 256, median of {repeats})",
        bench.machine_line(env, shape="batch 1 x 256"), "",
        bench.table(["model", "quantize", "weights MiB", "vs none", "step ms", "speed vs none", "train mem MiB"], rows),
        "", "weights: every tensor of the model as stored (packed 4-bit or int8 block weights with their scales; "
        "the embedding, tied to the output layer, stays float32). "
        f"Training memory: {bench.memory_method(env)}."])


def train_run(base, out_dir, preset, kind, data_dir, steps, device):
    """One train.py run with compare.py's own command (its defaults: q, v, r = 8, batches of 8, seed 1);
    -> (val loss at step 0, best val loss)."""
    if not os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        args, _ = compare.options([f"--init_from={base}", f"--data_dir={data_dir}", f"--max_iters={steps}",
                                   f"--device={device}", f"--quantize={kind}"])
        subprocess.run(compare.train_command(args, preset, 1, out_dir, []), check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f]
    first = next(r["val_loss"] for r in log if "val_loss" in r and r["step"] == 0)
    return first, next(r for r in log if "done" in r)["best_val_loss"]


def section_quant_quality(env, base, data_dir, out, steps):
    if not os.path.exists(base):
        return (f"### Quality on a quantized base\nskipped: no stand-in base at {base}; make it with "
                "`python data/e2e_refs/prepare.py && python train.py config/e2e_base_6l.py` (~25 minutes), "
                "or pass --quant_base")
    bench_job.need_e2e(data_dir)
    rows = []
    for preset, kind in QUALITY_RUNS:
        first, best = train_run(base, os.path.join(out, f"{preset}-{kind}"), preset, kind, data_dir, steps,
                                env.device.type)
        rows.append([preset, kind, f"{first:.4f}", f"{best:.4f}"])
    return "\n".join([
        f"### Quality on a quantized base: {base} (a stand-in, not GPT-2), E2E, q, v, r = 8, {steps} steps of 8",
        bench.machine_line(env, shape="batch 8"), "",
        bench.table(["adapter", "base", "val loss of the base (step 0)", "best val loss, trained"], rows), "",
        f"Runs in {out} (kept: a second call reads them instead of training again)."])
