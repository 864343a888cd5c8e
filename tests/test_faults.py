"""Bad input, as a hostile user gives it: every case ends with exit code 2 and one `error:` line that
names what is wrong, no traceback, and no file that existed before is changed (nor a temporary file
left behind). The scripts' main() runs in this process, as `python script.py ...` would run it: an
uncaught exception fails the test with its traceback.

Each case builds its bad input in its own folder from the tiny base, adapter and data that conftest
trains once (`trained`, `data`)."""
import hashlib
import json
import math
import os
import shutil
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tools import analyze
from tools import compare
from tools import evaluate_e2e
from tools import export
import runtime
import sample
import train
from conftest import ROOT, TINY, load_script


MAINS = {"train.py": train.main, "sample.py": sample.main, "tools/export.py": export.main, "tools/analyze.py": analyze.main,
         "tools/compare.py": compare.main,
         "tools/evaluate_e2e.py": lambda argv: runtime.run(evaluate_e2e.main, argv)}
PREPARE = ("data/e2e/prepare.py", "data/shakespeare/prepare.py", "data/e2e_refs/prepare.py")


class Case:
    """What a case may use: the trained tiny models, prepared data, and its own folder to spoil."""

    def __init__(self, trained, data, tmp):
        self.trained, self.data, self.tmp = trained, data, tmp
        self.base, self.adapter = trained / "base", trained / "adapted" / "adapter.safetensors"

    def file(self, name, content):
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def copy(self, src, name):
        dst = self.tmp / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        return dst

    def adapter_with(self, tensors=None, metadata=None, drop=()):
        """The trained adapter file, with some tensors or metadata changed."""
        from safetensors import safe_open
        with safe_open(self.adapter, framework="pt") as f:
            meta = dict(f.metadata())
            t = {k: f.get_tensor(k) for k in f.keys()}
        t.update(tensors or {})
        meta.update(metadata or {})
        for k in drop:
            meta.pop(k)
        path = self.tmp / "bad_adapter.safetensors"
        save_file(t, path, metadata=meta)
        return path

    def run_copy(self, change):
        """A copy of the trained adapter run whose ckpt.pt went through `change`."""
        run = self.copy(self.trained / "adapted", "run")
        self.copy(self.base, "base")  # beside it, as the run names it: ../base
        ckpt = torch.load(run / "ckpt.pt", weights_only=True)
        change(ckpt)
        torch.save(ckpt, run / "ckpt.pt")
        return run

    def e2e_copy(self, truncate=None, keep=0):
        d = self.copy(self.data["e2e"], "e2e")
        if truncate:
            self.truncate(d / truncate, keep)
        return d

    def train(self, *options):
        """A tiny training run's options on Shakespeare, from scratch; later options win."""
        return ["--init_from=scratch", *TINY[1:], "--max_iters=1", f"--data_dir={self.data['shakespeare']}",
                f"--out_dir={self.tmp / 'out'}", *options]

    def truncate(self, path, keep):
        path.write_bytes(path.read_bytes()[:keep])
        return path


def _meta_without_kind(c):
    d = c.e2e_copy()
    meta = json.loads((d / "meta.json").read_text())
    del meta["kind"]
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def _hf_dir(c, config=None, weights=None, config_text=None, extra=None):
    d = c.tmp / "hf"
    d.mkdir()
    shutil.copy(c.base / "model.safetensors", d)
    cfg = json.loads((c.base / "config.json").read_text())
    for k in config or ():
        del cfg[k]
    cfg.update(extra or {})
    (d / "config.json").write_text(config_text or json.dumps(cfg))
    if weights is not None:
        (d / "model.safetensors").unlink()
        weights(d)
    return d


def _pickle_with_code(d):
    import argparse
    torch.save({"weights": argparse.Namespace(a=1)}, d / "pytorch_model.bin")  # not weights only


def _csv(c, name, text, encoding="utf-8"):
    d = c.tmp / "csvs"
    d.mkdir(exist_ok=True)
    for f in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        (d / f).write_text("mr,ref\nname[A],A is nice.\n")
    (d / name).write_bytes(text.encode(encoding))
    return d


