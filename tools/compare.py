"""
Train every preset on E2E with the same base and budget, once per seed, and print one table of means and
standard deviations over the seeds; --png draws the curves and the papers' quality-against-parameters plot.

    python tools/compare.py --init_from=gpt2-medium --r=4 --max_iters=26288 --seeds=1,2,3   # the paper's setting, on a GPU
    python tools/compare.py --init_from=out-e2e-base-6l --seeds=1,2,3 --png                   # the README's CPU run

Each run trains in its own train.py process (so its peak memory is its own) into OUT/<preset>/seed<N>/,
then decodes the test MRs (all 630 by default; greedy unless --beam_size; predictions.txt in the run's
folder) and scores them with the five official E2E metrics (e2e_metrics.py; METEOR, ROUGE-L and CIDEr need Java). A finished run's row is kept
in its folder, so the same command run again after an interruption trains only what is missing, and
re-draws the table and plots at once. Anything after `--` goes to every train.py run as it is (e.g.
-- --batch_size=16), and --override PRESET:KEY=VALUE changes one preset only (VeRA needs a far larger
learning rate than LoRA).
"""
import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: the project's modules
sys.path.insert(0, ROOT)
from tools import e2e_metrics  # torch-free: its packages load only when it scores
from data.common import SEED, TEXT, Bound, Parser, check_record, quiet_ctrl_c, read_metrics, write_binary
from train_options import BOUNDS
from data.common import run as run_early

NAMES = {"val_loss": "val loss", **e2e_metrics.NAMES}
OWN_ARGUMENTS = ("init_from", "data_dir", "r", "alpha", "targets", "max_iters", "batch_size", "learning_rate",
                 "device", "quantize")  # compare.py's own options, passed to every run
PER_RUN = ("adapter", "seed", "out_dir", "dataset", "init_from", "data_dir")  # each run's, or the same for all
OWN_OPTIONS = OWN_ARGUMENTS + PER_RUN


