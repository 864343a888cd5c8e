"""
Tasks trained around one shared A, three ways, on one base and budget, once per seed; one table of
each task's scores (mean ± standard deviation over the seeds).

    python tools/joint_quality.py --init_from=out-e2e-base --seeds=1,2,3      # docs/bank.md's table

    separate  every task its own adapter, its own A: the reference, which no bank can hold
    sequence  the first task as in separate; every other task trains only its B, around the first
              task's A, frozen (train.py --init_adapter=FIRST --spec="A=shared/frozen B=layer")
    joint     one train.py --tasks run over every task's data, one A for all, round-robin batches,
              (number of tasks) x max_iters steps: every task gets as many batches as in the others

The tasks (--tasks, default E2E and E2E reversed: `python data/e2e/prepare.py` and `... --reverse`)
are NAME=DATA_DIR pairs; each is scored on an evenly spaced --eval_prompts of its test prompts, greedy,
by evaluate_e2e.py's metrics (E2E: BLEU ... CIDEr; the reversed task, whose replies are MRs: slot F1
and exact MR), and by its final validation loss. Every run is a train.py process in
OUT/WAY/seedN[/TASK]; a run finished and scored earlier is reused, one interrupted in training is
resumed (exactly), so the command run again after a stop does only what is missing.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: the project's modules
sys.path.insert(0, ROOT)
from data.common import SEED, TEXT, Bound, Parser, check_record, distinct_numbers, quiet_ctrl_c, read_metrics  # noqa: E402
from data.common import run as run_early  # noqa: E402
from train_options import BOUNDS, task_folders  # noqa: E402

WAYS = ("separate", "sequence", "joint")
FROZEN_A = "A=shared/frozen B=layer"  # sequence: the first task's A, only B trains (ShareA's layout)
ROW_FILE = "quality_row.json"  # a scored run's figures, beside its adapter
COMMAND_FILE = "quality_command.json"  # the train.py options a run was started with: whose run a folder holds
OURS = (*WAYS, "quality.md", "results.json", ".lock", ".staging", ".committed")  # what --out may hold


def options(argv):
    p = Parser(prog="tools/joint_quality.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--init_from", type=TEXT, required=True, help="the base, a local folder or hub name (the same for every run)")
    p.add_argument("--tasks", type=Bound(str, test=lambda v: task_folders(v) is not None and len(task_folders(v)) >= 2,
                                         what="NAME=DATA_DIR pairs, at least two, comma-separated"),
                   default="e2e=data/e2e,parse=data/e2e_parse")
    p.add_argument("--seeds", type=Bound(str, test=lambda v: distinct_numbers(v, SEED) is not None,
                                         what="whole numbers in [0, 2**32) separated by commas, none twice"), default="1,2,3")
    p.add_argument("--max_iters", type=Bound(int, 1, 10**7), default=300, help="steps per task (a joint run takes N times as many)")
    p.add_argument("--batch_size", type=BOUNDS["batch_size"], default=8)
    p.add_argument("--learning_rate", type=BOUNDS["learning_rate"], default=2e-3)
    p.add_argument("--r", type=BOUNDS["r"], default=8)
    p.add_argument("--targets", type=TEXT, default="q,v")
    p.add_argument("--eval_prompts", type=Bound(int, 1, 10**6), default=630,
                   help="test prompts scored per task, evenly spaced over the test split (E2E has 630 MRs)")
    p.add_argument("--device", type=BOUNDS["device"], default="auto")
    p.add_argument("--out", type=TEXT, default="out-joint-quality")
    args = p.parse_args(argv)
    args.tasks, args.seeds = task_folders(args.tasks), distinct_numbers(args.seeds, SEED)
    return args


if __name__ == "__main__":
    quiet_ctrl_c()
    run_early(options, sys.argv[1:])

import bank  # noqa: E402  (after the options were checked)
import runtime  # noqa: E402
from tools.compare import spread, trained  # noqa: E402
from tools.e2e_metrics import MR_METRICS, METRICS, NAMES, scores  # noqa: E402
from tools.evaluate_e2e import decode_mrs, read_references, room_to_generate  # noqa: E402


def main(argv=None):
    args = options(sys.argv[1:] if argv is None else argv)
    runtime.run(measure_all, args)


def runs(args):
    """Every run, in an order they can run in (a sequence run needs its seed's separate run of the first
    task): {"way", "seed", "argv" (train.py's), "out", "steps", "adapters": {task: adapter file}}."""
    first, names = next(iter(args.tasks)), list(args.tasks)
    common = [f"--init_from={args.init_from}", "--adapter=sharea", f"--r={args.r}", "--alpha=16",
              f"--targets={args.targets}", f"--batch_size={args.batch_size}", f"--learning_rate={args.learning_rate}",
              f"--device={args.device}", "--eval_prompt=", "--dataset=e2e"]

    def run(way, seed, out, steps, extra, adapters):
        schedule = [f"--max_iters={steps}", f"--warmup_iters={max(1, steps // 20)}", f"--eval_interval={max(1, steps // 4)}"]
        return {"way": way, "seed": seed, "argv": [*common, f"--seed={seed}", f"--out_dir={out}", *schedule, *extra],
                "out": out, "steps": steps, "adapters": adapters}

    def alone(way, seed, task, extra=()):
        out = os.path.join(args.out, way, f"seed{seed}", task)
        return run(way, seed, out, args.max_iters, [f"--data_dir={args.tasks[task]}", *extra],
                   {task: os.path.join(out, runtime.ADAPTER_FILE)})

    plan = []
    for seed in args.seeds:
        plan += [alone("separate", seed, task) for task in names]
        first_adapter = plan[-len(names)]["adapters"][first]
        plan += [alone("sequence", seed, task, [f"--init_adapter={first_adapter}", f"--spec={FROZEN_A}"]) for task in names[1:]]
        out = os.path.join(args.out, "joint", f"seed{seed}")
        plan.append(run("joint", seed, out, args.max_iters * len(names),
                        ["--tasks=" + ",".join(f"{n}={d}" for n, d in args.tasks.items())],
                        {n: os.path.join(out, f"{n}.safetensors") for n in names}))
    return plan


def measure_all(args):
    import train
    plan = runs(args)
    for r in plan:  # every run's options checked before the first one starts
        train.validate(train.parse_args(r["argv"]))
    prompts = {name: evenly_spaced(read_references(folder, "test", task=name), args.eval_prompts)
               for name, folder in args.tasks.items()}
    runtime.check_folder_target(args.out, "--out", OURS)
    runtime.writable_folder(args.out, "--out")
    rows = []
    with runtime.own_folder(args.out, "--out"):  # one measurement at a time here; each train.py owns its run folder
        runtime.finish_set(args.out, "results.json")
        for r in plan:
            mine(r)
            if not trained(r["out"], r["steps"]):
                resume = os.path.exists(os.path.join(r["out"], runtime.CKPT_FILE))
                print(f"== {r['way']}, seed {r['seed']}: {'resuming' if resume else 'training'} in {r['out']}", flush=True)
                argv = ["--init_from=resume", f"--out_dir={r['out']}"] if resume else r["argv"]
                if runtime.run_child([sys.executable, os.path.join(ROOT, "train.py"), *argv]) != 0:
                    sys.exit(2)  # train.py said why, in one line
            if r["way"] == "joint":  # each task of the run's bank alone, as an adapter file
                joint = bank.Bank.read(os.path.join(r["out"], bank.BANK_FILE))
                for name, path in r["adapters"].items():
                    if not os.path.exists(path):
                        joint.export(name, path)
            rows += [scored(r, name, adapter, prompts[name], args) for name, adapter in r["adapters"].items()]
        table = format_table(rows, args)

        def write(folder):
            runtime.write_text(os.path.join(folder, "quality.md"), table + "\n")
            runtime.write_text(os.path.join(folder, "results.json"), json.dumps(rows, indent=1) + "\n")
        runtime.write_set(args.out, write, last="results.json", what=f"the summary in {args.out}")
    print("\n" + table)


def mine(r):
    """Make sure r's folder holds r's run, or nothing yet (then claim it): a run of other options, or a
    folder joint_quality.py did not make, is refused, never reused or overwritten."""
    path = os.path.join(r["out"], COMMAND_FILE)
    if os.path.exists(path) and os.listdir(r["out"]) == [COMMAND_FILE]:  # claimed, never started (a bad option)
        os.remove(path)
    if os.path.exists(path):
        made_by = runtime.read_json(path, "run command")
    elif os.path.exists(r["out"]) and os.listdir(r["out"]):
        made_by = None
    else:
        os.makedirs(r["out"], exist_ok=True)
        runtime.write_text(path, json.dumps(r["argv"]) + "\n")
        return
    runtime.check(made_by == r["argv"], f"{r['out']} holds a run of other options (or one that joint_quality.py "
                                        "did not make): choose another --out, or delete that folder")


def evenly_spaced(groups, n):
    step = max(1, len(groups) // n)
    return groups[::step][:n]


def scored(run, task, adapter, groups, args):
    """A run's row for one task: its final validation loss and the scores of its greedy replies to the
    task's test prompts (written to TASK_predictions.txt beside); kept in TASK_quality_row.json there
    and reused while the prompts and the adapter are the same."""
    path = os.path.join(run["out"], f"{task}_{ROW_FILE}")
    if os.path.exists(path):  # checked field by field before it is used
        row = check_record(runtime.read_json(path, "quality row"), row_fields(), path, "delete it to score the run again",
                           required=("way", "seed", "task", "prompts", "adapter_bytes", "val_loss"))
        if (row["prompts"], row["adapter_bytes"]) == (len(groups), os.path.getsize(adapter)):
            return row
    val = [r for r in read_metrics(os.path.join(run["out"], "metrics.jsonl")) if "val_loss" in r][-1]
    model, info = runtime.load_model(adapter=adapter, device=args.device)
    prompts = [g["mr"] for g in groups]
    replies = decode_mrs(model, info, prompts, beam_size=1, max_new_tokens=room_to_generate(model, prompts))
    runtime.write_text(os.path.join(run["out"], f"{task}_predictions.txt"), "".join(r + "\n" for r in replies))  # to read
    row = {"way": run["way"], "seed": run["seed"], "task": task, "prompts": len(groups), "adapter_bytes": os.path.getsize(adapter),
           "val_loss": val.get(f"val_loss_{task}", val["val_loss"]), **scores(replies, [g["refs"] for g in groups])}
    runtime.write_text(path, json.dumps(row, indent=1) + "\n")
    return row


def row_fields():
    number = Bound(float, -3.4e38, 3.4e38)
    return {"way": Bound(str, test=lambda v: v in WAYS, what=" or ".join(WAYS)), "seed": SEED, "task": TEXT,
            "prompts": Bound(int, 1, 10**6), "adapter_bytes": Bound(int, 1, 2**53), "val_loss": number,
            **{m: number for m in METRICS + MR_METRICS}}


def format_table(rows, args):
    lines = []
    for task in args.tasks:
        mine = [r for r in rows if r["task"] == task]
        columns = ["val_loss"] + [m for m in METRICS + MR_METRICS if all(m in r for r in mine)]
        lines += [f"\n{task} ({args.tasks[task]}, {mine[0]['prompts']} test prompts, greedy)",
                  "| way | " + " | ".join(NAMES.get(c, "val loss") for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for way in WAYS:
            rs = [r for r in mine if r["way"] == way]
            if rs:
                cells = [spread([r[c] for r in rs]) for c in columns]
                digits = [3 if c in ("val_loss", "nist", "cider") else 2 for c in columns]
                cell = (lambda m, s, d: f"{m:.{d}f} ± {s:.{d}f}") if len(rs) > 1 else (lambda m, s, d: f"{m:.{d}f}")
                lines.append(f"| {way} | " + " | ".join(cell(m, s, d) for (m, s), d in zip(cells, digits)) + " |")
    seeds = ",".join(map(str, args.seeds))
    lines.append(f"\nsequence's first task is separate's; base {args.init_from}; sharea, r = {args.r}, targets {args.targets}; {args.max_iters} steps of "
                 f"batch {args.batch_size} per task (joint: {args.max_iters * len(args.tasks)} in all), lr "
                 f"{args.learning_rate}; seeds {seeds}; mean ± sample standard deviation; {runtime.machine(args.device)}.")
    return "\n".join(lines).strip()


if __name__ == "__main__":
    main()
