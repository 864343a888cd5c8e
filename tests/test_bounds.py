"""Bounds and validation, generated rather than listed: Hypothesis draws option values (wrong types,
extremes, nan, inf, huge integers, negative numbers, empty texts) for every option of every script, and
random JSON for the fields of the files the scripts read (meta.json, metrics.jsonl, compare_row.json,
an adapter file's metadata). Every outcome must be acceptance or exit code 2 with exactly one `error:`
line, never a traceback or a hang. Then the cases issue 23 listed, each once.

The option property calls each script's parse-and-check stage (`options(argv)`, torch-free, what
`python script.py` runs before anything is loaded) in this process: a few ms per example, so that
hundreds of examples fit in seconds. derandomize=True: the same examples on every run (stable CI)."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sample
import sharelora
import train_options
from conftest import ROOT, TINY, load_script
from data.common import UserError, read_meta, read_metrics
from data.common import run as run_early
from test_faults import Case, call
from tools import analyze, bench, bench_bank, compare, demo, evaluate_e2e, export, joint_quality

SCRIPTS = {  # script: (its parse-and-check stage, options every command needs, so that the rest is reached)
    "train.py": (train_options.early_options, []),
    "sample.py": (sample.options, ["--init_from=gpt2"]),
    "tools/evaluate_e2e.py": (evaluate_e2e.options, ["--adapter=a.safetensors"]),
    "tools/compare.py": (compare.options, ["--init_from=gpt2"]),
    "tools/export.py": (export.options, ["--to=hf", "--dest=d"]),
    "tools/analyze.py": (analyze.options, ["--adapter=a.safetensors"]),
    "tools/demo.py": (demo.options, []),
    "tools/bench_bank.py": (bench_bank.options, []),
    "tools/bench.py": (bench.parse_args, []),
    "tools/joint_quality.py": (joint_quality.options, ["--init_from=gpt2"]),
    **{p: (load_script(p).options, []) for p in ("data/e2e/prepare.py", "data/e2e_refs/prepare.py",
                                                 "data/shakespeare/prepare.py")},
}


def test_every_script_with_options_is_in_scripts():
    """A new script's options are drawn too: each file that declares options is listed above (bank.py's
    are positional: its commands are tested in tests/test_bank.py)."""
    declared = {str(p.relative_to(ROOT)) for p in [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("data/*/*.py")]
                if "add_argument(" in p.read_text()}
    assert declared - {"bank.py"} <= set(SCRIPTS)  # (train.py declares its options in train_options.py)


def option_names(script):
    """Every option of a script, read from its own --help (so that a new option is drawn too)."""
    stage, _ = SCRIPTS[script]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        stage(["--help"])
    names = sorted(set(re.findall(r"--([a-z_0-9]+)", out.getvalue())) - {"help"})
    assert names, out.getvalue()
    return names


HOSTILE = st.one_of(
    st.integers(-2**80, 2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "nan", "-nan", "inf", "-inf", "1e400", "-1e308", "1e308", "1e-45", "1e-300", "10**23",
                     "2**62", "7.8e18", "0", "-0", "-1", "1", "0.5", "x", "True", "FILE:", "1,-2", "3,3", "cuda:x",
                     "9" * 5000, "lora", "none", "e2e", "auto", "0\r", "a\nb", "\x1b[31m"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
)


def outcome(stage, argv):
    """(exit code, stderr) of a parse-and-check stage, as `python script.py argv` reports it."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_early(stage, argv)
            return 0, err.getvalue()
        except SystemExit as e:
            return e.code, err.getvalue()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_any_option_value_is_accepted_or_refused_in_one_sentence(script, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    stage, needed = SCRIPTS[script]
    names = option_names(script)
    pairs = st.lists(st.tuples(st.sampled_from(names), HOSTILE), min_size=1, max_size=3)
    extra = st.lists(st.tuples(st.sampled_from(option_names("train.py")), HOSTILE), max_size=2)

    @settings(max_examples=120, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(pairs, extra)
    def check(pairs, extra):
        argv = needed + [f"--{k}={v}" for k, v in pairs]
        if script == "tools/compare.py":  # what follows -- goes to train.py: contradictions are refused too
            argv += ["--"] + [f"--{k}={v}" for k, v in extra]
        started = time.perf_counter()
        code, err = outcome(stage, argv)
        assert time.perf_counter() - started < 5, argv  # never a hang
        assert "Traceback" not in err
        if code == 0:
            assert not err.strip(), (argv, err)
        else:
            assert code == 2, (argv, code, err)
            assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, (argv, err)
            assert len(err.strip().splitlines()) == 1, (argv, err)

    check()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_value_with_line_breaks_or_escapes_is_still_one_line(script, monkeypatch):
    """Every option of every script given text with a carriage return, a line break and a terminal
    escape: whatever the verdict, the refusal is one line (data.common.one_line), echoing the value."""
    monkeypatch.delenv("RANK", raising=False)
    stage, needed = SCRIPTS[script]
    for name in option_names(script):
        code, err = outcome(stage, needed + [f"--{name}=0\r1\nx\x1b[31m"])
        assert "Traceback" not in err and code in (0, 2), (name, err)
        assert code == 0 or len(err.strip().splitlines()) == 1, (name, err)
        assert "\x1b" not in err and "\r" not in err


def test_accepted_values_are_within_their_bounds():
    """What train.py accepts is in BOUNDS: the largest allowed value passes, the next one is refused."""
    for name, bound in train_options.BOUNDS.items():
        if bound.kind is int and bound.hi is not None:
            code, err = outcome(train_options.early_options, [f"--{name}={bound.hi + 1}"])
            assert code == 2 and f"{name} must be" in err, (name, err)
    for args in (["--n_layer=1024"], ["--grad_accum=4096"], ["--n_embd=65536", "--n_head=16"], ["--n_head=1024", "--n_embd=1024"]):
        code, err = outcome(train_options.early_options, ["--init_from=gpt2", *args])
        assert code == 0, (args, err)
    code, err = outcome(train_options.early_options, ["--init_from=scratch", "--n_layer=1024", "--n_embd=65536", "--n_head=16"])
    assert code == 2 and "n_layer must be smaller together with n_embd=65536" in err, err


# ---- files: random JSON for every field, a damaged file named ---------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
FIELD_VALUES = JSON | st.sampled_from([5, -1, 2**60, 1e308, "", "x", " ||", "stream", "examples", [1, 2], {}])


@settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(["kind", "separator", "vocab_size", "eot", "train_tokens"]), FIELD_VALUES, max_size=4))
def test_meta_json_of_any_content_is_read_or_named(tmp_path_factory, fields):
    d = tmp_path_factory.mktemp("meta")
    (d / "meta.json").write_text(json.dumps(fields))
    try:
        meta = read_meta(str(d), "run prepare.py")
    except UserError as e:
        assert "meta.json" in str(e) and "prepare.py again" in str(e)
        return
    assert meta["kind"] in ("stream", "examples")
    assert isinstance(meta.get("separator", " "), str) and meta.get("separator", " ")


