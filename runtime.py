"""
What train.py, sample.py and the evaluation scripts share, written once: user errors as one sentence,
device and precision choices, atomic checkpoint files, and loading a base model plus an adapter.
"""
import contextlib
import json
import os
import re
import signal
import sys
import threading

import torch

import sharelora
from data.common import (COMMITTED, STAGING, Parser, UserError, check, check_folder_target, committed_path, torchrun_rank,  # noqa: F401
                         fail, finish_set, own_folder, report, run_child, write_folder, write_set,
                         write_text)  # torch-free: data/ and train.py use them too
from model import GPT
from quantize import check_kind, quantize as quantize_base

ADAPTER_FILE, CKPT_FILE = "adapter.safetensors", "ckpt.pt"


# ---- errors a user can cause: one sentence, exit code 2, no traceback ------------------------

def run(main, *args):
    """Call main(*args) and turn the user's mistakes into one line on stderr and exit code 2.
    ValueError and FileNotFoundError are what model.py and sharelora.py raise for bad input (unknown
    preset, adapter for another base, missing weights); any other OSError is the machine refusing a
    file (permissions, a full disk) and its message names the file. Ctrl-C outside train.py's own
    handler ends with exit code 130 and one line. SHARELORA_TRACEBACK=1 shows the traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt again
    try:
        return main(*args)
    except (UserError, ValueError, OSError, MemoryError, RuntimeError) as e:
        if os.environ.get("SHARELORA_TRACEBACK") or (isinstance(e, RuntimeError) and not _out_of_memory(e)):
            raise  # any other RuntimeError is a bug: its traceback is what a report needs
        # input mistakes are the same in every torchrun process; memory and a refused file may be one's own
        report(_one_line(e), same_everywhere=isinstance(e, (UserError, ValueError, FileNotFoundError)))
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; files are only ever replaced whole, so what is on disk is complete",
              file=sys.stderr)
        sys.exit(130)


def _out_of_memory(e):
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower() or "can't allocate memory" in str(e)


def _one_line(e):
    if _out_of_memory(e):
        return ("out of memory: use a smaller batch_size, num_samples, block_size or model "
                f"({' '.join(str(e).split())[:120]})")
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename is not None:
        return f"cannot use {e.filename}: {e.strerror or e}"
    return str(e)  # report() makes it one printable line, whatever it held (data.common.one_line)


def read_json(path, what="file"):
    """json.load with errors that name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{path} is not a valid JSON {what} ({e}): write it again, or restore it")


# ---- device and precision -------------------------------------------------------------------

