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
import math
import os
import sys

from data.common import Parser, quiet_ctrl_c

# torch, the model and the tokenizer are imported after the options are read (a mistake shows at once)


def main(argv=None):
    p = Parser(prog="sample.py", description=__doc__.split("\n\n")[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="a training run's folder (its adapter.safetensors, or its whole model)")
    p.add_argument("--adapter", help="an adapter file, instead of out_dir's")
    p.add_argument("--bank", help="an adapter bank (bank.py): with --tasks, every task's samples in one mixed batch")
    p.add_argument("--tasks", help="with --bank: the tasks to sample, e.g. e2e,parse (default: all of the bank's)")
    p.add_argument("--init_from", help="the base model; default: the one the adapter names")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file")
    p.add_argument("--format", choices=("auto", "e2e", "text"), default="auto",
                   help="e2e: the prompt is an MR (auto: e2e when out_dir's run trained on e2e)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
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
    for ok, message in (
            (args.num_samples >= 1, f"--num_samples must be at least 1, not {args.num_samples}"),
            (args.max_new_tokens >= 1, f"--max_new_tokens must be at least 1, not {args.max_new_tokens}"),
            (math.isfinite(args.temperature) and args.temperature >= 0,
             f"--temperature must be a finite number >= 0 (0 is greedy), not {args.temperature}"),
            (args.top_k is None or args.top_k >= 1, f"--top_k must be at least 1, not {args.top_k}"),
            (args.top_p is None or 0 < args.top_p <= 1, f"--top_p must be in (0, 1], not {args.top_p}"),
            (0 <= args.seed < 2**63, f"--seed must be in [0, 2**63), not {args.seed}")):
        if not ok:
            p.error(message)
    import runtime
    runtime.run(generate, args)


def generate(args):
    import torch

    import runtime
    from tokenizer import EOT, decode, encode
    if args.bank is not None:
        return generate_tasks(args)
    model, info = runtime.load_model(args.out_dir, args.adapter, args.init_from, args.device, args.dtype,
                                     merge=not args.no_merge, quantize=args.quantize)
    e2e = args.format == "e2e" or (args.format == "auto" and _trained_on(args.out_dir) == "e2e")
    start = _prompt(args.start, e2e)
    torch.manual_seed(args.seed)
    idx = torch.tensor([encode(start)] * args.num_samples, device=info["device"])
    max_new = min(args.max_new_tokens, model.config.block_size - idx.size(1))
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
    from tokenizer import EOT, decode, encode
    runtime.check(args.quantize in ("auto", "none"), f"--quantize={args.quantize} with --bank: a bank runs on the "
                                                     "float base its tasks were trained on")
    model, info = bank.load(args.bank, args.tasks.split(",") if args.tasks else None, args.init_from,
                            args.device, args.dtype)
    names, device, dtype = info["tasks"], info["device"], info["dtype"]
    e2e = args.format == "e2e"
    start = _prompt(args.start, e2e)
    torch.manual_seed(args.seed)
    rows = [n for n in names for _ in range(args.num_samples)]
    idx = torch.tensor([encode(start)] * len(rows), device=device)
    max_new = min(args.max_new_tokens, model.config.block_size - idx.size(1))
    with runtime.autocast(device, dtype), bank.tasks(model, rows):
        out = model.generate(idx, max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             eos_token=EOT if e2e else None)
    print(f"# {info['base']} + {args.bank}: {', '.join(names)} in one batch", file=sys.stderr)
    for name, row in zip(rows, out):
        new = row[idx.size(1):].tolist()
        text = decode([t for t in new if t != EOT] if e2e else new)
        print(f"[{name}] " + (text.strip() if e2e else start + text))


def _prompt(start, e2e):
    """--start's text (FILE:path reads it from a file), with the E2E separator for an MR."""
    import runtime
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            runtime.fail(f"--start FILE:{start[5:]} cannot be read as UTF-8 text ({getattr(e, 'strerror', None) or e})")
    if e2e and not start.rstrip().endswith("||"):
        start = start.rstrip() + " ||"  # the separator data/e2e/prepare.py put between MR and reference
    return start


def _trained_on(out_dir):
    """The dataset of the run in out_dir, if its checkpoint says."""
    import runtime
    if out_dir is None or not os.path.exists(os.path.join(out_dir, runtime.CKPT_FILE)):
        return None
    return runtime.read_checkpoint(out_dir)["config"].get("dataset")


if __name__ == "__main__":
    quiet_ctrl_c()  # until runtime.run: Ctrl-C while torch loads ends quietly
    main()
