"""
Train a shared low-rank adapter on GPT-2 (or the whole model) on one GPU or a CPU.

    python train.py config/e2e_gpt2m_sharea.py                 # a recipe from config/
    python train.py config/cpu_demo_e2e.py --max_iters=100     # a recipe plus overrides
    python train.py --help                                     # every option and its default
    python train.py --init_from=BASE --tasks=e2e=data/e2e,parse=data/e2e_parse   # tasks jointly, one A (docs/bank.md)

Read train() first: it sets the run up, then loops (evaluate and save, stop if asked, one optimizer
step, log). The options and their checks are in train_options.py; below train() come its parts: one
training step, the model and its optimizer, checkpoints (what they hold; runtime.py writes the files),
stopping on a signal, and the log.
"""
import contextlib
import math
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import asdict

from data.common import check, data_fingerprint, fail, quiet_ctrl_c
from data.common import run as run_early
from train_options import (RESUME_OPTIONS, TrainConfig, check_options, early_options,  # noqa: F401
                           parse_args, resumed_config, task_folders)

if __name__ == "__main__":
    quiet_ctrl_c()  # until main() runs: Ctrl-C while torch loads ends quietly
    run_early(early_options, sys.argv[1:])

import torch  # noqa: E402  (after the options were checked)
from tqdm import tqdm  # noqa: E402