def options(argv):
    """-> (the options, what follows `--` for every train.py run); checked before torch loads."""
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = Parser(prog="compare.py", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", type=TEXT, required=True, help="the base: hub name or local path (the same for every preset)")
    p.add_argument("--presets", type=TEXT, default="lora,sharea,shareb,shareab,tied,vera",
                   help="presets of sharelora.py, comma-separated (default: the papers' six)")
    p.add_argument("--r", type=BOUNDS["r"], default=8)
    p.add_argument("--alpha", type=BOUNDS["alpha"], default=16.0)
    p.add_argument("--targets", type=TEXT, default="q,v")
    p.add_argument("--max_iters", type=Bound(int, 1, 10**9), default=300)
    p.add_argument("--batch_size", type=BOUNDS["batch_size"], default=8)
    p.add_argument("--learning_rate", type=BOUNDS["learning_rate"], default=2e-3)
    p.add_argument("--seeds", type=TEXT, default="1", help="comma-separated, e.g. 1,2,3: every preset trains once per seed")
    p.add_argument("--eval_mrs", type=Bound(int, 0, 10**6), default=630, help="the first N of the 630 test MRs (0: skip decoding)")
    p.add_argument("--beam_size", type=Bound(int, 1, 100), default=1, help="1: greedy (batched); 10: the papers' beam search")
    p.add_argument("--data_dir", type=TEXT, default="data/e2e")
    p.add_argument("--out", type=TEXT, default="out-compare", help="one folder per preset and seed in here, compare.md, results.json")
    p.add_argument("--override", type=TEXT, action="append", default=[], metavar="PRESET:KEY=VALUE")
    p.add_argument("--png", action="store_true", help="also write OUT/loss.png and OUT/quality.png (needs matplotlib)")
    p.add_argument("--device", type=BOUNDS["device"], default="auto")
    p.add_argument("--quantize", default="none", choices=("none", "nf4", "int8"),
                   help="the frozen base of every run in 4 or 8 bits (QShareA vs QLoRA: quantize.py)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be whole numbers separated by commas, like 1,2,3, not {args.seeds!r}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds names a seed twice: {args.seeds}")
    bad = [x for x in args.seeds if SEED.problem(x)]
    if bad:
        p.error(f"--seeds must be whole numbers in [0, 2**32), not {bad[0]}")
    # what compare.py sets for each run itself cannot also come from `--` or --override: train.py would take
    # the later value, and the row labelled sharea (or seed 2, or r = 8) would hold another run
    # (--override may change a shared setting for one preset, say vera:learning_rate=1e-2: the table names it)
    for where, option, own in [("after --", a, OWN_OPTIONS) for a in extra] + [
            (f"--override {o}", "--" + o.partition(":")[2], PER_RUN) for o in args.override]:
        key = option[2:].partition("=")[0] if option.startswith("--") else None
        if key in own:
            p.error(f"{where} sets {key}, which compare.py sets for every run itself: "
                    + (f"give --{key} to compare.py" if key in OWN_ARGUMENTS and own is OWN_OPTIONS else
                       "every preset and seed gets its own, or all the same one (leave it out)"))
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--png needs matplotlib: pip install matplotlib (or leave out --png)")
    return args, extra


if __name__ == "__main__":
    quiet_ctrl_c()  # until main() runs: Ctrl-C while torch loads ends quietly
    run_early(options, sys.argv[1:])

import runtime  # noqa: E402  (after the options were checked)
import sharelora  # noqa: E402
import train  # noqa: E402
from tools.evaluate_e2e import decode_mrs, read_references, room_to_generate, write_official_layout  # noqa: E402

PRESETS = list(sharelora.PRESETS)
ROW_FILE = "compare_row.json"  # a finished run's measurements, next to its adapter
COMMAND_FILE = "compare_command.json"  # the train.py options a run was started with, before it finishes
SUMMARY_FILES = ("results.json", "compare.md", "loss.png", "quality.png")


def main(argv=None):
    args, extra = options(sys.argv[1:] if argv is None else argv)
    runtime.run(compare, args, extra)


def compare(args, extra):
    presets = [x.strip() for x in args.presets.split(",")]
    runtime.check(len(set(presets)) == len(presets), f"--presets names a preset twice: {args.presets}")
    unknown = [x for x in presets if x not in PRESETS]
    if unknown:
        runtime.fail(f"unknown preset(s) {unknown}: choose from {', '.join(PRESETS)}")
    overrides = {}
    for o in args.override:
        preset, _, setting = o.partition(":")
        if preset not in presets or "=" not in setting:
            runtime.fail(f"--override {o!r} should look like vera:learning_rate=1e-2, for a preset being run")
        overrides.setdefault(preset, []).append(f"--{setting}")
    groups = read_references(args.data_dir, "test")[:args.eval_mrs]
    commands = {}
    for preset in presets:
        for seed in args.seeds:
            out_dir = os.path.join(args.out, preset, f"seed{seed}")
            cmd = train_command(args, preset, seed, out_dir, extra + overrides.get(preset, []))
            train.validate(train.parse_args(cmd[2:]))  # every option checked before the first run starts
            commands[preset, seed] = cmd, out_dir
    runtime.writable_folder(args.out, "--out")
    with runtime.own_folder(args.out, "--out"):  # one comparison at a time in --out; each run's train.py owns its folder
        runtime.finish_set(args.out, "results.json")  # a summary a crash left half moved, completed first
        check_summary(args.out, commands)
        rows = run_all(args, commands, groups)
        runtime.write_set(args.out, lambda folder: write_summary(folder, rows, args, extra, overrides, len(groups)),
                          last="results.json", what=f"the summary in {args.out}")


def run_all(args, commands, groups):
    """Train, decode and score every run that needs it (plan says which); -> their rows."""
    plans = {key: plan(out_dir, cmd, args, len(groups)) for key, (cmd, out_dir) in commands.items()}  # all checked first
    rows = []
    for (preset, seed), (cmd, out_dir) in commands.items():
        row, todo = plans[preset, seed]
        if todo == "reuse":
            print(f"== {preset}, seed {seed}: finished earlier in {out_dir}, reused")
        else:
            if todo in ("train", "resume"):
                print(f"== {preset}, seed {seed}: {'continuing ' if todo == 'resume' else ''}{' '.join(cmd[2:])}", flush=True)
                os.makedirs(out_dir, exist_ok=True)
                with runtime.own_folder(out_dir):  # released before train.py starts: it takes the folder then
                    runtime.write_text(os.path.join(out_dir, COMMAND_FILE), json.dumps(cmd[2:]) + "\n")  # whose run this is
                run = cmd if todo == "train" else [*cmd[:2], "--init_from=resume", f"--out_dir={out_dir}",
                                                   f"--max_iters={args.max_iters}"]
                if runtime.run_child(run) != 0:  # the child ends with us, and a stop signal reaches it once
                    print(f"compare.py: training {preset} (seed {seed}) failed; its error is above", file=sys.stderr)
                    sys.exit(2)
            else:
                print(f"== {preset}, seed {seed}: trained earlier in {out_dir}, decoding and scoring", flush=True)
            with runtime.own_folder(out_dir):
                row = measure(preset, seed, out_dir, groups, args)
                # the row comes last: a run whose predictions were written but not its row is measured again
                runtime.write_text(os.path.join(out_dir, ROW_FILE), json.dumps({**row, "command": cmd[2:]}, indent=1) + "\n")
        rows.append({k: v for k, v in row.items() if k != "command"})
    return rows


def write_summary(folder, rows, args, extra, overrides, n_mrs):
    """results.json, compare.md and the plots, into `folder` (write_set's staging: they appear together)."""
    table = format_table(rows, args, extra, overrides, n_mrs)  # every row is read before anything is written
    runtime.write_text(os.path.join(folder, "results.json"), json.dumps(rows, indent=1) + "\n")
    print("\n" + table)
    runtime.write_text(os.path.join(folder, "compare.md"), table + "\n")
    if args.png:
        for path in (plot_loss(rows, args, folder), plot_quality(rows, args, folder)):
            print(f"wrote {os.path.join(args.out, os.path.basename(path))}")


def train_command(args, preset, seed, out_dir, extra):
    return [sys.executable, os.path.join(ROOT, "train.py"),
            f"--init_from={args.init_from}", "--dataset=e2e", f"--data_dir={args.data_dir}", f"--adapter={preset}",
            f"--r={args.r}", f"--alpha={args.alpha}", f"--targets={args.targets}", f"--max_iters={args.max_iters}",
            f"--batch_size={args.batch_size}", f"--learning_rate={args.learning_rate}", f"--seed={seed}",
            f"--out_dir={out_dir}", f"--device={args.device}", f"--warmup_iters={max(1, args.max_iters // 20)}",
            f"--eval_interval={max(1, args.max_iters // 4)}",
            *([f"--quantize={args.quantize}"] if args.quantize != "none" else []), *extra]


def plan(out_dir, cmd, args, n_mrs):
    """(the row of an earlier run of this very command or None, what to do): "reuse" a finished and
    scored run; "measure" a run trained but not scored (or scored on other MRs or another beam);
    "resume" one interrupted in training (train.py's resume is exact); "train" one not started. A folder
    that holds another command's run is refused: never overwritten."""
    if not os.path.exists(out_dir):
        return None, "train"
    path = os.path.join(out_dir, ROW_FILE)
    row = check_row(runtime.read_json(path, "comparison row"), path) if os.path.exists(path) else None
    marker = os.path.join(out_dir, COMMAND_FILE)
    made_by = row.get("command") if isinstance(row, dict) else (
        runtime.read_json(marker, "comparison command") if os.path.exists(marker) else None)
    runtime.check(made_by == cmd[2:], f"--out {args.out} holds a run of another comparison in {out_dir} (other "
                                      "options, or not made by compare.py): choose another --out, or delete that folder")
    if row is not None:
        return row, "reuse" if (row.get("mrs"), row.get("beam_size")) == (n_mrs, args.beam_size) else "measure"
    if trained(out_dir, args.max_iters):
        finished(out_dir)  # its log is read now, before anything is written
        return None, "measure"
    return None, "resume" if os.path.exists(os.path.join(out_dir, runtime.CKPT_FILE)) else "train"


def trained(out_dir, max_iters):
    """Whether train.py finished this run: its metrics.jsonl ends it with {"done": max_iters, ...}."""
    path = os.path.join(out_dir, "metrics.jsonl")
    return os.path.exists(path) and any(r.get("done") == max_iters for r in read_metrics(path))


def finished(out_dir):
    """(the step records, the final record) of a finished run's metrics.jsonl, checked."""
    path = os.path.join(out_dir, "metrics.jsonl")
    log = read_metrics(path)
    done = [r for r in log if "done" in r]
    runtime.check(done and all(k in done[-1] for k in ("best_val_loss", "peak_memory_mb")),
                  f"{path} has no final record with best_val_loss and peak_memory_mb: train the run again")
    return log, done[-1]


NUMBER = Bound(float, 0, 3.4e38)
ROW_FIELDS = {"preset": TEXT, "seed": SEED, "trainable": Bound(int, 0, 2**53), "mrs": Bound(int, 0, 10**6),
              "beam_size": Bound(int, 1, 100), "file_bytes": Bound(int, 0, 2**53), "val_loss": NUMBER,
              "tokens_per_s": NUMBER, "peak_memory_mb": NUMBER,
              "val_curve": Bound(list, test=lambda v: all(isinstance(p, list) and len(p) == 2 and
                                                             not any(NUMBER.problem(x) for x in p) for p in v),
                                 what="a list of [step, loss] pairs"),
              "command": Bound(list, test=lambda v: all(isinstance(x, str) for x in v), what="a list of options"),
              **{m: Bound(float, -3.4e38, 3.4e38) for m in e2e_metrics.METRICS}}


def check_row(row, path):
    """A compare_row.json, checked field by field before any of it is used or anything is written."""
    return check_record(row, ROW_FIELDS, path, "delete it to measure the run again",
                        required=[k for k in ROW_FIELDS if k not in e2e_metrics.METRICS])


def check_summary(out, commands):
    """The summary files in --out are rewritten only when they summarise runs of this command: an earlier
    comparison of more presets or seeds, or files compare.py did not write, are never overwritten."""
    path = os.path.join(out, "results.json")
    if os.path.exists(path):
        earlier = runtime.read_json(path, "comparison results")
        ok = isinstance(earlier, list) and all(isinstance(r, dict) for r in earlier)
        extra = sorted({(r.get("preset"), r.get("seed")) for r in earlier} - set(commands)) if ok else ["?"]
        runtime.check(not extra, f"--out {out} summarises runs this command does not make ({extra[:3]}): give "
                                 "the presets and seeds of that comparison again, or choose another --out")
    else:
        found = [f for f in SUMMARY_FILES if os.path.exists(os.path.join(out, f))]
        runtime.check(not found, f"--out {out} holds {', '.join(found)} but no results.json of compare.py: "
                                 "choose another --out (nothing there is overwritten)")


def measure(preset, seed, out_dir, groups, args):
    log, done = finished(out_dir)
    steps = [r for r in log if "tokens_per_s" in r]
    adapter = os.path.join(out_dir, runtime.ADAPTER_FILE)
    model, info = runtime.load_model(adapter=adapter, device=args.device)
    row = {"preset": preset, "seed": seed, "trainable": sharelora.count_trainable(model), "mrs": len(groups),
           "beam_size": args.beam_size, "file_bytes": os.path.getsize(adapter), "val_loss": done["best_val_loss"],
           "val_curve": [[r["step"], r["val_loss"]] for r in log if "val_loss" in r],
           # the median step, skipping the first 5 (warm-up of allocator and caches)
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[5:] or steps),
           "peak_memory_mb": done["peak_memory_mb"]}
    if groups:
        mrs = [g["mr"] for g in groups]
        predictions = decode_mrs(model, info, mrs, beam_size=args.beam_size, max_new_tokens=room_to_generate(model, mrs))
        write_official_layout(out_dir, predictions, groups)  # predictions.txt, references.txt: to read, or score elsewhere
        row.update(e2e_metrics.e2e_scores(predictions, [g["refs"] for g in groups]))
    return row


