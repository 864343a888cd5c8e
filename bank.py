"""
An adapter bank: many tasks' adapters around one A, in one file, served in one mixed batch.

When task k + 1 is trained with task 1's A frozen (train.py --init_adapter=task1.safetensors
--spec="A=shared/frozen B=layer"), every task's update is s · v_t ⊙ B_t (u_t ⊙ A x) with the same A.
A batch whose rows belong to different tasks then needs A x only once, for all its rows, whatever the
mix; each row adds its own task's r-wide product B_t h. PEFT's mixed batch (adapter_names=) instead runs
every present adapter's A and B on its rows. So:

    bank = Bank.build({"e2e": "e2e.safetensors", "parse": "parse.safetensors"})   # refused if A differs
    bank.save("tasks.safetensors")
    attach(model, Bank.read("tasks.safetensors"))     # the base model, in place: inference only
    with tasks(model, ["e2e", "parse", "e2e"]):       # one task per row of the batch
        out = model.generate(idx, 20, temperature=0)  # the KV cache, greedy or sampled; beam search too
    bank.export("parse", "parse.safetensors")          # one task alone: a normal adapter file again

The file is sharelora's safetensors layout: the shared A under its adapter-file key
(transformer.h.*.attn.q.lora_A), each task's tensors under tasks.NAME.KEY; the metadata holds the
base's identity and shapes, and per task its configuration, parameter count and a sha256 fingerprint
(checked on reading: a damaged file is refused). The command line does the same:

    python bank.py build tasks.safetensors e2e=e2e.safetensors parse=parse.safetensors
    python bank.py add tasks.safetensors shakespeare=shakespeare.safetensors
    python bank.py remove tasks.safetensors parse
    python bank.py export tasks.safetensors e2e e2e_alone.safetensors
    python bank.py list tasks.safetensors
    python sample.py --bank=tasks.safetensors --tasks=e2e,parse --start="..."      # every task, one batch
    python tools/evaluate_e2e.py --bank=tasks.safetensors --tasks=e2e,parse=data/e2e_parse  # scores per task
    python train.py --init_from=BASE --tasks=e2e=data/e2e,parse=data/e2e_parse    # tasks trained jointly (part 3)

docs/bank.md has the measurement against PEFT's mixed batch.
"""
import contextlib
import hashlib
import json
import os
import random
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import sharelora
from sharelora import COMPONENTS, AdapterConfig
from train_options import TASK_NAME  # a name goes into tensor keys (tasks.NAME.KEY); train.py --tasks checks it early

FORMAT = "sharelora-bank"
BANK_FILE = "bank.safetensors"  # what train.py --tasks writes into out_dir with each checkpoint


# ---- 1. The bank: one A, every task's B, u, v ----------------------------------------------------

def _layout(config):
    """What every adapter of a bank must share to run in one batch: the rank, the scale, the maps, the
    placements. Not the training flags (task 2 freezes the A that task 1 trained), dropout or seed
    (the bank stores every tensor, frozen random ones too)."""
    comps = config.components()
    return {"r": config.r, "scale": config.scale, "targets": sorted(config.targets), "split": config.split,
            "layer_pattern": config.layer_pattern, "share": comps["share"],
            "placements": [comps[x][0] for x in COMPONENTS]}


def _all_tensors(path):
    """(config, metadata, {key: tensor}) of an adapter file, with the frozen tensors it stores as seed
    and fingerprint only (VeRA's A and B) rebuilt, so that two files compare tensor by tensor."""
    config, meta, tensors = sharelora.read_adapter(path)
    if config.modules_to_save:
        raise ValueError(f"{path} trains {', '.join(config.modules_to_save)} whole (modules_to_save), which one "
                         "batch cannot switch per row: a bank holds adapters without modules_to_save")
    comps = config.components()
    groups = sharelora.group_maps(meta["shapes"], config.layer_pattern, comps["share"])
    for group, names in groups.items():
        for name in names:
            for x in COMPONENTS:
                key = sharelora._key(name, x, comps, group)
                if comps[x][0] != "off" and key not in tensors:  # read_adapter checked its fingerprint
                    tensors[key] = sharelora._initial_value(x, key, tuple(meta["shapes"][name]), config.r, comps,
                                                            sharelora._zero_factor(comps), config.seed).detach()
    return config, meta, {k: t.float() for k, t in tensors.items()}


