"""
bench_job.py: the job users run, side by side with transformers + PEFT, for bench.py's sections
job_train, job_decode and job_scale (`python tools/bench.py --only job` runs all three).

  job_train   optimizer steps of batch 16 of E2E training examples. Ours: train.py's own step
              (train.train_step: reading the batch, forward, backward, clipping, AdamW), with its
              length-grouped batches (the default) and with plain random batches. PEFT: a loop as their
              docs write it: the examples tokenized once as {input_ids, labels} with labels -100 on the
              MR, a DataLoader with a padding collator (what DataCollatorForSeq2Seq does, without a
              tokenizer object), GPT2LMHeadModel(**batch).loss, clipping at 1.0, AdamW; once with a
              random sampler and once with transformers' LengthGroupedSampler (what Trainer's
              group_by_length uses). Both sides adapt the same modules (attn.c_proj, mlp.c_fc, r = 8:
              the same trainable parameters) and read the same examples (data/e2e's train split).
              Reference tokens = the positions the loss counts (the reference texts): the useful
              work. Positions = what the model computes, padding included.
  job_decode  the first 100 test MRs, beam 10, length penalty 0.9, no-repeat 4 (the paper's setting):
              evaluate_e2e.decode_mrs against transformers' generate(num_beams=10, ...) on the same
              weights, and greedy on both sides. transformers gets the same batches of prompts as ours:
              for beam search up to 32 prompts of similar lengths, left-padded with an attention mask;
              for greedy, prompts of one length.
  job_scale   one training step at batch 1 x 256 for the gpt2 ... gpt2-xl configurations: ShareA on
              q, v (r 8) against PEFT's LoRA on c_attn (r 8), and the bound at each size: our step's
              matrix products replayed alone, then with torch's attention and GELU kernels replayed too.

Contenders take turns (ours, PEFT, ours, PEFT, ...) and each reports the median of its rounds, as in
bench.py. Training memory is the peak over a contender's timed steps minus the memory before them,
measured in a fresh process on a CPU (bench.py's memory probe).
"""
import gc
import json
import os
import statistics
import tempfile
from dataclasses import replace
from types import SimpleNamespace

import torch

import runtime
import sharelora
import train
from data.loader import Batches
from tokenizer import EOT, decode, get_tokenizer
from tools import bench_lib as bench
from tools import evaluate_e2e as ev

DATA_DIR = os.path.join(bench.ROOT, "data", "e2e")
JOB_TARGETS = ("attn.c_proj", "mlp.c_fc")  # the same modules and trainable parameters on both sides
JOB_BATCH = 16


def need_e2e(data_dir):
    for name in ("meta.json", "train.bin", "train_examples.bin", "test_refs.json"):
        if not os.path.exists(os.path.join(data_dir, name)):
            runtime.fail(f"{data_dir} has no prepared E2E data ({name} is missing): run python data/e2e/prepare.py first")


# ---- training: the two loops ------------------------------------------------------------------------

