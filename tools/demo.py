"""
The whole method, offline, on a CPU: `make demo` runs this in the project's .venv.

    1. prepare E2E and its reference sentences from the copies shipped in data/*/source;
    2. pretrain a small stand-in GPT-2 on the reference sentences (real GPT-2 weights need a network);
    3. train a ShareA adapter and a LoRA adapter on E2E (meaning representation -> sentence);
    4. decode a few test MRs next to their references, score BLEU on the first 100 test MRs (greedy);
    5. print one table, write the loss curves as a PNG, and say what to run next on a GPU.

Every step is reused when a previous run finished it, so a second `make demo` takes a fraction of the
first. Everything goes to out-demo/ (override with --out).
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: the project's modules
sys.path.insert(0, ROOT)
from data.common import TEXT, Parser, committed_path, own_folder, read_metrics, run, run_child, write_text  # noqa: E402
BASE = ["config/e2e_base.py", "--max_iters=300", "--eval_interval=100"]  # the stand-in base, at half budget
ADAPTER = ["--dataset=e2e", "--targets=q,v", "--r=8", "--alpha=16", "--max_iters=300", "--batch_size=8",
           "--learning_rate=2e-3", "--warmup_iters=15", "--eval_interval=75", "--device=cpu"]
PRESETS = ("sharea", "lora")
MRS = 100  # scored; the first 4 are shown


def options(argv=None):
    """The command line: --out is resolved from the current folder, before the demo works in ROOT."""
    p = Parser(prog="tools/demo.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out", type=TEXT, default=os.path.join(ROOT, "out-demo"),
                   help="where the base, the adapters and the plot go (default: out-demo in the repository)")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None):
    args = options(argv)
    os.chdir(ROOT)
    os.makedirs(args.out, exist_ok=True)
    with own_folder(args.out, "--out"):  # one demo at a time here; each train.py owns its own folder inside
        demo(args)


def demo(args):
    started = time.time()
    say(1, "data: E2E and its reference sentences, from the shipped copies")
    for name in ("e2e", "e2e_refs"):
        if not os.path.exists(f"data/{name}/meta.json"):
            step([f"data/{name}/prepare.py"])
        else:
            print(f"   data/{name} is prepared already")
    base = os.path.join(args.out, "base")
    say(2, f"a stand-in GPT-2 (4 layers, 128 wide) pretrained on E2E's sentences -> {base}")
    timings = {"base": train_once(base, BASE)}
    for preset in PRESETS:
        say(3, f"{preset} adapter on E2E -> {args.out}/{preset}")
        timings[preset] = train_once(os.path.join(args.out, preset),
                                     [f"--init_from={base}", f"--adapter={preset}", *ADAPTER])
    say(4, f"decoding: the first {MRS} test MRs, greedy")
    rows = [score(args.out, preset, timings[preset]) for preset in PRESETS]
    say(5, "summary")
    print(table(rows))
    png = plot(args.out)
    print(f"\nbase {base} (val loss {best_val(base):.2f}, pretrained in {seconds(timings['base'])}), adapters in {args.out}/<preset>/adapter.safetensors, "
          f"metrics in {args.out}/<preset>/metrics.jsonl" + (f", loss curves in {png}" if png else ""))
    print(f"demo took {time.time() - started:,.0f} s. Next, on a GPU with GPT-2 Medium (README, Quick start):\n"
          "  python data/e2e/prepare.py && python train.py config/e2e_gpt2m_sharea.py\n"
          "  python tools/evaluate_e2e.py --out_dir=out-e2e-gpt2m-sharea")


def say(n, what):
    print(f"\n== {n}/5 {what}", flush=True)


def step(argv):
    """Run a project script; its own progress bar shows; a failure ends the demo with its message. The
    script ends with the demo (run_child): a Ctrl-C stops both, and the demo run again continues."""
    code = run_child([sys.executable, *argv])
    if code != 0:
        sys.exit(code)


def train_once(out_dir, options):
    """train.py, unless out_dir holds the finished run already; a run an interruption stopped is resumed.
    Returns the seconds training took (None when a run finished earlier without recording them)."""
    timing = os.path.join(out_dir, "demo_seconds.txt")
    if finished(out_dir):
        print(f"   {out_dir} is trained already (delete it to train again)")
    else:
        t0 = time.time()
        if os.path.exists(committed_path(out_dir, "ckpt.pt")):  # stopped by Ctrl-C, a kill or a crash: continue it
            max_iters = next(o for o in reversed(options) if o.startswith("--max_iters="))
            print(f"   {out_dir} was interrupted: continuing it")
            step(["train.py", "--init_from=resume", f"--out_dir={out_dir}", max_iters])
        else:
            step(["train.py", *options, f"--out_dir={out_dir}"])
        with own_folder(out_dir):
            write_text(timing, f"{time.time() - t0:.0f}\n")
    try:
        with open(timing) as f:
            return float(f.read())
    except (OSError, ValueError):
        return None


def finished(out_dir):
    """Whether train.py ended this run: its metrics.jsonl holds the {"done": ...} record."""
    log = os.path.join(out_dir, "metrics.jsonl")
    return os.path.exists(log) and any("done" in r for r in read_metrics(log))


def seconds(value):
    return "?" if value is None else f"{value:.0f} s"


def records(out_dir):
    return read_metrics(os.path.join(out_dir, "metrics.jsonl"))


def best_val(out_dir):
    return min(r["val_loss"] for r in records(out_dir) if "val_loss" in r)


def score(out, preset, seconds):
    import runtime
    import sharelora
    from tools.e2e_metrics import bleu
    from tools.evaluate_e2e import decode_mrs
    adapter = os.path.join(out, preset, runtime.ADAPTER_FILE)
    model, info = runtime.load_model(adapter=adapter, device="cpu", dtype="float32")
    groups = runtime.read_json("data/e2e/test_refs.json")[:MRS]
    predictions = decode_mrs(model, info, [g["mr"] for g in groups], beam_size=1)
    for g, text in list(zip(groups, predictions))[:4]:
        print(f"   {preset:>6} | {g['mr']}\n          -> {text}\n     (ref)   {g['refs'][0]}")
    model, _ = runtime.load_model(adapter=adapter, device="cpu", dtype="float32", merge=False)
    return {"preset": preset, "trainable": sharelora.count_trainable(model), "bytes": os.path.getsize(adapter),
            "val": best_val(os.path.join(out, preset)), "bleu": bleu(predictions, [g["refs"] for g in groups]),
            "seconds": seconds}


def table(rows):
    lines = ["| adapter | trainable parameters | adapter file (bytes) | best val loss | BLEU (100 MRs) | training time |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['preset']} | {r['trainable']:,} | {r['bytes']:,} | {r['val']:.3f} | {r['bleu']:.2f} | {seconds(r['seconds'])} |"
              for r in rows]
    return "\n".join(lines)


def plot(out):
    """Validation loss against step for each adapter, as out/loss.png; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from data.common import write_binary
    except ImportError:
        print("   (no plot: pip install matplotlib)")
        return None
    for preset in PRESETS:
        points = [(r["step"], r["val_loss"]) for r in records(os.path.join(out, preset)) if "val_loss" in r]
        plt.plot(*zip(*points), marker="o", label=preset)
    plt.xlabel("step (8 E2E examples each)")
    plt.ylabel("validation loss (reference tokens)")
    plt.title("adapters on the stand-in base")
    plt.legend()
    path = os.path.join(out, "loss.png")
    write_binary(path, lambda f: plt.savefig(f, dpi=100, bbox_inches="tight", format="png"))
    return path


if __name__ == "__main__":
    run(main)  # a damaged metrics.jsonl or an unwritable --out: one sentence
