"""
Small helpers shared by the data/*/prepare.py scripts: user errors without tracebacks, downloads with a
timeout, and little-endian binary arrays written with the stdlib (no numpy needed to read or write them).
"""
import argparse
import hashlib
import json
import lzma
import math
import os
import re
import sys
import urllib.error
import urllib.request
from array import array
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (a wrong option, a damaged file, no network...): printed as
    `error: <message>`, exit code 2. Defined here, without torch, so that the prepare scripts and
    train.py's option parsing report mistakes before torch loads; runtime.py uses the same class."""


DataError = UserError  # the prepare scripts' name for it


def fail(msg):
    raise UserError(msg)


def check(ok, message):
    """fail(message) unless ok: for option checks that read as a list."""
    if not ok:
        fail(message)


def report(message, same_everywhere=True):
    """Print `error: message` to stderr. Under torchrun every process runs the same checks on the same
    options, so only process 0 reports a mistake (RANK 0); an error of one process alone (a file, memory)
    is reported by that process, naming it."""
    rank = torchrun_rank()
    if rank == "0":
        print(f"error: {message}", file=sys.stderr)
    elif not same_everywhere:
        print(f"error: process {rank}: {message}", file=sys.stderr)


def torchrun_rank():
    """This process's RANK under torchrun, "0" otherwise: a RANK left in the environment by something
    else (a shell, a job scheduler) without torchrun's other variables must not silence every error."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return os.environ["RANK"]
    return "0"


def run(main, *args):
    """Call main(*args); turn a UserError, or the machine refusing a file (OSError: permissions, a full
    disk, a file where a folder should be), into `error: ...` on stderr and exit code 2, no traceback.
    (runtime.run does the same once torch is loaded, for the errors torch-based code raises too.)"""
    try:
        return main(*args)
    except DataError as e:
        report(e)
        sys.exit(2)
    except OSError as e:
        report(f"cannot write {e.filename or 'the output'} ({e.strerror or e}): choose an --out folder "
               "you can write to, on a disk with space", same_everywhere=False)
        sys.exit(2)


# ---- bounds: every number or text a user or a file gives has a type and a range ----------------

FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: beyond it a value becomes inf on the device
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: below it a nonzero value becomes 0 or loses its digits


class Bound:
    """The type and range of one value, an option's or a file field's, checked the same way for both:
    as argparse's type= (Bound(int, 1, 100) converts "7" and refuses "0" or "1e400" in one sentence),
    in train_options.BOUNDS, and in check_record for the fields of JSON files. Numbers are bounded on
    both sides; a float must also be finite and, unless it is 0, of a magnitude float32 can hold
    (FLOAT32_TINY to FLOAT32_MAX), since the model computes in float32 or lower. A text must not be
    empty. `test` adds a condition (say, a list of pairs) that `what` describes."""

    def __init__(self, kind, lo=None, hi=None, open_lo=False, open_hi=False, test=None, what=None):
        self.kind, self.lo, self.hi, self.open_lo, self.open_hi, self.test = kind, lo, hi, open_lo, open_hi, test
        self.what = what or self._describe()

    def _describe(self):
        if self.kind is str:
            return "a non-empty text"
        if self.kind is bool:
            return "true or false"
        name = "a whole number" if self.kind is int else "a float32 number"
        fmt = (lambda x: f"{x:,}") if self.kind is int else (lambda x: f"{x:g}")
        if self.lo is not None and self.hi is not None:
            return (f"{name} in {'(' if self.open_lo else '['}{fmt(self.lo)}, {fmt(self.hi)}"
                    f"{')' if self.open_hi else ']'}")
        return name if self.lo is None else f"{name} {'>' if self.open_lo else '>='} {fmt(self.lo)}"

    def problem(self, value):
        """None if value is of this type and range, else what it should be."""
        kind = type(value)
        if kind is not self.kind and not (self.kind is float and kind is int):
            return self.what
        if kind is str and value.strip() == "" and self.test is None:
            return self.what
        if self.kind is float and (not math.isfinite(value) or abs(value) > FLOAT32_MAX
                                   or 0 < abs(value) < FLOAT32_TINY):
            return self.what
        if self.kind in (int, float):
            if self.lo is not None and (value < self.lo or (self.open_lo and value == self.lo)):
                return self.what
            if self.hi is not None and (value > self.hi or (self.open_hi and value == self.hi)):
                return self.what
        if self.test is not None and not self.test(value):
            return self.what
        return None

    def __call__(self, text):
        """argparse's type=: the text converted and checked."""
        try:
            value = text if self.kind is str else self.kind(text)
        except (ValueError, OverflowError):
            value = None
        why = self.problem(value) if value is not None else self.what
        if why:
            raise argparse.ArgumentTypeError(f"must be {why}, not {text!r}")
        return value

    __name__ = "bounded value"  # what argparse calls the type in its own messages