def _fingerprint(tensors):
    """sha256 of tensors' names and bytes, 16 hex digits: equal tensors, equal fingerprints."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode() + b"\0" + tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _local(reference):
    return isinstance(reference, str) and (reference == "." or reference.startswith(("./", "../", ".\\", "..\\")))


def _absolute(reference, folder):
    """train.py names a local base relative to the adapter's folder (runtime.base_reference): the bank
    holds it as an absolute path, so that adapters from different folders compare, and writes it
    relative to its own file's folder again (_relative)."""
    return os.path.abspath(os.path.join(folder, reference)) if _local(reference) else reference


def _relative(reference, path):
    if reference is None or not os.path.isabs(reference):
        return reference
    rel = os.path.relpath(reference, os.path.dirname(os.path.abspath(path)))
    return rel if rel == "." or rel.startswith("..") else os.path.join(".", rel)


def _is_a(key):
    return key.endswith(".lora_A")


def _missing(base):
    """Whether base names a local folder that is not there (a hub name is never missing here)."""
    return base is not None and os.path.isabs(base) and not os.path.exists(base)


def _first_difference(theirs, ours):
    """'MAP: [d_out, d_in] against [...]' for the first map whose shape (or presence) differs."""
    name = next(n for n in sorted(set(theirs) | set(ours)) if theirs.get(n) != ours.get(n))
    return f"{name}: {theirs.get(name, 'absent')} against {ours.get(name, 'absent')}"


