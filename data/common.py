"""
Small helpers shared by the data/*/prepare.py scripts: user errors without tracebacks, downloads with a
timeout, and little-endian binary arrays written with the stdlib (no numpy needed to read or write them).
"""
import argparse
import hashlib
import json
import lzma
import os
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
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"error: {message}", file=sys.stderr)
    elif not same_everywhere:
        print(f"error: process {rank}: {message}", file=sys.stderr)


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


class Parser(argparse.ArgumentParser):
    """argparse with this project's error format: one `error:` line naming the option, exit code 2."""

    def error(self, message):
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