# ---- the table ------------------------------------------------------------------------------

def spread(values):
    """(mean, sample standard deviation); the deviation is 0 for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def by_preset(rows):
    out = {}
    for r in rows:
        out.setdefault(r["preset"], []).append(r)
    return out


def differs(mine, lora):
    """True when two presets' means are further apart than their standard deviations added: a difference
    the seeds' own scatter does not cover (a rough rule for 3 seeds, not a significance test)."""
    (m1, s1), (m2, s2) = mine, lora
    return (s1 > 0 or s2 > 0) and abs(m1 - m2) > s1 + s2


def format_table(rows, args, extra, overrides, n_mrs):
    groups = by_preset(rows)
    columns = ["val_loss"] + [m for m in e2e_metrics.METRICS if all(m in r for r in rows)]
    digits = {"val_loss": 3, "nist": 3, "cider": 3}
    stats = {p: {c: spread([r[c] for r in rs]) for c in columns} for p, rs in groups.items()}
    head = ("| preset | trainable params | adapter file (bytes) | " + " | ".join(NAMES[c] for c in columns)
            + " | train tokens/s | peak memory (MB) |")
    lines = [head, "|---|---:|---:|" + "---:|" * (len(columns) + 2)]
    for preset, rs in groups.items():
        cells = []
        for c in columns:
            (m, s), d = stats[preset][c], digits.get(c, 2)
            mark = " *" if preset != "lora" and "lora" in stats and differs((m, s), stats["lora"][c]) else ""
            cells.append(f"{m:.{d}f} ± {s:.{d}f}{mark}" if len(rs) > 1 else f"{m:.{d}f}")
        lines.append(f"| {preset} | {rs[0]['trainable']:,} | {rs[0]['file_bytes']:,} | " + " | ".join(cells)
                     + f" | {statistics.median(r['tokens_per_s'] for r in rs):,.0f} "
                       f"| {max(r['peak_memory_mb'] for r in rs):,.0f} |")
    how = "greedy" if args.beam_size == 1 else f"beam {args.beam_size}"
    seeds = ",".join(map(str, args.seeds))
    lines.append(f"\nbase {args.init_from}; targets {args.targets}, r = {args.r}, alpha = {args.alpha}; "
                 f"{args.max_iters} steps of batch {args.batch_size}, lr {args.learning_rate}; seeds {seeds}"
                 + (f"; extra {' '.join(extra)}" if extra else "")
                 + (f"; overrides {overrides}" if overrides else "")
                 + f"; metrics on the first {n_mrs} test MRs, {how}; {runtime.machine(args.device)}.")
    if len(args.seeds) > 1:
        lines.append(f"Mean ± sample standard deviation over the {len(args.seeds)} seeds; * marks a mean further "
                     "from LoRA's than the two standard deviations added. Val loss is the best one of each run; "
                     "train tokens/s the median of the seeds, peak memory the largest.")
    return "\n".join(lines)


