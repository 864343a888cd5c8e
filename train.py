"""
Train a shared low-rank adapter on GPT-2 (or the whole model) on one GPU or a CPU.

    python train.py config/e2e_gpt2m_sharea.py                 # a recipe from config/
    python train.py config/cpu_demo_e2e.py --max_iters=100     # a recipe plus overrides
    python train.py --help                                     # every option and its default

Options come from three places, later ones winning: the defaults in TrainConfig below, a Python file
of `name = value` lines, and `--name=value` arguments. Every value is checked against the type of its
default; an unknown name is an error that suggests the closest ones.
"""
import dataclasses
import difflib
import math
import os
import random
import runpy
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields

from data.common import check, fail, quiet_ctrl_c
from data.common import run as run_early


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    init_from: str = "gpt2"  # gpt2 ... gpt2-xl, a local checkpoint path, 'scratch' or 'resume' (from out_dir)
    # a model from scratch (init_from=scratch): its size; block_size is also the longest training sequence
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    dropout: float = 0.0  # the base model's dropout (GPT-2 was pretrained with 0.1)
    # data: data_dir defaults to data/<dataset>, written by data/<dataset>/prepare.py
    dataset: str = "shakespeare"
    data_dir: str = ""
    # the adapter (see sharelora.py and METHOD.md); adapter=none trains the whole model
    adapter: str = "sharea"  # lora | sharea | shareb | shareab | tied | vera | none
    spec: str = ""  # overrides the preset, e.g. "A=shared/frozen B=layer"
    r: int = 8
    alpha: float = 16.0
    adapter_dropout: float = 0.0
    targets: str = "q,v"
    adapter_seed: int = 0
    init_adapter: str = ""  # start from this adapter file's tensors (e.g. task 1's shared A, frozen by spec)
    quantize: str = "none"  # none | nf4 | int8: the frozen base in 4 or 8 bits (QLoRA, QShareA; quantize.py)
    # optimisation: AdamW over the trainable tensors; weight decay on matrices only
    batch_size: int = 8
    group_by_length: bool = True  # example sets: batches of similar lengths, <1% padding on E2E (data/loader.py)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 1000
    learning_rate: float = 2e-4
    min_lr: float = 0.0
    warmup_iters: int = 100
    decay: str = "linear"  # linear | cosine | constant, from learning_rate after warm-up to min_lr
    lr_decay_iters: int = 0  # where the decay ends; 0 means max_iters
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # 0 disables
    label_smoothing: float = 0.0
    # evaluation and logging
    eval_interval: int = 200
    eval_iters: int = 20
    eval_prompt: str = ""  # if set, one greedy sample of `sample_tokens` tokens at every eval
    sample_tokens: int = 40
    # system
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337


FLOAT32_MAX = 3.4028234663852886e38  # the optimizer works in float32: larger values overflow to inf

# what init_from=resume takes from the command line; everything else comes from the checkpoint
RESUME_OPTIONS = ("max_iters", "lr_decay_iters", "eval_interval", "eval_iters", "device", "compile")

# ---- configuration ----------------------------------------------------------------------------

def parse_args(argv):
    """[config_file.py] [--key=value ...] -> TrainConfig; mistakes raise UserError (data.common)."""
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    values = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\noptions (default):\n" + "\n".join(
                f"  --{f.name}={f.default!r}" for f in fields(TrainConfig)))
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                fail(f"write options as --{key}=value")
            key = _known(key, types)
            values[key] = _convert(key, value, types[key])
        else:
            if not os.path.isfile(arg):
                fail(f"config file {arg} does not exist")
            try:
                settings = runpy.run_path(arg)
            except (Exception, SystemExit) as e:  # a syntax error, code in it that raises or calls exit()
                where = f" line {e.lineno}" if isinstance(e, SyntaxError) else ""
                fail(f"config file {arg} could not run:{where} {type(e).__name__}: {e}; "
                     "write it as `name = value` lines")
            for key, value in settings.items():
                if not key.startswith("_") and not callable(value) and not isinstance(value, type(sys)):
                    key = _known(key, types, where=arg)
                    values[key] = _check(key, value, types[key], arg)
    cfg = TrainConfig(**values)
    cfg.given = frozenset(values)  # what the user set, even to its default: resume refuses changing it
    return cfg


