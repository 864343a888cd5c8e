"""
Train every preset on E2E with the same base, budget and seed, and print one table.

    python compare.py --init_from=gpt2-medium --r=4 --max_iters=26288      # the paper's setting, on a GPU
    python compare.py --init_from=out-e2e-base --max_iters=300 --eval_mrs=100   # the README's CPU run

Each preset trains in its own train.py process (so its peak memory is its own) into OUT/<preset>/, then
decodes the first `eval_mrs` test MRs (greedy by default) for BLEU and ROUGE-L against all their
references. Anything after `--` goes to every train.py run as it is (e.g. -- --batch_size=16), and
--override PRESET:KEY=VALUE changes one preset only (VeRA needs a far larger learning rate than LoRA).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from data.common import Parser, quiet_ctrl_c
from data.common import run as run_early


def options(argv):
    """-> (the options, what follows `--` for every train.py run); checked before torch loads."""
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = Parser(prog="compare.py", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", required=True, help="the base: hub name or local path (the same for every preset)")
    p.add_argument("--presets", default="lora,sharea,shareb,shareab,tied,vera",
                   help="presets of sharelora.py, comma-separated (default: the papers' six)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q,v")
    p.add_argument("--max_iters", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval_mrs", type=int, default=100, help="the first N of the 630 test MRs (0: skip decoding)")
    p.add_argument("--beam_size", type=int, default=1)
    p.add_argument("--data_dir", default="data/e2e")
    p.add_argument("--out", default="out-compare", help="one folder per preset in here, and compare.md")
    p.add_argument("--override", action="append", default=[], metavar="PRESET:KEY=VALUE")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv[:argv.index("--")] if "--" in argv else argv), extra


if __name__ == "__main__":
    quiet_ctrl_c()  # until main() runs: Ctrl-C while torch loads ends quietly
    run_early(options, sys.argv[1:])

import runtime  # noqa: E402  (after the options were checked)
import sharelora  # noqa: E402
import train  # noqa: E402
from evaluate_e2e import corpus_scores, decode_mrs  # noqa: E402

PRESETS = list(sharelora.PRESETS)


def main(argv=None):
    args, extra = options(sys.argv[1:] if argv is None else argv)
    runtime.run(compare, args, extra)


def compare(args, extra):
    presets = [x.strip() for x in args.presets.split(",")]
    unknown = [x for x in presets if x not in PRESETS]
    if unknown:
        runtime.fail(f"unknown preset(s) {unknown}: choose from {', '.join(PRESETS)}")
    overrides = {}
    for o in args.override:
        preset, _, setting = o.partition(":")
        if preset not in presets or "=" not in setting:
            runtime.fail(f"--override {o!r} should look like vera:learning_rate=1e-2, for a preset being run")
        overrides.setdefault(preset, []).append(f"--{setting}")
    runtime.check(args.eval_mrs >= 0 and args.max_iters >= 1, "--eval_mrs must be at least 0 and --max_iters at least 1")
    refs = os.path.join(args.data_dir, "test_refs.json")
    runtime.check(os.path.exists(refs), f"{refs} does not exist: run python data/e2e/prepare.py first (or pass --data_dir)")
    groups = runtime.read_json(refs, "references file")[:args.eval_mrs]
    runtime.writable_folder(args.out, "--out")
    commands = {}
    for preset in presets:
        out_dir = os.path.join(args.out, preset)
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
               f"--init_from={args.init_from}", "--dataset=e2e", f"--data_dir={args.data_dir}", f"--adapter={preset}",
               f"--r={args.r}", f"--alpha={args.alpha}", f"--targets={args.targets}", f"--max_iters={args.max_iters}",
               f"--batch_size={args.batch_size}", f"--learning_rate={args.learning_rate}", f"--seed={args.seed}",
               f"--out_dir={out_dir}", f"--device={args.device}", f"--warmup_iters={max(1, args.max_iters // 20)}",
               f"--eval_interval={max(1, args.max_iters // 4)}", *extra, *overrides.get(preset, [])]
        if os.path.exists(out_dir):  # never overwrite an earlier comparison's runs
            runtime.fail(f"--out {args.out} holds an earlier comparison ({out_dir}): choose another --out, or delete it")
        train.validate(train.parse_args(cmd[2:]))  # every option checked before the first run starts
        commands[preset] = cmd
    rows = []
    for preset, cmd in commands.items():
        print(f"== {preset}: {' '.join(cmd[2:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"compare.py: training {preset} failed; its error is above", file=sys.stderr)
            sys.exit(2)
        rows.append(measure(preset, os.path.join(args.out, preset), groups, args))
    table = format_table(rows, args, extra, overrides, len(groups))
    print("\n" + table)
    runtime.write_text(os.path.join(args.out, "compare.md"), table + "\n")


def measure(preset, out_dir, groups, args):
    log = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    steps = [r for r in log if "tokens_per_s" in r]
    done = next(r for r in log if "done" in r)
    adapter = os.path.join(out_dir, runtime.ADAPTER_FILE)
    model, info = runtime.load_model(adapter=adapter, device=args.device)
    row = {"preset": preset, "trainable": sharelora.count_trainable(model), "mrs": len(groups),
           "file_bytes": os.path.getsize(adapter), "best_val_loss": done["best_val_loss"],
           # the median step, skipping the first 5 (warm-up of allocator and caches)
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[5:] or steps),
           "peak_memory_mb": done["peak_memory_mb"]}
    if groups:
        predictions = decode_mrs(model, info, [g["mr"] for g in groups], beam_size=args.beam_size)
        row.update(corpus_scores(predictions, [g["refs"] for g in groups]))
    return row


def format_table(rows, args, extra, overrides, n_mrs):
    head = ("| preset | trainable params | adapter file (bytes) | best val loss | BLEU | ROUGE-L | train tokens/s "
            "| peak memory (MB) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['trainable']:,} | {r['file_bytes']:,} | {r['best_val_loss']:.3f} | "
                     f"{r.get('bleu', float('nan')):.2f} | {r.get('rouge_l', float('nan')):.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_memory_mb']:,.0f} |")
    how = "greedy" if args.beam_size == 1 else f"beam {args.beam_size}"
    lines.append(f"\nbase {args.init_from}; targets {args.targets}, r = {args.r}, alpha = {args.alpha}; "
                 f"{args.max_iters} steps of batch {args.batch_size}, lr {args.learning_rate}, seed {args.seed}"
                 + (f"; extra {' '.join(extra)}" if extra else "")
                 + (f"; overrides {overrides}" if overrides else "")
                 + f"; BLEU/ROUGE-L on the first {n_mrs} test MRs, {how}; {runtime.machine(args.device)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
