"""
The E2E reference sentences alone, as a token stream: the corpus for a stand-in base model.

    python data/e2e_refs/prepare.py

Real GPT-2 weights cannot be downloaded everywhere (not on our CI machines, for one). A small GPT-2
pretrained by train.py on these sentences knows the domain's English ("The Eagle is a cheap coffee
shop near Burger King") but has never seen a meaning representation, so an adapter on top of it still
has the data-to-text task to learn: compare.py uses it that way. Only train references go into train
and dev references into val; the test set is never read. Each distinct sentence is followed by
<|endoftext|>. On the full data set:
train has 40,782 sentences, 1,017,236 tokens
val has 4,499 sentences, 124,854 tokens

    python data/e2e_refs/prepare.py --with_mrs     # into data/e2e_refs_mrs

adds every distinct MR as a text of its own, after all the sentences, never beside its sentence: a
base that knows the MRs' words too ("eatType[", "priceRange["; real GPT-2 has seen such text) but
not which sentence goes with which MR, for the parsing task (text -> MR, data/e2e/prepare.py
--reverse). Without them its tied embeddings for those tokens never train, and an adapter, which
cannot change them, does not learn to write an MR at all (tools/joint_quality.py, docs/bank.md).
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from data.common import TEXT, Parser, run, write_bin, write_json, write_prepared  # noqa: E402
from data.e2e.prepare import CSVS, read_rows, read_sources  # noqa: E402
from tokenizer import EOT, VOCAB_SIZE, get_tokenizer  # noqa: E402
from tqdm import tqdm  # noqa: E402


def options(argv=None):
    """The command line, checked before anything is read."""
    p = Parser(prog="data/e2e_refs/prepare.py", description=__doc__.split("\n")[1])
    p.add_argument("--src", type=TEXT, help="a folder with the E2E CSVs, instead of the copy shipped in data/e2e/source")
    p.add_argument("--download", action="store_true", help="fetch the official release zip instead (network)")
    p.add_argument("--out", type=TEXT, help="output folder (default: this script's; with --with_mrs, data/e2e_refs_mrs)")
    p.add_argument("--with_mrs", action="store_true", help="every distinct MR as a text too, apart from its sentences")
    args = p.parse_args(argv)
    args.out = args.out or str(Path(__file__).parent.parent / ("e2e_refs_mrs" if args.with_mrs else "e2e_refs"))
    return args


def main(argv=None):
    args = options(argv)
    sources = read_sources(args.src, args.download)
    rows = {split: read_rows(sources[split], CSVS[split]) for split in ("train", "val")}  # all checked first
    enc = get_tokenizer()
    write_prepared(args.out, lambda folder: write_files(folder, rows, enc, args))


def write_files(out, rows, enc, args):
    meta = {"kind": "stream", "with_mrs": args.with_mrs, "vocab_size": VOCAB_SIZE, "source": args.src or ("the E2E release zip" if args.download else "data/e2e/source")}
    for split in ("train", "val"):
        sentences = list(dict.fromkeys(ref for _, ref in rows[split]))
        mrs = list(dict.fromkeys(mr for mr, _ in rows[split])) if args.with_mrs else []
        tokens = [t for s in tqdm(sentences, desc=f"tokenizing {split}", unit=" sentences", leave=False)
                  for t in enc.encode_ordinary(" " + s) + [EOT]] + [t for mr in mrs for t in enc.encode_ordinary(" " + mr) + [EOT]]
        write_bin(os.path.join(out, f"{split}.bin"), "H", tokens)
        meta[f"{split}_tokens"] = len(tokens)
        print(f"{split} has {len(sentences):,} sentences{f' and {len(mrs):,} MRs' if mrs else ''}, {len(tokens):,} tokens")
    write_json(os.path.join(out, "meta.json"), meta)

if __name__ == "__main__":
    run(main)