def _checksum(metadata):
    """sha256 of a bank file's metadata (every value, canonical JSON), 16 hex digits: a flipped byte of
    the header that still reads (alpha 16.0 -> 36.0, a shape, a path) changes it."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]


def is_bank(path):
    """Whether path is a bank file (and not, say, an adapter file)."""
    try:
        return sharelora._read_safetensors(path)[1].get("format") == FORMAT
    except (ValueError, OSError):
        return False


class Bank:
    """The shared A tensors ({key: tensor}, every key ending in .lora_A), the base they were trained on
    (base: its name, shapes: {map: [d_out, d_in]}, quantized: as in an adapter file) and the tasks, in
    order (their index is the row's task in a mixed batch): {name: {"config": AdapterConfig,
    "tensors": {key: tensor}, "source": file name}}."""

    def __init__(self, shared, base, shapes, quantized, tasks):
        self.shared, self.base, self.shapes, self.quantized, self.tasks = shared, base, shapes, quantized, tasks

    @classmethod
    def build(cls, adapters):
        """A bank from {task name: adapter file}, the first file's A being the bank's."""
        bank = None
        for name, path in adapters.items():
            if bank is None:
                config, meta, tensors = _all_tensors(path)
                bank = cls({k: t for k, t in tensors.items() if _is_a(k)},
                           _absolute(meta.get("base"), os.path.dirname(os.path.abspath(path))), meta["shapes"],
                           meta.get("base_quantized"), {})
            bank.add(name, path)
        if bank is None:
            raise ValueError("a bank needs at least one adapter file")
        return bank

    @property
    def names(self):
        return list(self.tasks)

    def add(self, name, path):
        """Add the adapter file at path as task `name`, refused in one sentence unless it was trained on
        the bank's base, in the bank's layout, around the bank's A. The other tasks are left as they are."""
        if not TASK_NAME.fullmatch(name) or name in self.tasks:
            raise ValueError(f"task name {name!r} is {'a task of the bank already' if name in self.tasks else 'not 1 to 64 ASCII letters, digits, _ or -'}"
                             ": choose another")
        config, meta, tensors = _all_tensors(path)
        if self.tasks:
            first = next(iter(self.tasks.values()))["config"]
            if _layout(config) != _layout(first):
                raise ValueError(f"{path} is a {config.describe()} adapter of r={config.r} on {','.join(config.targets)}, "
                                 f"the bank's are {first.describe()} of r={first.r} on {','.join(first.targets)}: a "
                                 "bank holds adapters of one layout (rank, scale, targets, placements)")
        base = _absolute(meta.get("base"), os.path.dirname(os.path.abspath(path)))
        if (base, meta.get("base_quantized")) != (self.base, self.quantized):
            moved = (f" ({self.base} does not exist: a bank names its base relative to its own folder, so keep the "
                     "bank where its base is found)" if _missing(self.base) else "")
            raise ValueError(f"{path} was trained on base {base!r} (quantized: {meta.get('base_quantized')}), the bank's "
                             f"tasks on {self.base!r} (quantized: {self.quantized}){moved}: a bank holds adapters of one base")
        if meta["shapes"] != self.shapes:
            raise ValueError(f"{path} was trained on maps of other shapes than the bank's tasks, so on another base "
                             f"of that name (e.g. {_first_difference(meta['shapes'], self.shapes)}): a bank holds "
                             "adapters of one base")
        differ = sorted(k for k in tensors.keys() & self.shared.keys() if not torch.equal(tensors[k], self.shared[k]))
        if differ or {k for k in tensors if _is_a(k)} != self.shared.keys():
            raise ValueError(f"{path}'s A ({(differ or sorted(self.shared))[0]}) is not the bank's: train the task with "
                             f"--init_adapter=<a task of the bank> and A frozen (--spec=\"A=shared/frozen B=layer\")")
        where = os.path.abspath(path)  # its folder and name, which say which run it came from
        self.tasks[name] = {"config": config, "source": os.path.join(os.path.basename(os.path.dirname(where)),
                                                                     os.path.basename(where)),
                            "tensors": {k: t for k, t in tensors.items() if not _is_a(k)}}
        return self

    def remove(self, name):
        self._require(name)
        if len(self.tasks) == 1:
            raise ValueError(f"{name} is the bank's last task: delete the file instead")
        del self.tasks[name]
        return self

    def _require(self, name):
        if name not in self.tasks:
            raise ValueError(f"the bank has no task {name!r}; its tasks are {', '.join(self.tasks)}")

    def save(self, path):
        """One safetensors file, written atomically (sharelora's writer)."""
        tensors = dict(self.shared)
        listing = []
        for name, task in self.tasks.items():
            tensors.update({f"tasks.{name}.{k}": t for k, t in task["tensors"].items()})
            listing.append({"name": name, "config": asdict(task["config"]), "source": task["source"],
                            "count": sum(t.numel() for t in task["tensors"].values()),
                            "fingerprint": _fingerprint(task["tensors"])})
        metadata = {"format": FORMAT, "version": "1", "base": json.dumps(_relative(self.base, path)), "shapes": json.dumps(self.shapes),
                    "base_quantized": json.dumps(self.quantized), "tasks": json.dumps(listing),
                    "shared": json.dumps({"count": sum(t.numel() for t in self.shared.values()),
                                          "fingerprint": _fingerprint(self.shared)})}
        metadata["checksum"] = _checksum(metadata)
        sharelora._write_safetensors(path, tensors, metadata)

    @classmethod
    def read(cls, path):
        """The bank in a file that save wrote; a ValueError naming the file for anything else, or for a
        tensor whose bytes no longer match the fingerprint taken when it was saved."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no bank file at {path}: give the path of a file that `python bank.py build` "
                                    "or a joint train.py run (out_dir/bank.safetensors) wrote")
        try:
            tensors, meta = sharelora._read_safetensors(path)
            if meta.get("format") == "sharelora":
                raise ValueError("it is an adapter file, not a bank: build one with `python bank.py build`")
            if meta.get("format") != FORMAT:
                raise ValueError("it has no bank metadata")
            # (banks written before 2026-12-03 have no checksum: their tensors' fingerprints are still checked)
            if "checksum" in meta and _checksum({k: v for k, v in meta.items() if k != "checksum"}) != meta["checksum"]:
                raise ValueError("its metadata differs from its checksum (damaged?)")
            listing, shared = json.loads(meta["tasks"]), json.loads(meta["shared"])
            base, shapes, quantized = (json.loads(meta[k]) for k in ("base", "shapes", "base_quantized"))
            tasks = {e["name"]: {"config": AdapterConfig(**e["config"]), "source": e["source"],
                                 "tensors": {k[len(f"tasks.{e['name']}."):]: t for k, t in tensors.items()
                                             if k.startswith(f"tasks.{e['name']}.")}} for e in listing}
            base = _absolute(base, os.path.dirname(os.path.abspath(path)))
            bank = cls({k: t for k, t in tensors.items() if not k.startswith("tasks.")}, base, shapes, quantized, tasks)
            for e in [*listing, {"name": "(shared A)", **shared}]:
                held = tasks[e["name"]]["tensors"] if e["name"] in tasks else bank.shared
                if _fingerprint(held) != e["fingerprint"]:
                    raise ValueError(f"the tensors of {e['name']} differ from their fingerprint (damaged?)")
        except (ValueError, KeyError, TypeError, OSError) as e:  # json's errors are ValueErrors
            raise ValueError(f"{path} is not a readable adapter bank: {e}; build it again (python bank.py build) "
                             "or copy it again from where it was made") from None
        return bank

    def export(self, name, path):
        """Task `name` alone as a normal adapter file (sharelora.load_adapter, export_peft and export_merged
        take it), its frozen tensors included."""
        self._require(name)
        if os.path.exists(path):
            raise ValueError(f"{path} exists: export writes a new file, never over one (choose another name)")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"the folder of {path} does not exist: create it first, or choose another place")
        task = self.tasks[name]
        sharelora._write_safetensors(path, {**self.shared, **task["tensors"]}, {
            "format": "sharelora", "version": "1", "config": json.dumps(asdict(task["config"])),
            "base": json.dumps(_relative(self.base, path)), "shapes": json.dumps(self.shapes), "regenerated": json.dumps({}),
            "base_quantized": json.dumps(self.quantized)})

    def summary(self):
        """One line per task: name, trained parameters, fingerprint; then the shared A."""
        lines = [f"{n:<16} {sum(t.numel() for t in task['tensors'].values()):>10,} parameters  "
                 f"{_fingerprint(task['tensors'])}  (from {task['source']})" for n, task in self.tasks.items()]
        return "\n".join(lines + [f"{'shared A':<16} {sum(t.numel() for t in self.shared.values()):>10,} parameters  "
                                  f"{_fingerprint(self.shared)}  base {self.base!r}"])


# ---- 2. Mixed batches: A x once, each row's B ----------------------------------------------------

class TaskRows:
    """The task of each row of the batch ((rows,) long, or None), read by every MixedLinear of a model;
    or one task's index (an int) for a whole batch of that task (joint training's batches). Beam search
    keeps it in step with the KV cache through reorder()."""

    def __init__(self, names):
        self.names, self.index, self.gathered = names, None, {}

    def set(self, index):
        self.index, self.gathered = index, {}

    def reorder(self, rows):
        """Keep the rows `rows` (the index KVCache.reorder is given)."""
        if torch.is_tensor(self.index):
            self.set(self.index[rows.to(self.index.device)])

    def factor(self, m, dtype):
        """What the MixedLinear m multiplies its r-wide A x by: s · diag(u_t) · B_t^T (v_t is in B_t
        already), with zero columns for the other parts of a fused map (m.rows); (r, d_out) for one task's
        batch, (rows, r, d_out) for a batch of one task per row. Made once per set of tasks and kept
        until they change, so that every decoding step of a generation reuses it: the per-step product
        is then one addmm or baddbmm onto the base map's output, with no gather, scale, pad or add
        (python tools/bench_bank.py --products). It holds rows x r x d_out numbers per B (d_out the
        fused map's whole width) while the tasks are set. Not while autograd records: the graph would
        be kept; nor for a fresh stack (a trainable bank's ParameterList, not for inference)."""
        B, u = m.lora_B, m.lora_u
        keep = all(t is None or (isinstance(t, nn.Parameter) and not (torch.is_grad_enabled() and t.requires_grad))
                   for t in (B, u))
        key = (id(B), id(u), m.rows, m.scale, B._version, u is not None and u._version, dtype) if keep else None
        if key in self.gathered:  # a B (and u) shared by several maps: one entry
            return self.gathered[key]
        if not isinstance(self.index, int):
            B, u = _stack(B), _stack(u)
        W = B[self.index].to(dtype) * m.scale  # (d_out, r) or (rows, d_out, r)
        if u is not None:
            W = W * u[self.index].to(dtype).unsqueeze(-2)
        if m.rows is not None:  # a part of a fused map (AdaptedLinear.rows): zeros for the other parts
            start, stop, period = m.rows
            W = F.pad(W.unflatten(-2, (-1, stop - start)), (0, 0, start, period - stop)).flatten(-3, -2)
        W = W.transpose(-1, -2).contiguous()
        if key:
            self.gathered[key] = W
        return W


def _stack(t):
    """(tasks, ...) from a trainable bank's ParameterList (one Parameter per task); a tensor as it is."""
    return torch.stack(list(t)) if isinstance(t, nn.ParameterList) else t


class MixedLinear(nn.Module):
    """A frozen linear map plus s · v_t ⊙ B_t (u_t ⊙ A x), t being each row's task. v_t is folded into
    B_t once, at attach (diag(v_t) B_t, as AdaptedLinear folds it per call); s and u_t into each
    row's factor, once per set of tasks (TaskRows.factor). B is stacked (tasks, d_out, r), u (tasks, r);
    in a trainable bank each is a ParameterList of the tasks' own (d_out, r) and (r,). dropout and memo
    are the AdaptedLinear's it replaces (sharelora.project: adapter dropout in training; A x once for
    maps that share it)."""

    def __init__(self, base, A, B, u, scale, rows, task_rows, dropout, memo):
        super().__init__()
        self.base, self.lora_A, self.lora_B, self.lora_u = base, A, B, u
        self.scale, self.rows, self.task_rows, self.dropout, self.memo = scale, rows, task_rows, dropout, memo

    @property
    def weight(self):  # as AdaptedLinear's: code reading `module.weight` (dtype, device) keeps working
        return self.base.weight

    def forward(self, x):
        index = self.task_rows.index
        if index is None or (torch.is_tensor(index) and index.numel() != x.size(0)):
            raise ValueError(f"the batch has {x.size(0)} rows and the bank was told the tasks of "
                             f"{'none' if index is None else index.numel()}: wrap the call in "
                             "`with bank.tasks(model, [one task per row])`")
        y = self.base(x)
        factor = self.task_rows.factor(self, y.dtype)
        # (rows, T, r): A x once for every task; and once for q, k and v when they share A (share=all)
        h = sharelora.project(x, self.lora_A, self.dropout, self.memo, self.lora_A).to(y.dtype)
        if factor.dim() == 2:  # the whole batch is one task: y + h · factor
            return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), factor).view(y.shape)
        rows = x.size(0)  # each row's own factor, one batched product
        return torch.baddbmm(y.reshape(rows, -1, y.size(-1)), h.reshape(rows, -1, h.size(-1)), factor).view(y.shape)


