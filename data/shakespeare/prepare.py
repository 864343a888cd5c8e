"""
Tiny Shakespeare as GPT-2 BPE tokens, for plain next-token prediction (a "stream" data set).

    python data/shakespeare/prepare.py                 # the copy shipped in data/shakespeare/source
    python data/shakespeare/prepare.py --download      # fetches input.txt (1,115,394 characters), same sha256
    python data/shakespeare/prepare.py --src FILE      # a local input.txt

The first 90% of the characters are train, the rest val. Writes, next to this script (or to --out):
train.bin and val.bin, the token ids as raw uint16 little-endian (50,257 ids fit in 16 bits), and
meta.json. On the full file:
train has 301,966 tokens
val has 36,059 tokens
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repo root, for tokenizer.py and data/common.py
sys.path.insert(0, str(ROOT))
from data.common import TEXT, Parser, checked, decode_utf8, download, fail, run, shipped, write_bin, write_json, write_prepared  # noqa: E402
from tokenizer import VOCAB_SIZE, get_tokenizer  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # data/shakespeare/source/README.md
SHIPPED = Path(__file__).resolve().parent / "source" / "input.txt"


def read_text(src=None, fetch=False):
    """The text: from the file src, from the upstream URL (fetch), or by default from the compressed
    copy shipped in data/shakespeare/source; the last two are checked against SHA256."""
    if src is not None:
        if not os.path.isfile(src):
            fail(f"--src {src} is not a file; give the path of tinyshakespeare's input.txt.")
        with open(src, "rb") as f:
            return decode_utf8(f.read(), src)
    if fetch:
        hint = "pass a local copy with --src FILE instead."
        return decode_utf8(checked(download(URL, hint), SHA256, URL, hint), URL)
    return decode_utf8(checked(shipped(str(SHIPPED)), SHA256, f"{SHIPPED}.xz", "git checkout it again"), str(SHIPPED))


def options(argv=None):
    """The command line, checked before anything is read."""
    p = Parser(prog="data/shakespeare/prepare.py", description=__doc__.split("\n")[1])
    p.add_argument("--src", type=TEXT, help="a local input.txt, instead of the copy shipped in data/shakespeare/source")
    p.add_argument("--download", action="store_true", help="fetch input.txt from its upstream address (network)")
    p.add_argument("--out", type=TEXT, default=str(Path(__file__).parent), help="output folder (default: this script's)")
    return p.parse_args(argv)


def main(argv=None):
    args = options(argv)

    text = read_text(args.src, args.download)
    n = int(0.9 * len(text))
    enc = get_tokenizer()
    # encode_ordinary: Shakespeare has no special tokens, and a literal "<|endoftext|>" stays plain text
    splits = {"train": enc.encode_ordinary(text[:n]), "val": enc.encode_ordinary(text[n:])}
    if min(map(len, splits.values())) < 2:
        fail(f"{args.src or URL} is too short to split into training and validation text "
             f"({len(text)} characters): give the whole input.txt")

    write_prepared(args.out, lambda folder: write_files(folder, splits, args))


def write_files(out, splits, args):
    for split, ids in splits.items():
        write_bin(os.path.join(out, f"{split}.bin"), "H", ids)
        print(f"{split} has {len(ids):,} tokens")
    write_json(os.path.join(out, "meta.json"), {
        "kind": "stream", "vocab_size": VOCAB_SIZE,
        "train_tokens": len(splits["train"]), "val_tokens": len(splits["val"]),
        "source": args.src or (URL if args.download else "data/shakespeare/source (shipped, sha256-checked)"),
    })

if __name__ == "__main__":
    run(main)