def pick_device(device="auto"):
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        fail(f"device must be auto, cpu, cuda or mps, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("device=cuda was asked for but torch sees no CUDA GPU: use device=cpu or device=auto")
    if device == "mps" and not torch.backends.mps.is_available():
        fail("device=mps was asked for but this torch build or machine has no MPS: use device=cpu")
    return device


def pick_dtype(dtype, device):
    """auto: bfloat16 on a GPU that computes it natively (compute capability 8.0 and newer: Ampere,
    Hopper...; same range as float32, no loss scaling), float16 on older GPUs (V100, T4: with a
    GradScaler, see grad_scaler), float32 on CPU and MPS, where low precision is slower or less
    supported (bfloat16 on CPU runs when asked for: it halves memory). The check reads the chosen GPU
    (cuda:1 is not cuda:0) and its compute capability: torch.cuda.is_bf16_supported() also says yes
    for emulated bfloat16, which runs without bf16 tensor cores. float32 on a GPU lets matrix products
    use TF32 (10-bit mantissa inputs, float32 sums), as autocast's bfloat16 already trades precision."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto" and dtype not in names:
        fail(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    if not device.startswith("cuda"):
        return names.get(dtype, torch.float32)
    if dtype == "auto":
        native_bf16 = torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native_bf16 else torch.float16
    if names[dtype] == torch.float32:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # (cuDNN's convolutions, unused here, default to it)
    return names[dtype]


def autocast(device, dtype):
    """Matrix products in `dtype` inside the context; everything numerically delicate (softmax, layer
    norm, the loss) stays float32, by autocast's own op lists. A no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def grad_scaler(device, dtype):
    """float16 has 5 exponent bits: small gradients underflow to 0. The scaler multiplies the loss by a
    large factor before backward and divides the gradients again, skipping a step (and halving the
    factor) when it finds inf/nan. bfloat16 has float32's range and needs none: disabled = pass-through."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == torch.float16))


def place(model, device, dtype):
    """Store the frozen matrices in `dtype` (in low precision), then move the model to `device`: cast
    first, so that the GPU never holds the float32 copy (GPT-2 Medium: 0.7 GB of bfloat16 block
    weights, not a 1.4 GB load spike). Frozen weights are never updated, so they need no float32
    master copy: this is where an adapter saves most memory. What stays float32: the trainable tensors
    (the adapter, or everything when training the whole model), for the optimizer; vectors (biases,
    layer norms), they are tiny; and the embeddings (wte, wpe, and the output layer tied to wte), so
    that the residual stream, their sum plus every block's output, is added up in float32 as under
    nanoGPT's autocast (a bfloat16 residual rounds each addition to 8 bits of mantissa). Costs GPT-2
    Medium (50,257 + 1,024) x 1,024 values x 2 bytes = 105 MB over bfloat16 embeddings.
    model.compute_dtype records `dtype`: the model runs under autocast to it even when the caller sets
    none up (model.GPT.precision)."""
    if dtype != torch.float32:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        for p in model.parameters():
            if not p.requires_grad and p.dim() >= 2 and p.is_floating_point() and id(p) not in embeddings:
                p.data = p.data.to(dtype)
    model.to(device)
    follow_move(model)
    model.compute_dtype = dtype if dtype != torch.float32 else None
    return model


def follow_move(model):
    """bitsandbytes' int8 weights keep their int8 matrix (CB) and row scales (SCB) in attributes of the
    parameter object, which Module.to keeps while replacing its data: after a move to the GPU they
    would still point at the CPU copies and the first forward fails. Point them at the moved data.
    (NF4 keeps its scales in a quant_state that Params4bit.to moves itself.)"""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is None or not hasattr(w, "SCB"):
            continue
        if w.CB is not None:
            w.CB = w.data
        if w.SCB is not None:
            w.SCB = w.SCB.to(w.device)
        state = getattr(m, "state", None)
        if state is not None and getattr(state, "CB", None) is not None:
            state.CB, state.SCB = w.data, state.SCB.to(w.device)


def reset_peak_memory(device):
    """Start the peak-memory count (peak_memory_mb) afresh: called once the model is placed, so that the
    peak is training's, not the load's. On CPU it resets VmHWM where Linux allows it."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---- files: a checkpoint is a set of files that change together --------------------------------

def write_checkpoint(out_dir, ckpt, write_files):
    """Write ckpt.pt and the files that go with it (`write_files(folder)` writes them: the adapter file,
    or the model) as one set (data.common.write_set): a crash, a kill or a full disk at any moment
    leaves the previous checkpoint's set or this one's, never a mix; a failure says what is kept. Only
    the run's owner (train.py, holding own_folder) calls this."""
    def files(folder):
        write_files(folder)
        with open(os.path.join(folder, CKPT_FILE), "wb") as f:
            torch.save(ckpt, f)

    def kept():
        step = _committed_step(out_dir)
        return f"the checkpoint of step {step} there is kept" if step is not None else "no checkpoint was written"

    write_set(out_dir, files, last=CKPT_FILE, what=f"the checkpoint of step {ckpt['step']} to {out_dir}", kept=kept,
              fix="free disk space or choose another out_dir, then continue with --init_from=resume")


def finish_checkpoint(out_dir):
    """As the run's owner, complete a checkpoint a crash left committed but not moved into place."""
    finish_set(out_dir, CKPT_FILE)


def has_checkpoint(out_dir):
    return os.path.exists(committed_path(out_dir, CKPT_FILE))


def _committed_step(out_dir):
    path = committed_path(out_dir, CKPT_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"] if os.path.exists(path) else None
    except Exception:
        return None


def _reread(folder, name, read):
    """read(the newest committed `name` of folder). Its owner may move that set into place between our
    looking it up and opening it (its old copy is removed first, the new one moved in last), so a file
    that vanished is looked up again: at every instant it is in folder or in folder/.committed."""
    for attempt in range(10):
        try:
            return read(committed_path(folder, name))
        except FileNotFoundError:
            if attempt == 9:
                raise


CKPT_KEYS = ("format", "step", "best_val", "config", "optimizer", "scaler", "rng")


def read_checkpoint(out_dir):
    """The last committed training checkpoint in out_dir; reading changes nothing there (a set its
    owner is still moving into place is read where it is: committed_path)."""
    path = committed_path(out_dir, CKPT_FILE)
    if not os.path.exists(path):
        path = os.path.join(out_dir, CKPT_FILE)
        fail(f"no checkpoint at {path}: train first (python train.py ... --out_dir={out_dir}) or fix out_dir")
    try:
        ckpt = _reread(out_dir, CKPT_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    except Exception as e:
        fail(f"{path} is not a readable checkpoint (truncated, corrupt, or holding more than tensors): "
             f"{type(e).__name__}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "sharelora-train":
        fail(f"{path} was not written by this project's train.py")
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        fail(f"{path} lacks {', '.join(missing) or 'a config'}: it is damaged; train again or restore the file")
    if type(ckpt["step"]) is not int or ckpt["step"] < 0 or not isinstance(ckpt["best_val"], float):
        fail(f"{path} has a damaged step or best_val: train again or restore the file")
    return ckpt


# ---- naming the base model, so that a run folder or a clone can move --------------------------

def base_reference(init_from, folder):
    """How a run in `folder` names its base: a hub name as it is; a local path relative to `folder`,
    starting with ./ or ../ ("." for the folder itself), so that moving a clone, or a run folder
    together with its base, keeps the two connected. Shapes, not the name, prove it is the right base."""
    if not os.path.exists(init_from):
        return init_from
    rel = os.path.relpath(os.path.abspath(init_from), os.path.abspath(folder))
    return rel if rel == "." or rel.startswith("..") else os.path.join(".", rel)


def resolve_base(reference, folder, what, fix="pass the base with --init_from=PATH, or move the run folder back beside it",
                 kind="the base model"):
    """The base a run names, as a path to load (or a hub name). `what` names the file that named it;
    kind, what the path is (the base model, or a data folder)."""
    if reference == "." or reference.startswith(("./", "../", ".\\", "..\\")):
        path = os.path.normpath(os.path.join(folder, reference))
    elif os.path.isabs(reference):
        path = reference  # written by an older version of this project
    else:
        return reference  # a hub name
    if not os.path.exists(path):
        fail(f"{what} was trained on {kind} at {reference!r} (relative to its folder), but {path} "
             f"does not exist: {fix}")
    return path


def load_base(init_from, **overrides):
    if init_from in ("scratch", "resume"):
        fail(f"init_from={init_from} names no weights to load here: give a hub name or a local path")
    try:
        return GPT.from_pretrained(init_from, **overrides)
    except FileNotFoundError as e:
        maker = None if os.path.exists(init_from) else config_writing(init_from)
        check(maker is None, f"init_from {init_from!r} is not a folder here: it is the base that `python train.py "
                             f"{maker}` trains (its comment lists its steps); run that first, or give the folder's path")
        if "hugging face hub" not in str(e).lower():
            raise
        fail(f"{e}, or run `make demo`, which trains a stand-in base here (then init_from=out-demo/base)")


def config_writing(out_dir):
    """The config/ file whose out_dir is `out_dir` (a base another of this project's runs trains:
    config/cpu_demo_e2e.py's out-cpu-demo), or None."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
    wanted = re.compile(rf"^out_dir\s*=\s*[\"']{re.escape(os.path.normpath(out_dir))}[\"']", re.M)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            if name.endswith(".py") and wanted.search(f.read()):
                return os.path.join("config", name)
    return None


def load_model(out_dir=None, adapter=None, init_from=None, device="auto", dtype="auto", merge=True, quantize="auto"):
    """A base model plus (optionally) an adapter, ready for inference. The adapter comes from `adapter`
    (a file) or out_dir/adapter.safetensors; the base from `init_from`, else the base the adapter
    names, else out_dir itself when train.py wrote a whole model there. quantize: none, nf4, int8, or
    auto: as the adapter was trained (its file records it), so that it runs against the base it
    learned on; a quantized base keeps the adapter unmerged (sharelora.merge explains why).
    Returns (model, info); info["quantize"] says what the base is. A run folder is only read: its
    last committed checkpoint (committed_path), whatever its owner is writing meanwhile."""
    if out_dir is not None and not os.path.isdir(out_dir):
        fail(f"out_dir {out_dir} is not a folder: give the folder of a training run")
    try:
        return _load_model(out_dir, adapter, init_from, device, dtype, merge, quantize)
    except (FileNotFoundError, ValueError, UserError) as e:
        if out_dir is None or COMMITTED not in str(e):
            raise
        # the run's owner moved the newest checkpoint out of .committed while we read it: read it where it is now
        return _load_model(out_dir, adapter, init_from, device, dtype, merge, quantize)


def _load_model(out_dir, adapter, init_from, device, dtype, merge, quantize):
    if adapter is None and out_dir is not None and os.path.exists(committed_path(out_dir, ADAPTER_FILE)):
        adapter = committed_path(out_dir, ADAPTER_FILE)
    info = {"adapter": adapter}
    if adapter is not None:
        config, meta, _ = sharelora.read_adapter(adapter)
        if init_from is None and meta.get("base") is None:
            fail(f"{adapter} does not name its base model: pass init_from")
        home = os.path.dirname(adapter)  # the base is named relative to the run folder, the adapter's folder
        if os.path.basename(home) == COMMITTED:  # ... or its parent, for a set read while its owner moves it
            home = os.path.dirname(home)
        info.update(config=config, base=init_from or resolve_base(meta["base"], home, adapter))
    elif init_from is not None:
        info["base"] = init_from
    elif out_dir is not None and os.path.exists(committed_path(out_dir, "model.safetensors")):
        info["base"] = os.path.dirname(committed_path(out_dir, "model.safetensors"))
    else:
        if os.path.exists(committed_path(out_dir, "bank.safetensors")):
            fail(f"{out_dir} is a joint run (train.py --tasks): it holds bank.safetensors, not one adapter: pass "
                 f"--bank={os.path.join(out_dir, 'bank.safetensors')}, or export a task with `python bank.py export`")
        fail(f"found neither {ADAPTER_FILE} nor model.safetensors in {out_dir}: pass out_dir of a "
             "training run, an adapter file, or init_from")
    trained_on = (meta.get("base_quantized") or "none") if adapter is not None else "none"
    device = pick_device(device)
    info.update(device=device, dtype=pick_dtype(dtype, device))
    if adapter is None and quantize not in ("auto", "none"):
        fail(f"quantize={check_kind(quantize)} is for a base under an adapter, and {out_dir} holds a whole model")
    model = base_as_trained(info, trained_on, quantize)
    if adapter is not None:
        sharelora.load_adapter(model, adapter)
        if merge and info["quantize"] == "none":
            sharelora.merge(model)  # inference at the base model's cost
    place(model, device, info["dtype"]).eval()
    return model, info


def base_as_trained(info, trained_on, quantize):
    """The base info["base"] loaded and, before any adapter wraps its layers (as train.py does it),
    quantized: quantize=auto as the adapters were trained (trained_on: none, nf4 or int8), else as
    asked. Records both in info ("quantize", "trained_on"); info["dtype"] is the compute dtype."""
    info.update(quantize=trained_on if quantize == "auto" else check_kind(quantize), trained_on=trained_on)
    model = load_base(info["base"])
    if info["quantize"] != "none":
        quantize_base(model, info["quantize"], compute_dtype=info["dtype"])
    return model


def base_note(info):
    """load_model's base, in words, when it is quantized or differs from what the adapter was trained on."""
    if info["quantize"] == info["trained_on"]:
        return f" ({info['quantize']})" if info["quantize"] != "none" else ""
    return f" (quantize={info['quantize']}; the adapter was trained with quantize={info['trained_on']})"


def peak_memory_mb(device):
    """Peak memory of this process since reset_peak_memory (or its start): allocated tensors on the
    CUDA device; on CPU the peak resident set (VmHWM: tensors plus the Python process itself, ~300 MB
    of it torch's own code and data)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource  # not Linux: ru_maxrss is in KB on Linux-likes, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def machine(device="auto"):
    """One line naming the hardware and software a measurement came from."""
    import platform
    device = pick_device(device)
    if device.startswith("cuda"):
        hw = torch.cuda.get_device_name(device)
    else:
        hw = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                hw = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return (f"{hw}, {device}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def json_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(path, step):
    """Keep the records of metrics.jsonl up to `step`, the checkpoint a run resumes from: the steps a
    crash or Ctrl-C lost are trained again and logged again, so their old lines go (a line half-written
    by a kill goes too). Rewritten atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", record.get("done", 0)) <= step:
                kept.append(line)
    write_text(path, "".join(kept))


@contextlib.contextmanager
def no_empty_folder_left(path):
    """Around a command that creates the folder `path`: if the command ends (fails, mostly) with
    nothing written in a folder it created, the folder goes again, so that a failed start leaves no
    trace. os.rmdir removes only an empty folder: nothing written is ever removed. Under torchrun only
    process 0, which makes the folder, removes it: another process that failed first would take it away
    under process 0's first write (seen: "cannot write in out_dir (No such file or directory)")."""
    created = not os.path.exists(path) and torchrun_rank() == "0"
    try:
        yield
    finally:
        if created:
            try:
                os.rmdir(path)
            except OSError:  # not empty (the command wrote there), or never made, or not ours to remove
                pass


def writable_folder(path, option):
    """Create the folder `path` if needed and check that files can be written in it, so that a mistake
    shows before minutes of work rather than at the first save."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{option} {path} is a file, not a folder: choose a folder name")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write in {option} {path} ({e.strerror or e}): choose a folder you can write to")
