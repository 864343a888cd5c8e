"""
Small helpers shared by the data/*/prepare.py scripts and, through runtime.py, by every other script, all
torch-free: user errors without tracebacks, downloads with a timeout, little-endian binary arrays written
with the stdlib (no numpy needed to read or write them), and the three mechanisms that keep outputs
whole (docs/reliability.md): one owner per folder (own_folder), one writer for files, sets of files and
folders (write_file, write_set, write_folder) that turns any write error into one sentence, and child
processes that end with their parent (run_child).
"""
import argparse
import contextlib
import hashlib
import json
import lzma
import math
import os
import re
import shutil
import signal
import subprocess
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


def one_line(message):
    """message as one printable line, whatever the user's text in it held: runs of white space (a line
    break or a carriage return in an option value) become one space, other control characters their
    escapes, so that every refusal is exactly one `error:` line on any terminal."""
    text = " ".join(str(message).split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def report(message, same_everywhere=True):
    """Print `error: message` to stderr. Under torchrun every process runs the same checks on the same
    options, so only process 0 reports a mistake (RANK 0); an error of one process alone (a file, memory)
    is reported by that process, naming it."""
    rank = torchrun_rank()
    if rank == "0":
        print(f"error: {one_line(message)}", file=sys.stderr)
    elif not same_everywhere:
        print(f"error: process {rank}: {one_line(message)}", file=sys.stderr)


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
    except KeyboardInterrupt:
        print("error: interrupted; files are only ever replaced whole, so what is on disk is complete", file=sys.stderr)
        sys.exit(130)


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
# torch threads: more than the machine's cores never helps, and 1,000 of them on 2 cores took the load
# average to 285 (a benchmark's --threads, before this bound)
THREADS = Bound(int, 1, os.cpu_count() or 1)


def distinct_numbers(text, bound):
    """[n, ...] from "1,2,4": whole numbers, each within `bound` (a Bound) and none twice; None for
    anything else (an option's test: --seeds, --tasks of the benchmarks)."""
    parts = text.split(",")
    if not all(re.fullmatch(r"[0-9]{1,20}", p) for p in parts):
        return None
    values = [int(p) for p in parts]
    return values if len(set(values)) == len(values) and not any(bound.problem(v) for v in values) else None


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


# folders a prepare.py writes with an option (its --out help says so): the option is the hint, since the
# script's plain run would fill the folder with other data (E2E, not E2E reversed) under the right name
VARIANTS = {"e2e_parse": "python data/e2e/prepare.py --reverse", "e2e_refs_mrs": "python data/e2e_refs/prepare.py --with_mrs"}


def prepare_command(data_dir):
    """The command that prepares data_dir: for a folder named after a data set of ours (data/e2e) or a
    variant of one (VARIANTS), its script (told where, if not in data/); for any other, every script, told where."""
    name = os.path.basename(os.path.normpath(data_dir))
    here = os.path.dirname(os.path.abspath(__file__))
    shipped = sorted(d for d in os.listdir(here) if os.path.isfile(os.path.join(here, d, "prepare.py")))
    elsewhere = "" if os.path.abspath(data_dir) == os.path.join(here, name) else f" --out {data_dir}"
    if name in shipped:
        return f"python data/{name}/prepare.py{elsewhere}"
    if name in VARIANTS:
        return VARIANTS[name] + elsewhere
    return " or ".join(f"python data/{d}/prepare.py --out {data_dir}" for d in shipped)


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
        print(f"error: {one_line(message)} (see python {self.prog} --help)", file=sys.stderr)
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


def write_prepared(out, write_files):
    """The prepare scripts' output: write_files(folder) writes the data set's files, meta.json among
    them, and they appear in `out` as one set (write_set: the previous data stays until the new set is
    complete; meta.json, which the loader needs, goes last), by one prepare at a time (own_folder)."""
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a folder: choose a folder name")
    os.makedirs(out, exist_ok=True)
    with own_folder(out, "--out"):
        write_set(out, write_files, last="meta.json", what=f"the prepared data in {out}",
                  fix="free disk space, or prepare into another --out, and run the command again")


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



# ---- one owner per folder ----------------------------------------------------------------------

LOCK_FILE = ".lock"  # in a folder being written: the pid and command of the process that owns it


@contextlib.contextmanager
def own_folder(folder, option="out_dir"):
    """Hold `folder` (which must exist) for this process alone while the block runs: an exclusive
    fcntl.flock on folder/.lock, which holds our pid and command. A second writer is refused in one
    sentence naming the holder. The operating system releases the lock when the process dies, however
    it dies (kill -9 included), so a lock is never stale; the file is removed on a normal release.
    Readers take no lock: they read only what a writer committed. Without fcntl (Windows) nothing is
    locked."""
    if fcntl is None:
        yield
        return
    path = os.path.join(folder, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another process (EWOULDBLOCK)
            holder = _lock_holder(fd)
            os.close(fd)
            fail(f"{option} {folder} is being written by process {holder}: wait until it ends, or stop it "
                 "(kill PID: a training run saves a checkpoint first), then run this command again")
        try:  # the previous owner may have removed the file between our open and our lock: lock the one there
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join([os.path.basename(sys.executable), *sys.argv])}).encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still held: a waiting process then finds the file gone and opens a new one
        os.close(fd)


