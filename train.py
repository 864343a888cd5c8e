"""
Train a shared low-rank adapter on GPT-2 (or the whole model) on one GPU or a CPU.

    python train.py config/e2e_gpt2m_sharea.py                 # a recipe from config/
    python train.py config/cpu_demo_e2e.py --max_iters=100     # a recipe plus overrides
    python train.py --help                                     # every option and its default

Read train() first: it sets the run up, then loops (evaluate and save, stop if asked, one optimizer
step, log). The options and their checks are in train_options.py; below train() come its parts: one
training step, the model and its optimizer, checkpoints (what they hold; runtime.py writes the files),
stopping on a signal, and the log.
"""
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict

from data.common import check, fail, quiet_ctrl_c
from data.common import run as run_early
from train_options import (RESUME_OPTIONS, TrainConfig, check_options, early_options,  # noqa: F401
                           parse_args, resumed_config)

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

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- the loop ------------------------------------------------------------------------------------

def train(cfg):
    """Run training as configured; returns the list of training losses (one per optimizer step). A start
    that fails before anything is written leaves no empty out_dir behind."""
    with runtime.no_empty_folder_left(cfg.out_dir):
        group = distributed.setup()  # one process, or one of torchrun's
        group.start()
        cfg, ckpt = start_or_resume(cfg, group)
        validate(cfg)
        group.check_batch(cfg.batch_size)
        if group.main:
            runtime.writable_folder(cfg.out_dir, "out_dir")  # before minutes of loading, not after
        group.barrier()  # process 0 has made out_dir: the others may not find a training run there as it starts
        device = group.device(runtime.pick_device(cfg.device))
        dtype = runtime.pick_dtype(cfg.dtype, device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        batches = Batches(cfg.data_dir or os.path.join(HERE, "data", cfg.dataset), cfg.batch_size, cfg.block_size,
                          seed=cfg.seed, group_by_length=cfg.group_by_length)
        model = build_model(cfg, ckpt, dtype)
        fit_data_to_model(cfg, batches, model)
        runtime.place(model, device, dtype).train()
        optimizer = make_optimizer(model, cfg, device)
        scaler = runtime.grad_scaler(device, dtype)
        ctx = runtime.autocast(device, dtype)
        step, best_val = restore_state(ckpt, optimizer, scaler, cfg.out_dir) if ckpt else (0, float("inf"))
        forward = group.wrap(model)  # DistributedDataParallel under torchrun
        forward = torch.compile(forward) if cfg.compile else forward
        say = print if group.main else lambda *a, **k: None  # process 0 speaks for all
        say(describe(model, cfg, device, dtype, batches, group))
        log = Log(cfg.out_dir, group.main, resumed_at=step if ckpt else None)
        saver = Saver(model, cfg, optimizer, scaler, group, saved=step if ckpt else None)

        losses = []
        stop = StopSignals(speak=group.main, torchrun=group.world > 1)
        bar = tqdm(total=cfg.max_iters, initial=step, desc="train", dynamic_ncols=True, disable=not group.main)
        with stop, bar:  # the bar ends its line whatever happens, so that an error message starts its own
            while True:
                # evaluate and save (a resumed run did both at the step it resumes from)
                if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step != log.resumed_at:
                    val = evaluate(model, batches, cfg, device, ctx, group)
                    if not math.isfinite(val):
                        saver.diverged(f"the validation loss became {val} at step {step}")
                    best_val = min(best_val, val)
                    log.evaluation(step, val, sample_text(model, cfg, device, ctx) if cfg.eval_prompt and group.main
                                   else None)
                    saver.save(step, best_val)
                if step >= cfg.max_iters:
                    break
                signal_number = group.largest(stop.requested)  # every process stops at the same step
                if signal_number:  # between two steps: the checkpoint is exactly an uninterrupted run's state
                    bar.close()
                    saver.stop(step, best_val, signal_number)
                # one optimizer step
                t0 = time.time()
                try:
                    loss, lr, n_tokens, n_loss_tokens = train_step(forward, optimizer, scaler, batches, step, cfg,
                                                                   device, ctx, group)
                except NonFinite as e:
                    saver.diverged(str(e))
                step += 1
                losses.append(loss)
                # log
                elapsed = time.time() - t0
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / elapsed:,.0f}")
                bar.update()
                log.step(step, loss, lr, n_tokens / elapsed, n_loss_tokens / elapsed)
        peak = runtime.peak_memory_mb(device)
        log.write({"done": step, "best_val_loss": round(best_val, 4), "peak_memory_mb": round(peak)})
        say(f"done: {step} steps, best val loss {best_val:.4f}, peak memory {peak:,.0f} MB"
            + (" (process 0)" if group.world > 1 else "") + f"; saved to {cfg.out_dir}")
        group.finish()
        return losses


