"""
Small helpers shared by the data/*/prepare.py scripts: user errors without tracebacks, downloads with a
timeout, and little-endian binary arrays written with the stdlib (no numpy needed to read or write them).
"""
import json
import sys
import urllib.error
import urllib.request
from array import array


class DataError(Exception):
    """A mistake the user can fix (no network, wrong --src...): printed as one line, exit code 2."""


def fail(msg):
    raise DataError(msg)


def run(main):
    """Call main(); turn a DataError into `error: ...` on stderr and exit code 2, with no traceback."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def download(url, hint, timeout=20):
    """The bytes at url; with no network this fails after at most ~timeout s, saying `hint` (the fix)."""
    print(f"downloading {url} ...")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError) as e:  # URLError, HTTPError, timeouts are all OSErrors
        fail(f"could not download {url} ({getattr(e, 'reason', e)}); {hint}")


def write_bin(path, typecode, values):
    """Write values as a raw little-endian array: typecode 'H' = uint16 tokens, 'i' = int32 rows."""
    a = array(typecode, values)
    assert a.itemsize == {"H": 2, "i": 4}[typecode]  # true on every platform CPython supports today
    if sys.byteorder == "big":
        a.byteswap()
    with open(path, "wb") as f:
        a.tofile(f)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