import bank  # noqa: E402
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
    with runtime.no_empty_folder_left(cfg.out_dir), own_run(cfg) as group:
        cfg, ckpt = start_or_resume(cfg, group)
        validate(cfg)
        group.check_batch(cfg.batch_size)
        group.barrier()  # process 0 has made out_dir: the others may not find a training run there as it starts
        device = group.device(runtime.pick_device(cfg.device))
        dtype = runtime.pick_dtype(cfg.dtype, device)
        torch.manual_seed(cfg.seed)  # the same in every process: a model from scratch is built alike everywhere
        random.seed(cfg.seed)

        batches = load_data(cfg, ckpt)
        model = build_model(cfg, ckpt, dtype)
        fit_data_to_model(cfg, batches, model)
        runtime.place(model, device, dtype).train()
        ctx = runtime.autocast(device, dtype)
        if cfg.adapter != "none" and not cfg.tasks:  # an adapted map the model never calls would never train: name it now
            with ctx:
                sharelora.check_adapters_run(model, torch.zeros((1, 1), dtype=torch.long, device=device))
        optimizer = make_optimizer(model, cfg, device)
        scaler = runtime.grad_scaler(device, dtype)
        step, best_val = 0, float("inf")
        torch.manual_seed(cfg.seed + group.rank)  # dropout: each process draws its own masks
        if ckpt:
            step, best_val = restore_state(ckpt, optimizer, scaler, cfg, group.rank, device, dtype)
        forward = group.wrap(model)  # DistributedDataParallel under torchrun
        forward = torch.compile(forward) if cfg.compile else forward
        say = print if group.main else lambda *a, **k: None  # process 0 speaks for all
        say(describe(model, cfg, device, dtype, batches, group))
        log = Log(cfg.out_dir, group.main, resumed_at=step if ckpt else None)
        saver = Saver(model, cfg, optimizer, scaler, group, device, dtype, saved=step if ckpt else None)

        stop = StopSignals(speak=group.main, torchrun=group.world > 1)
        bar = tqdm(total=cfg.max_iters, initial=step, desc="train", dynamic_ncols=True, disable=not group.main)
        runtime.reset_peak_memory(device)  # the peak logged at the end is training's, not loading's
        with stop, bar:  # the bar ends its line whatever happens, so that an error message starts its own
            while True:
                due = (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step != log.resumed_at
                # stop if asked, and read the last steps' losses from the device (one all-reduce for both)
                signal_number = between_steps(group, stop, log, bar, saver,
                                              read=due or step % cfg.log_interval == 0 or step >= cfg.max_iters)
                # evaluate and save (a resumed run did both at the step it resumes from)
                if due:
                    val, per_task = evaluate_tasks(model, batches, cfg, device, ctx, group)
                    if not math.isfinite(val):
                        saver.diverged(f"the validation loss became {val} at step {step}")
                    best_val = min(best_val, val)
                    log.evaluation(step, val, sample_text(model, cfg, device, ctx) if cfg.eval_prompt and group.main
                                   else None, per_task)
                    saver.save(step, best_val)
                if step >= cfg.max_iters:
                    break
                if signal_number:  # between two steps: the checkpoint is exactly an uninterrupted run's state
                    bar.close()
                    saver.stop(step, best_val, signal_number)
                # one optimizer step; its loss stays on the device until the next read
                loss, lr, n_tokens, n_loss_tokens = train_step(forward, optimizer, scaler, batches, step, cfg,
                                                               device, ctx, group)
                step += 1
                bar.update()
                log.step(step, loss, lr, n_tokens, n_loss_tokens)
        peak = runtime.peak_memory_mb(device)
        log.write({"done": step, "best_val_loss": round(best_val, 4), "peak_memory_mb": round(peak)})
        say(f"done: {step} steps, best val loss {best_val:.4f}, peak memory in training {peak:,.0f} MB"
            + (" (process 0)" if group.world > 1 else "") + f"; saved to {cfg.out_dir}")
        group.finish()
        return log.losses


# ---- setting a run up ----------------------------------------------------------------------------

@contextlib.contextmanager
def own_run(cfg):
    """Set up the process group (one process, or torchrun's) and, in process 0, own out_dir for the whole
    run (runtime.own_folder: a second train.py, a resume while this one trains, or a compare.py rerun is
    refused, naming this process); as the owner, first complete a checkpoint a crash left half moved.
    out_dir is made here, before minutes of loading, so that a folder we cannot write shows at once.
    Yields the group."""
    group = distributed.setup()
    group.start()
    if not group.main:
        yield group
        return
    runtime.writable_folder(cfg.out_dir, "out_dir")
    with runtime.own_folder(cfg.out_dir):
        runtime.finish_checkpoint(cfg.out_dir)
        yield group


def start_or_resume(cfg, group):
    """-> (the run's options, its checkpoint or None). A new run must find no run in out_dir (nothing is
    ever overwritten unasked); a resumed one continues the run stored there, as it was configured."""
    if cfg.init_from != "resume":
        if runtime.has_checkpoint(cfg.out_dir):
            fail(f"out_dir {cfg.out_dir} holds a training run already: continue it with --init_from=resume, "
                 "or choose another out_dir (delete that one to start over)")
        # a model, or prepared data (a task's own folder given as out_dir), that a new run would write beside or over
        models = [f for f in ("model.safetensors", runtime.ADAPTER_FILE, bank.BANK_FILE, "meta.json", "train.bin")
                  if os.path.exists(os.path.join(cfg.out_dir, f))]
        check(not models, f"out_dir {cfg.out_dir} holds {models[0] if models else ''} but no checkpoint to resume, and a "
                          "new run would overwrite it: choose another out_dir (or move that file away)")
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
    need = "bank" if cfg.tasks else "adapter" if cfg.adapter != "none" else "model"
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
        why = bank.joint_problem(adapter_config(cfg)) if cfg.tasks else None
        check(why is None, f"tasks cannot train {cfg.adapter} (spec {cfg.spec!r}): {why}")


def load_data(cfg, ckpt):
    """The run's batches, and what its checkpoint records of the data (cfg.data_record). Joint training
    (tasks): each task's folder, one task per batch (bank.JointBatches), each recorded alike."""
    def batches_of(folder):
        return Batches(folder, cfg.batch_size, cfg.block_size, seed=cfg.seed, group_by_length=cfg.group_by_length)
    recorded = ckpt.get("data") if ckpt is not None and isinstance(ckpt.get("data"), dict) else {}
    if not cfg.tasks:
        batches = batches_of(data_folder(cfg, recorded, cfg.data_dir or os.path.join(HERE, "data", cfg.dataset)))
        cfg.data_record = data_record(cfg, recorded, batches)
        return batches
    joint = bank.JointBatches({name: batches_of(data_folder(cfg, recorded.get(name), folder))
                               for name, folder in task_folders(cfg.tasks).items()}, cfg.grad_accum, cfg.task_mix, cfg.seed)
    cfg.data_record = {name: data_record(cfg, recorded.get(name), b) for name, b in joint.batches.items()}
    return joint


def data_folder(cfg, recorded, folder):
    """A data folder of the run: a new run's (data_dir, default data/<dataset> here; a task's DATA_DIR)
    resolved from the current folder; a resumed run's from the path its checkpoint recorded (relative
    to the run folder, like its base), so that a resume from any current folder reads the same data."""
    if isinstance(recorded, dict) and isinstance(recorded.get("path"), str):
        return runtime.resolve_base(recorded["path"], cfg.out_dir, f"the checkpoint in {cfg.out_dir}",
                                    fix="put the data back there, or move the run folder back beside it",
                                    kind="the data folder")
    return os.path.abspath(folder)


def data_record(cfg, recorded, batches):
    """What the checkpoint records of a data folder: its path (relative to the run folder when local)
    and fingerprint (kind, separator, each file's size and sha256). A resumed run refuses other data."""
    found = data_fingerprint(batches.data_dir, batches.meta)
    if isinstance(recorded, dict) and "files" in recorded:
        theirs = {k: recorded.get(k) for k in found}
        changed = [k for k in found if k != "files" and found[k] != theirs[k]] + sorted(
            n for n in found["files"].keys() | (theirs["files"] or {}).keys()
            if found["files"].get(n) != (theirs["files"] or {}).get(n))
        check(not changed, f"the data in {batches.data_dir} is not what the run in {cfg.out_dir} trained on "
                           f"({changed[0] if changed else ''} differs): put that data back, or start a new run in "
                           "another out_dir")
    return {"path": runtime.base_reference(batches.data_dir, cfg.out_dir), **found}


def fit_data_to_model(cfg, batches, model):
    """Refuse data the model cannot read; train on sequences no longer than its context; an eval_prompt
    must leave room for its sample_tokens."""
    if batches.max_token() >= model.config.vocab_size:
        fail(f"the data in {batches.data_dir} holds token id {batches.max_token()}, beyond the model's "
             f"vocabulary of {model.config.vocab_size}: prepare it again with this project's tokenizer")
    cfg.block_size = min(cfg.block_size, model.config.block_size)
    batches.set_block_size(cfg.block_size)
    if cfg.tasks:  # each batch tells the model's MixedLinears whose it is
        batches.steer(model.task_rows)
    prompt = len(encode(cfg.eval_prompt)) if cfg.eval_prompt else 0
    check(prompt + cfg.sample_tokens <= model.config.block_size or not cfg.eval_prompt,
          f"eval_prompt ({prompt} tokens) plus sample_tokens ({cfg.sample_tokens}) is more than the model's "
          f"context of {model.config.block_size} tokens: shorten eval_prompt or lower sample_tokens")


def describe(model, cfg, device, dtype, batches, group):
    """The lines printed before training: what trains, on what, in which precision."""
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = (f", block weights in {cfg.quantize} ({stored_bytes(model) / 2**20:,.0f} MiB of weights in all)"
            if cfg.quantize != "none" else "")
    lines = [f"{model.name_or_path} on {device} in {str(dtype).removeprefix('torch.')}{base}; "
             f"{n_trainable:,} trainable parameters" + (f"; {group.world} processes, each {cfg.batch_size // group.world} "
                                                        f"rows of every batch of {cfg.batch_size}" if group.world > 1 else "")]
    if cfg.adapter != "none":
        lines.append(bank.summary_of_training(model) if cfg.tasks else sharelora.parameter_table(model))
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
    forward, backward, clipping, the update. -> (this process's share of the mean loss, a tensor left
    on the device: reading it would make the host wait for the GPU; learning rate; positions; reference
    tokens: the positions the loss counts, i.e. without padding and MRs; all processes together).
    Under torchrun each process takes its rows of every micro-batch (see distributed.py). bench.py
    times this very function against a transformers + PEFT loop."""
    lr = get_lr(step, cfg)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    share, n_tokens, n_loss_tokens = 0.0, 0, 0
    for micro in range(cfg.grad_accum):
        x, y = batches.get("train", step * cfg.grad_accum + micro)
        counted = int((y != -100).sum())  # the micro-batch's supervised tokens, every process's rows
        n_loss_tokens, n_tokens = n_loss_tokens + counted, n_tokens + x.numel()
        x, y = group.shard(x, y)
        rows = loss_rows(y)
        # this process's share of the micro-batch's mean over its tokens (0 when none counts); DDP
        # averages the world's shares
        fraction = rows.numel() / counted if counted else 0.0
        x, y, rows = (to_device(t, device) for t in (x, y, rows))
        with group.no_sync(last=micro == cfg.grad_accum - 1):
            with ctx:
                _, loss = forward(x, y, label_smoothing=cfg.label_smoothing, return_logits=False, rows=rows)
            scaler.scale(loss * (fraction * group.world / cfg.grad_accum)).backward()
        share = share + loss.detach().float() * (fraction / cfg.grad_accum)
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    scaler.step(optimizer)  # skipped when float16 gradients overflowed: not a failure
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return share, lr, n_tokens, n_loss_tokens


def loss_rows(y):
    """The flat indices of the positions whose target counts, found on the CPU beside the batch (see
    model.GPT.forward's `rows`)."""
    return (y.reshape(-1) != -100).nonzero().squeeze(1)


def to_device(t, device):
    """A CPU tensor on `device`; to a GPU through pinned memory, so that the copy overlaps the work
    queued before it (non_blocking from ordinary memory copies synchronously)."""
    if device.startswith("cuda"):
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def between_steps(group, stop, log, bar, saver, read):
    """What every process must agree on between two steps, in one all-reduce under torchrun: whether a
    stop signal came, and, when `read`, the sum of the losses of the steps since the last read, which
    brings them from the device: the loop's only wait for the GPU. A stop reads them too, so that
    metrics.jsonl is complete at the checkpoint. -> the agreed signal number, or 0."""
    votes = stop.votes()
    totals = group.sum(votes + (log.unread() if read else []))
    signal_number = stop.agreed(totals[:len(votes)])
    if signal_number and not read:
        return between_steps(group, stop, log, bar, saver, read=True)
    if read:
        try:
            log.read(totals[len(votes):], bar)
        except NonFinite as e:
            saver.diverged(str(e))
    return signal_number


@torch.no_grad()
def evaluate(model, batches, cfg, device, ctx, group=distributed.Single()):
    """Mean validation loss over eval_iters fixed batches (the same ones every time). Under torchrun
    each process evaluates every world-th batch, and the sum goes round."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(group.rank, cfg.eval_iters, group.world):
        x, y = batches.get("val", i)
        x, y, rows = (to_device(t, device) for t in (x, y, loss_rows(y)))
        with ctx:
            total += model(x, y, return_logits=False, rows=rows)[1].float()
    model.train()
    return group.sum([total.item()])[0] / cfg.eval_iters  # one read from the device


def evaluate_tasks(model, batches, cfg, device, ctx, group):
    """-> (validation loss, {task: its validation loss}): a joint run's is the mean of its tasks' (each
    on its own eval_iters batches), any other run's has no tasks."""
    if not cfg.tasks:
        return evaluate(model, batches, cfg, device, ctx, group), {}
    per_task = {}
    for name in batches.names:
        with batches.only(name) as own:
            per_task[name] = evaluate(model, own, cfg, device, ctx, group)
    return sum(per_task.values()) / len(per_task), per_task


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
    if cfg.tasks:  # one shared A, one B (and u) per task, stacked; the bank they go back into is model.bank
        model.bank = bank.fresh(model, adapter_config(cfg), list(task_folders(cfg.tasks)), base=cfg.init_from)
        bank.attach(model, model.bank, trainable=True)
        if cfg.init_adapter and ckpt is None:  # new tasks around an adapter's or a bank's A (the spec may freeze it)
            shared = {k: t for k, t in init_tensors(cfg.init_adapter, model).items() if k.endswith(".lora_A")}
            copy_tensors(model.bank_tensors, shared, f"init_adapter {cfg.init_adapter}", only_shared_keys=True)
        if ckpt is not None:
            copy_tensors(model.bank_tensors, ckpt["bank"], f"the checkpoint in {cfg.out_dir}")
    elif cfg.adapter != "none":
        sharelora.add_adapters(model, adapter_config(cfg))
        if cfg.init_adapter and ckpt is None:
            copy_adapter(model, init_tensors(cfg.init_adapter, model), f"init_adapter {cfg.init_adapter}",
                         only_shared_keys=True)  # take the tensors both adapters have; the spec decides what trains
        if ckpt is not None:
            copy_adapter(model, ckpt["adapter"], f"the checkpoint in {cfg.out_dir}")
    return model


def init_tensors(path, model):
    """init_adapter's tensors: an adapter file's, or an adapter bank's shared A (bank.py), so that a task
    trained around it, with A frozen, can join that bank. Refused when the file was made on maps of other
    shapes than this run's (another base)."""
    if bank.is_bank(path):
        b = bank.Bank.read(path)
        shapes, tensors = b.shapes, b.shared
    else:
        _, meta, tensors = sharelora.read_adapter(path)
        shapes = meta["shapes"]
    ours = model.bank.shapes if hasattr(model, "bank") else sharelora.map_shapes(model)  # (attach took the maps)
    # a map of both of another shape, or a map of a target both adapt that only this run has (another depth);
    # maps of targets only this run adapts are new ones (they start afresh: docs/beyond.md)
    pattern = lambda name: re.sub(r"\.\d+(?=\.|$)", ".*", name)
    theirs = {pattern(n) for n in shapes}
    other = next((n for n in ours if shapes.get(n, ours[n]) != ours[n] or (n not in shapes and pattern(n) in theirs)), None)
    check(other is None, f"init_adapter {path} was made on another base: its map {other} is "
                         f"{shapes.get(other, 'absent')}, this run's {ours.get(other)}; train on the base it was made on")
    return tensors


def copy_adapter(model, tensors, source, only_shared_keys=False):
    """Copy adapter tensors into the model's adapter, after checking each one's name and shape."""
    copy_tensors(sharelora.adapter_state_dict(model), tensors, source, only_shared_keys)


@torch.no_grad()
def copy_tensors(own, tensors, source, only_shared_keys=False):
    """Copy tensors into the model's ({key: parameter}: its adapter, or a joint run's stacked bank
    tensors), after checking each one's name and shape."""
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
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a shared tensor appears once
    groups = [{"params": [p for n, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if p.dim() < 2], "weight_decay": 0.0}]  # u, v, biases, norms
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.startswith("cuda"))


# ---- checkpoints ---------------------------------------------------------------------------------

def checkpoint(model, cfg, state, step, best_val):
    """Everything needed to continue exactly: adapter tensors (the base is only named), `state` (the
    optimizer's and scaler's states, every process's random generators, the dtype the run computed
    in), step, config. Plus adapter.safetensors, the file to share and sample from; or, when the whole
    model trains, the model in the Hugging Face layout (out_dir is then a base). All of it as one set
    (runtime.write_checkpoint): a crash leaves the old set or the new one."""
    ckpt = {"format": "sharelora-train", "step": step, "best_val": best_val, "config": asdict(cfg), **state,
            "data": getattr(cfg, "data_record", None)}
    if cfg.init_from != "scratch":
        ckpt["base"] = runtime.base_reference(cfg.init_from, cfg.out_dir)
    if cfg.adapter == "none" or cfg.init_from == "scratch":  # no base to name: keep its weights
        ckpt["model"] = model.state_dict() if cfg.adapter == "none" else sharelora.base_state_dict(model)
    if cfg.tasks:  # a joint run: the shared A and each task's tensors (model.bank_tensors); bank.safetensors beside
        ckpt["bank"] = {k: v.detach() for k, v in model.bank_tensors.items()}
    elif cfg.adapter != "none":
        ckpt["adapter"] = {k: v.detach() for k, v in sharelora.adapter_state_dict(model).items()}

    def write_files(folder):
        if cfg.tasks:
            joint = bank.collect(model, model.bank)
            joint.base = ckpt["base"]  # relative to out_dir, as the adapter's: folder is a staging folder inside it
            joint.save(os.path.join(folder, bank.BANK_FILE))
            return
        if cfg.adapter == "none":
            model.save_pretrained(folder)
            return
        # a base from scratch is saved beside its adapter, which names it as "." (this folder)
        if cfg.init_from == "scratch":
            model.save_pretrained(folder, state_dict=sharelora.base_state_dict(model))
        sharelora.save_adapter(model, os.path.join(folder, runtime.ADAPTER_FILE),
                               base="." if cfg.init_from == "scratch" else ckpt["base"])

    runtime.write_checkpoint(cfg.out_dir, ckpt, write_files)


def random_state(device):
    """This process's random generators: torch's CPU one, Python's, and its own GPU's."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def restore_state(ckpt, optimizer, scaler, cfg, rank, device, dtype):
    """Put the optimizer, the scaler and this process's random generators back as the checkpoint has
    them. The optimizer's state keeps this device's own settings (fused on CUDA), not those of the
    device it was saved on; a scaler state is loaded only into a float16 run's scaler (a run saved in
    another precision starts one afresh, as a new float16 run does). -> (step, best validation loss)."""
    saved = ckpt["optimizer"]
    try:
        for theirs, ours in zip(saved["param_groups"], optimizer.param_groups):
            theirs.update({k: ours[k] for k in ("fused", "foreach", "capturable") if k in ours})
        optimizer.load_state_dict(saved)
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"the optimizer state in {cfg.out_dir}/{runtime.CKPT_FILE} does not fit this run ({e})")
    was = ckpt.get("dtype", str(dtype))
    if was != str(dtype) and rank == 0:
        print(f"note: the run computed in {was.removeprefix('torch.')} until step {ckpt['step']} and goes on in "
              f"{str(dtype).removeprefix('torch.')} on {device}: it continues, but not bit for bit")
    try:
        restore_random_state(ckpt["rng"], rank, device, cfg.seed)
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as e:
        fail(f"the random state in {cfg.out_dir}/{runtime.CKPT_FILE} is damaged ({type(e).__name__}): "
             "restore the file, or train again")
    return ckpt["step"], ckpt["best_val"]


def restore_random_state(saved, rank, device, seed):
    """This process's generators from `saved`, one state per process (older checkpoints: process 0's
    alone, with every GPU's state). A process that saved none (a run resumed with more processes than
    it had) draws from seed + rank, as a new run's would."""
    states = saved if isinstance(saved, list) else [saved]
    if rank >= len(states):
        torch.manual_seed(seed + rank)
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"]))
    cuda = state["cuda"]
    if isinstance(cuda, list):  # the older format: the states of every GPU process 0 saw
        index = torch.device(device).index or 0
        cuda = cuda[index] if device.startswith("cuda") and index < len(cuda) else None
    if cuda is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(cuda, device)