# ---- setting a run up ----------------------------------------------------------------------------

def start_or_resume(cfg, group):
    """-> (the run's options, its checkpoint or None). A new run must find no run in out_dir (nothing is
    ever overwritten unasked); a resumed one continues the run stored there, as it was configured."""
    if cfg.init_from != "resume":
        if os.path.exists(os.path.join(cfg.out_dir, runtime.CKPT_FILE)):
            fail(f"out_dir {cfg.out_dir} holds a training run already: continue it with --init_from=resume, "
                 "or choose another out_dir (delete that one to start over)")
        return cfg, None
    if group.main:  # process 0 first: it completes a checkpoint a crash left unfinished
        ckpt = runtime.read_checkpoint(cfg.out_dir)
    group.barrier()
    if not group.main:
        ckpt = runtime.read_checkpoint(cfg.out_dir)
    cfg = resumed_config(cfg, ckpt["config"], cfg.out_dir)
    if cfg.max_iters <= ckpt["step"]:
        fail(f"the run in {cfg.out_dir} is at step {ckpt['step']} already: give --max_iters above it "
             "to train on")
    need = "adapter" if cfg.adapter != "none" else "model"
    if need not in ckpt or (cfg.init_from == "scratch" and "model" not in ckpt):
        fail(f"the checkpoint in {cfg.out_dir} lacks its {need} tensors: it is damaged; restore it or train again")
    if "base" in ckpt:  # a local base is named relative to the run folder, which may have moved
        cfg.init_from = runtime.resolve_base(ckpt["base"], cfg.out_dir, f"the checkpoint in {cfg.out_dir}",
                                             fix="put the base back there, or move the run folder back beside it")
    return cfg, ckpt


def validate(cfg):
    """check_options, plus what needs sharelora: the preset, the spec and the targets."""
    check_options(cfg)
    check(cfg.adapter == "none" or cfg.adapter in sharelora.PRESETS,
          f"adapter must be one of {', '.join(sharelora.PRESETS)} or none, not {cfg.adapter!r}")
    if cfg.adapter != "none":  # the spec and targets, by the same rules add_adapters applies
        adapter_config(cfg)


def fit_data_to_model(cfg, batches, model):
    """Refuse data the model cannot read; train on sequences no longer than its context."""
    if batches.max_token() >= model.config.vocab_size:
        fail(f"the data in {batches.data_dir} holds token id {batches.max_token()}, beyond the model's "
             f"vocabulary of {model.config.vocab_size}: prepare it again with this project's tokenizer")
    cfg.block_size = min(cfg.block_size, model.config.block_size)
    batches.set_block_size(cfg.block_size)


def describe(model, cfg, device, dtype, batches, group):
    """The lines printed before training: what trains, on what, in which precision."""
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = (f", block weights in {cfg.quantize} ({stored_bytes(model) / 2**20:,.0f} MiB of weights in all)"
            if cfg.quantize != "none" else "")
    lines = [f"{model.name_or_path} on {device} in {str(dtype).removeprefix('torch.')}{base}; "
             f"{n_trainable:,} trainable parameters" + (f"; {group.world} processes, each {cfg.batch_size // group.world} "
                                                        f"rows of every batch of {cfg.batch_size}" if group.world > 1 else "")]
    if cfg.adapter != "none":
        lines.append(sharelora.parameter_table(model))
    if batches.kind == "examples":  # what a padded batch wastes: every padded position is a full forward and backward
        lines.append(f"padding: {100 * batches.padding_share('train'):.1f}% of the positions of a training batch "
                     f"({'length-grouped' if cfg.group_by_length else 'random'} batches of {cfg.batch_size})")
    return "\n".join(lines)


