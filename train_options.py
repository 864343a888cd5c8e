"""
train.py's options: their defaults (TrainConfig), reading them from a config file and the command line
(parse_args), checking every value before anything is loaded (check_options), and what a resumed run
takes from its checkpoint (resumed_config). The standard library only, so that a typo is reported at
once, before the seconds that importing torch takes.

How options are given: USAGE below, which `python train.py --help` prints.
"""
import dataclasses
import difflib
import os
import re
import runpy
import sys
from dataclasses import dataclass, fields

from data.common import FLOAT32_MAX, SEED, TEXT, Bound, check, fail

USAGE = """usage:
    python train.py config/e2e_gpt2m_sharea.py                 # a recipe from config/
    python train.py config/cpu_demo_e2e.py --max_iters=100     # a recipe plus overrides
    python train.py --help                                     # every option and its default

Options come from three places, later ones winning: the defaults (listed below), a Python file
of `name = value` lines, and `--name=value` arguments. Every value is checked against the type of its
default; an unknown name is an error that suggests the closest ones.
"""


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
    tasks: str = ""  # NAME=DATA_DIR,NAME=DATA_DIR,...: train them jointly, one shared A, one B each (bank.py)
    task_mix: str = "round_robin"  # tasks: each step's task in turn, or drawn in proportion to its training tokens
    # the adapter (see sharelora.py and docs/METHOD.md); adapter=none trains the whole model
    adapter: str = "sharea"  # lora | sharea | shareb | shareab | tied | vera | shareqkv | none
    spec: str = ""  # overrides the preset, e.g. "A=shared/frozen B=layer"
    r: int = 8
    alpha: float = 16.0
    adapter_dropout: float = 0.0
    targets: str = "q,v"
    adapter_seed: int = 0
    init_adapter: str = ""  # start from this adapter file's tensors (e.g. task 1's shared A, frozen by spec), or a bank's A
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
    log_interval: int = 10  # steps between reads of the loss from the device (each waits for the GPU); one metrics line per step still
    eval_iters: int = 20
    eval_prompt: str = ""  # if set, one greedy sample of `sample_tokens` tokens at every eval
    sample_tokens: int = 40
    # system
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337


TASK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # it names a results folder and tensor keys: short, ASCII
MAX_TASKS = 64  # a bank stacks every task's B: 64 x GPT-2 small's ShareA B's is 38 MB


def task_folders(text):
    """{name: data folder} from --tasks=NAME=DATA_DIR,...; None if it is not that."""
    pairs = [item.partition("=")[::2] for item in text.split(",")]
    names = [n for n, _ in pairs]
    ok = 1 <= len(pairs) <= MAX_TASKS and len(set(names)) == len(names) and \
        all(TASK_NAME.fullmatch(n) and folder.strip() for n, folder in pairs)
    return dict(pairs) if ok else None


# what init_from=resume takes from the command line; everything else comes from the checkpoint
RESUME_OPTIONS = ("max_iters", "lr_decay_iters", "eval_interval", "log_interval", "eval_iters", "device", "compile")