LINES = st.one_of(JSON.map(json.dumps),
                  st.dictionaries(st.sampled_from(["step", "done", "loss", "val_loss", "tokens_per_s", "sample"]),
                                  FIELD_VALUES, min_size=1, max_size=3).map(json.dumps),
                  st.binary(max_size=12).map(lambda b: b.decode("latin-1")))


@settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(LINES, max_size=4))
def test_metrics_jsonl_of_any_content_is_read_or_named_with_its_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("metrics") / "metrics.jsonl"
    path.write_bytes("".join(line.replace("\n", " ") + "\n" for line in lines).encode("latin-1", "replace"))
    try:
        records = read_metrics(str(path))
    except UserError as e:
        assert re.search(r"metrics\.jsonl line \d+ ", str(e)), str(e)
        return
    for r in records:
        assert isinstance(r, dict) and ("step" in r or "done" in r)
        assert all(type(r[k]) is int for k in ("step", "done") if k in r)


@settings(max_examples=100, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(list(compare.ROW_FIELDS)), FIELD_VALUES, max_size=6))
def test_compare_rows_of_any_content_are_checked(fields):
    good = {"preset": "lora", "seed": 1, "trainable": 10, "mrs": 2, "beam_size": 1, "file_bytes": 100, "val_loss": 1.0,
            "tokens_per_s": 5.0, "peak_memory_mb": 3.0, "val_curve": [[0, 2.0]], "command": ["--r=2"]}
    row = {**good, **fields}
    try:
        compare.check_row(row, "compare_row.json")
    except UserError as e:
        assert str(e).startswith("compare_row.json ")
        return
    compare.format_table([row], argparse_like(), [], {}, 2)  # what compare.py does with a row it accepted