def ours_loop(env, spec):
    """train.py's step on a fresh GPT (random weights, env's size) with a LoRA on JOB_TARGETS."""
    c = env.cfg
    cfg = train.TrainConfig(init_from="scratch", n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                            block_size=c["block_size"], adapter="lora", r=bench.R, alpha=bench.ALPHA,
                            targets=",".join(JOB_TARGETS), batch_size=JOB_BATCH, group_by_length=spec["grouped"],
                            warmup_iters=0, max_iters=10**6, seed=spec["seed"])
    batches = Batches(spec["data_dir"], cfg.batch_size, cfg.block_size, seed=cfg.seed, group_by_length=cfg.group_by_length)
    torch.manual_seed(0)
    model = train.build_model(cfg, None)
    device = str(env.device)
    runtime.place(model, env.device, env.dtype).train()
    optimizer = train.make_optimizer(model, cfg, device)
    scaler, ctx = runtime.grad_scaler(device, env.dtype), runtime.autocast(device, env.dtype)
    state = SimpleNamespace(i=0)

    def step():
        _, _, positions, reference = train.train_step(model, optimizer, scaler, batches, state.i, cfg, device, ctx)
        used, _ = batches.positions("train", state.i)
        state.i += 1
        return reference, positions, used

    return SimpleNamespace(step=step, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


def pad_collate(features):
    """Pad a list of {input_ids, labels} to the longest: input_ids with eos, labels with -100, and an
    attention_mask of 1 on real tokens (DataCollatorForSeq2Seq's output, without needing a tokenizer)."""
    T = max(len(f["input_ids"]) for f in features)
    pad = lambda seq, value: seq + [value] * (T - len(seq))
    return {"input_ids": torch.tensor([pad(f["input_ids"], EOT) for f in features]),
            "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
            "labels": torch.tensor([pad(f["labels"], -100) for f in features])}


def hf_example(tokens, start, context, total):
    """One prepared E2E example (a row of data/loader.py's index) as transformers' docs tokenize one:
    input_ids, and labels -100 on the MR (transformers shifts labels by one inside)."""
    return {"input_ids": tokens[start:start + total], "labels": [-100] * context + tokens[start + context:start + total]}


def peft_loop(env, spec):
    """A transformers + PEFT LoRA training loop over the same examples, the way their docs show it."""
    from torch.utils.data import DataLoader, RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler
    ours = Batches(spec["data_dir"], JOB_BATCH, env.cfg["block_size"], group_by_length=False)
    tokens = ours.tokens["train"].tolist()
    dataset = [hf_example(tokens, *row) for row in ours.examples["train"].tolist()]
    g = torch.Generator().manual_seed(spec["seed"])
    sampler = (LengthGroupedSampler(JOB_BATCH, lengths=[len(d["input_ids"]) for d in dataset], generator=g)
               if spec["grouped"] else RandomSampler(dataset, generator=g))
    loader = DataLoader(dataset, batch_size=JOB_BATCH, sampler=sampler, collate_fn=pad_collate, drop_last=True)
    model = bench.hf_model(env, JOB_TARGETS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    batches = iter(loader)

    def step():
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(env.device) for k, v in batch.items()}
        with env.autocast():
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # transformers shifts labels by one inside: label t is predicted at position t - 1
        return int((batch["labels"][:, 1:] != -100).sum()), batch["input_ids"].numel(), int(batch["attention_mask"].sum())

    return SimpleNamespace(step=step, trainable=sum(p.numel() for p in params))


def contender(env, spec):
    """A job_train contender from its spec (also what bench.py's memory probe builds in a fresh process)."""
    return (ours_loop if spec["side"] == "ours" else peft_loop)(env, spec)


def job_specs(data_dir, seed=0):
    base = {"job": True, "data_dir": data_dir, "seed": seed}
    return {"ours, length-grouped": dict(base, side="ours", grouped=True),
            "ours, random batches": dict(base, side="ours", grouped=False),
            "PEFT, random batches": dict(base, side="peft", grouped=False),
            "PEFT, LengthGroupedSampler": dict(base, side="peft", grouped=True)}


def take_turns(env, contenders, rounds, steps):
    """One warm-up step each, then `rounds` rounds in which each contender runs its next `steps` steps.
    -> {name: [(seconds, reference tokens, positions, real positions) per round]}."""
    for c in contenders.values():
        c.step()
    run = lambda c: lambda: [sum(x) for x in zip(*(c.step() for _ in range(steps)))]
    turns = bench.take_turns(env, {k: run(c) for k, c in contenders.items()}, warmup=0, repeats=rounds)
    return {k: [(t, *work) for t, work in v] for k, v in turns.items()}


def job_memory(env, spec, steps):
    """Peak training memory over `steps` steps after a warm-up step, in bytes (None if not measured)."""
    if not env.memory:
        return None
    if env.device.type == "cuda":
        c = contender(env, spec)
        c.step()
        return bench.step_memory(env, lambda: [c.step() for _ in range(steps)], measures=1)
    return bench.training_memory(env, dict(spec, measure_steps=steps, warmup_steps=1))


def section_job_train(env, rounds, steps, data_dir=DATA_DIR):
    env = replace(env, batch_size=JOB_BATCH)
    need_e2e(data_dir)
    specs = job_specs(data_dir)
    cs = {k: contender(env, s) for k, s in specs.items()}
    turns = take_turns(env, cs, rounds, steps)
    del cs
    gc.collect()
    mem = {k: job_memory(env, s, rounds * steps) for k, s in specs.items()}
    rate = {k: statistics.median(r / t for t, r, _, _ in v) for k, v in turns.items()}
    rows = []
    for k, v in turns.items():
        t, ref, pos, real = (sum(x) for x in zip(*v))
        rows.append([k, f"{ref / (rounds * steps):,.0f}", f"{100 * (1 - real / pos):.1f}%",
                     f"{statistics.median(s for s, *_ in v) / steps * 1e3:,.0f}", f"{rate[k]:,.0f}",
                     f"{statistics.median(p / s for s, _, p, _ in v):,.0f}", bench.fmt_mb(mem[k])])
    ours = "ours, length-grouped"
    ratios = []
    for other, key in (("PEFT, random batches", "job_plain"), ("PEFT, LengthGroupedSampler", "job_grouped"),
                       ("ours, random batches", None)):
        r = rate[ours] / rate[other]
        ratios.append([f"{ours} / {other}", "reference tokens/s", f"{r:.2f}x", *bench.goal_if_set(key, r)])
    for other in ("PEFT, random batches", "PEFT, LengthGroupedSampler"):
        if mem[ours] and mem[other]:
            m = mem[ours] / mem[other]
            key = "job_mem" if other.endswith("Sampler") else None
            ratios.append([f"{ours} / {other}", "training memory", f"{m:.2f}x", *bench.goal_if_set(key, m)])
    return "\n".join([
        f"### The E2E training job: train.py's step vs a transformers + PEFT loop (LoRA r = {bench.R} on "
        f"{', '.join(JOB_TARGETS)}, batch {JOB_BATCH}, {rounds} rounds of {steps} steps each after 1 warm-up step)",
        bench.machine_line(env, shape=f"batch {JOB_BATCH} E2E training examples"), "",
        bench.table(["loop", "reference tokens / step", "padding", "step ms", "reference tokens/s", "positions/s",
                     "train mem MiB"], rows), "",
        bench.table(["contenders", "measure", "ratio", "goal", "met"], ratios), "",
        f"Training memory: the peak over {rounds * steps} steps after a warm-up step (the timed run's batches) "
        f"minus the memory before them; {bench.memory_method(env).replace('over one step ', '')}. "
        "Padding: the share of computed positions that are padding (transformers' rows hold one more token, "
        "the last, which predicts nothing). LengthGroupedSampler puts the epoch's longest batch first."])


# ---- decoding -------------------------------------------------------------------------------------------

def decode_model(env, run_dir):
    """(ours, info, folder in the Hugging Face layout with the same weights). run_dir: a training run
    (its base and adapter, merged as evaluate_e2e.py merges it); None: random weights of env's size."""
    folder = tempfile.mkdtemp(prefix="bench-job-")
    if run_dir:
        model, info = runtime.load_model(run_dir, device=str(env.device), dtype=str(env.dtype).removeprefix("torch."),
                                         merge=False)
        sharelora.export_merged(model, folder)
        sharelora.merge(model)
    else:
        model = bench.ours_model(replace(env, model=env.model)).eval()
        info = {"device": str(env.device), "dtype": env.dtype}
        model.save_pretrained(folder)
    config = os.path.join(folder, "config.json")
    with open(config) as f:
        c = json.load(f)
    c.update(bos_token_id=EOT, eos_token_id=EOT)
    with open(config, "w") as f:
        json.dump(c, f)
    return model, info, folder


def hf_decode(hf, env, prompts, beam_size, max_new_tokens, batch_size):
    """transformers' generate on the same batches of prompts as ours: for beam search prompts of similar
    lengths, left-padded with an attention mask (as their docs batch prompts); greedy, one length each."""
    out = [None] * len(prompts)
    beam = dict(num_beams=beam_size, length_penalty=0.9, no_repeat_ngram_size=4, early_stopping=False) \
        if beam_size > 1 else {}
    chunks = ev.by_similar_length(prompts, batch_size) if beam_size > 1 else ev.by_length(prompts, batch_size)
    for chunk in chunks:
        longest = max(len(prompts[i]) for i in chunk)
        idx = torch.tensor([[EOT] * (longest - len(prompts[i])) + prompts[i] for i in chunk], device=env.device)
        mask = torch.tensor([[0] * (longest - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=env.device)
        with torch.no_grad(), env.autocast():
            rows = hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                               eos_token_id=EOT, pad_token_id=EOT, **beam)[:, idx.size(1):].tolist()
        for i, row in zip(chunk, rows):
            out[i] = row[:row.index(EOT)] if EOT in row else row
    return [ev.one_line(decode(o)) for o in out]


def prompt_ban(prompt, text, n=4):
    """Whether transformers' no-repeat rule, which also counts the prompt, forbids a token of our text:
    an n-gram of the generated tokens that already occurred in prompt + the tokens before it."""
    gen = get_tokenizer().encode_ordinary(text)
    seq = list(prompt)
    for token in gen:
        if token in ev.banned_tokens(seq, n) and token not in ev.banned_tokens(seq[len(prompt):], n):
            return True
        seq.append(token)
    return False


def section_job_decode(env, mrs_count, repeats, run_dir, data_dir=DATA_DIR, batch_size=32):
    import transformers
    need_e2e(data_dir)
    with open(os.path.join(data_dir, "test_refs.json"), encoding="utf-8") as f:
        mrs = [g["mr"] for g in json.load(f)][:mrs_count]
    model, info, folder = decode_model(env, run_dir)
    transformers.logging.set_verbosity_error()
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).to(env.device, env.dtype).eval()
    max_new = ev.room_to_generate(model, mrs)
    prompts = [get_tokenizer().encode_ordinary(mr + " ||") for mr in mrs]
    rows, ratios = [], []
    for beam_size in (10, 1):
        how = "greedy" if beam_size == 1 else f"beam {beam_size}"
        results = {}

        def ours():
            results["ours"] = ev.decode_mrs(model, info, mrs, " ||", beam_size, max_new, 0.9, 4, batch_size)

        def theirs():
            results["transformers"] = hf_decode(hf, env, prompts, beam_size, max_new, batch_size)

        t = bench.race(env, {"ours": ours, "transformers": theirs}, warmup=0, repeats=repeats)
        same = sum(a == b for a, b in zip(results["ours"], results["transformers"]))
        differ = [i for i, (a, b) in enumerate(zip(results["ours"], results["transformers"])) if a != b]
        banned = sum(prompt_ban(prompts[i], results["ours"][i]) for i in differ)
        for side in ("ours", "transformers"):
            rows.append([how, side, f"{t[side]:,.1f}", f"{len(mrs) / t[side]:.2f}",
                         f"{same}/{len(mrs)}" if side == "ours" else ""])
        speed = t["transformers"] / t["ours"]
        ratios.append([how, f"{speed:.2f}x", *(bench.goal("decode", speed) if beam_size > 1 else ("-", "-")),
                       f"{same}/{len(mrs)}", f"{banned} of {len(differ)}"])
    bound = decode_bound(env, model, hf, prompts, max_new, repeats, batch_size)
    base = f"the run in {run_dir}" if run_dir else f"random weights ({env.model} configuration)"
    return "\n".join([
        f"### Decoding the first {len(mrs)} E2E test MRs: evaluate_e2e.py vs transformers' generate, same weights "
        f"({base}), length penalty 0.9, no-repeat 4 (beam), at most {max_new} new tokens, batches of up to {batch_size} "
        f"prompts (beam: similar lengths, left-padded; greedy: one length), median of {repeats}",
        bench.machine_line(env, shape=f"{len(mrs)} MRs"), "",
        bench.table(["decoding", "side", "seconds", "MRs/s", "identical outputs"], rows), "",
        bench.table(["decoding", "speed, ours / transformers", "goal", "met", "identical", "differences where "
                     "transformers' n-gram ban counts the prompt"], ratios), "",
        "Definitions both sides share: a finished beam scores its summed log-probs / (new tokens including eos) "
        "** length_penalty; the search stops when the pool is full and the best live beam cannot beat its worst "
        "(early_stopping=False). One difference: transformers' no_repeat_ngram_size also bans n-grams of the "
        "prompt for a decoder-only model, ours (as microsoft/LoRA's) only those of the generated text; the last "
        "column counts the differing outputs that rule explains (our text repeats a 4-gram of its MR).", "",
        bound])


def decode_bound(env, model, hf, prompts, max_new, repeats, batch_size):
    """The ceiling of the beam-10 ratio, measured as bench.py's bound section does: the largest batch of
    prompts, decoded by both sides, against the time of our decoding's matrix products alone (recorded
    below autograd, replayed on preallocated tensors). transformers' time over that is the highest
    speed ratio a decoder with zero overhead beyond its products could reach here."""
    chunk = [prompts[i] for i in max(ev.by_similar_length(prompts, batch_size), key=len)]

    def ours():
        with env.autocast():
            ev.beam_search_batch(model, chunk, 10, max_new, 0.9, 4, EOT)

    calls = bench.record_gemms(env, ours)
    run, gflop = bench.gemm_replay(env, calls)
    t = bench.race(env, {"ours": ours, "transformers": lambda: hf_decode(hf, env, chunk, 10, max_new, batch_size),
                         "our matmuls": run}, warmup=0, repeats=repeats)
    rows = [[k, f"{v:,.1f}"] for k, v in t.items()]
    ceiling = t["transformers"] / t["our matmuls"]
    return "\n".join([
        f"The bound, on the largest batch ({len(chunk)} prompts, beam 10, {len(calls):,} matrix products, "
        f"{gflop:,.0f} GFLOP, {gflop / t['our matmuls']:,.0f} GFLOP/s replayed):", "",
        bench.table(["contender", "seconds"], rows), "",
        bench.table(["ceiling, transformers / our matmuls", "measured, ours / transformers", "decode goal",
                     "goal within ceiling"],
                    [[f"{ceiling:.2f}x", f"{t['transformers'] / t['ours']:.2f}x", *bench.goal("decode", ceiling)]])])


# ---- scaling --------------------------------------------------------------------------------------------

def saved_activations(model, loss_fn):
    """Bytes of the tensors autograd keeps for backward in one forward pass, not counting parameters:
    the activations an exact backward needs, whatever the allocator does around them."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t.detach()  # not t: an op's saved output would hold its own graph node, a cycle never freed

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(kept.values())


def section_job_scale(env, sizes, repeats):
    rows, ratios, bounds = [], [], []
    for size in sizes:
        e = replace(env, model=size, batch_size=1, block_size=256)
        specs = {"ours": {"side": "ours", "targets": ["q", "v"], "supervision": "all", "preset": "sharea"},
                 "PEFT": {"side": "peft", "targets": ["c_attn"], "supervision": "all"}}
        cs = {k: bench.train_contender(e, s) for k, s in specs.items()}
        params = sum(p.numel() for p in cs["ours"].model.parameters() if not p.requires_grad)
        # the bound, as in bench.py's bound section: our step's matrix products replayed alone; and the
        # same with torch's fused attention and GELU kernels replayed too, which a GPT-2 step in torch calls
        cs["ours"].step()
        replays = {"our matmuls": bench.gemm_replay(e, bench.record_gemms(e, cs["ours"].step))[0],
                   "+ kernels": bench.gemm_replay(e, bench.record_gemms(e, cs["ours"].step, "kernel"))[0]}
        kept = saved_activations(cs["ours"].model, cs["ours"].loss)
        t = bench.race(e, {**{k: c.step for k, c in cs.items()}, **replays}, warmup=1, repeats=repeats)
        del replays
        trainable = {k: c.trainable for k, c in cs.items()}
        if e.device.type == "cuda":
            mem = {k: bench.training_memory(e, specs[k], cs[k]) for k in cs}
            del cs
        else:
            del cs  # the probes run in fresh processes: free this one's copies first (gpt2-xl is 6 GB each)
            bench.release_memory()
            mem = {k: bench.training_memory(e, s) for k, s in specs.items()}
        bench.release_memory()
        for k in specs:
            rows.append([size, f"{params / 1e6:,.0f}M", k, f"{trainable[k]:,}", f"{t[k] * 1e3:,.0f}",
                         f"{256 / t[k]:,.0f}", bench.fmt_mb(mem[k])])
        speed = t["PEFT"] / t["ours"]
        m = mem["ours"] / mem["PEFT"] if mem["ours"] and mem["PEFT"] else None
        ratios.append([size, f"{speed:.2f}x", *bench.goal("scale_speed", speed),
                       f"{m:.2f}x" if m else "n/a", *(bench.goal("scale_mem", m) if m else ("-", "-"))])
        ceiling = t["PEFT"] / t["our matmuls"]
        with_kernels = t["PEFT"] / t["+ kernels"]
        floor = kept / mem["PEFT"] if mem["PEFT"] else None
        bounds.append([size, f"{t['our matmuls'] * 1e3:,.0f}", f"{ceiling:.2f}x", *bench.goal("scale_speed", ceiling),
                       f"{t['+ kernels'] * 1e3:,.0f}", f"{with_kernels:.2f}x", *bench.goal("scale_speed", with_kernels),
                       bench.fmt_mb(kept), f"{floor:.2f}x" if floor else "n/a",
                       *(bench.goal("scale_mem", floor) if floor else ("-", "-"))])
    return "\n".join([
        f"### One training step at batch 1 x 256 as the model grows: ours ShareA (q, v, r = {bench.R}) vs PEFT "
        f"LoRA (c_attn, r = {bench.R}), every position supervised, median of {repeats}",
        bench.machine_line(env, shape="batch 1 x 256"), "",
        bench.table(["model", "frozen params", "side", "trainable", "step ms", "tokens/s", "train mem MiB"], rows), "",
        bench.table(["model", "speed, ours / PEFT", "goal", "met", "memory, ours / PEFT", "goal", "met"], ratios), "",
        f"Training memory: {bench.memory_method(env)}.", "",
        "The bound at each size. Speed: PEFT's step over our step's matrix products replayed alone (same "
        "shapes, strides and dtype, timed in the same rounds), the fastest a step with zero overhead could "
        "be, with attention counted as standard attention's batched matmuls; then the same products plus "
        "torch's fused attention and GELU kernels (forward and backward, replayed on copies of their real "
        "arguments), the fastest a step that calls torch's attention and GELU could be. Memory: the tensors our "
        "backward keeps (autograd's saved tensors, parameters not counted) over PEFT's training memory, the "
        "least a step that keeps them could use; fewer would mean recomputing matrix products in backward.", "",
        bench.table(["model", "our matmuls ms", "speed ceiling", "goal", "within", "+ attention, GELU ms",
                     "ceiling with them", "goal", "within", "kept for backward MiB", "memory floor", "goal",
                     "within"], bounds)])
