"""
Runs data/shakespeare/prepare.py and data/e2e/prepare.py the way a user does (subprocess, from the repo
root) and checks what they write. Sources: the copies shipped in data/*/source (decompressed here, and
read by default), and a small sample written here; no network.
"""
import csv
import hashlib
import io
import json
import lzma
import os
import subprocess
import sys
import zipfile
from array import array
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import load_script  # noqa: E402
from tokenizer import decode  # noqa: E402

SHAKESPEARE = ROOT / "data" / "shakespeare" / "prepare.py"
E2E = ROOT / "data" / "e2e" / "prepare.py"
CSVS = {"train": "trainset.csv", "val": "devset.csv", "test": "testset_w_refs.csv"}
LIMIT = 300

SAMPLE_TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?
"""
SAMPLE_ROWS = [  # several refs per MR, commas inside quoted fields, a doubled quote, a non-ASCII £
    ("name[The Vaults], eatType[pub], priceRange[more than £30]", "The Vaults is an expensive pub."),
    ("name[The Vaults], eatType[pub], priceRange[more than £30]", 'The Vaults, a pub, is "pricey".'),
    ("name[Blue Spice], area[riverside]", "Blue Spice is by the river."),
    ("name[The Vaults], eatType[pub], priceRange[more than £30]", "Pricey pub: The Vaults."),
    ("name[Blue Spice], area[riverside]", "On the riverside, there is Blue Spice."),
    ("name[Zizzi], food[Italian]", "Zizzi serves Italian food."),
]


def write_sample(folder):
    """A tiny input.txt and E2E folder shaped like the real ones (CRLF, every field quoted)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    for name in CSVS.values():
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
            w.writerow(["mr", "ref"])
            w.writerows(SAMPLE_ROWS)
    return folder / "input.txt", folder


def unpack_shipped(folder):
    """The shipped copies, decompressed: (input.txt, E2E folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for xz in [ROOT / "data/shakespeare/source/input.txt.xz", *(ROOT / "data/e2e/source").glob("*.csv.xz")]:
        (folder / xz.name[:-3]).write_bytes(lzma.decompress(xz.read_bytes()))
    return folder / "input.txt", folder


@pytest.fixture(params=["shipped", "sample"])
def sources(request, tmp_path_factory):
    """(tinyshakespeare input.txt, E2E folder)."""
    if request.param == "shipped":
        return unpack_shipped(tmp_path_factory.mktemp("shipped"))
    return write_sample(tmp_path_factory.mktemp("sample"))


def prepare(script, *args, env=None):
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def read_bin(path, typecode):
    a = array(typecode)
    a.frombytes(path.read_bytes())
    if sys.byteorder == "big":
        a.byteswap()
    return a


def read_rows(path, limit):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["mr", "ref"]
    return [tuple(r) for r in rows[1:limit + 1]]


def assert_user_error(r):
    """Exit code 2 and one line on stderr naming --src, not a traceback."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "--src" in lines[0] and "Traceback" not in r.stderr


def test_shakespeare(sources, tmp_path):
    text_file, _ = sources
    r = prepare(SHAKESPEARE, "--src", text_file, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["kind"] == "stream" and meta["vocab_size"] == 50257
    text = text_file.read_text(encoding="utf-8")
    n = int(0.9 * len(text))
    for split, part in (("train", text[:n]), ("val", text[n:])):
        assert (tmp_path / f"{split}.bin").stat().st_size == 2 * meta[f"{split}_tokens"] > 0
        assert decode(read_bin(tmp_path / f"{split}.bin", "H")) == part
        assert f"{split} has {meta[f'{split}_tokens']:,} tokens" in r.stdout


def test_e2e(sources, tmp_path):
    _, e2e_dir = sources
    r = prepare(E2E, "--src", e2e_dir, "--out", tmp_path, "--limit", LIMIT)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["kind"] == "examples" and meta["separator"] == " ||" and meta["vocab_size"] == 50257
    for split, name in CSVS.items():
        rows = read_rows(e2e_dir / name, LIMIT)
        tokens = read_bin(tmp_path / f"{split}.bin", "H")
        index = read_bin(tmp_path / f"{split}_examples.bin", "i")
        assert meta[f"{split}_examples"] == len(rows) == len(index) // 3
        assert meta[f"{split}_tokens"] == len(tokens) == (tmp_path / f"{split}.bin").stat().st_size // 2
        assert meta[f"{split}_max_len"] == max(index[2::3])
        end = 0
        for (mr, ref), (start, ctx, total) in zip(rows, zip(*[iter(index)] * 3)):
            assert start == end and 0 < ctx < total  # back to back, with a non-empty completion
            assert decode(tokens[start:start + ctx]) == mr + " ||"
            assert decode(tokens[start + ctx:start + total]) == " " + ref + "<|endoftext|>"
            assert tokens[start + total - 1] == 50256
            end = start + total
        assert end == len(tokens)
        if split != "train":  # refs grouped by MR, MRs in order of first appearance
            expected = {}
            for mr, ref in rows:
                expected.setdefault(mr, []).append(ref)
            refs = json.loads((tmp_path / f"{split}_refs.json").read_text(encoding="utf-8"))
            assert refs == [{"mr": mr, "refs": rs} for mr, rs in expected.items()]
            assert max(len(x["refs"]) for x in refs) > 1


def test_download_offline_is_one_sentence(tmp_path):
    dead = "http://127.0.0.1:9"  # every download goes through a proxy that refuses connections
    env = {**os.environ, "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead,
           "no_proxy": "", "NO_PROXY": ""}
    for script in (SHAKESPEARE, E2E):
        r = prepare(script, "--download", "--out", tmp_path / script.parent.name, env=env)
        assert_user_error(r)
        assert not (tmp_path / script.parent.name / "meta.json").exists()


def test_the_default_reads_the_shipped_copy_offline(tmp_path):
    """No --src, no network: the same files as from the decompressed copy, which has the upstream sha256."""
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead}
    text, e2e_dir = unpack_shipped(tmp_path / "unpacked")
    assert hashlib.sha256(text.read_bytes()).hexdigest() == load_script(SHAKESPEARE).SHA256
    for name, sha in load_script(E2E).SHA256.items():
        assert hashlib.sha256((e2e_dir / name).read_bytes()).hexdigest() == sha
    for script, src, extra in ((SHAKESPEARE, text, []), (E2E, e2e_dir, ["--limit", 50])):
        default, explicit = tmp_path / f"{script.parent.name}_default", tmp_path / f"{script.parent.name}_src"
        assert prepare(script, "--out", default, *extra, env=env).returncode == 0
        assert prepare(script, "--src", src, "--out", explicit, *extra).returncode == 0
        for f in default.iterdir():
            if f.name != "meta.json":  # which names its source
                assert f.read_bytes() == (explicit / f.name).read_bytes(), f.name