def _tiny_stream(c, tokens, token=None):
    from data.common import write_bin, write_json
    d = c.tmp / "tiny_stream"
    d.mkdir()
    for split in ("train", "val"):
        write_bin(str(d / f"{split}.bin"), "H", [token or i for i in range(1, tokens + 1)])
    write_json(str(d / "meta.json"), {"kind": "stream", "vocab_size": 50257})
    return d


def _refs(c, content):
    d = c.e2e_copy()
    (d / "test_refs.json").write_text(content)
    return d


CASES = {  # name: (script, lambda case: argv, a phrase the message must hold)
    # configuration
    "config file with a syntax error": ("train.py", lambda c: [c.file("c.py", "r = = 3\n")], "could not run: line 1"),
    "config file that raises": ("train.py", lambda c: [c.file("c.py", "import nowhere_module\n")], "could not run"),
    "eval_interval=0": ("train.py", lambda c: c.train("--eval_interval=0"), "eval_interval must be"),
    "n_head does not divide n_embd": ("train.py", lambda c: c.train("--n_head=3"), "n_embd must be"),
    "block_size=0": ("train.py", lambda c: c.train("--block_size=0"), "block_size must be"),
    "alpha=nan": ("train.py", lambda c: c.train("--alpha=nan"), "alpha must be"),
    "learning_rate=inf": ("train.py", lambda c: c.train("--learning_rate=inf"), "learning_rate must be"),
    "label_smoothing=1.5": ("train.py", lambda c: c.train("--label_smoothing=1.5"), "label_smoothing must be"),
    "weight_decay<0": ("train.py", lambda c: c.train("--weight_decay=-0.1"), "weight_decay must be"),
    "grad_clip=nan": ("train.py", lambda c: c.train("--grad_clip=nan"), "grad_clip must be"),
    "beta2=1": ("train.py", lambda c: c.train("--beta2=1"), "beta2 must be"),
    "seed<0": ("train.py", lambda c: c.train("--seed=-1"), "seed must be"),
    "bad spec": ("train.py", lambda c: c.train("--spec=A=everywhere"), "bad spec setting"),
    # data
    "block_size larger than the data": ("train.py", lambda c: c.train(f"--data_dir={_tiny_stream(c, 20)}"),
                                        "too few for block_size"),
    "meta.json without kind": ("train.py", lambda c: c.train(f"--data_dir={_meta_without_kind(c)}"), "no valid kind"),
    "meta.json not JSON": ("train.py", lambda c: c.train(f"--data_dir={c.file('d/meta.json', '{kind: stream').parent}"),
                           "meta.json is not valid JSON"),
    "truncated E2E examples": ("train.py", lambda c: c.train(f"--data_dir={c.e2e_copy('train_examples.bin', 100)}"),
                               "train_examples.bin is truncated"),
    "E2E examples beyond the tokens": ("train.py", lambda c: c.train(f"--data_dir={c.e2e_copy('train.bin', 1000)}"),
                                       "does not fit train.bin"),
    # bases and adapters to start from
    "init_adapter of another rank": ("train.py", lambda c: c.train(f"--init_from={c.base}", "--adapter=lora", "--r=4",
                                                                   f"--init_adapter={c.adapter}"), "use the same r"),
    "init_adapter of another width": ("train.py", lambda c: c.train("--n_embd=48", "--adapter=lora", "--r=2",
                                                                    f"--init_adapter={c.adapter}"), "was made on another base"),
    "init_from garbage .safetensors": ("train.py", lambda c: c.train(f"--init_from={c.file('x.safetensors', os.urandom(300))}"),
                                       "not a readable weights file"),
    "init_from truncated .safetensors": ("train.py", lambda c: c.train(
        f"--init_from={c.truncate(c.copy(c.base / 'model.safetensors', 'm.safetensors'), 5000)}"), "not a readable weights file"),
    "init_from huge safetensors header": ("train.py", lambda c: c.train(
        f"--init_from={c.file('h.safetensors', struct.pack('<Q', 2**40) + b'{}')}"), "not a readable weights file"),
    "init_from a pickle holding code": ("train.py", lambda c: c.train(f"--init_from={_hf_dir(c, weights=_pickle_with_code)}"),
                                        "not a readable weights file"),
    "config.json missing a field": ("train.py", lambda c: c.train(f"--init_from={_hf_dir(c, config=['n_layer'])}"),
                                    "lacks n_layer"),
    "config.json not JSON": ("train.py", lambda c: c.train(f"--init_from={_hf_dir(c, config_text='{')}"),
                             "config.json is not valid JSON"),
    # checkpoints
    "checkpoint with an unknown option": ("train.py", lambda c: [
        "--init_from=resume", "--max_iters=5", f"--out_dir={c.run_copy(lambda k: k['config'].update(bogus=1))}"], "does not know (bogus)"),
    "checkpoint without optimizer": ("train.py", lambda c: [
        "--init_from=resume", "--max_iters=5", f"--out_dir={c.run_copy(lambda k: k.pop('optimizer'))}"], "lacks optimizer"),
    "checkpoint without adapter tensors": ("train.py", lambda c: [
        "--init_from=resume", "--max_iters=5", f"--out_dir={c.run_copy(lambda k: k.pop('adapter'))}"], "lacks its adapter tensors"),
    "checkpoint of another project": ("train.py", lambda c: [
        "--init_from=resume", f"--out_dir={c.file('f/ckpt.pt', b'x').parent}"], "not a readable checkpoint"),
    "fresh run into a run's folder": ("train.py", lambda c: c.train(f"--out_dir={c.trained / 'adapted'}"),
                                      "holds a training run already"),
    "resume changing a fixed option": ("train.py", lambda c: [
        "--init_from=resume", "--max_iters=5", "--learning_rate=5", f"--out_dir={c.copy(c.trained / 'adapted', 'r')}"],
        "learning_rate cannot change when a run resumes"),
    "resume to a step already reached": ("train.py", lambda c: [
        "--init_from=resume", "--max_iters=1", f"--out_dir={c.copy(c.trained / 'adapted', 'r')}"], "at step 1 already"),
    "checkpoint option of the wrong type": ("train.py", lambda c: [
        "--init_from=resume", "--max_iters=5", f"--out_dir={c.run_copy(lambda k: k['config'].update(r='abc'))}"],
        "r in the checkpoint"),
    "checkpoint step of the wrong type": ("train.py", lambda c: [
        "--init_from=resume", "--max_iters=5", f"--out_dir={c.run_copy(lambda k: k.update(step='5'))}"], "damaged step"),
    "checkpoint random state damaged": ("train.py", lambda c: [
        "--init_from=resume", "--max_iters=5", f"--out_dir={c.run_copy(lambda k: k['rng'][0].update(torch=torch.zeros(3, dtype=torch.uint8)))}"],
        "random state"),
    "learning_rate beyond float32": ("train.py", lambda c: c.train("--learning_rate=1e300"), "learning_rate must be"),
    "config file that calls exit()": ("train.py", lambda c: [c.file("c.py", "import sys\nsys.exit(0)\n")], "could not run"),
    "token ids beyond the vocabulary": ("train.py", lambda c: c.train(f"--data_dir={_tiny_stream(c, 100, token=60000)}"),
                                        "beyond the model's vocabulary"),
    "config.json without n_embd but with n_inner": ("train.py", lambda c: c.train(
        f"--init_from={_hf_dir(c, config=['n_embd'], extra={'n_inner': 128})}"), "lacks n_embd"),
    "config.json epsilon of the wrong type": ("train.py", lambda c: c.train(
        f"--init_from={_hf_dir(c, extra={'layer_norm_epsilon': 'x'})}"), "layer_norm_eps"),
    "config.json epsilon negative": ("train.py", lambda c: c.train(
        f"--init_from={_hf_dir(c, extra={'layer_norm_epsilon': -1.0})}"), "layer_norm_eps"),
    # adapter files
    "adapter spec of the wrong type": ("sample.py", lambda c: [
        f"--adapter={c.adapter_with(metadata={'config': json.dumps({'preset': 'lora', 'spec': 5})})}",
        f"--init_from={c.base}"], "damaged metadata"),
    "adapter alpha of the wrong type": ("sample.py", lambda c: [
        f"--adapter={c.adapter_with(metadata={'config': json.dumps({'preset': 'lora', 'alpha': 'x'})})}",
        f"--init_from={c.base}"], "damaged metadata"),
    "adapter alpha infinite": ("sample.py", lambda c: [
        f"--adapter={c.adapter_with(metadata={'config': json.dumps({'preset': 'lora', 'alpha': math.inf})})}",
        f"--init_from={c.base}"], "damaged metadata"),
    "adapter targets not names": ("sample.py", lambda c: [
        f"--adapter={c.adapter_with(metadata={'config': json.dumps({'preset': 'lora', 'targets': [1]})})}",
        f"--init_from={c.base}"], "damaged metadata"),
    "adapter shapes damaged": ("sample.py", lambda c: [
        f"--adapter={c.adapter_with(metadata={'shapes': json.dumps({'transformer.h.0.attn.q': 5})})}",
        f"--init_from={c.base}"], "damaged metadata"),
    "adapter base not a name": ("sample.py", lambda c: [f"--adapter={c.adapter_with(metadata={'base': '5'})}"],
                                "damaged metadata"),
    "adapter metadata without config": ("sample.py", lambda c: [f"--adapter={c.adapter_with(drop=['config'])}",
                                                                f"--init_from={c.base}"], "lacks 'config'"),
    "adapter metadata without shapes": ("sample.py", lambda c: [f"--adapter={c.adapter_with(drop=['shapes'])}",
                                                                f"--init_from={c.base}"], "lacks 'shapes'"),
    "adapter config with an unknown field": ("sample.py", lambda c: [
        f"--adapter={c.adapter_with(metadata={'config': json.dumps({'preset': 'lora', 'colour': 'red'})})}",
        f"--init_from={c.base}"], "damaged metadata"),
    "adapter metadata not JSON": ("sample.py", lambda c: [f"--adapter={c.adapter_with(metadata={'shapes': '{'})}",
                                                          f"--init_from={c.base}"], "damaged metadata"),
    "adapter holding nan": ("sample.py", lambda c: [
        f"--adapter={c.adapter_with({'transformer.h.0.attn.q.lora_B': torch.full((32, 2), math.nan)})}",
        f"--init_from={c.base}"], "inf or nan"),
    "adapter holding integers": ("sample.py", lambda c: [
        f"--adapter={c.adapter_with({'transformer.h.0.attn.q.lora_B': torch.zeros(32, 2, dtype=torch.int64)})}",
        f"--init_from={c.base}"], "torch.int64"),
    # where to write
    "out_dir is a file": ("train.py", lambda c: c.train(f"--out_dir={c.file('f', 'x')}"), "is a file"),
    "out_dir cannot be made": ("train.py", lambda c: c.train("--out_dir=/sys/sharelora-test"), "cannot write in out_dir"),
    "out_dir below a file": ("train.py", lambda c: c.train(f"--out_dir={c.file('f', 'x')}/sub"), "cannot write in out_dir"),
    "export --dest is a run": ("tools/export.py", lambda c: [f"--adapter={c.adapter}", "--to=hf",
                                                     f"--dest={c.copy(c.trained / 'adapted', 'r')}"], "holds a training run"),
    "export --dest is the base": ("tools/export.py", lambda c: [f"--adapter={c.copy(c.trained / 'adapted', 'ad') / 'adapter.safetensors'}",
                                                        f"--init_from={c.copy(c.base, 'b')}", "--to=hf", f"--dest={c.tmp / 'b'}"],
                                  "the base"),
    "export --dest is a file": ("tools/export.py", lambda c: [f"--adapter={c.adapter}", "--to=hf", f"--dest={c.file('f', 'x')}"],
                                "--dest"),
    "prepare --out is a file": ("data/e2e/prepare.py", lambda c: ["--src", _csv(c, "devset.csv", "mr,ref\nname[B],B.\n"),
                                                                 "--out", c.file("f", "x")], "is a file"),
    # sampling options
    "sample --top_k=0": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--top_k=0"], "--top_k must be"),
    "sample --top_p=-1": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--top_p=-1"], "--top_p must be"),
    "sample --num_samples=0": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--num_samples=0"],
                               "--num_samples must be"),
    "sample --max_new_tokens=-5": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--max_new_tokens=-5"],
                                   "--max_new_tokens must be"),
    "sample --temperature=-1": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--temperature=-1"],
                                "--temperature must be"),
    "sample --start=FILE: missing": ("sample.py", lambda c: [f"--out_dir={c.trained / 'adapted'}", "--start=FILE:/nowhere.txt"],
                                     "--start FILE:/nowhere.txt"),
    "sample with an unknown option": ("sample.py", lambda c: ["--tempreature=1"], "unrecognized arguments"),
    # evaluation
    "refs file of the wrong shape": ("tools/evaluate_e2e.py", lambda c: [f"--adapter={c.adapter}", "--data_dir=" + str(_refs(c, '{"mr": 1}'))],
                                     "is not a list of"),
    "refs file not JSON": ("tools/evaluate_e2e.py", lambda c: [f"--adapter={c.adapter}", f"--data_dir={_refs(c, '[{')}"],
                           "test_refs.json is not a valid JSON"),
    "evaluate --beam_size beyond the vocabulary": ("tools/evaluate_e2e.py", lambda c: [
        f"--adapter={c.adapter}", f"--data_dir={c.data['e2e']}", "--beam_size=100000", "--limit=1",
        f"--results_dir={c.tmp / 'res'}"], "at most the vocabulary size"),
    "analyze a run without adapter": ("tools/analyze.py", lambda c: [f"--out_dir={c.base}"], "holds no adapter"),
    "analyze --png is a folder": ("tools/analyze.py", lambda c: [f"--adapter={c.adapter}", f"--png={c.tmp}"], "ending in .png"),
    "compare with r=0": ("tools/compare.py", lambda c: [f"--init_from={c.base}", f"--data_dir={c.data['e2e']}", "--r=0",
                                                  f"--out={c.tmp / 'cmp'}"], "r must be"),
    "compare into an earlier comparison": ("tools/compare.py", lambda c: [
        f"--init_from={c.base}", f"--data_dir={c.data['e2e']}", f"--out={c.file('cmp/lora/seed1/x', 'x').parent.parent.parent}"],
        "holds a run of another comparison"),
    "compare --presets twice the same": ("tools/compare.py", lambda c: [f"--init_from={c.base}", f"--data_dir={c.data['e2e']}",
                                                                 "--presets=lora,lora", f"--out={c.tmp / 'cmp2'}"], "names a preset twice"),
    "compare --seeds not numbers": ("tools/compare.py", lambda c: [f"--init_from={c.base}", "--seeds=1,two"], "--seeds must be whole numbers"),
    "compare --seeds twice the same": ("tools/compare.py", lambda c: [f"--init_from={c.base}", "--seeds=3,3"], "names a seed twice"),
    "evaluate --beam_size=0": ("tools/evaluate_e2e.py", lambda c: [f"--adapter={c.adapter}", "--beam_size=0"], "--beam_size must be"),
    # preparing data
    "prepare non-UTF-8 text": ("data/shakespeare/prepare.py", lambda c: ["--src", c.file("t.txt", "Ros\xe9 ".encode("latin-1") * 99),
                                                                        "--out", c.tmp / "o"], "not UTF-8"),
    "prepare non-UTF-8 CSV": ("data/e2e/prepare.py", lambda c: ["--src", _csv(c, "devset.csv", "mr,ref\nname[Caf\xe9],ok.\n",
                                                                              "latin-1"), "--out", c.tmp / "o"], "not UTF-8"),
    "prepare an empty data set": ("data/e2e/prepare.py", lambda c: ["--src", _csv(c, "trainset.csv", "mr,ref\n"),
                                                                    "--out", c.tmp / "o"], "no rows"),
    "prepare a cut CSV row": ("data/e2e/prepare.py", lambda c: ["--src", _csv(c, "trainset.csv", "mr,ref\nname[A]\n"),
                                                                "--out", c.tmp / "o"], "row 2 has 1 fields"),
    "prepare --limit=0": ("data/e2e/prepare.py", lambda c: ["--src", c.tmp, "--limit=0", "--out", c.tmp / "o"],
                          "--limit must be"),
    "prepare text too short": ("data/shakespeare/prepare.py", lambda c: ["--src", c.file("t.txt", "Hi."), "--out", c.tmp / "o"],
                               "too short"),
    # banks (bank.py), as an outside tester tried them
    "out_dir a prepared data folder": ("train.py", lambda c: c.train(f"--out_dir={c.e2e_copy()}"), "holds meta.json"),
    "init_adapter of another depth": ("train.py", lambda c: c.train("--n_layer=3", "--adapter=lora", "--r=2",
                                                                    f"--init_adapter={c.adapter}"), "was made on another base"),
    "a bank where an adapter goes": ("sample.py", lambda c: [f"--adapter={_bank(c)}", "--max_new_tokens=1"],
                                     "is an adapter bank"),
    "evaluate a joint run's folder": ("tools/evaluate_e2e.py", lambda c: [f"--out_dir={c.file('joint/bank.safetensors', b'x').parent}",
                                                                        f"--data_dir={c.data['e2e']}"], "is a joint run"),
    "evaluate a bank's task twice": ("tools/evaluate_e2e.py", lambda c: [f"--bank={_bank(c)}", "--tasks=a,a", "--limit=1",
                                                                       f"--data_dir={c.data['e2e']}"], "names a task twice"),
    "evaluate a bank into a run folder": ("tools/evaluate_e2e.py", lambda c: [
        f"--bank={_bank(c)}", "--limit=1", f"--data_dir={c.data['e2e']}", f"--results_dir={c.copy(c.trained / 'adapted', 'run')}"],
        "which this command did not write there"),
}