# Each row's s · diag(u_t) · B_t^T is gathered once per set of tasks (TaskRows.factor) and added onto
# the base map's output in one batched product, rather than looping over the tasks present with
# index_select / index_copy_ (what PEFT's mixed batch does, there with A too), or gathering in every call.
# Measured with `python tools/bench_bank.py --products` (2026-12-03 15:02, AMD EPYC, 2 cores, torch 2.13.0
# CPU, 2 threads, load 0.1; 64 rows, d_out 768, r 8; microseconds per map for y + the rows' B_t h, the
# median of 5):
#     tasks  positions   per task   gathered   kept           tasks  positions   per task   gathered   kept
#       2        1          320        344      39              8       32          9774       5989     554
#       8        1          474        413      35             16        1           723        359      34
#       2       32         8542       6789     433             16       32          9404       6114     441
# The kept factor wins everywhere, by 8x to 21x. A decoding step's mixed map is then the base map, A x and
# one baddbmm (the stand-in base's c_attn, 32 rows, 8 tasks: 52 µs the base map alone, 78 the three
# products, 93 to 120 the whole MixedLinear call with its Python, on this noisy 2-core VM).
# No loop also means no host-device synchronisation (the loop must find each task's rows), which
# matters on GPUs.


@torch.no_grad()
def attach(model, bank, trainable=False):
    """Give the base `model` (in place) every task of the bank at once, for inference: each adapted map
    becomes a MixedLinear. The maps, groups and fused-map parts are found as sharelora.add_adapters
    finds them, with the first task's configuration. Returns the model; `with tasks(model, ...)` then
    says which task each row of a batch is. trainable=True: the tensors train as the configuration
    says (joint training of fresh() tasks: one A for all, each task's B and u Parameters of their own;
    collect() then puts them back into the bank)."""
    config = next(iter(bank.tasks.values()))["config"]
    comps = config.components()
    if trainable and comps["v"][0] != "off":  # before any change to the model
        raise ValueError("attach folds v into B, so a trainable bank cannot train v: train tasks without v "
                         "(u is fine) jointly, or train tasks with v one after another")
    sharelora.add_adapters(model, config)
    shapes = sharelora.map_shapes(model)
    if bank.shapes is not None and shapes != bank.shapes:
        raise ValueError(f"this model's maps are not those the bank's tasks were trained on "
                         f"({_first_difference(shapes, bank.shapes)}): attach the bank to its own base ({bank.base})")
    model.task_rows = TaskRows(bank.names)
    made = {}  # (key, v's key) -> one tensor for every map that holds it: a shared A or B stays one tensor

    def stacked(m, x, fold=None):
        keys = (sharelora._key(m.name, x, comps, m.group), fold and sharelora._key(m.name, fold, comps, m.group))
        if keys not in made:
            train = trainable and comps[x][1]
            if x == "A":
                made[keys] = nn.Parameter(bank.shared[keys[0]].to(m.lora_A.device), requires_grad=train)
            elif trainable:  # one Parameter per task: a step of one task leaves the others' B, u and their
                # optimizer state alone (no weight decay, no stale momentum: their gradients are None)
                made[keys] = nn.ParameterList(nn.Parameter(task["tensors"][keys[0]].to(m.lora_A.device).clone(),
                                                           requires_grad=train) for task in bank.tasks.values())
            else:
                t = torch.stack([task["tensors"][keys[0]] for task in bank.tasks.values()])
                if keys[1]:  # diag(v_t) B_t, once
                    t = torch.stack([task["tensors"][keys[1]] for task in bank.tasks.values()])[:, :, None] * t
                made[keys] = nn.Parameter(t.to(m.lora_A.device), requires_grad=False)
        return made[keys]

    def mixed(m):  # an AdaptedLinear, and the one below it when two parts of a fused map are adapted
        base = mixed(m.base) if isinstance(m.base, sharelora.AdaptedLinear) else m.base
        return MixedLinear(base, stacked(m, "A"), stacked(m, "B", "v" if comps["v"][0] != "off" else None),
                           stacked(m, "u") if comps["u"][0] != "off" else None, m.scale, m.rows, model.task_rows,
                           m.dropout, m.memo)

    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, sharelora.AdaptedLinear)}
    for name, m in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        if parent_name not in wrappers:  # the outer wrapper of a map
            setattr(model.get_submodule(parent_name) if parent_name else model, child, mixed(m))
    # what collect() copies back after training, and a checkpoint holds: the shared A under its own key,
    # a trainable bank's tensors of each task under tasks.NAME.KEY (the bank file's names)
    model.bank_tensors = {}
    for (key, _), p in made.items():
        each = zip(bank.names, p) if isinstance(p, nn.ParameterList) else [(None, p)]
        model.bank_tensors.update({key if name is None else f"tasks.{name}.{key}": t for name, t in each})
    return model