TEXT = Bound(str)  # every text option: a path, a name, a prompt
SEED = Bound(int, 0, 2**32 - 1)  # what every random generator here accepts (numpy's, too)


def check_record(record, fields, where, fix, required=()):
    """record, a value read from a JSON file (`where` names the file and line), after checking that it
    is an object whose `required` keys are present and whose keys in `fields` ({key: Bound}) have
    their type and range; anything else is one sentence naming the file, the key and `fix`."""
    if not isinstance(record, dict):
        fail(f"{where} is {type(record).__name__} {_short(record)}, not a JSON object: {fix}")
    missing = [k for k in required if k not in record]
    if missing:
        fail(f"{where} lacks {', '.join(missing)}: {fix}")
    for key, bound in fields.items():
        if key in record and bound.problem(record[key]) is not None:
            fail(f"{where} has {key} = {_short(record[key])}, which should be {bound.problem(record[key])}: {fix}")
    return record


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json_file(path, what, fix):
    """The JSON value in path, or one sentence naming the file."""
    try:
        with open(path, "rb") as f:
            return json.loads(decode_utf8(f.read(), path))
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON ({e}), so not a {what}: {fix}")
    except RecursionError:
        fail(f"{path} nests its JSON too deeply to be a {what}: {fix}")


def read_json_lines(path, fields, fix, required_any=()):
    """The records of a JSON-lines file (metrics.jsonl), each checked by check_record (and holding one
    of `required_any`). A last line without its newline is one a kill cut short while it was written:
    it is dropped. Any other damaged line is named, with its number."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            if number == len(lines):  # no newline after it: cut short by a kill
                continue
            fail(f"{where} is not a JSON record (damaged or binary): {fix}")
        check_record(record, fields, where, fix)
        if required_any and not any(k in record for k in required_any):
            fail(f"{where} has none of {', '.join(required_any)}: {fix}")
        records.append(record)
    return records


# ---- the files runs and data folders hold, read as untrusted input -----------------------------

COUNT = Bound(int, 0, 2**53)  # steps, tokens, bytes: JSON keeps integers exact up to 2**53
LOSS = Bound(float, 0, FLOAT32_MAX)
METRICS_FIELDS = {"step": COUNT, "done": COUNT, "loss": LOSS, "val_loss": LOSS, "val_ppl": Bound(float, 0, FLOAT32_MAX),
                  "best_val_loss": Bound(float, 0, FLOAT32_MAX), "lr": Bound(float, 0, FLOAT32_MAX),
                  "tokens_per_s": Bound(float, 0, FLOAT32_MAX), "loss_tokens_per_s": Bound(float, 0, FLOAT32_MAX),
                  "peak_memory_mb": Bound(float, 0, FLOAT32_MAX), "sample": Bound(str, test=lambda v: True, what="a text")}


def read_metrics(path):
    """The records of a run's metrics.jsonl (train.py writes them), each checked: a damaged line is
    named with its number. A step record has "step", the last one "done"."""
    return read_json_lines(path, METRICS_FIELDS, "delete that line, or train the run again",
                           required_any=("step", "done"))


DATA_FILES = ("train.bin", "val.bin", "train_examples.bin", "val_examples.bin")  # what train.py reads
META_FIELDS = {"kind": Bound(str, test=lambda v: v in ("stream", "examples"), what="stream or examples"),
               "separator": Bound(str, test=lambda v: 0 < len(v) <= 100, what="a text of 1 to 100 characters"),
               "vocab_size": Bound(int, 1, 2**20), "eot": Bound(int, 0, 2**20)}


def read_meta(data_dir, fix):
    """A prepared data folder's meta.json (written last by every prepare.py, so its presence means the
    folder is complete), checked: kind stream or examples, a text separator, sizes in range."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        fail(f"no prepared data in {data_dir} (no meta.json): {fix} first")
    meta = read_json_file(path, "data description", f"{fix} again")
    if not isinstance(meta, dict) or META_FIELDS["kind"].problem(meta.get("kind")) is not None:
        fail(f"{path} has no valid kind (stream or examples): {fix} again")
    return check_record(meta, META_FIELDS, path, f"{fix} again")


