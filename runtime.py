"""
What train.py, sample.py and the evaluation scripts share, written once: user errors as one sentence,
device and precision choices, atomic checkpoint files, and loading a base model plus an adapter.
"""
import contextlib
import json
import os
import sys

import torch

import sharelora
from model import GPT

ADAPTER_FILE, CKPT_FILE = "adapter.safetensors", "ckpt.pt"


# ---- errors a user can cause: one sentence, exit code 2, no traceback ------------------------

class UserError(Exception):
    """Bad input that the user can fix: printed as `error: <message>`, exit code 2."""


def fail(message):
    raise UserError(message)


def run(main, *args):
    """Call main(*args) and turn the user's mistakes into one line on stderr and exit code 2.
    ValueError and FileNotFoundError are what model.py and sharelora.py raise for bad input (unknown
    preset, adapter for another base, missing weights). SHARELORA_TRACEBACK=1 shows the traceback."""
    try:
        return main(*args)
    except (UserError, ValueError, FileNotFoundError) as e:
        if os.environ.get("SHARELORA_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
    """auto: bfloat16 on a GPU that has it (Ampere and newer: same range as float32, no loss scaling),
    float16 on older GPUs (with a GradScaler, see grad_scaler), float32 on CPU and MPS, where low
    precision is slower or less supported (bfloat16 on CPU runs when asked for: it halves memory)."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        fail(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
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
    """Move the model to `device`; in low precision, store the frozen matrices in `dtype`.
    Frozen weights are never updated, so they need no float32 master copy: this is where an adapter
    saves most memory (GPT-2 Medium: 1.4 GB of float32 weights -> 0.7 GB). Trainable tensors (the
    adapter, or everything when training the whole model) stay float32 for the optimizer; vectors
    (biases, layer norms) stay float32 too, they are tiny."""
    model.to(device)
    if dtype != torch.float32:
        for p in model.parameters():
            if not p.requires_grad and p.dim() >= 2 and p.is_floating_point():
                p.data = p.data.to(dtype)
    return model


# ---- files -----------------------------------------------------------------------------------

def atomic_save(obj, path):
    """torch.save to a temporary file, then rename over `path`: a crash mid-write leaves the previous
    checkpoint whole (os.replace is atomic on POSIX and Windows)."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(out_dir):
    path = os.path.join(out_dir, CKPT_FILE)
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: train first (python train.py ... --out_dir={out_dir}) or fix out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint (truncated or corrupt?): {type(e).__name__}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "sharelora-train":
        fail(f"{path} was not written by this project's train.py")
    return ckpt


def base_identity(init_from):
    """How an adapter names its base: a hub name as it is, a local path made absolute."""
    return os.path.abspath(init_from) if os.path.exists(init_from) else init_from


def load_base(init_from, **overrides):
    if init_from in ("scratch", "resume"):
        fail(f"init_from={init_from} names no weights to load here: give a hub name or a local path")
    return GPT.from_pretrained(init_from, **overrides)


def load_model(out_dir=None, adapter=None, init_from=None, device="auto", dtype="auto", merge=True):
    """A base model plus (optionally) an adapter, ready for inference. The adapter comes from `adapter`
    (a file) or out_dir/adapter.safetensors; the base from `init_from`, else the base the adapter
    names, else out_dir itself when train.py wrote a whole model there. Returns (model, info)."""
    if adapter is None and out_dir is not None and os.path.exists(os.path.join(out_dir, ADAPTER_FILE)):
        adapter = os.path.join(out_dir, ADAPTER_FILE)
    info = {"adapter": adapter}
    if adapter is not None:
        config, meta, _ = sharelora.read_adapter(adapter)
        info.update(config=config, base=init_from or meta["base"])
        if info["base"] is None:
            fail(f"{adapter} does not name its base model: pass init_from")
    elif init_from is not None:
        info["base"] = init_from
    elif out_dir is not None and os.path.exists(os.path.join(out_dir, "model.safetensors")):
        info["base"] = out_dir
    else:
        fail(f"found neither {ADAPTER_FILE} nor model.safetensors in {out_dir}: pass out_dir of a "
             "training run, an adapter file, or init_from")
    model = load_base(info["base"])
    if adapter is not None:
        sharelora.load_adapter(model, adapter)
        if merge:
            sharelora.merge(model)  # inference at the base model's cost
    device = pick_device(device)
    info.update(device=device, dtype=pick_dtype(dtype, device))
    place(model, device, info["dtype"]).eval()
    return model, info


def peak_memory_mb(device):
    """Peak memory of this process so far: allocated tensors on CUDA; on CPU the peak resident set
    (VmHWM: tensors plus the Python process itself, ~300 MB of it torch's own code and data)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
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