def argparse_like():
    import argparse
    return argparse.Namespace(beam_size=1, seeds=[1], init_from="b", targets="q,v", r=2, alpha=4.0, max_iters=2,
                              batch_size=2, learning_rate=1e-3, device="cpu")


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = sharelora.add_adapters(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64)),
                                   sharelora.AdapterConfig(preset="vera", r=2))
    path = tmp_path_factory.mktemp("adapter") / "a.safetensors"
    sharelora.save_adapter(model, path, base="b")
    return path


def rewritten(path, tmp, change):
    """A copy of the adapter file with its metadata changed by change({key: decoded JSON})."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    decoded = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
    change(decoded)
    out = tmp / "changed.safetensors"
    save_file(tensors, out, metadata={**{k: meta[k] for k in ("format", "version")},
                                      **{k: json.dumps(v) for k, v in decoded.items()}})
    return out


@settings(max_examples=80, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["r", "seed", "alpha", "layer_pattern", "targets", "preset"]), FIELD_VALUES)
def test_adapter_config_of_any_content_is_refused_before_any_allocation(adapter_file, tmp_path_factory, key, value):
    from model import GPT, GPTConfig
    path = rewritten(adapter_file, tmp_path_factory.mktemp("a"), lambda m: m["config"].update({key: value}))
    started = time.perf_counter()
    try:
        sharelora.load_adapter(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64)), path)
    except ValueError as e:
        assert str(path) in str(e), str(e)  # the damaged file is named
    assert time.perf_counter() - started < 5


@settings(max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["shapes", "regenerated", "groups"]), FIELD_VALUES)
def test_adapter_layout_metadata_of_any_content_is_checked(adapter_file, tmp_path_factory, key, value):
    from model import GPT, GPTConfig
    path = rewritten(adapter_file, tmp_path_factory.mktemp("a"), lambda m: m.update({key: value}))
    try:
        sharelora.load_adapter(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64)), path)
    except ValueError as e:
        assert str(path) in str(e), str(e)


def test_a_crafted_layer_pattern_in_a_file_is_never_run(adapter_file, tmp_path):
    """(a+)+$ against a long run of a's backtracks for ages; loading never runs a pattern from a file."""
    from model import GPT, GPTConfig
    evil = "(.+)+$x"
    fresh = lambda: GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64))
    path = rewritten(adapter_file, tmp_path, lambda m: m["config"].update(layer_pattern=evil))
    started = time.perf_counter()
    model = sharelora.load_adapter(fresh(), path)  # the recorded grouping is used
    assert time.perf_counter() - started < 5
    assert {m.group for m in sharelora.adapted_layers(model)} == {"transformer.h.*.attn.q", "transformer.h.*.attn.v"}

    def older(m):
        m["config"]["layer_pattern"] = evil
        del m["groups"]
    with pytest.raises(ValueError, match="custom layer_pattern but no recorded grouping"):
        sharelora.load_adapter(fresh(), rewritten(adapter_file, tmp_path, older))


@pytest.mark.parametrize("r, phrase", [(2**60, "r must be"), (2**40, "r must be"), (32, "narrowest map")])
def test_adapter_rank_is_bounded_before_any_allocation(adapter_file, tmp_path, r, phrase):
    from model import GPT, GPTConfig
    path = rewritten(adapter_file, tmp_path, lambda m: m["config"].update(r=r))
    with pytest.raises(ValueError, match=phrase):
        sharelora.load_adapter(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64)), path)


# ---- the cases issue 23 listed, each once, through the scripts' main() ---------------------------------

def one_error(code, err, phrase):
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and phrase in errors[0], err