def test_a_damaged_shipped_copy_is_refused(tmp_path, monkeypatch, capsys):
    mod = load_script(SHAKESPEARE)
    bad = tmp_path / "input.txt"
    bad.with_suffix(".txt.xz").write_bytes(lzma.compress(b"Not Shakespeare at all.\n" * 100))
    monkeypatch.setattr(mod, "SHIPPED", bad)
    from data.common import DataError
    with pytest.raises(DataError, match="sha256 differs"):
        mod.read_text()


def test_bad_src(tmp_path):
    _, e2e_dir = write_sample(tmp_path / "sample")
    (e2e_dir / "devset.csv").unlink()
    r = prepare(E2E, "--src", e2e_dir, "--out", tmp_path / "e2e")
    assert_user_error(r)
    assert "devset.csv" in r.stderr
    assert_user_error(prepare(SHAKESPEARE, "--src", tmp_path / "nope.txt", "--out", tmp_path / "sh"))


def test_release_zip_layout(monkeypatch):
    """The default (download) path finds the CSVs inside the release zip's e2e-dataset/ folder."""
    mod = load_script(E2E)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in CSVS.values():
            zf.writestr(f"e2e-dataset/{name}", f"mr,ref\n{name},x\n")
        zf.writestr("e2e-dataset/README.md", "hi")
    monkeypatch.setattr(mod, "download_url", lambda url, hint: buf.getvalue())
    monkeypatch.setattr(mod, "SHA256", {name: hashlib.sha256(f"mr,ref\n{name},x\n".encode()).hexdigest() for name in CSVS.values()})
    sources = mod.read_sources(None, download=True)
    assert {s: mod.read_rows(b, s) for s, b in sources.items()} == {s: [(n, "x")] for s, n in CSVS.items()}


def test_e2e_parse_reverses_every_example(sources, tmp_path):
    """data/e2e_parse: each example's prompt is a reference, its reply that reference's MR; meta.json
    is written last (the loader reads a folder only once it is there)."""
    _, e2e_dir = sources
    r = prepare(ROOT / "data" / "e2e_parse" / "prepare.py", "--src", e2e_dir, "--out", tmp_path, "--limit", LIMIT)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["kind"] == "examples" and meta["task"] == "ref -> mr" and meta["separator"] == " ||"
    written = sorted(tmp_path.iterdir(), key=lambda f: f.stat().st_mtime_ns)
    assert written[-1].name == "meta.json" or written[-1].stat().st_mtime_ns == (tmp_path / "meta.json").stat().st_mtime_ns
    assert not list(tmp_path.glob("*_refs.json"))  # those score generated texts, not MRs
    for split, name in CSVS.items():
        rows = read_rows(e2e_dir / name, LIMIT)
        tokens = read_bin(tmp_path / f"{split}.bin", "H")
        index = read_bin(tmp_path / f"{split}_examples.bin", "i")
        assert meta[f"{split}_examples"] == len(rows) == len(index) // 3
        for (mr, ref), (start, ctx, total) in zip(rows, zip(*[iter(index)] * 3)):
            assert decode(tokens[start:start + ctx]) == ref + " ||"
            assert decode(tokens[start + ctx:start + total]) == " " + mr + "<|endoftext|>"