class Saver:
    """Writes the checkpoints of a run and remembers the step of the last one on disk (`saved`, None
    before the first): what a run that diverges, or is stopped, keeps."""

    def __init__(self, model, cfg, optimizer, scaler, group, device, dtype, saved):
        self.model, self.cfg, self.optimizer, self.scaler, self.group = model, cfg, optimizer, scaler, group
        self.device, self.dtype, self.saved = device, dtype, saved

    def save(self, step, best_val):
        try:
            finite_weights(self.model, step)  # nothing non-finite is saved; checked in every process, so that all stop together
            rng = self.group.gather(random_state(self.device))  # every process's own generators
            if self.group.main:  # every process holds the same weights: one writes them
                state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                         "rng": rng, "dtype": str(self.dtype)}
                checkpoint(self.model, self.cfg, state, step, best_val)
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

    def votes(self):
        """The request as numbers that add up across processes: one count per signal."""
        return [float(self.requested == s) for s in self.NAMES]

    def agreed(self, totals):
        """The signal to stop for, from every process's votes summed: SIGTERM over SIGINT; 0 for none."""
        asked = [s for s, n in zip(self.NAMES, totals) if n > 0]
        return max(asked, default=0)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for s in self.NAMES:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Log:
    """metrics.jsonl, one JSON record a line (process 0 writes it), the progress bar's figures and the
    evaluation lines printed. A step's loss stays on the device until read() (every log_interval
    steps, before an evaluation, at a stop and at the end); a resumed run first drops the lines after
    its checkpoint (runtime.trim_log), a new run those of one that never saved a checkpoint."""

    def __init__(self, out_dir, main, resumed_at=None):
        self.path, self.main, self.resumed_at = os.path.join(out_dir, "metrics.jsonl"), main, resumed_at
        self.pending, self.losses, self.since = [], [], time.perf_counter()
        if main:  # a new run starts its log afresh (a run that never saved a checkpoint left its lines)
            runtime.trim_log(self.path, resumed_at if resumed_at is not None else -1)

    def write(self, record):
        if self.main:
            runtime.json_line(self.path, record)

    def evaluation(self, step, val, sample=None, per_task=None):
        """per_task: {task: validation loss} of a joint run, logged as val_loss_TASK beside their mean."""
        record = {"step": step, "val_loss": round(val, 4), "val_ppl": round(math.exp(min(val, 50)), 2),
                  **{f"val_loss_{name}": round(v, 4) for name, v in (per_task or {}).items()}}
        if sample is not None:
            record["sample"] = sample
        if self.main:  # one line: a sample's newlines show as \n (metrics.jsonl keeps the text as it is)
            tqdm.write(" ".join(f"{k} {v!r}" if k == "sample" else f"{k} {v}" for k, v in record.items()))
        self.write(record)
        self.since = time.perf_counter()  # the evaluation's time is not the training steps'

    def step(self, step, loss, lr, n_tokens, n_loss_tokens):
        self.pending.append((step, loss, lr, n_tokens, n_loss_tokens))

    def unread(self):
        """This process's loss shares of the pending steps, on the CPU: one copy from the device."""
        return torch.stack([p[1] for p in self.pending]).double().cpu().tolist() if self.pending else []

    def read(self, losses, bar):
        """Log the pending steps with their losses (summed over the processes). The speed is the mean over
        them: a GPU runs steps asynchronously, so only a read tells when they were done. Raises NonFinite
        at a non-finite loss."""
        elapsed = max(time.perf_counter() - self.since, 1e-6)  # a clock that did not advance: no division by 0
        tokens, loss_tokens = (sum(p[i] for p in self.pending) / elapsed for i in (3, 4))
        for (step, _, lr, _, _), loss in zip(self.pending, losses):
            if not math.isfinite(loss):
                raise NonFinite(f"the training loss became {loss} at step {step}")
            self.losses.append(loss)
            self.write({"step": step, "loss": round(loss, 5), "lr": lr, "tokens_per_s": round(tokens),
                        "loss_tokens_per_s": round(loss_tokens)})
        if self.pending:
            bar.set_postfix(loss=f"{self.losses[-1]:.4f}", lr=f"{self.pending[-1][2]:.2e}", tok_s=f"{tokens:,.0f}")
        self.pending, self.since = [], time.perf_counter()


def main(argv=None):
    runtime.run(lambda: train(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