def load(path, names=None, init_from=None, device="auto", dtype="auto", quantize="auto"):
    """(model, info) for the command lines: the bank's base (or init_from) with the bank attached, placed
    on the device; info as runtime.load_model's, with "tasks": the names asked for (default: all).
    quantize: auto (default) quantizes the base as the tasks were trained (the file records it), or
    none, nf4, int8, as runtime.load_model."""
    import runtime
    b = Bank.read(path)
    names = names or b.names
    for name in names:
        b._require(name)
    runtime.check(len(set(names)) == len(names), f"--tasks names a task twice ({','.join(names)}): name each once")
    runtime.check(init_from is not None or not _missing(b.base), f"{path} names its base {b.base}, which does not exist "
                  "(a bank names a local base relative to its own folder: was it moved?): pass the base with --init_from")
    device = runtime.pick_device(device)
    info = {"base": init_from or b.base, "adapter": path, "tasks": names, "device": device,
            "dtype": runtime.pick_dtype(dtype, device)}
    model = attach(runtime.base_as_trained(info, b.quantized or "none", quantize), b)
    return runtime.place(model, device, info["dtype"]).eval(), info


# ---- 3. Training tasks jointly around one A ------------------------------------------------------

def fresh(model, config, names, base=None):
    """A bank of new tasks for joint training: every task starts where sharelora.add_adapters starts an
    adapter (B = 0, the shared A random from config.seed), on `model`'s maps (model is left as it is).
    base: how the bank names its base (default: model.name_or_path; a local one as an absolute path)."""
    import copy
    start = sharelora.add_adapters(copy.deepcopy(model), config)
    tensors = {k: t.detach().clone() for k, t in sharelora.adapter_state_dict(start).items()}
    shapes = sharelora.map_shapes(start)
    base = base or getattr(model, "name_or_path", None)
    base = os.path.abspath(base) if base and os.path.exists(base) else base
    return Bank({k: t for k, t in tensors.items() if _is_a(k)}, base, shapes, None,
                {n: {"config": config, "source": "a joint train.py run",
                     "tensors": {k: t.clone() for k, t in tensors.items() if not _is_a(k)}} for n in names})


