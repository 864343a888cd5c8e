"""
Generate text from a base model plus an adapter.

    python sample.py --out_dir=out-e2e-sharea --start="name[The Vaults], eatType[pub], food[Italian]"
    python sample.py --init_from=gpt2 --start="FILE:prompt.txt" --num_samples=3 --top_p=0.9
    python sample.py --adapter=out/adapter.safetensors --start="ROMEO:" --no_merge

The adapter is merged into the base weights for speed (generation then costs what the base model
costs); --no_merge keeps it separate. For an adapter trained on E2E, --start is a meaning
representation: the separator " ||" is appended and the reply ends at <|endoftext|>.
"""
import argparse
import sys

from data.common import TEXT, Bound, Parser, check, quiet_ctrl_c
from train_options import BOUNDS

# torch, the model and the tokenizer are imported after the options are read (a mistake shows at once)


# the most samples, tokens and candidates one command takes: far beyond a GPT-2 context (1,024 tokens) or
# vocabulary (50,257), so that only typos are refused
TEMPERATURE = Bound(float, 0, 100, test=lambda t: t == 0 or t >= 1e-3,
                    what="0 (greedy) or a number in [0.001, 100]: below 0.001 sampling is greedy but for float "
                         "rounding, above 100 it is noise")


def options(argv=None):
    """The command line, checked before torch loads: every option has a type and a range."""
    p = Parser(prog="sample.py", description=__doc__.split("\n\n")[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", type=TEXT, help="a training run's folder (its adapter.safetensors, or its whole model)")
    p.add_argument("--adapter", type=TEXT, help="an adapter file, instead of out_dir's")
    p.add_argument("--bank", type=TEXT, help="an adapter bank (bank.py): with --tasks, every task's samples in one mixed batch")
    p.add_argument("--tasks", type=TEXT, help="with --bank: the tasks to sample, e.g. e2e,parse (default: all of the bank's)")
    p.add_argument("--init_from", type=TEXT, help="the base model; default: the one the adapter names")
    p.add_argument("--start", type=Bound(str, test=lambda v: v not in ("", "FILE:"), what="a non-empty prompt"),
                   default="\n", help="the prompt, or FILE:path to read it from a file")
    p.add_argument("--format", choices=("auto", "e2e", "text"), default="auto",
                   help="e2e: the prompt is an MR (auto: e2e when out_dir's run trained on examples, as E2E)")
    p.add_argument("--num_samples", type=Bound(int, 1, 4096), default=1)
    p.add_argument("--max_new_tokens", type=Bound(int, 1, 2**20), default=100)
    p.add_argument("--temperature", type=TEMPERATURE, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=Bound(int, 1, 2**20), default=None)
    p.add_argument("--top_p", type=Bound(float, 0, 1, open_lo=True), default=None)
    p.add_argument("--seed", type=Bound(int, 0, 2**63 - 1), default=1337)
    p.add_argument("--device", type=BOUNDS["device"], default="auto")
    p.add_argument("--dtype", type=BOUNDS["dtype"], default="auto")
    p.add_argument("--no_merge", action="store_true", help="keep the adapter unmerged")
    p.add_argument("--quantize", default="auto", choices=("auto", "none", "nf4", "int8"),
                   help="auto (default): as the adapter was trained, which its file records; none, nf4 or int8 (quantize.py)")
    args = p.parse_args(argv)
    if args.out_dir is None and args.adapter is None and args.init_from is None and args.bank is None:
        p.error("give --out_dir, --adapter, --bank or --init_from")
    if args.bank is not None and (args.out_dir is not None or args.adapter is not None):
        p.error("--bank holds its own adapters: leave out --out_dir and --adapter")
    if args.tasks is not None and args.bank is None:
        p.error("--tasks chooses tasks of a --bank: give the bank file too")
    return args


def main(argv=None):
    args = options(argv)
    import runtime
    runtime.run(generate, args)


def generate(args):
    import torch

    import runtime
    from tokenizer import EOT, decode
    if args.bank is not None:
        return generate_tasks(args)
    model, info = runtime.load_model(args.out_dir, args.adapter, args.init_from, args.device, args.dtype,
                                     merge=not args.no_merge, quantize=args.quantize)
    e2e = args.format == "e2e" or (args.format == "auto" and _trained_on(args.out_dir) == "examples")
    start = _prompt(args.start, e2e)
    torch.manual_seed(args.seed)
    idx, max_new = _batch(model, start, args.num_samples, args.max_new_tokens, info["device"])
    with runtime.autocast(info["device"], info["dtype"]):
        out = model.generate(idx, max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             eos_token=EOT if e2e else None)
    print(f"# {info['base']}{runtime.base_note(info)} + {info['adapter'] or 'no adapter'}", file=sys.stderr)
    for row in out:
        text = decode([t for t in row[idx.size(1):].tolist() if t != EOT] if e2e else row[idx.size(1):].tolist())
        print(text.strip() if e2e else start + text)
        if args.num_samples > 1:
            print("---------------")


def generate_tasks(args):
    """--bank: num_samples rows per task, every task's rows in one batch (A x once for them all)."""
    import torch

    import bank
    import runtime
    from tokenizer import EOT, decode
    model, info = bank.load(args.bank, args.tasks.split(",") if args.tasks else None, args.init_from,
                            args.device, args.dtype, args.quantize)
    names, device, dtype = info["tasks"], info["device"], info["dtype"]
    e2e = args.format == "e2e"
    start = _prompt(args.start, e2e)
    torch.manual_seed(args.seed)
    rows = [n for n in names for _ in range(args.num_samples)]
    idx, max_new = _batch(model, start, len(rows), args.max_new_tokens, device)
    with runtime.autocast(device, dtype), bank.tasks(model, rows):
        out = model.generate(idx, max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             eos_token=EOT if e2e else None)
    print(f"# {info['base']} + {args.bank}: {', '.join(names)} in one batch", file=sys.stderr)
    for name, row in zip(rows, out):
        new = row[idx.size(1):].tolist()
        text = decode([t for t in new if t != EOT] if e2e else new)
        print(f"[{name}] " + (text.strip() if e2e else start + text))


def _batch(model, start, rows, max_new_tokens, device):
    """(the prompt's tokens repeated in `rows` rows, the tokens there is room to generate after it)."""
    import torch

    from tokenizer import encode
    idx = torch.tensor([encode(start)] * rows, device=device)
    room = model.config.block_size - idx.size(1)
    check(room >= 1, f"the prompt is {idx.size(1)} tokens, and the model's context of {model.config.block_size} "
                     "leaves no room to generate: shorten --start")
    return idx, min(max_new_tokens, room)


def _prompt(start, e2e):
    """--start's text (FILE:path reads it from a file), with the E2E separator for an MR."""
    import runtime
    given = start
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            runtime.fail(f"--start FILE:{start[5:]} cannot be read as UTF-8 text ({getattr(e, 'strerror', None) or e})")
    runtime.check(start != "", f"--start {given[:40]!r} gives an empty prompt: give some text to continue")
    if e2e and not start.rstrip().endswith("||"):
        start = start.rstrip() + " ||"  # the separator data/e2e/prepare.py put between MR and reference
    return start


def _trained_on(out_dir):
    """The kind of data (stream or examples) the run in out_dir trained on, as its checkpoint records
    (older checkpoints: examples when their dataset was e2e)."""
    import runtime
    if out_dir is None or not runtime.has_checkpoint(out_dir):
        return None
    ckpt = runtime.read_checkpoint(out_dir)
    data = ckpt.get("data")
    if isinstance(data, dict) and data.get("kind") in ("stream", "examples"):
        return data["kind"]
    return "examples" if ckpt["config"].get("dataset") == "e2e" else "stream"


if __name__ == "__main__":
    quiet_ctrl_c()  # until runtime.run: Ctrl-C while torch loads ends quietly
    main()