LISTED = {  # name: (script, lambda case: argv, a phrase the message must hold)
    "n_layer=10**23": ("train.py", lambda c: c.train("--n_layer=" + "1" + "0" * 23), "n_layer must be a whole number in [1, 1,024]"),
    "grad_accum=7.8e18": ("train.py", lambda c: c.train("--grad_accum=7800000000000000000"), "grad_accum must be"),
    "n_embd=2**62": ("train.py", lambda c: c.train(f"--n_embd={2**62}"), "n_embd must be"),
    "batch_size=10**23": ("train.py", lambda c: c.train("--batch_size=1" + "0" * 23), "batch_size must be"),
    "batch larger than the data": ("train.py", lambda c: [*c.train(f"--data_dir={c.data['e2e']}", "--batch_size=60000")],
                                   "fewer than batch_size 60000"),
    "eval_prompt beyond the context": ("train.py", lambda c: c.train("--eval_prompt=" + "hello " * 40, "--sample_tokens=4"),
                                       "shorten eval_prompt or lower sample_tokens"),
    "beam_size=30000": ("tools/evaluate_e2e.py", lambda c: [f"--adapter={c.adapter}", "--beam_size=30000"], "--beam_size must be"),
    "length_penalty=1e308": ("tools/evaluate_e2e.py", lambda c: [f"--adapter={c.adapter}", "--length_penalty=1e308"],
                             "--length_penalty must be"),
    "length_penalty=-1e308": ("tools/evaluate_e2e.py", lambda c: [f"--adapter={c.adapter}", "--length_penalty=-1e308"],
                              "--length_penalty must be"),
    "temperature=1e-45": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--temperature=1e-45"], "--temperature must be"),
    "top_p=1e-300": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--top_p=1e-300"], "--top_p must be"),
    "empty --start": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--start="], "--start must be"),
    "empty --start file": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", f"--start=FILE:{c.file('p.txt', '')}"],
                           "gives an empty prompt"),
    "prompt longer than the context": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--start=" + "word " * 80],
                                       "leaves no room to generate: shorten --start"),
    "meta.json separator 5": ("tools/evaluate_e2e.py", lambda c: [f"--adapter={c.adapter}", f"--data_dir={_meta_with(c, separator=5)}"],
                              "has separator = 5"),
    "compare --presets=sharea -- --adapter=lora": ("tools/compare.py", lambda c: [
        f"--init_from={c.base}", "--presets=sharea", "--", "--adapter=lora"], "sets adapter, which compare.py sets"),
    "compare -- --seed=7": ("tools/compare.py", lambda c: [f"--init_from={c.base}", "--", "--seed=7"], "sets seed"),
    "adapter r=2**60": ("sample.py", lambda c: [f"--adapter={_adapter_r(c, 2**60)}"], "r must be a whole number in [1, 65536]"),
    "adapter r=2**40": ("sample.py", lambda c: [f"--adapter={_adapter_r(c, 2**40)}"], "r must be a whole number in [1, 65536]"),
}


def _meta_with(c, **fields):
    d = c.e2e_copy()
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, **fields}))
    return d


def _adapter_r(c, r):
    return rewritten(c.adapter, c.tmp, lambda m: m["config"].update(r=r))