def _bank(c):
    import bank
    path = c.tmp / "tasks.safetensors"
    bank.Bank.build({"a": c.adapter}).save(path)
    return path


def snapshot(*roots):
    """{path: sha256} of every file under the roots."""
    out = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def call(script, argv, monkeypatch, capsys):
    """Run a script's main as `python script argv` would; -> (exit code, stderr)."""
    argv = [str(a) for a in argv]
    with pytest.raises(SystemExit) as e:
        if script in MAINS:
            MAINS[script](argv)
        else:
            monkeypatch.setattr(sys, "argv", [script, *argv])
            prepare = load_script(script)
            prepare.run(prepare.main)
            pytest.fail(f"{script} {argv} exited 0")
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_sentence_and_exit_2(name, trained, data, tmp_path, monkeypatch, capsys, one_thread):
    script, make_argv, phrase = CASES[name]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SHARELORA_TRACEBACK", raising=False)
    argv = make_argv(Case(trained, data, tmp_path))
    before = snapshot(trained, tmp_path)
    folders = {p for p in tmp_path.rglob("*") if p.is_dir()}
    code, err = call(script, argv, monkeypatch, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert phrase in errors[0], errors[0]
    after = snapshot(trained, tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing that existed was changed
    assert not [p for p in after if p.endswith(".tmp") or "/.staging" in p or "/.committed" in p]
    left = [p for p in tmp_path.rglob("*") if p.is_dir() and p not in folders and not any(p.iterdir())]
    assert not left, f"a failed start left empty folders behind: {left}"


# ---- checkpoints: consistent after a kill at any moment, a full disk, a move ----------------------

KILLER = '''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import runtime, train
kill_at, log, calls = int(sys.argv[2]), sys.argv[3], [0]

def hook(real):
    def f(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            if real is os.fsync:  # killed while writing: the file holds half of its bytes
                path = os.readlink(f"/proc/self/fd/{args[0]}")
                if os.path.isfile(path):
                    os.truncate(path, os.path.getsize(path) // 2)
            os._exit(137)  # as kill -9: no cleanup, no finally
        return real(*args, **kwargs)
    return f

os.replace, os.fsync = hook(os.replace), hook(os.fsync)
write = runtime.write_checkpoint
def logged(out_dir, ckpt, write_files):
    start = calls[0]
    write(out_dir, ckpt, write_files)
    with open(log, "a") as f:
        f.write(json.dumps([ckpt["step"], start, calls[0]]) + "\\n")
runtime.write_checkpoint = logged
train.main(sys.argv[4:])
'''


def adapter_run(c, out, *extra):
    return [*TINY[1:], f"--init_from={c.base}", "--adapter=tied", "--r=2", "--adapter_dropout=0.1",
            f"--data_dir={c.data['e2e']}", "--eval_interval=1", "--learning_rate=1e-2", f"--out_dir={out}", *extra]


def assert_consistent(out):
    """ckpt.pt and adapter.safetensors hold the same adapter, as a reader finds them (reading changes
    nothing) and after the run's owner completed what the kill interrupted (no temporary file is left;
    the lock file of the killed owner may stay: it is no lock once its process is gone)."""
    before = snapshot(out)
    ckpt = runtime.read_checkpoint(out)
    saved = load_file(runtime.committed_path(out, "adapter.safetensors"))
    assert saved.keys() == ckpt["adapter"].keys()
    assert all(torch.equal(saved[k], ckpt["adapter"][k]) for k in saved)
    assert snapshot(out) == before  # a reader leaves .staging and .committed to the owner
    runtime.finish_checkpoint(str(out))  # what train.py does first when it owns the folder again
    assert runtime.read_checkpoint(out)["step"] == ckpt["step"]
    assert sorted(set(os.listdir(out)) - {".lock"}) == ["adapter.safetensors", "ckpt.pt", "metrics.jsonl"], os.listdir(out)
    return ckpt["step"]


def test_a_kill_at_any_point_of_a_checkpoint_leaves_a_consistent_pair(trained, data, tmp_path, one_thread):
    """kill -9 at every file operation of the step-2 checkpoint (before each rename and each flush,
    leaving half-written files at the flushes): the pair on disk is always the old one or the new one,
    and resuming from it ends with exactly the adapter of a run that was never killed."""
    import subprocess
    c = Case(trained, data, tmp_path)
    driver, log = c.file("killer.py", KILLER), tmp_path / "calls.jsonl"
    straight = tmp_path / "straight"

    def train_killed_at(k, out):
        return subprocess.run([sys.executable, driver, ROOT, str(k), log, *adapter_run(c, out, "--max_iters=3")],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # resumed here, in one thread too

    assert train_killed_at(0, straight).returncode == 0  # 0: never killed; logs each checkpoint's calls
    calls = {step: (start, end) for step, start, end in map(json.loads, log.read_text().splitlines())}
    start, end = calls[2]
    assert end - start >= 6, calls  # flushes and renames of the staged set, the commit, the moves
    final = load_file(straight / "adapter.safetensors")
    seen = set()
    for k in range(start + 1, end + 1):
        out = tmp_path / f"killed_at_{k}"
        p = train_killed_at(k, out)
        assert p.returncode == 137, p.stderr
        step = assert_consistent(out)
        seen.add(step)
        train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=3"])
        resumed = load_file(out / "adapter.safetensors")
        assert all(torch.equal(resumed[key], final[key]) for key in final), f"kill at call {k}"
    assert seen == {1, 2}  # some kills came before the commit, some after


def test_a_full_disk_keeps_the_last_checkpoint_and_says_so(trained, data, tmp_path, monkeypatch, capsys):
    import errno
    import sharelora
    c = Case(trained, data, tmp_path)
    out = tmp_path / "run"
    train.main(adapter_run(c, out, "--max_iters=1"))
    before = snapshot(out)

    def full(path, tensors, metadata=None):  # the adapter file's writer finds the disk full halfway
        with open(path, "wb") as f:
            f.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(sharelora, "_write_safetensors", full)
    with pytest.raises(SystemExit) as e:
        train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=2"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "No space left on device" in err[0] and "step 1 there is kept" in err[0], err
    monkeypatch.undo()
    after = snapshot(out)
    assert {p: h for p, h in after.items() if not p.endswith("metrics.jsonl")} == \
        {p: h for p, h in before.items() if not p.endswith("metrics.jsonl")}
    assert assert_consistent(out) == 1


def test_save_adapter_to_a_folder_is_refused_and_leaves_nothing(trained, tmp_path):
    import sharelora
    model, _ = runtime.load_model(adapter=str(trained / "adapted" / "adapter.safetensors"), device="cpu",
                                  dtype="float32", merge=False)
    with pytest.raises(ValueError, match="is a folder"):
        sharelora.save_adapter(model, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_load_adapter_onto_a_merged_model_is_refused(trained):
    import sharelora
    path = str(trained / "adapted" / "adapter.safetensors")
    model, _ = runtime.load_model(adapter=path, device="cpu", dtype="float32", merge=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="merged into its weights: call sharelora.unmerge"):
        sharelora.load_adapter(model, path)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # untouched
    sharelora.unmerge(model)
    sharelora.load_adapter(model, path)  # the documented way works


def test_a_moved_run_resumes_in_the_folder_named_now(trained, data, tmp_path):
    c = Case(trained, data, tmp_path)
    first, moved = tmp_path / "runA", tmp_path / "runB"
    train.main(adapter_run(c, first, "--max_iters=2"))
    shutil.copytree(first, moved)
    before = snapshot(first)
    train.main(["--init_from=resume", f"--out_dir={moved}", "--max_iters=4"])
    assert snapshot(first) == before  # the old folder is not touched
    assert runtime.read_checkpoint(moved)["step"] == 4
    shutil.rmtree(first)  # and the old folder is not needed
    train.main(["--init_from=resume", f"--out_dir={moved}", "--max_iters=5"])
    assert runtime.read_checkpoint(moved)["step"] == 5


def test_a_moved_clone_still_finds_its_base(trained, data, tmp_path):
    """A base and an adapter run trained beside each other, then their parent folder renamed (a clone
    moved): sampling, exporting and resuming work; with the base gone, the message names it."""
    from conftest import run
    c = Case(trained, data, tmp_path)
    home = tmp_path / "clone"
    shutil.copytree(c.base, home / "base")
    train.main(adapter_run(c, home / "run", "--max_iters=1", f"--init_from={home / 'base'}"))
    scratch = [*c.train("--adapter=lora", "--r=2", f"--out_dir={home / 'scratch_run'}")]
    train.main(scratch)
    home.rename(tmp_path / "moved")
    moved = tmp_path / "moved"
    for run_dir in ("run", "scratch_run"):
        assert run("sample.py", f"--out_dir={moved / run_dir}", "--max_new_tokens=2", "--device=cpu").returncode == 0
    run("tools/export.py", f"--out_dir={moved / 'run'}", "--to=peft", f"--dest={tmp_path / 'peft'}")
    assert not os.path.isabs(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"])
    train.main(["--init_from=resume", f"--out_dir={moved / 'run'}", "--max_iters=2"])
    shutil.rmtree(moved / "base")
    p = run("sample.py", f"--out_dir={moved / 'run'}", "--device=cpu", check=False)
    assert p.returncode == 2 and "trained on the base model at '../base'" in p.stderr, p.stderr


def test_an_interruption_while_staging_leaves_the_last_set_and_no_staged_files(tmp_path):
    from pathlib import Path
    runtime.write_checkpoint(str(tmp_path), {"step": 1}, lambda d: Path(d, "adapter.safetensors").write_text("one"))

    def interrupted(folder):  # a second Ctrl-C while the next checkpoint's files are written
        Path(folder, "adapter.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runtime.write_checkpoint(str(tmp_path), {"step": 2}, interrupted)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "ckpt.pt"]
    assert (tmp_path / "adapter.safetensors").read_text() == "one"
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True) == {"step": 1}


def test_a_csv_saved_with_a_byte_order_mark_is_read(tmp_path, monkeypatch, capsys):
    src = tmp_path / "csvs"
    src.mkdir()
    for f in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        (src / f).write_text("\ufeffmr,ref\nname[A],A is nice.\n", encoding="utf-8")  # as Excel saves UTF-8
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--src", str(src), "--out", str(tmp_path / "o")])
    load_script("data/e2e/prepare.py").main()
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["train_examples"] == 1


def test_every_file_written_gets_the_same_permissions(trained, tmp_path):
    """safetensors' writer alone would make model and adapter files 0600, unlike every other file."""
    import stat
    import sharelora
    model, _ = runtime.load_model(adapter=str(trained / "adapted" / "adapter.safetensors"), device="cpu",
                                  dtype="float32", merge=False)
    sharelora.export_peft(model, tmp_path / "peft")
    sharelora.export_merged(model, tmp_path / "merged")
    files = [*(trained / "base").iterdir(), *(trained / "adapted").iterdir(), *(tmp_path / "peft").iterdir(),
             *(tmp_path / "merged").iterdir()]
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files if f.is_file()}
    assert len(set(modes.values())) == 1, modes
