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
from conftest import ROOT, TINY, load_script, run
from data.common import UserError, check_record, read_meta, read_metrics
from data.common import run as run_early
from test_faults import Case, call
from tools import analyze, compare, demo, evaluate_e2e, export

SCRIPTS = {  # script: (its parse-and-check stage, options every command needs, so that the rest is reached)
    "train.py": (train_options.early_options, []),
    "sample.py": (sample.options, ["--init_from=gpt2"]),
    "tools/evaluate_e2e.py": (evaluate_e2e.options, ["--adapter=a.safetensors"]),
    "tools/compare.py": (compare.options, ["--init_from=gpt2"]),
    "tools/export.py": (export.options, ["--to=hf", "--dest=d"]),
    "tools/analyze.py": (analyze.options, ["--adapter=a.safetensors"]),
    "tools/demo.py": (demo.options, []),
    **{p: (load_script(p).options, []) for p in ("data/e2e/prepare.py", "data/e2e_refs/prepare.py",
                                                 "data/shakespeare/prepare.py")},
}


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
                     "9" * 5000, "lora", "none", "e2e", "auto"]),
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