# ---- one step ------------------------------------------------------------------------------------

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


# ---- the model and its optimizer -----------------------------------------------------------------

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


# ---- checkpoints ---------------------------------------------------------------------------------

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


def restore_state(ckpt, optimizer, scaler, out_dir):
    """Put the optimizer, the scaler and the random generators back as the checkpoint has them.
    -> (step, best validation loss)."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"the optimizer state in {out_dir}/{runtime.CKPT_FILE} does not fit this run ({e})")
    try:
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(tuple(ckpt["rng"]["python"]))
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        fail(f"the random state in {out_dir}/{runtime.CKPT_FILE} is damaged ({type(e).__name__}): "
             "restore the file, or train again")
    return ckpt["step"], ckpt["best_val"]


class Saver:
    """Writes the checkpoints of a run and remembers the step of the last one on disk (`saved`, None
    before the first): what a run that diverges, or is stopped, keeps."""

    def __init__(self, model, cfg, optimizer, scaler, group, saved):
        self.model, self.cfg, self.optimizer, self.scaler, self.group = model, cfg, optimizer, scaler, group
        self.saved = saved

    def save(self, step, best_val):
        try:
            finite_weights(self.model, step)  # nothing non-finite is saved; checked in every process, so that all stop together
            if self.group.main:  # every process holds the same weights: one writes them
                checkpoint(self.model, self.cfg, self.optimizer, self.scaler, step, best_val)
        except NonFinite as e:
            self.diverged(str(e))
        self.saved = step

    def diverged(self, what):
        kept = f"the checkpoint of step {self.saved} in {self.cfg.out_dir} is kept" if self.saved is not None else \
            "no checkpoint was written"
        fail(f"{what}, so training stopped; {kept}: lower learning_rate (now {self.cfg.learning_rate:g}), "
             "or use dtype=float32 or bfloat16")

    def stop(self, step, best_val, signal_number):
        """A stop signal, agreed by every process between two steps: save this step, say how to continue,
        exit with the shell's code for the signal."""
        if self.saved != step:
            self.save(step, best_val)
        if self.group.main:
            print(f"\n{StopSignals.NAMES.get(signal_number, 'stopped')}: saved step {step} to {self.cfg.out_dir}; "
                  f"continue with --init_from=resume --out_dir={self.cfg.out_dir}")
        self.group.finish()
        sys.exit(128 + signal_number)


class NonFinite(Exception):
    """The run diverged: nothing non-finite is ever saved over a good checkpoint."""


def finite_weights(model, step):
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise NonFinite(f"the trained weights hold inf or nan at step {step}")


# ---- stopping on a signal, and the log -----------------------------------------------------------

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


class Log:
    """metrics.jsonl, one JSON record a line (process 0 writes it), and the evaluation lines printed.
    A resumed run first drops the lines after its checkpoint (runtime.trim_log)."""

    def __init__(self, out_dir, main, resumed_at=None):
        self.path, self.main, self.resumed_at = os.path.join(out_dir, "metrics.jsonl"), main, resumed_at
        if main and resumed_at is not None:
            runtime.trim_log(self.path, resumed_at)

    def write(self, record):
        if self.main:
            runtime.json_line(self.path, record)

    def evaluation(self, step, val, sample=None):
        record = {"step": step, "val_loss": round(val, 4), "val_ppl": round(math.exp(min(val, 50)), 2)}
        if sample is not None:
            record["sample"] = sample
        if self.main:  # one line: a sample's newlines show as \n (metrics.jsonl keeps the text as it is)
            tqdm.write(" ".join(f"{k} {v!r}" if k == "sample" else f"{k} {v}" for k, v in record.items()))
        self.write(record)

    def step(self, step, loss, lr, tokens_per_s, loss_tokens_per_s):
        self.write({"step": step, "loss": round(loss, 5), "lr": lr, "tokens_per_s": round(tokens_per_s),
                    "loss_tokens_per_s": round(loss_tokens_per_s)})


def main(argv=None):
    runtime.run(lambda: train(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