@pytest.mark.parametrize("name", list(LISTED))
def test_listed_cases_are_one_sentence_and_exit_2(name, trained, data, tmp_path, monkeypatch, capsys, one_thread):
    script, make_argv, phrase = LISTED[name]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SHARELORA_TRACEBACK", raising=False)
    started = time.perf_counter()
    code, err = call(script, make_argv(Case(trained, data, tmp_path)), monkeypatch, capsys)
    one_error(code, err, phrase)
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize("lines, phrase", [
    (['{"step": 1, "loss": 2.0}', "5"], "metrics.jsonl line 2 is int 5, not a JSON object"),
    (['{"step": "x"}'], "metrics.jsonl line 1 has step = 'x'"),
    (["\x00\xff\xfe binary"], "metrics.jsonl line 1 is not a JSON record (damaged or binary)"),
])
def test_a_damaged_metrics_line_is_named_and_compare_rewrites_nothing(lines, phrase, trained, data, tmp_path,
                                                                        monkeypatch, capsys, one_thread):
    """compare.py over a finished run whose metrics.jsonl is damaged: one sentence naming the file and the
    line, and results.json (of an earlier comparison) unchanged."""
    out = tmp_path / "cmp"
    argv = [f"--init_from={trained / 'base'}", f"--data_dir={data['e2e']}", "--presets=lora", "--max_iters=1", "--r=2",
            "--batch_size=2", "--eval_mrs=0", f"--out={out}", "--device=cpu", "--", "--eval_iters=1", "--dtype=float32"]
    run_dir = out / "lora" / "seed1"
    run_dir.mkdir(parents=True)
    cmd = compare.train_command(compare.options(argv)[0], "lora", 1, str(run_dir), ["--eval_iters=1", "--dtype=float32"])
    (run_dir / compare.COMMAND_FILE).write_text(json.dumps(cmd[2:]))
    data_lines = [*lines, '{"done": 1, "best_val_loss": 1.0, "peak_memory_mb": 5}']
    (run_dir / "metrics.jsonl").write_bytes(("\n".join(data_lines) + "\n").encode("latin-1"))
    (out / "results.json").write_text('[{"preset": "lora", "seed": 1}]\n')
    before = (out / "results.json").read_bytes()
    code, err = call("tools/compare.py", argv, monkeypatch, capsys)
    one_error(code, err, phrase)
    assert str(run_dir / "metrics.jsonl") in err
    assert (out / "results.json").read_bytes() == before


def test_rank_without_torchrun_does_not_silence_errors():
    p = subprocess.run([sys.executable, "train.py", "--n_layer=0"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "RANK": "1"}, timeout=60)
    one_error(p.returncode, p.stderr, "n_layer must be")
    p = subprocess.run([sys.executable, "sample.py", "--init_from=gpt2", "--top_k=0"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "RANK": "3"}, timeout=60)
    one_error(p.returncode, p.stderr, "--top_k must be")


def test_a_run_records_its_data_and_refuses_other_data_on_resume(data, tmp_path):
    """A run trained on E2E through a relative --data_dir: resumed from another folder it finds the
    same data (the path is recorded relative to the run folder); swapped for Shakespeare it is refused;
    sample.py --format=auto reads from the run that it trained on examples."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copytree(data["e2e"], work / "mydata")
    opts = [*TINY, "--adapter=lora", "--r=2", "--eval_interval=1"]
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *opts, "--data_dir=mydata", "--out_dir=run", "--max_iters=1"],
                       cwd=work, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ckpt = torch.load(work / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["data"]["kind"] == "examples" and ckpt["data"]["path"] == "../mydata"
    assert set(ckpt["data"]["files"]) == {"train.bin", "val.bin", "train_examples.bin", "val_examples.bin"}
    resume = [sys.executable, str(ROOT / "train.py"), "--init_from=resume", f"--out_dir={work / 'run'}"]
    p = subprocess.run([*resume, "--max_iters=2"], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr  # from another folder: the same data, found through the run folder
    assert sample._trained_on(str(work / "run")) == "examples"
    shutil.rmtree(work / "mydata")
    shutil.copytree(data["shakespeare"], work / "mydata")  # the folder now holds other data
    p = subprocess.run([*resume, "--max_iters=3"], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    one_error(p.returncode, p.stderr, "is not what the run in")


def test_a_clock_that_does_not_advance_gives_finite_rates(data, tmp_path, monkeypatch, one_thread):
    import train
    monkeypatch.setattr(time, "perf_counter", lambda: 1000.0)
    out = tmp_path / "run"
    train.main([*TINY, "--adapter=lora", "--r=2", f"--data_dir={data['shakespeare']}", f"--out_dir={out}", "--max_iters=3",
                "--log_interval=1"])
    steps = [r for r in read_metrics(str(out / "metrics.jsonl")) if "tokens_per_s" in r]
    assert len(steps) == 3 and all(0 < r["tokens_per_s"] < 1e12 for r in steps)


def test_demo_out_is_relative_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.options(["--out", "rel"]).out == str(tmp_path / "rel")