def data_fingerprint(data_dir, meta):
    """What a run records of its data, to refuse resuming on other data: the kind, the separator and
    the size and sha256 of each file train.py reads (E2E's prepared files: 4 MB, hashed in ~10 ms)."""
    files = {}
    for name in DATA_FILES:
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            files[name] = [len(data), hashlib.sha256(data).hexdigest()]
    return {"kind": meta["kind"], "separator": meta.get("separator"), "files": files}


class Parser(argparse.ArgumentParser):
    """argparse with this project's error format: one `error:` line naming the option, exit code 2."""

    def error(self, message):
        # a Bound's refusal reads as train.py's: "--top_k must be ..., not '0'"
        message = re.sub(r"^argument (-[^ /:]+)(?:/[^ :]+)?: must be", r"\1 must be", message)
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def quiet_ctrl_c():
    """Ctrl-C while a script still imports torch (seconds): exit 130 with one line, not a traceback.
    runtime.run hands Ctrl-C back to Python's own handling once the script's work starts."""
    import signal

    def stop(signum, frame):
        print("error: interrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, stop)


def decode_utf8(data, name):
    """Bytes -> text, or one sentence naming the file that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")  # -sig: a byte-order mark at the start (as Excel writes) is dropped
    except UnicodeDecodeError as e:
        fail(f"{name} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}): convert it to UTF-8 first")


def start_output(out):
    """Make the output folder and remove its meta.json, which is written last: a run that stops
    halfway leaves a folder that the loader calls unprepared, never a mix of old and new files."""
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a folder: choose a folder name")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")):
        os.remove(os.path.join(out, "meta.json"))


def download(url, hint, timeout=20):
    """The bytes at url; with no network this fails after at most ~timeout s, saying `hint` (the fix)."""
    print(f"downloading {url} ...")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError) as e:  # URLError, HTTPError, timeouts are all OSErrors
        fail(f"could not download {url} ({getattr(e, 'reason', e)}); {hint}")


def checked(data, sha256, name, hint):
    """data, after checking that it is the file the project was made with (a copy that differs by one byte
    would silently change every figure measured on it)."""
    if hashlib.sha256(data).hexdigest() != sha256:
        fail(f"{name} is not the expected file (its sha256 differs from {sha256[:12]}...); {hint}")
    return data


def shipped(path):
    """The bytes of a data file shipped with the project as path + '.xz' (data/*/source/)."""
    try:
        return lzma.decompress(Path(path + ".xz").read_bytes())
    except (OSError, lzma.LZMAError) as e:
        fail(f"the shipped copy {path}.xz cannot be read ({e}): restore it with git checkout, or use --download")


def write_bin(path, typecode, values):
    """Write values as a raw little-endian array: typecode 'H' = uint16 tokens, 'i' = int32 rows."""
    a = array(typecode, values)
    assert a.itemsize == {"H": 2, "i": 4}[typecode]  # true on every platform CPython supports today
    if sys.byteorder == "big":
        a.byteswap()
    _atomic(path, "wb", a.tofile)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_text(path, text):
    """A text file, written atomically (runtime re-exports it for the scripts)."""
    _atomic(path, "w", lambda f: f.write(text))


def write_binary(path, write):
    """A binary file that write(f) fills (a plot's savefig, say), written atomically."""
    _atomic(path, "wb", write)


def _atomic(path, mode, write):
    """Write through a temporary file and a rename: a file is either the old one or the new one."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