def _lock_holder(fd):
    """'PID (COMMAND)' from a lock file another process holds."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        return f"{int(holder['pid'])} ({str(holder['command'])[:200]})"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown (its lock file is being written)"


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


# ---- every output complete or absent, and every write error one sentence -------------------------

def write_file(path, write, mode="wb"):
    """Write the file `path` whole: write(f) fills a temporary file beside it, which is flushed to the disk
    and renamed over path (a rename is atomic), so that a crash, a kill or a full disk leaves the old
    file or the new one, never a part."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        raise write_failed(e, path, f"the previous {path} is kept" if os.path.exists(path) else None) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bin(path, typecode, values):
    """Write values as a raw little-endian array: typecode 'H' = uint16 tokens, 'i' = int32 rows."""
    a = array(typecode, values)
    assert a.itemsize == {"H": 2, "i": 4}[typecode]  # true on every platform CPython supports today
    if sys.byteorder == "big":
        a.byteswap()
    write_file(path, a.tofile)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_text(path, text):
    """A text file, written whole (runtime re-exports it for the scripts)."""
    write_file(path, lambda f: f.write(text), mode="w")


def write_binary(path, write):
    """A binary file that write(f) fills (a plot's savefig, say), written whole."""
    write_file(path, write)


STAGING, COMMITTED = ".staging", ".committed"  # in a folder: the next set of files, before and after it counts


def write_set(folder, write_files, last, what="the files", kept=None, fix=None):
    """Write a set of files that belong together into `folder` (a run folder: the checkpoint; a data
    folder: the prepared data), so that a crash, a kill or a full disk at any moment leaves the previous
    set or the new one, never a mix. Only the folder's owner (own_folder) calls this.

    1. write_files(folder/.staging) writes the set there, and each file is flushed to the disk;
    2. .staging is renamed to .committed: this one rename is the commit;
    3. finish_set moves the files into folder, `last` (ckpt.pt, meta.json: the file whose presence says
       the set is there) removed first and moved last.
    Readers that find .committed read the set there (committed_path). A failure in 1 deletes .staging
    and says, in one sentence, which file could not be written and what is kept (`kept`, words or a
    function giving them; default: the previous set); a crash in 1 leaves .staging, which the next write_set deletes; a crash in 3 is
    completed by the owner's next finish_set."""
    finish_set(folder, last)  # a set a crash left committed comes first
    stage = os.path.join(folder, STAGING)
    try:
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        write_files(stage)
        _fsync_tree(stage)
    except BaseException as e:  # a full disk, or a second Ctrl-C: the staged files go, the last set stays
        failed = _newest_file(stage, e).replace(stage, folder)  # named as the file it was to become
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, Exception):
            kept = kept() if callable(kept) else kept  # (a callable: what is kept costs a read, only now)
            raise write_failed(e, failed, kept or f"the previous {what} in {folder} are kept", fix, what=what) from None
        raise
    os.replace(stage, os.path.join(folder, COMMITTED))  # the commit
    _fsync(folder)
    finish_set(folder, last)


def finish_set(folder, last):
    """Complete what a crash interrupted in folder, as its owner: move the files of a committed set into
    place (`last` last), delete an uncommitted one. Cheap when there is nothing to do (two stat calls)."""
    committed, stage = os.path.join(folder, COMMITTED), os.path.join(folder, STAGING)
    if not os.path.isdir(committed) and not os.path.isdir(stage):
        return
    try:
        if os.path.isdir(committed):
            names = sorted(os.listdir(committed), key=lambda n: n == last)
            if last in names and os.path.exists(os.path.join(folder, last)):
                os.remove(os.path.join(folder, last))  # until it is back, the folder holds no complete set
            for name in names:
                os.replace(os.path.join(committed, name), os.path.join(folder, name))
            os.rmdir(committed)
            _fsync(folder)
        shutil.rmtree(stage, ignore_errors=True)
    except OSError as e:
        fail(f"{folder} holds a set of files that a crash left unfinished, and it cannot be completed "
             f"({e.strerror or e}): make the folder writable and run the command again")


def committed_path(folder, name):
    """Where a reader finds the newest committed `name` of folder: in .committed while its owner moves
    that set into place (or after a crash there, until the owner comes back), else in folder. Readers
    never move or delete anything."""
    inside = os.path.join(folder, COMMITTED, name)
    return inside if os.path.exists(inside) else os.path.join(folder, name)


