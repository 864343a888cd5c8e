"""
Shared fixtures for the model / adapter tests: the repository root on sys.path, a guard that fails a
test which tries to open a network connection, and small builders for transformers' GPT-2 reference.
Everything runs on the CPU in float32; transformers and peft objects are built from configs, never
downloaded.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# The suite runs one worker per core (pytest.ini: -n auto, pytest-xdist). One torch thread each, and in
# each script a test starts: two threads per process on a 2-core machine spin-wait for cores the other
# worker holds. Set before torch is imported, which reads it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is much faster than two that
    spin-wait for each other while other processes hold the cores (20 ms vs 1 s for a training step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host name or connect a socket is recorded, refused, and fails the test
    (even when the code under test catches the error)."""
    attempts = []

    def refuse(what):
        def f(*args, **kwargs):
            attempts.append((what, args[:2]))
            raise OSError(f"network access attempted in a test: {what}{args[:2]}")
        return f

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    yield attempts
    assert not attempts, f"the test tried to use the network: {attempts}"


def hf_config(vocab_size=211, n_positions=64, n_embd=48, n_layer=2, n_head=4):
    """A transformers GPT2Config with every dropout off and no bos/eos (so generate never stops early)."""
    from transformers import GPT2Config
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)


@torch.no_grad()
def randomize_(module, seed, std=0.05):
    """Perturb every parameter (weights, biases, LayerNorm gains) so that a loader that mixes up or
    drops a tensor shows in the outputs; the default inits leave biases at 0 and gains at 1."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for _, p in module.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def hf_model(seed=0, std=0.05, **config):
    """A randomly initialised transformers GPT2LMHeadModel in eval mode (every tensor perturbed)."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(hf_config(**config)).eval()
    return randomize_(m, seed + 1000, std)


# ---- running the scripts on tiny models and data (test_train.py, test_faults.py) -------------------

def load_script(path):
    """A script (data/*/prepare.py, which reads sys.argv) as a module; path relative to the root."""
    import importlib.util
    path = ROOT / path
    spec = importlib.util.spec_from_file_location(path.parent.name + "_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--warmup_iters=2", "--device=cpu", "--dtype=float32"]


def run(script, *args, check=True, env=None):
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """{'shakespeare': dir, 'e2e': dir}, prepared by the real prepare scripts from the copies shipped in
    data/*/source (a subset of E2E)."""
    tmp = tmp_path_factory.mktemp("data")
    out = {"shakespeare": tmp / "shakespeare", "e2e": tmp / "e2e_prepared"}
    run("data/shakespeare/prepare.py", "--out", out["shakespeare"])
    run("data/e2e/prepare.py", "--out", out["e2e"], "--limit", 2000)
    return out


@pytest.fixture(scope="session")
def trained(data, tmp_path_factory):
    """A tiny base written by train.py, and an adapter trained on it (for the bad-input cases)."""
    tmp = tmp_path_factory.mktemp("trained")
    run("train.py", *TINY, "--adapter=none", f"--data_dir={data['shakespeare']}", f"--out_dir={tmp / 'base'}",
        "--max_iters=1")
    run("train.py", *TINY[5:], f"--init_from={tmp / 'base'}", "--adapter=lora", "--r=2", f"--data_dir={data['e2e']}",
        f"--out_dir={tmp / 'adapted'}", "--max_iters=1")
    run("train.py", *TINY[:2], "--n_layer=3", *TINY[2:], "--adapter=none", f"--data_dir={data['shakespeare']}",
        f"--out_dir={tmp / 'other'}", "--max_iters=1")
    return tmp