@torch.no_grad()
def collect(model, bank):
    """Copy the tensors a trainable attach() trained back into `bank` (then bank.save, bank.export)."""
    for key, p in model.bank_tensors.items():
        if key.startswith("tasks."):
            name, _, key = key[len("tasks."):].partition(".")
            bank.tasks[name]["tensors"][key] = p.detach().cpu().clone()
        elif _is_a(key):
            bank.shared[key] = p.detach().cpu().clone()
        else:  # a stacked tensor of an inference attach(): row i is task i's
            for i, task in enumerate(bank.tasks.values()):
                task["tensors"][key] = p[i].detach().cpu().clone()
    return bank


def joint_problem(config):
    """None if joint training can train adapters of this configuration, else why not: every task must
    see one A (placed shared), and v, which attach folds into B, cannot train."""
    comps = config.components()
    if comps["A"][0] != "shared" or comps["v"][0] != "off":
        return (f"a {config.describe()} adapter {'has its own A in every layer' if comps['A'][0] != 'shared' else 'has v'}"
                ", and joint training needs one shared A and no v: use adapter=sharea, shareab or shareqkv, or a spec "
                "with A=shared and v=off")
    return None


class JointBatches:
    """Joint training's data: {task name: data.loader.Batches}, one task per batch. mix="round_robin":
    step s is task s mod N's; "proportional": each step's task is drawn with a probability proportional
    to its training tokens (as if the data sets were pooled: a task of 10x the data gets about 10x the
    batches), from one random stream seeded by `seed`. Either way training batch i (train.py's step *
    grad_accum + micro-batch) is that task's next one, a pure function of i (resume needs no loader
    state), and get() tells the model's MixedLinears which task it is (steer(model.task_rows) first).
    Validation goes task by task (only())."""
    kind = "tasks"

    def __init__(self, batches, grad_accum=1, mix="round_robin", seed=0):
        self.batches, self.names, self.grad_accum, self.task_rows = batches, list(batches), grad_accum, None
        self.data_dir = ", ".join(b.data_dir for b in batches.values())  # for messages naming the data
        self.mix, self.schedule, self.turns = mix, [], [0] * len(self.names)  # proportional: (task, turn) per step
        self.draws = random.Random(seed)
        self.weights = [len(b.tokens["train"]) for b in batches.values()]

    def steer(self, task_rows):
        self.task_rows = task_rows

    def task_of(self, step):
        """(the task of training step `step`, how many steps before it were that task's)."""
        if self.mix == "round_robin":
            return step % len(self.names), step // len(self.names)
        while len(self.schedule) <= step:  # drawn in order, in chunks: the same schedule for any max_iters
            for task in self.draws.choices(range(len(self.names)), self.weights, k=1024):
                self.schedule.append((task, self.turns[task]))
                self.turns[task] += 1
        return self.schedule[step]

    def get(self, split, i):
        step, micro = divmod(i, self.grad_accum)
        task, turn = self.task_of(step)
        self.task_rows.set(task)
        return self.batches[self.names[task]].get(split, turn * self.grad_accum + micro)

    @contextlib.contextmanager
    def only(self, name):
        """Inside, the model is task `name`'s for every batch; yields its Batches."""
        self.task_rows.set(self.names.index(name))
        try:
            yield self.batches[name]
        finally:
            self.task_rows.set(None)

    def max_token(self):
        return max(b.max_token() for b in self.batches.values())

    def set_block_size(self, block_size):
        for b in self.batches.values():
            b.set_block_size(block_size)