# ---- the plots (--png) ----------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt
    return plt


def save(fig, path):
    """Write a figure as PNG, atomically: a crash never leaves half a picture."""
    write_binary(path, lambda f: fig.savefig(f, dpi=110, bbox_inches="tight", format="png"))
    pyplot().close(fig)
    return path


def plot_loss(rows, args, folder):
    """Validation loss against step, one line per preset: the mean over seeds, and a band of ± one
    standard deviation around it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset, rs in by_preset(rows).items():
        steps = sorted({s for r in rs for s, _ in r["val_curve"]})
        curves = [dict(map(tuple, r["val_curve"])) for r in rs]
        steps = [s for s in steps if all(s in c for c in curves)]
        mean, std = zip(*(spread([c[s] for c in curves]) for s in steps))
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{preset} ({rs[0]['trainable']:,} params)")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel(f"step ({args.batch_size} E2E examples each)")
    ax.set_ylabel("validation loss (reference tokens)")
    ax.set_title(f"{args.init_from}, {len(args.seeds)} seed(s): mean ± std")
    ax.set_ylim(top=min(ax.get_ylim()[1], 1.5 * min(r["val_loss"] for r in rows)))  # step 0 would flatten the rest
    ax.legend()
    return save(fig, os.path.join(folder, "loss.png"))


def plot_quality(rows, args, folder):
    """The papers' figure: quality against trainable parameters (log scale), mean ± std over seeds,
    one panel for BLEU (when decoded) and one for the validation loss."""
    plt = pyplot()
    from matplotlib import ticker
    panels = (["bleu"] if all("bleu" in r for r in rows) else []) + ["val_loss"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, column in zip(axes[0], panels):
        for preset, rs in by_preset(rows).items():
            m, s = spread([r[column] for r in rs])
            ax.errorbar(rs[0]["trainable"], m, yerr=s, fmt="o", capsize=4)
            ax.annotate(preset, (rs[0]["trainable"], m), textcoords="offset points", xytext=(6, 4))
        ax.set_xscale("log")
        counts = [r["trainable"] for r in rows]
        ax.set_xticks([t for t in (k * 10 ** e for e in range(9) for k in (1, 2, 5))
                       if min(counts) / 2 <= t <= max(counts) * 2])  # 1-2-5 steps: enough labels on a short axis
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))  # 10,000 rather than 10^4
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.2)  # room for the labels of the outermost points
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(NAMES[column] + (" (lower is better)" if column == "val_loss" else ""))
    fig.suptitle(f"{args.init_from}: quality against parameters, {len(args.seeds)} seed(s)")
    return save(fig, os.path.join(folder, "quality.png"))


if __name__ == "__main__":
    main()