def parse_args(argv):
    """[config_file.py] [--key=value ...] -> TrainConfig; mistakes raise UserError (data.common)."""
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    values = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(USAGE + "\noptions (default):\n" + "\n".join(
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


# Every option's type and range, upper bounds included. The upper bounds are far beyond any model here
# (GPT-2 XL: 48 layers of width 1,600, 25 heads, a context of 1,024) and what one machine can hold, so
# that a typo such as --n_layer=10**23 is refused at once instead of filling memory for minutes, and a
# step always ends (a stop signal is honoured between steps: --grad_accum=7.8e18 would never end one).
# tools/compare.py, sample.py and evaluate_e2e.py use these same bounds for the options they share.
UNIT = Bound(float, 0, 1, open_hi=True)
ITERS = Bound(int, 0, 10**9)
NUMBER = Bound(float, 0, FLOAT32_MAX)
BOUNDS = {
    "n_layer": Bound(int, 1, 1024), "n_head": Bound(int, 1, 1024), "n_embd": Bound(int, 1, 2**16),
    "block_size": Bound(int, 1, 2**20), "dropout": UNIT, "adapter_dropout": UNIT,
    "r": Bound(int, 1, 2**16), "alpha": Bound(float, -FLOAT32_MAX, FLOAT32_MAX),
    "batch_size": Bound(int, 1, 2**16), "grad_accum": Bound(int, 1, 2**12), "max_iters": ITERS,
    "learning_rate": NUMBER, "min_lr": NUMBER, "warmup_iters": ITERS, "lr_decay_iters": ITERS,
    "weight_decay": NUMBER, "beta1": UNIT, "beta2": UNIT, "grad_clip": NUMBER, "label_smoothing": UNIT,
    "eval_interval": Bound(int, 1, 10**9), "log_interval": Bound(int, 1, 10**9), "eval_iters": Bound(int, 1, 10**6),
    "sample_tokens": Bound(int, 1, 2**20), "seed": SEED, "adapter_seed": SEED,
    "tasks": Bound(str, test=lambda v: v == "" or task_folders(v) is not None,
                   what=f"NAME=DATA_DIR pairs separated by commas, 1 to {MAX_TASKS} distinct names of 1 to 64 ASCII letters, "
                        "digits, _ or - (e.g. e2e=data/e2e,parse=data/e2e_parse), or empty"),
    "task_mix": Bound(str, test=lambda v: v in ("round_robin", "proportional"), what="round_robin or proportional"),
    "out_dir": TEXT, "init_from": TEXT, "dataset": TEXT, "targets": TEXT,
    "adapter": Bound(str, test=lambda v: v.strip() != "", what="a preset name or none"),
    "decay": Bound(str, test=lambda v: v in ("linear", "cosine", "constant"), what="linear, cosine or constant"),
    "quantize": Bound(str, test=lambda v: v in ("none", "nf4", "int8"), what="none, nf4 or int8"),
    "device": Bound(str, test=lambda v: v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()),
                    what="auto, cpu, cuda, cuda:N or mps"),
    "dtype": Bound(str, test=lambda v: v in ("auto", "float32", "bfloat16", "float16"),
                   what="auto, float32, bfloat16 or float16"),
}  # data_dir, spec, eval_prompt and init_adapter may be empty (none); bools are checked by their type
MAX_SCRATCH_PARAMETERS = 10**10  # a model from scratch: ~7x GPT-2 XL, 40 GB in float32 before any training


def check_options(cfg):
    """Refuse every value that cannot train, naming the option, before anything is loaded or written:
    each option against BOUNDS, then the rules that tie options together."""
    for name, bound in BOUNDS.items():
        why = bound.problem(getattr(cfg, name))
        check(why is None, f"{name} must be {why}, not {getattr(cfg, name)!r}")
    width = 12 * cfg.n_layer * cfg.n_embd ** 2 + (50304 + cfg.block_size) * cfg.n_embd  # blocks + embeddings
    rules = [
        ("n_embd", cfg.n_embd % cfg.n_head == 0,
         f"a positive multiple of n_head ({cfg.n_head}): each head gets n_embd / n_head channels"),
        ("n_layer", cfg.init_from != "scratch" or width <= MAX_SCRATCH_PARAMETERS,
         f"smaller together with n_embd={cfg.n_embd}: a model from scratch of {width:.2g} parameters is beyond "
         f"{MAX_SCRATCH_PARAMETERS:.0e}"),
        ("min_lr", cfg.min_lr <= cfg.learning_rate, "in [0, learning_rate]"),
        ("task_mix", cfg.tasks or cfg.task_mix == "round_robin", "round_robin without tasks: it says how tasks take turns"),
        ("quantize", cfg.quantize == "none" or cfg.adapter != "none",
         "none when adapter=none: a quantized base is frozen, so only an adapter can train on it"),
        # a base from scratch is saved as dequant(W) beside its adapter, and NF4 with double quantization
        # does not give the same 4-bit weights twice (5e-6 apart): resume would not be exact
        ("quantize", cfg.quantize == "none" or cfg.init_from != "scratch",
         "none with init_from=scratch: quantize a base that was loaded (a hub name or a path)"),
    ]
    for name, ok, what in rules:
        check(ok, f"{name} must be {what}, not {getattr(cfg, name)!r}")
    joint_conflicts = [("adapter", cfg.adapter == "none"), ("init_from", cfg.init_from == "scratch"),
                       ("quantize", cfg.quantize != "none"), ("data_dir", cfg.data_dir != ""),
                       ("eval_prompt", cfg.eval_prompt != "")]
    clash = next((name for name, bad in joint_conflicts if bad), None)
    check(not cfg.tasks or clash is None,
          f"tasks does not go with {clash}={getattr(cfg, clash or 'tasks')!r}: joint training adapts a loaded, "
          "unquantized base (train one first with adapter=none), reads each task's DATA_DIR and samples no "
          f"eval_prompt; change or drop {clash}")


def early_options(argv):
    """The options, checked as far as the standard library can: a typo or a bad value is reported at
    once, not after the seconds that importing torch takes. (A resumed run's options come later, from
    its checkpoint.)"""
    cfg = parse_args(argv)
    if cfg.init_from != "resume":
        check_options(cfg)


def resumed_config(cfg, stored, out_dir):
    """The options of a run that resumes from out_dir: those stored in its checkpoint (`stored`), with the
    few RESUME_OPTIONS the command line may change to extend it. Any other option given now to another
    value than the run has (--quantize=none on an nf4 run too) is refused."""
    defaults = TrainConfig()
    given = getattr(cfg, "given", {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)})
    fixed = sorted(k for k in given - set(RESUME_OPTIONS) - {"init_from", "out_dir"}
                   if getattr(cfg, k) != stored.get(k, getattr(defaults, k)))
    if fixed:
        fail(f"{fixed[0]} cannot change when a run resumes (it continues as it was configured); "
             f"resume with only {', '.join(RESUME_OPTIONS)}, or start a new run in another out_dir")
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    unknown = sorted(set(stored) - set(types))
    if unknown:
        fail(f"the checkpoint in {out_dir} has options this train.py does not know ({', '.join(unknown)}): "
             "resume it with the version of this project that wrote it")
    stored = {k: _check(k, v, types[k], f"the checkpoint in {out_dir}") for k, v in stored.items()}
    stored.setdefault("group_by_length", False)  # runs saved before the option existed had random batches
    changed = {k: getattr(cfg, k) for k in RESUME_OPTIONS if k in given}
    return dataclasses.replace(TrainConfig(**stored), **changed, out_dir=out_dir)