def summary_of_training(model):
    """The line train.py prints for a joint run: the tasks, the shared A's and each task's parameters."""
    names = model.task_rows.names
    shared = sum(p.numel() for k, p in model.bank_tensors.items() if not k.startswith("tasks.") and p.requires_grad)
    each = sum(p.numel() for k, p in model.bank_tensors.items() if k.startswith(f"tasks.{names[0]}.") and p.requires_grad)
    own = "B, u" if any(k.endswith(".lora_u") for k in model.bank_tensors) else "B"
    return (f"{len(names)} tasks trained jointly ({', '.join(names)}): one shared A ({shared:,} trainable "
            f"parameters), each task its own {own} ({each:,} each)")


@contextlib.contextmanager
def tasks(model, names):
    """Inside, row i of every batch the model runs is task names[i] (a name or an index of the bank's
    tasks); beam search follows its beams with model.task_rows.reorder. Forgotten on leaving, so that a
    batch without its tasks is refused, never run with stale ones."""
    rows = model.task_rows
    index = [n if isinstance(n, int) else rows.names.index(n) if n in rows.names else None for n in names]
    if None in index or not all(0 <= i < len(rows.names) for i in index):
        bad = next(n for n, i in zip(names, index) if i is None or not 0 <= i < len(rows.names))
        raise ValueError(f"the bank has no task {bad!r}; its tasks are {', '.join(rows.names)}")
    device = next(model.parameters()).device
    rows.set(torch.tensor(index, dtype=torch.long, device=device))
    try:
        yield rows
    finally:
        rows.set(None)