def _known(key, types, where="the command line"):
    if key not in types:
        close = difflib.get_close_matches(key, types, n=3)
        fail(f"unknown option {key!r} in {where}" + (f"; did you mean {', '.join(close)}?" if close else
                                                      "; see python train.py --help"))
    return key


def _convert(key, text, kind):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            fail(f"--{key} takes True or False, not {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        fail(f"--{key} takes {'an' if kind is int else 'a'} {kind.__name__}, not {text!r}")


def _check(key, value, kind, where):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # 3 where 3.0 is expected is fine
    if type(value) is not kind:
        fail(f"{key} in {where} must be a {kind.__name__}, not {type(value).__name__} {value!r}")
    return value


def check_options(cfg):
    """Refuse every value that cannot train, naming the option, before anything is loaded or written."""
    unit = lambda x: 0 <= x < 1
    rules = [
        ("n_layer", cfg.n_layer >= 1, "at least 1"), ("n_head", cfg.n_head >= 1, "at least 1"),
        ("n_embd", cfg.n_embd >= 1 and cfg.n_embd % max(cfg.n_head, 1) == 0,
         f"a positive multiple of n_head ({cfg.n_head}): each head gets n_embd / n_head channels"),
        ("block_size", cfg.block_size >= 1, "at least 1 (tokens per training sequence)"),
        ("dropout", unit(cfg.dropout), "in [0, 1)"), ("adapter_dropout", unit(cfg.adapter_dropout), "in [0, 1)"),
        ("r", cfg.r >= 1, "at least 1 (the rank, e.g. 8)"), ("alpha", abs(cfg.alpha) <= FLOAT32_MAX, "a float32 number (e.g. 16)"),
        ("batch_size", cfg.batch_size >= 1, "at least 1"), ("grad_accum", cfg.grad_accum >= 1, "at least 1"),
        ("max_iters", cfg.max_iters >= 0, "at least 0"),
        ("learning_rate", 0 <= cfg.learning_rate <= FLOAT32_MAX, "a float32 number >= 0 (e.g. 2e-4)"),
        ("min_lr", 0 <= cfg.min_lr <= cfg.learning_rate, "in [0, learning_rate]"),
        ("warmup_iters", cfg.warmup_iters >= 0, "at least 0"), ("lr_decay_iters", cfg.lr_decay_iters >= 0, "at least 0"),
        ("decay", cfg.decay in ("linear", "cosine", "constant"), "linear, cosine or constant"),
        ("weight_decay", 0 <= cfg.weight_decay <= FLOAT32_MAX, "a float32 number >= 0 (e.g. 0.01)"),
        ("beta1", unit(cfg.beta1), "in [0, 1) (e.g. 0.9)"), ("beta2", unit(cfg.beta2), "in [0, 1) (e.g. 0.999)"),
        ("grad_clip", 0 <= cfg.grad_clip <= FLOAT32_MAX, "a float32 number >= 0 (0 disables clipping)"),
        ("label_smoothing", unit(cfg.label_smoothing), "in [0, 1)"),
        ("eval_interval", cfg.eval_interval >= 1, "at least 1 (steps between evaluations)"),
        ("eval_iters", cfg.eval_iters >= 1, "at least 1"), ("sample_tokens", cfg.sample_tokens >= 1, "at least 1"),
        ("seed", 0 <= cfg.seed < 2**32, "in [0, 2**32)"), ("adapter_seed", 0 <= cfg.adapter_seed < 2**32, "in [0, 2**32)"),
        ("quantize", cfg.quantize in ("none", "nf4", "int8"), "none, nf4 or int8"),
        ("quantize", cfg.quantize == "none" or cfg.adapter != "none",
         "none when adapter=none: a quantized base is frozen, so only an adapter can train on it"),
        # a base from scratch is saved as dequant(W) beside its adapter, and NF4 with double quantization
        # does not give the same 4-bit weights twice (5e-6 apart): resume would not be exact
        ("quantize", cfg.quantize == "none" or cfg.init_from != "scratch",
         "none with init_from=scratch: quantize a base that was loaded (a hub name or a path)"),
        ("out_dir", cfg.out_dir.strip() != "", "a folder name"), ("init_from", cfg.init_from.strip() != "",
                                                                  "gpt2 ... gpt2-xl, a path, scratch or resume"),
    ]
    for name, ok, what in rules:
        check(ok, f"{name} must be {what}, not {getattr(cfg, name)!r}")


def early_options(argv):
    """The options, checked as far as the standard library can: a typo or a bad value is reported at
    once, not after the seconds that importing torch takes. (A resumed run's options come later, from
    its checkpoint.)"""
    cfg = parse_args(argv)
    if cfg.init_from != "resume":
        check_options(cfg)


if __name__ == "__main__":
    quiet_ctrl_c()  # until main() runs: Ctrl-C while torch loads ends quietly
    run_early(early_options, sys.argv[1:])

import torch  # noqa: E402  (after the options were checked)
from tqdm import tqdm  # noqa: E402

import distributed  # noqa: E402
import runtime  # noqa: E402
import sharelora  # noqa: E402
from data.loader import Batches  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantize import quantize, stored_bytes  # noqa: E402
from tokenizer import decode, encode  # noqa: E402


def validate(cfg):
    """check_options, plus what needs sharelora: the preset, the spec and the targets."""
    check_options(cfg)
    check(cfg.adapter == "none" or cfg.adapter in sharelora.PRESETS,
          f"adapter must be one of {', '.join(sharelora.PRESETS)} or none, not {cfg.adapter!r}")
    if cfg.adapter != "none":  # the spec and targets, by the same rules add_adapters applies
        adapter_config(cfg)


def get_lr(step, cfg):
    """Linear warm-up, then linear or cosine decay to min_lr at lr_decay_iters, flat after it."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    end = cfg.lr_decay_iters or cfg.max_iters
    if cfg.decay == "constant" or step >= end:
        return cfg.learning_rate if cfg.decay == "constant" else cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
    coeff = 1 - progress if cfg.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


# ---- model ---------------------------------------------------------------------------------------

def adapter_config(cfg):
    return sharelora.AdapterConfig(preset=cfg.adapter, r=cfg.r, alpha=cfg.alpha, dropout=cfg.adapter_dropout,
                                   targets=cfg.targets, seed=cfg.adapter_seed, spec=cfg.spec or None)


def build_model(cfg, ckpt, dtype=torch.float32):
    """The base (hub, path, or a fresh GPT), quantized if asked (computing in `dtype`), with the adapter
    when there is one. On resume the model is rebuilt from the checkpoint's own config, then its tensors
    are loaded."""
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              block_size=cfg.block_size, dropout=cfg.dropout))
    else:
        model = runtime.load_base(cfg.init_from, dropout=cfg.dropout)
    if ckpt is not None and "model" in ckpt:  # a base trained here (scratch, or adapter=none)
        model.load_state_dict(ckpt["model"])
    quantize(model, cfg.quantize, compute_dtype=dtype)  # after loading, before the adapters wrap its layers
    if cfg.adapter != "none":
        sharelora.add_adapters(model, adapter_config(cfg))
        if cfg.init_adapter and ckpt is None:
            copy_adapter(model, sharelora.read_adapter(cfg.init_adapter)[2], f"init_adapter {cfg.init_adapter}",
                         only_shared_keys=True)  # take the tensors both adapters have; the spec decides what trains
        if ckpt is not None:
            copy_adapter(model, ckpt["adapter"], f"the checkpoint in {cfg.out_dir}")
    return model


@torch.no_grad()
def copy_adapter(model, tensors, source, only_shared_keys=False):
    """Copy adapter tensors into the model's adapter, after checking each one's name and shape."""
    own = sharelora.adapter_state_dict(model)
    keys = own.keys() & tensors.keys() if only_shared_keys else own.keys()
    if not keys:
        fail(f"{source} has none of this run's adapter tensors (e.g. {next(iter(own))}): "
             "it was made for other targets")
    for key in keys:
        if key not in tensors or tensors[key].shape != own[key].shape:
            have = tuple(tensors[key].shape) if key in tensors else "nothing"
            fail(f"{source} holds {have} for {key}, where this run's adapter is {tuple(own[key].shape)}: "
                 "use the same r, targets and base model it was made with")
    for key in keys:
        own[key].copy_(tensors[key])


def make_optimizer(model, cfg, device):
    params = [p for p in model.parameters() if p.requires_grad]  # a shared tensor appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # u, v, biases, norms
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.startswith("cuda"))


def checkpoint(model, cfg, optimizer, scaler, step, best_val):
    """Everything needed to continue exactly: adapter tensors (the base is only named), optimizer and
    scaler state, step, RNG states, config. Plus adapter.safetensors, the file to share and sample from;
    or, when the whole model trains, the model in the Hugging Face layout (out_dir is then a base).
    All of it as one set (runtime.write_checkpoint): a crash leaves the old set or the new one."""
    ckpt = {"format": "sharelora-train", "step": step, "best_val": best_val, "config": asdict(cfg),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    if cfg.init_from != "scratch":
        ckpt["base"] = runtime.base_reference(cfg.init_from, cfg.out_dir)
    if cfg.adapter == "none" or cfg.init_from == "scratch":  # no base to name: keep its weights
        ckpt["model"] = model.state_dict() if cfg.adapter == "none" else sharelora.base_state_dict(model)
    if cfg.adapter != "none":
        ckpt["adapter"] = {k: v.detach() for k, v in sharelora.adapter_state_dict(model).items()}

    def write_files(folder):
        if cfg.adapter == "none":
            model.save_pretrained(folder)
            return
        # a base from scratch is saved beside its adapter, which names it as "." (this folder)
        if cfg.init_from == "scratch":
            model.save_pretrained(folder, state_dict=sharelora.base_state_dict(model))
        sharelora.save_adapter(model, os.path.join(folder, runtime.ADAPTER_FILE),
                               base="." if cfg.init_from == "scratch" else ckpt["base"])

    runtime.write_checkpoint(cfg.out_dir, ckpt, write_files)


class NonFinite(Exception):
    """The run diverged: nothing non-finite is ever saved over a good checkpoint."""


def finite_weights(model, step):
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise NonFinite(f"the trained weights hold inf or nan at step {step}")


# ---- training ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, batches, cfg, device, ctx, group=distributed.Single()):
    """Mean validation loss over eval_iters fixed batches (the same ones every time). Under torchrun
    each process evaluates every world-th batch, and the sum goes round."""
    model.eval()
    total = 0.0
    for i in range(group.rank, cfg.eval_iters, group.world):
        x, y = (t.to(device) for t in batches.get("val", i))
        with ctx:
            total += model(x, y, return_logits=False)[1].item()
    model.train()
    return group.sum([total])[0] / cfg.eval_iters


@torch.no_grad()
def sample_text(model, cfg, device, ctx):
    """One greedy continuation of eval_prompt: greedy, so it uses no random numbers and a resumed run
    stays exactly on course."""
    model.eval()
    idx = torch.tensor([encode(cfg.eval_prompt)], device=device)
    with ctx:
        out = model.generate(idx, cfg.sample_tokens, temperature=0, eos_token=50256)
    model.train()
    return decode(out[0, idx.size(1):].tolist())


def train_step(forward, optimizer, scaler, batches, step, cfg, device, ctx, group=distributed.Single()):
    """Optimizer step `step`: its grad_accum micro-batches (read here: data loading is part of a step),
    forward, backward, clipping, the update. -> (mean loss, learning rate, positions, reference tokens:
    the positions the loss counts, i.e. without padding and MRs; all processes together). Raises
    NonFinite on a non-finite loss. Under torchrun each process takes its rows of every micro-batch
    (see distributed.py). bench.py times this very function against a transformers + PEFT loop."""
    lr = get_lr(step, cfg)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    shares, n_tokens, n_loss_tokens = [], 0, 0
    for micro in range(cfg.grad_accum):
        x, y = batches.get("train", step * cfg.grad_accum + micro)
        counted = int((y != -100).sum())  # the micro-batch's supervised tokens, every process's rows
        n_loss_tokens, n_tokens = n_loss_tokens + counted, n_tokens + x.numel()
        x, y = group.shard(x, y)
        mine = int((y != -100).sum())
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with group.no_sync(last=micro == cfg.grad_accum - 1):
            with ctx:
                _, loss = forward(x, y, label_smoothing=cfg.label_smoothing, return_logits=False)
            # this process's share of the micro-batch's mean over its tokens; DDP averages the world shares
            weight = mine * group.world / counted
            scaler.scale(loss * weight / cfg.grad_accum).backward()
        shares.append(loss.item() * (mine / counted))
    loss_sum = sum(group.sum(shares)) / cfg.grad_accum
    if not math.isfinite(loss_sum):  # after the backward passes, so that every process stops at the same step
        optimizer.zero_grad(set_to_none=True)
        raise NonFinite(f"the training loss became {loss_sum} at step {step}")
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    scaler.step(optimizer)  # skipped when float16 gradients overflowed: not a failure
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, lr, n_tokens, n_loss_tokens


def train(cfg):
    """Run training as configured; returns the list of training losses (one per optimizer step). A start
    that fails before anything is written leaves no empty out_dir behind."""
    with runtime.no_empty_folder_left(cfg.out_dir):
        return _train(cfg)


def _train(cfg):
    resuming = cfg.init_from == "resume"
    group = distributed.setup()  # one process, or one of torchrun's
    group.start()
    ckpt = None
    if resuming:  # process 0 first: it completes a checkpoint a crash left unfinished
        if group.main:
            ckpt = runtime.read_checkpoint(cfg.out_dir)
        group.barrier()
        if not group.main:
            ckpt = runtime.read_checkpoint(cfg.out_dir)
    if resuming:  # continue the stored run in the folder named now; the options given now may only extend it
        defaults = TrainConfig()
        given = getattr(cfg, "given", {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)})
        # an option set now to another value than the run has (--quantize=none on an nf4 run too)
        fixed = sorted(k for k in given - set(RESUME_OPTIONS) - {"init_from", "out_dir"}
                       if getattr(cfg, k) != ckpt["config"].get(k, getattr(defaults, k)))
        if fixed:
            fail(f"{fixed[0]} cannot change when a run resumes (it continues as it was configured); "
                 f"resume with only {', '.join(RESUME_OPTIONS)}, or start a new run in another out_dir")
        changed = {k: getattr(cfg, k) for k in RESUME_OPTIONS if k in given}
        stored = ckpt["config"]
        types = {f.name: type(f.default) for f in fields(TrainConfig)}
        unknown = sorted(set(stored) - set(types))
        if unknown:
            fail(f"the checkpoint in {cfg.out_dir} has options this train.py does not know ({', '.join(unknown)}): "
                 "resume it with the version of this project that wrote it")
        stored = {k: _check(k, v, types[k], f"the checkpoint in {cfg.out_dir}") for k, v in stored.items()}
        stored.setdefault("group_by_length", False)  # runs saved before the option existed had random batches
        cfg = dataclasses.replace(TrainConfig(**stored), **changed, out_dir=cfg.out_dir)
        if cfg.max_iters <= ckpt["step"]:
            fail(f"the run in {cfg.out_dir} is at step {ckpt['step']} already: give --max_iters above it "
                 "to train on")
        need = "adapter" if cfg.adapter != "none" else "model"
        if need not in ckpt or (cfg.init_from == "scratch" and "model" not in ckpt):
            fail(f"the checkpoint in {cfg.out_dir} lacks its {need} tensors: it is damaged; restore it or train again")
        if "base" in ckpt:  # a local base is named relative to the run folder, which may have moved
            cfg.init_from = runtime.resolve_base(ckpt["base"], cfg.out_dir, f"the checkpoint in {cfg.out_dir}",
                                                 fix="put the base back there, or move the run folder back beside it")
    elif os.path.exists(os.path.join(cfg.out_dir, runtime.CKPT_FILE)):  # nothing is ever overwritten unasked
        fail(f"out_dir {cfg.out_dir} holds a training run already: continue it with --init_from=resume, "
             "or choose another out_dir (delete that one to start over)")
    validate(cfg)
    group.check_batch(cfg.batch_size)
    if group.main:
        runtime.writable_folder(cfg.out_dir, "out_dir")  # before minutes of loading, not after
    group.barrier()  # process 0 has made out_dir: the others may not find a training run there as it starts
    device = group.device(runtime.pick_device(cfg.device))
    dtype = runtime.pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    batches = Batches(cfg.data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", cfg.dataset),
                      cfg.batch_size, cfg.block_size, seed=cfg.seed, group_by_length=cfg.group_by_length)
    model = build_model(cfg, ckpt, dtype)
    if batches.max_token() >= model.config.vocab_size:
        fail(f"the data in {batches.data_dir} holds token id {batches.max_token()}, beyond the model's "
             f"vocabulary of {model.config.vocab_size}: prepare it again with this project's tokenizer")
    cfg.block_size = min(cfg.block_size, model.config.block_size)
    batches.set_block_size(cfg.block_size)
    runtime.place(model, device, dtype).train()
    optimizer = make_optimizer(model, cfg, device)
    scaler = runtime.grad_scaler(device, dtype)
    ctx = runtime.autocast(device, dtype)
    step, best_val, saved = 0, float("inf"), None  # saved: the step of the last checkpoint on disk
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, TypeError) as e:
            fail(f"the optimizer state in {cfg.out_dir}/{runtime.CKPT_FILE} does not fit this run ({e})")
        step, best_val = ckpt["step"], ckpt["best_val"]
        saved = step
        try:
            torch.set_rng_state(ckpt["rng"]["torch"])
            random.setstate(tuple(ckpt["rng"]["python"]))
            if ckpt["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        except (RuntimeError, TypeError, ValueError, KeyError) as e:
            fail(f"the random state in {cfg.out_dir}/{runtime.CKPT_FILE} is damaged ({type(e).__name__}): "
                 "restore the file, or train again")
    forward = group.wrap(model)  # DistributedDataParallel under torchrun
    forward = torch.compile(forward) if cfg.compile else forward
    say = print if group.main else lambda *a, **k: None  # process 0 speaks for all
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = (f", block weights in {cfg.quantize} ({stored_bytes(model) / 2**20:,.0f} MiB of weights in all)"
            if cfg.quantize != "none" else "")
    say(f"{model.name_or_path} on {device} in {str(dtype).removeprefix('torch.')}{base}; "
        f"{n_trainable:,} trainable parameters" + (f"; {group.world} processes, each {cfg.batch_size // group.world} "
                                                   f"rows of every batch of {cfg.batch_size}" if group.world > 1 else ""))
    if cfg.adapter != "none":
        say(sharelora.parameter_table(model))
    if batches.kind == "examples":  # what a padded batch wastes: every padded position is a full forward and backward
        say(f"padding: {100 * batches.padding_share('train'):.1f}% of the positions of a training batch "
              f"({'length-grouped' if cfg.group_by_length else 'random'} batches of {cfg.batch_size})")
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if resuming and group.main:
        runtime.trim_log(log_path, step)
    log = runtime.json_line if group.main else lambda *a: None

    def save(at):
        nonlocal saved
        try:
            finite_weights(model, at)  # nothing non-finite is saved; checked in every process, so that all stop together
            if group.main:  # every process holds the same weights: one writes them
                checkpoint(model, cfg, optimizer, scaler, at, best_val)
        except NonFinite as e:
            diverged(str(e))
        saved = at

    def diverged(what):
        kept = f"the checkpoint of step {saved} in {cfg.out_dir} is kept" if saved is not None else \
            "no checkpoint was written"
        fail(f"{what}, so training stopped; {kept}: lower learning_rate (now {cfg.learning_rate:g}), "
             "or use dtype=float32 or bfloat16")

    losses = []
    stop = StopSignals(speak=group.main, torchrun=group.world > 1)
    bar = tqdm(total=cfg.max_iters, initial=step, desc="train", dynamic_ncols=True, disable=not group.main)
    with stop, bar:  # the bar ends its line whatever happens, so that an error message starts its own
        while True:
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                if not (resuming and step == ckpt["step"]):  # already evaluated and saved at this step
                    val = evaluate(model, batches, cfg, device, ctx, group)
                    if not math.isfinite(val):
                        diverged(f"the validation loss became {val} at step {step}")
                    best_val = min(best_val, val)
                    record = {"step": step, "val_loss": round(val, 4), "val_ppl": round(math.exp(min(val, 50)), 2)}
                    if cfg.eval_prompt and group.main:
                        record["sample"] = sample_text(model, cfg, device, ctx)
                    if group.main:  # one line: a sample's newlines show as \n (metrics.jsonl keeps the text as it is)
                        tqdm.write(" ".join(f"{k} {v!r}" if k == "sample" else f"{k} {v}" for k, v in record.items()))
                    log(log_path, record)
                    save(step)
            if step >= cfg.max_iters:
                break
            signal_number = group.largest(stop.requested)  # every process stops at the same step
            if signal_number:  # between two steps: the checkpoint is exactly an uninterrupted run's state
                if saved != step:
                    save(step)
                bar.close()
                say(f"\n{StopSignals.NAMES.get(signal_number, 'stopped')}: saved step {step} to {cfg.out_dir}; "
                    f"continue with --init_from=resume --out_dir={cfg.out_dir}")
                group.finish()
                sys.exit(128 + signal_number)
            t0 = time.time()
            try:
                loss_sum, lr, n_tokens, n_loss_tokens = train_step(forward, optimizer, scaler, batches, step, cfg,
                                                                   device, ctx, group)
            except NonFinite as e:
                diverged(str(e))
            step += 1
            losses.append(loss_sum)
            rate = n_tokens / (time.time() - t0)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
            bar.update()
            log(log_path, {"step": step, "loss": round(loss_sum, 5), "lr": lr, "tokens_per_s": round(rate),
                                         "loss_tokens_per_s": round(n_loss_tokens / (time.time() - t0))})
    bar.close()
    peak = runtime.peak_memory_mb(device)
    log(log_path, {"done": step, "best_val_loss": round(best_val, 4), "peak_memory_mb": round(peak)})
    say(f"done: {step} steps, best val loss {best_val:.4f}, peak memory {peak:,.0f} MB"
        + (" (process 0)" if group.world > 1 else "") + f"; saved to {cfg.out_dir}")
    group.finish()
    return losses


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (`kill`, a cluster's preemption) ask training to stop at the next step
    boundary, where it saves a checkpoint and exits: a step is never cut in half, so the saved random
    state and weights are exactly those of an uninterrupted run (dropout included) and resume continues
    it bit for bit. A second signal stops at once, keeping the last checkpoint. The handlers are
    installed even when the shell started us with SIGINT ignored (a background job `&`, nohup), and
    the previous ones come back on exit.

    Under torchrun a Ctrl-C reaches each process twice: from the terminal, and forwarded by torchrun
    itself a moment later (which then waits 30 s, TORCH_ELASTIC_SHUTDOWN_TIMEOUT, before it kills what still runs). A second signal
    within REPEAT_S of the first is that same Ctrl-C, not a request to quit at once."""
    NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
    REPEAT_S = 2.0

    def __init__(self, speak=True, torchrun=False):
        self.requested, self.previous, self.at = 0, {}, 0.0
        self.speak, self.torchrun = speak, torchrun

    def _handle(self, signum, frame):
        if self.requested:
            if self.torchrun and time.monotonic() - self.at < self.REPEAT_S:
                return
            raise KeyboardInterrupt
        self.requested, self.at = signum, time.monotonic()
        if self.speak:
            tqdm.write(f"{self.NAMES[signum]}: stopping after this step to save a checkpoint (again to quit at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for s in self.NAMES:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def main(argv=None):
    runtime.run(lambda: train(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
