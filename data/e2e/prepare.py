"""
The E2E NLG Challenge data set (restaurant meaning representations -> English) as GPT-2 BPE examples.

    python data/e2e/prepare.py                          # the copy shipped in data/e2e/source (no network)
    python data/e2e/prepare.py --download               # the official v1.0.0 release zip, same sha256
    python data/e2e/prepare.py --src DIR                # a folder with the three CSVs
    python data/e2e/prepare.py --limit 300 --out /tmp/e2e   # quick test

Every CSV row (header `mr,ref`) becomes one example, context + completion:
    context    = mr + " ||"                    e.g. "name[Blue Spice], eatType[coffee shop] ||"
    completion = " " + ref + "<|endoftext|>"   e.g. " Blue Spice is a coffee shop.<|endoftext|>"
tokenized separately and concatenated, so the boundary is exact: the loss counts only the completion.
Splits: train = trainset.csv, val = devset.csv, test = testset_w_refs.csv. For each split we write
  {split}.bin           all examples' tokens back to back, uint16 little-endian
  {split}_examples.bin  int32 little-endian, 3 per example: (start, context_len, total_len), where
                        start indexes {split}.bin and tokens[start+context_len : start+total_len] is
                        the completion
plus val_refs.json / test_refs.json, [{"mr": ..., "refs": [every ref of that MR]}, ...] in order of
first appearance (for BLEU etc. against all references), and meta.json with the counts.
On the full data set:
train has 42,061 examples, 2,427,730 tokens, the longest 121 tokens
val has 4,672 examples, 300,986 tokens, the longest 134 tokens (547 MRs)
test has 4,693 examples, 342,912 tokens, the longest 142 tokens (630 MRs)
"""
import csv
import io
import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repo root, for tokenizer.py and data/common.py
sys.path.insert(0, str(ROOT))
from data.common import TEXT, Bound, Parser, checked, decode_utf8, fail, run, shipped, write_bin, write_json, write_prepared
from data.common import download as download_url  # noqa: E402
from tokenizer import EOT, VOCAB_SIZE, get_tokenizer  # noqa: E402
from tqdm import tqdm  # noqa: E402

URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
CSVS = {"train": "trainset.csv", "val": "devset.csv", "test": "testset_w_refs.csv"}
SEP = " ||"
NEED = "trainset.csv, devset.csv and testset_w_refs.csv"


SHA256 = {  # of the release's CSVs (data/e2e/source/README.md)
    "trainset.csv": "f27d48df45815288ab15619d47a79028c300fbb7f42e373668aba0b98c1d57c6",
    "devset.csv": "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9",
    "testset_w_refs.csv": "edc8db685e39bb9824d5bd70c18b1c9b0412d14b527aa960e2d1c8251ee15ccd",
}
SHIPPED = Path(__file__).resolve().parent / "source"


def read_sources(src=None, download=False):
    """{split: raw CSV bytes}: from the folder src, from the release zip (download), or by default from
    the compressed copy shipped in data/e2e/source; the last two are checked against SHA256."""
    hint = f"pass --src DIR instead, a folder with {NEED}."
    if src is not None:
        for f in CSVS.values():
            if not os.path.isfile(os.path.join(src, f)):
                fail(f"--src {src} has no {f}; --src must be a folder with {NEED}.")
        return {split: Path(src, f).read_bytes() for split, f in CSVS.items()}
    if not download:
        return {split: checked(shipped(str(SHIPPED / f)), SHA256[f], f"{SHIPPED / f}.xz", "git checkout it again")
                for split, f in CSVS.items()}
    try:
        zf = zipfile.ZipFile(io.BytesIO(download_url(URL, hint)))
    except zipfile.BadZipFile:
        fail(f"{URL} did not give a zip file; {hint}")
    by_name = {os.path.basename(n): n for n in zf.namelist()}  # the CSVs sit in a subfolder
    missing = [f for f in CSVS.values() if f not in by_name]
    if missing:
        fail(f"the release zip has no {missing[0]}; {hint}")
    return {split: checked(zf.read(by_name[f]), SHA256[f], f"{f} of {URL}", hint) for split, f in CSVS.items()}


