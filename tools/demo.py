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
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: the project's modules
sys.path.insert(0, ROOT)
from data.common import TEXT, Parser, read_metrics, run  # noqa: E402
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
    print(f"\nbase {base} (val loss {best_val(base):.2f}, pretrained in {timings['base']:.0f} s), adapters in {args.out}/<preset>/adapter.safetensors, "
          f"metrics in {args.out}/<preset>/metrics.jsonl" + (f", loss curves in {png}" if png else ""))
    print(f"demo took {time.time() - started:,.0f} s. Next, on a GPU with GPT-2 Medium (README, Quick start):\n"
          "  python data/e2e/prepare.py && python train.py config/e2e_gpt2m_sharea.py\n"
          "  python tools/evaluate_e2e.py --out_dir=out-e2e-gpt2m-sharea")


def say(n, what):
    print(f"\n== {n}/5 {what}", flush=True)


def step(argv):
    """Run a project script; its own progress bar shows; a failure ends the demo with its message."""
    r = subprocess.run([sys.executable, *argv])
    if r.returncode != 0:
        sys.exit(r.returncode)


def train_once(out_dir, options):
    """train.py, unless out_dir holds the finished run already. Returns the seconds it took (then or now)."""
    log = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(log) and any("done" in r for r in read_metrics(log)):
        print(f"   {out_dir} is trained already (delete it to train again)")
    else:
        t0 = time.time()
        step(["train.py", *options, f"--out_dir={out_dir}"])
        with open(os.path.join(out_dir, "demo_seconds.txt"), "w") as f:
            f.write(f"{time.time() - t0:.0f}\n")
    with open(os.path.join(out_dir, "demo_seconds.txt")) as f:
        return float(f.read())


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
    lines += [f"| {r['preset']} | {r['trainable']:,} | {r['bytes']:,} | {r['val']:.3f} | {r['bleu']:.2f} | {r['seconds']:.0f} s |"
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