# ---- 4. The command line -------------------------------------------------------------------------

COMMANDS = """commands:
  build BANK NAME=ADAPTER ...  a new bank of adapter files trained around one A (train.py --init_adapter)
  add BANK NAME=ADAPTER ...    more tasks; the others are left as they are
  remove BANK NAME ...         tasks out of the bank (not its last one)
  export BANK NAME FILE        one task alone, a normal adapter file again (never over an existing file)
  list BANK                    each task's parameters and fingerprint, then the shared A and the base
e.g. python bank.py build tasks.safetensors e2e=out-e2e/adapter.safetensors parse=out-parse/adapter.safetensors
(docs/bank.md: training tasks around one A, mixed batches, the measurement)"""


def main(argv=None):
    from argparse import RawDescriptionHelpFormatter
    from runtime import Parser, check
    p = Parser(prog="bank.py", description="Build, change, list or export an adapter bank.", epilog=COMMANDS,
               formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("build", "add", "remove", "export", "list"))
    p.add_argument("bank", help="the bank file")
    p.add_argument("items", nargs="*", help="build, add: NAME=ADAPTER_FILE ...; remove: NAME ...; export: NAME FILE")
    args = p.parse_args(argv)
    pairs = [item.partition("=")[::2] for item in args.items]
    if args.command in ("build", "add"):
        check(pairs and all(n and f for n, f in pairs), f"{args.command} takes NAME=ADAPTER_FILE items, e.g. "
              f"e2e=out-e2e/adapter.safetensors, not {' '.join(args.items) or 'none'}")
    check(args.command != "export" or len(args.items) == 2, "export takes the task's name and the adapter file to write")
    check(args.command != "remove" or args.items, "remove takes the names of the tasks to remove")
    names = [n for n, _ in pairs] if args.command in ("build", "add") else args.items if args.command == "remove" else []
    twice = sorted({n for n in names if names.count(n) > 1})
    check(not twice, f"{args.command} names {twice[0] if twice else ''} twice: name each task once")
    check(args.command != "list" or not args.items, "list takes only the bank file")
    check(args.command != "build" or not os.path.exists(args.bank), f"{args.bank} exists: "
          f"{'choose a file name' if os.path.isdir(args.bank) else 'use add, or another name'}")
    if args.command == "build":
        Bank.build(dict(pairs)).save(args.bank)
    else:
        b = Bank.read(args.bank)
        if args.command == "export":
            b.export(*args.items)
            return print(f"wrote {args.items[1]}: task {args.items[0]} alone, an adapter file")
        for name, path in pairs if args.command == "add" else []:
            b.add(name, path)
        for name in args.items if args.command == "remove" else []:
            b.remove(name)
        if args.command != "list":
            b.save(args.bank)
    print(Bank.read(args.bank).summary())


if __name__ == "__main__":
    import runtime
    runtime.run(main)