def write_folder(dest, write, option, ours, marker):
    """Write the folder `dest` whole: write(tmp) fills a temporary folder beside it, which is flushed and
    renamed to dest, so that dest is the previous version until the rename and the new one after it,
    never a part of either. dest may be new, empty, or this command's own earlier output (it holds
    `marker` and only names in `ours`); anything else is refused before anything is written
    (check_folder_target)."""
    check_folder_target(dest, option, ours, marker)
    parent, name = os.path.split(os.path.abspath(dest))
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write(tmp)
        _fsync_tree(tmp)
        if os.path.exists(dest):  # a folder cannot be renamed over a non-empty one: the old one steps aside first
            old = os.path.join(parent, f".{name}.old-{os.getpid()}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        _fsync(parent)
    except Exception as e:
        failed = _newest_file(tmp, e).replace(tmp, dest)  # named as the file it was to become
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(e, failed, f"{dest} is kept as it was" if os.path.exists(dest) else None, what=dest) from None


def check_folder_target(dest, option, ours, marker=None):
    """Refuse, in one sentence, a destination folder that holds anything this command did not write, or
    one that cannot be made; called before the work (decoding, merging), and by write_folder again.
    ours: the names the command writes there; marker: the one of them whose presence says the folder is
    the command's (None: any of ours, say a folder per task, or a half-done measurement's runs)."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        fail(f"{option} {dest} is a file, not a folder: choose a folder name")
    names = sorted(os.listdir(dest)) if os.path.isdir(dest) else []
    foreign = [n for n in names if n not in ours]
    if names and (foreign or (marker is not None and marker not in names)):
        fail(f"{option} {dest} holds {', '.join((foreign or names)[:3])}, which this command did not write "
             "there, and would replace it: choose a new or empty folder")
    above = os.path.dirname(os.path.abspath(dest))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not (os.path.isdir(above) and os.access(above, os.W_OK | os.X_OK)):
        fail(f"cannot write {option} {dest}: {above} is not a folder you can write in; choose another place")


def write_failed(e, path, kept, fix=None, what=None):
    """The one sentence for a write that failed, whichever library raised it: an OSError (a full disk,
    a file size limit, permissions), torch.save's RuntimeError on a full disk ("unexpected pos ..."),
    safetensors' SafetensorError. kept: what is left as it was, in words (None: nothing was written).
    -> a UserError naming the file; any other exception is returned as it is (a bug: its traceback is
    what a report needs)."""
    if isinstance(e, WriteFailed):  # a file of a set (write_file inside write_set): the set's words
        e = e.error
    if isinstance(e, UserError) or not (isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError"):
        return e
    limit = _write_limit(path)  # torch's and safetensors' own writers name no cause: say which limit was hit
    cause = e.strerror if isinstance(e, OSError) and e.strerror else None
    reason = f"{cause or 'the write failed'} ({limit})" if limit else cause or " ".join(str(e).split())[:160]
    target = f"{what} ({path})" if what and path and os.path.abspath(what) != os.path.abspath(path) else (path or what)
    return WriteFailed(f"could not write {target}: {reason}; {kept or 'nothing was written'}: "
                       + (fix or "free disk space, or write to another folder, and run the command again"), e, path)


class WriteFailed(UserError):
    """write_failed's sentence, keeping the error and the file, so that a set can say it in its own words."""

    def __init__(self, message, error, path):
        super().__init__(message)
        self.error, self.path = error, path


def _write_limit(path):
    """What stops writes that name no cause (torch's and safetensors' own writers): a file size limit
    (ulimit -f), or a full disk; None when neither is the case."""
    import resource
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"ulimit -f allows {limit:,} bytes a file"
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) if path else ".")
        if st.f_bavail * st.f_frsize < 2**20:
            return "the disk is full"
    except OSError:
        pass
    return None


def _newest_file(folder, e):
    """The file a failed write was writing: the one the error names, else the newest one in folder, else
    folder (safetensors removes the file it could not finish)."""
    if isinstance(e, WriteFailed) and e.path:
        return str(e.path)
    if isinstance(e, OSError) and e.filename:
        return str(e.filename)
    try:
        files = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
        return max(files, key=os.path.getmtime) if files else folder
    except OSError:
        return folder


def _fsync_tree(folder):
    for d, _, names in os.walk(folder):
        for n in names:
            _fsync(os.path.join(d, n))
        _fsync(d)


def _fsync(path):
    """Flush a file (or a folder's list of names) to the disk, so that a power cut after a rename
    cannot leave the new name pointing at data that never reached the disk. Not every system lets a
    folder be opened (Windows): there a rename is already durable enough."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- child processes end with their parent -----------------------------------------------------

def run_child(argv):
    """Run a project script (compare.py's and demo.py's train.py runs) as a child that cannot outlive
    this process: on Linux the kernel sends it SIGTERM when we die, even by kill -9 (PR_SET_PDEATHSIG);
    SIGTERM or Ctrl-C sent to us is passed on once, and we wait for the child to save and exit before
    exiting ourselves, with its exit code. The child runs in its own process group, so that a Ctrl-C
    in the terminal reaches it once (through us), not twice (a second one means: quit at once).
    -> the child's exit code."""
    child = subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                             start_new_session=sys.platform != "win32")
    forwarded = []

    def forward(signum, frame):
        if not forwarded:
            forwarded.append(signum)
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:  # an exception here: never leave it running
            child.terminate()
            child.wait()
    if forwarded:
        sys.exit(128 + forwarded[0])
    return code


def _die_with_parent():
    """In the child, before it runs: ask Linux for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the prctl: go now
        os.kill(os.getpid(), signal.SIGTERM)