def read_rows(data, name, limit=None):
    """[(mr, ref), ...] from CSV bytes with the header `mr,ref` (quoted fields may hold commas)."""
    reader = csv.reader(io.StringIO(decode_utf8(data, name)))
    if next(reader, None) != ["mr", "ref"]:
        fail(f"{name} does not start with the header `mr,ref`; is it an E2E CSV?")
    rows = []
    for line, row in enumerate(reader, start=2):
        if len(row) != 2:
            fail(f"{name} row {line} has {len(row)} fields, not 2 (mr,ref): is the file cut or damaged?")
        rows.append(tuple(row))
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        fail(f"{name} has no rows after its header: nothing to prepare")
    return rows


def tokenize(rows, enc, desc="tokenizing"):
    """All rows' tokens back to back, and the (start, context_len, total_len) triples, flattened."""
    tokens, index = [], []
    for mr, ref in tqdm(rows, desc=desc, unit=" rows", leave=False):  # train: about 5 s (reversed: ref, mr)
        # encode_ordinary + [EOT] is what encode(" " + ref + "<|endoftext|>") gives, except that a
        # literal "<|endoftext|>" inside the data could not sneak in a real EOT
        ctx = enc.encode_ordinary(mr + SEP)
        comp = enc.encode_ordinary(" " + ref) + [EOT]
        index += [len(tokens), len(ctx), len(ctx) + len(comp)]
        tokens += ctx + comp
    return tokens, index


def group_refs(rows):
    """[{"mr": mr, "refs": [...]}, ...], MRs in order of first appearance (dicts keep insertion order)."""
    refs = {}
    for mr, ref in rows:
        refs.setdefault(mr, []).append(ref)
    return [{"mr": mr, "refs": r} for mr, r in refs.items()]


def options(argv=None, script=__file__, doc=__doc__):
    """The command line, checked before anything is read (data/e2e_parse/prepare.py's too: its own
    script and docstring)."""
    p = Parser(prog=os.path.relpath(script, ROOT), description=doc.split("\n")[1])
    p.add_argument("--src", type=TEXT, help=f"a folder with {NEED}, instead of the copy shipped in data/e2e/source")
    p.add_argument("--download", action="store_true", help="fetch the official release zip instead (network)")
    p.add_argument("--out", type=TEXT, default=str(Path(script).parent), help="output folder (default: this script's)")
    p.add_argument("--limit", type=Bound(int, 1, 10**9), help="keep only the first N rows of each CSV (quick tests)")
    return p.parse_args(argv)


def main(argv=None, reverse=False, script=__file__, doc=__doc__):
    """reverse: every example the other way round, ref -> mr (data/e2e_parse/prepare.py)."""
    args = options(argv, script, doc)

    sources = read_sources(args.src, args.download)
    rows = {split: read_rows(data, CSVS[split], args.limit) for split, data in sources.items()}  # all checked first
    if reverse:
        rows = {split: [(ref, mr) for mr, ref in r] for split, r in rows.items()}
    enc = get_tokenizer()
    write_prepared(args.out, lambda folder: write_files(folder, rows, enc, args, reverse))


def write_files(out, rows, enc, args, reverse=False):
    """The files of each split; the reversed task writes no {split}_refs.json (texts per MR, for the
    E2E metrics of generated texts)."""
    meta = {"kind": "examples", "task": "ref -> mr" if reverse else "mr -> ref", "separator": SEP, "vocab_size": VOCAB_SIZE, "eot": EOT,
            "examples_format": "int32 (start, context_len, total_len) per example"}
    for split, rows in rows.items():
        tokens, index = tokenize(rows, enc, f"tokenizing {split}")
        write_bin(os.path.join(out, f"{split}.bin"), "H", tokens)
        write_bin(os.path.join(out, f"{split}_examples.bin"), "i", index)
        max_len = max(index[2::3], default=0)
        meta.update({f"{split}_examples": len(rows), f"{split}_tokens": len(tokens), f"{split}_max_len": max_len})
        msg = f"{split} has {len(rows):,} examples, {len(tokens):,} tokens, the longest {max_len} tokens"
        if split != "train" and not reverse:  # the references for scoring generations
            grouped = group_refs(rows)
            write_json(os.path.join(out, f"{split}_refs.json"), grouped)
            msg += f" ({len(grouped)} MRs)"
        print(msg)
    meta["max_len"] = max(meta[f"{s}_max_len"] for s in CSVS)
    meta["source"] = args.src or (URL if args.download else "data/e2e/source (shipped, sha256-checked)")
    write_json(os.path.join(out, "meta.json"), meta)

if __name__ == "__main__":
    run(main)
