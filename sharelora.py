"""
Shared low-rank adapters: LoRA, ShareLoRA (ShareA, ShareB, ShareAB), Tied-LoRA, VeRA in one layer.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a pretrained map W (d_out x d_in) and learns a
low-rank update next to it:

        x ──► W ─────────────────────────────┐
        │                                     (+) ──► y = W x + s · B A x
        └──► A (r x d_in) ──► B (d_out x r) ──┘

with r << d (8 instead of 768), s = alpha / r, B = 0 at the start so the model starts as the base.
Each adapted map of each layer has its own A and B: L·r·(d_in + d_out) parameters per target.

ShareLoRA (Song et al. 2024, arXiv 2406.10785) observes that the layers' updates have much in common
and shares A (ShareA), B (ShareB) or both (ShareAB) between the L layers: one tensor, referenced by
every layer, trained by the sum of their gradients. ShareA keeps LoRA's quality with about half the
parameters (the paper's experiments).

Tied-LoRA (Renduchintala et al. 2024, arXiv 2311.09578) ties A and B across layers and gives each
layer two cheap scaling vectors back, u (r) and v (d_out), each part trainable or frozen:

        y = W x + s · v ⊙ (B (u ⊙ (A dropout(x))))      (docs/METHOD.md's formula; ⊙: elementwise)

The Tied-LoRA paper names a configuration by its factors, marking those tied across layers with ®:
vB®uA® is A and B tied (one for all layers), u and v per layer: the preset `tied` below.
VeRA (Kopiczko et al. 2024, arXiv 2310.11454) is the corner of that space where A and B are frozen
random matrices and only u and v train (and s = 1).

So every method here is one formula with four components A, B, u, v, each with a placement
(`layer`: one per layer, `shared`: one for all layers of a target, `off`: the constant 1, u and v
only) and a training setting (`train` or `frozen`).

The file has two parts. Part 1, the method, ends at the banner "END OF PART 1": the presets, the
adapted layer, the configuration, adding adapters (grouping and initialisation), counting, merging
and the adapter's state dict; a reader who stops there has every preset. Part 2 is for other
people's models (transformers' Conv1D, fused maps split into parts, refusals, quantized layers),
the adapter file (save_adapter, read_adapter, load_adapter) and exports (merged weights, PEFT).
Imports only torch and the standard library (the safetensors format is written and read in part 2),
so it can be copied into any project.
"""
import hashlib
import json
import math
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [  # part 1, the method
    "PRESETS", "parse_spec", "AdaptedLinear", "AdapterConfig", "add_adapters", "group_maps",
    "adapted_layers", "count_trainable", "trainable_breakdown", "parameter_table", "merge",
    "unmerge", "adapter_state_dict",
    # part 2: other people's models, the adapter file, exports
    "find_targets", "check_adapters_run", "quantization", "quantized_maps", "applied_weight",
    "saved_modules",
    "save_adapter", "read_adapter", "load_adapter",
    "base_state_dict", "merged_state_dict", "export_merged", "export_peft",
]

COMPONENTS = ("A", "B", "u", "v")  # of s · v ⊙ B(u ⊙ A x); `comps` below: a resolved spec


# ---- 1. The presets are spec strings -------------------------------------------------------------

# A spec is a space-separated list of settings; a preset is a named spec. Grammar:
#     spec    := setting (" " setting)*
#     setting := X "=" placement ["/" training]  |  "scale=" ("alpha/r" | "1")
#              | "share=" (layers | targets | all)
#     X := A | B | u | v   placement := layer | shared | off (u, v only)   training := train | frozen
# Unspecified: A=layer, B=layer, u=off, v=off, training=train, scale=alpha/r, share=layers. So
# "A=shared" is ShareA, and every configuration of the Tied-LoRA paper can be written
# down, e.g. its vB®uA® with frozen u: "A=shared B=shared u=layer/frozen v=layer".
# The placement `shared` makes a component one tensor for a group of maps; the setting `share=`
# says what a group spans: `layers` (the paper's default), one per target across all layers;
# `targets`, one per layer across the targets (q, k, v of a layer read the same input x, so a
# shared A computes A x once for the three); `all`, one across the layers and the targets.
PRESETS = {
    "lora": "A=layer B=layer",  # Hu et al.
    "sharea": "A=shared B=layer",  # ShareLoRA's ShareA: about half LoRA's parameters, same quality
    "shareb": "A=layer B=shared",  # ShareB
    "shareab": "A=shared B=shared",  # ShareAB: every layer adds the same ΔW
    "tied": "A=shared B=shared u=layer v=layer",  # Tied-LoRA vB®uA®, all trained
    "vera": "A=shared/frozen B=shared/frozen u=layer v=layer scale=1",  # VeRA: frozen random A, B
    "shareqkv": "A=shared B=layer share=all",  # ShareLoRA's Shareqkv: one A for all q, k, v
}


def parse_spec(spec):
    """-> {"A": (placement, trainable), "B": ..., "u": ..., "v": ..., "scale": ..., "share": ...}"""
    out = {"A": ("layer", True), "B": ("layer", True), "u": ("off", False), "v": ("off", False),
           "scale": "alpha/r", "share": "layers"}
    seen = set()
    for setting in spec.split():
        key, _, value = setting.partition("=")
        if key in seen:
            raise ValueError(f"spec {spec!r} sets {key} twice")
        seen.add(key)
        if value in {"scale": ("alpha/r", "1"), "share": ("layers", "targets", "all")}.get(key, ()):
            out[key] = value
            continue
        placement, _, training = value.partition("/")
        ok_placements = ("layer", "shared") if key in ("A", "B") else ("layer", "shared", "off")
        if key not in COMPONENTS or placement not in ok_placements \
                or training not in ("", "train", "frozen") or (placement == "off" and training):
            raise ValueError(f"bad spec setting {setting!r} in {spec!r}: write "
                             "X=placement[/training] with X in A, B, u, v, placement layer|shared "
                             "(|off for u, v), training train|frozen; or scale=alpha/r|1, or "
                             "share=layers|targets|all")
        out[key] = (placement, placement != "off" and training != "frozen")
    if not any(out[x][1] for x in COMPONENTS):
        raise ValueError(f"spec {spec!r} freezes every component: nothing would train")
    return out


# ---- 2. One adapted linear map -------------------------------------------------------------------

class AdaptedLinear(nn.Module):
    """A frozen linear map plus the update s · v ⊙ B(u ⊙ A x).

    The components are given, not created here, because a shared component is one nn.Parameter that
    several AdaptedLinear modules hold at once (PyTorch lists it once in model.parameters(), so the
    optimizer updates it once, with the sum of the layers' gradients). u and v may be None (off).

    `base` is an nn.Linear (W stored d_out x d_in), or transformers' Conv1D (GPT-2: W stored d_in x
    d_out), or another AdaptedLinear when two parts of one fused map are adapted. `rows` =
    (start, stop, period) makes this adapter a part of a fused map: in every block of `period`
    outputs only start..stop-1 change. q of GPT-2's c_attn = [q; k; v] (d_out = 3d) is (0, d, 3d):
    one block; q of GPT-NeoX's query_key_value, [q; k; v] per head, is (0, h, 3h) for head size h.
    ΔW then has (stop - start) · d_out / period rows. `memo` is a _Memo that the maps of one layer
    share when they share A, so that A x is computed once for those that read one input.
    """

    def __init__(self, base, A, B, u=None, v=None, scale=1.0, dropout=0.0, name="", group="",
                 config=None, rows=None, memo=None):
        super().__init__()
        self.base = base
        # (r, d_in), (d_out, r), (r,), (d_out,); u, v None when off
        self.lora_A, self.lora_B, self.lora_u, self.lora_v = A, B, u, v
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name, self.group, self.config = name, group, config  # see adapter_state_dict
        self.rows = rows
        self.memo = memo
        self.merged = False
        self.train(base.training)  # added to a model in eval mode, it is in eval mode too

    @property
    def weight(self):  # so that code reading `module.weight` (dtype, device, shape) keeps working
        return self.base.weight

    def __getattr__(self, name):
        if name == "bias":  # no pass-through, on purpose: code that reads a layer's weight and
            # bias to compute with them itself (nn.MultiheadAttention's out_proj, WavLM's attention)
            # would skip the adapter
            raise AttributeError(f"{self.name} is adapted, but this model reads its weight and "
                                 "bias itself instead of calling it, which would skip the adapter: "
                                 "adapt other layers of this model")
        return super().__getattr__(name)  # parameters, submodules (nn.Module keeps them in dicts)

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # ΔW is inside base.weight already: no adapter work at all
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(f"{self.name} is merged: call sharelora.unmerge(model) before "
                                   "training")
            return y
        # x -> A -> B: r·(d_in + d_out) multiply-adds per token, never the d_out·d_in of ΔW. u and v
        # are folded into the factors first (diag(u)·A is r x d_in, diag(v)·B is d_out x r): the
        # same product as scaling the activations, but elementwise work on the small matrices
        # instead of on every token's r- and d_out-wide vectors (tied and VeRA then train in LoRA's
        # memory). s is applied on the r-wide side, where it is cheapest. Components are cast to the
        # input's dtype, so a bfloat16 base works without autocast too.
        B, A = self.folded_factors()
        delta = F.linear(self._project(x, A) * self.scale, B.to(x.dtype))  # (..., d_out)
        if self.rows is not None:  # a part of a fused map: zeros for the other parts' outputs
            start, stop, period = self.rows
            delta = F.pad(delta.unflatten(-1, (-1, stop - start)), (start, period - stop)).flatten(-2)
        return y + delta

    def _project(self, x, A):
        """A x, (..., r); u folded into A makes it this map's own, so u turns the memo off."""
        return project(x, A, self.dropout, self.memo if self.lora_u is None else None, self.lora_A)

    def folded_factors(self):
        """(B', A') in float32 with v and u folded in: B' = diag(v) B, A' = diag(u) A, so ΔW = s ·
        B' A'. Differentiable: forward uses it too (the adapters are float32 already, so .float() is
        free)."""
        A, B = self.lora_A.float(), self.lora_B.float()
        if self.lora_u is not None:
            A = self.lora_u.float()[:, None] * A
        if self.lora_v is not None:
            B = self.lora_v.float()[:, None] * B
        return B, A

    def delta_weight(self):
        """ΔW = s · diag(v) · B · diag(u) · A in float32, (d_out, d_in): to merge and export."""
        B, A = self.folded_factors()
        return self.scale * (B @ A)

    def extra_repr(self):
        return (f"group={self.group!r}, r={self.lora_A.size(0)}, scale={self.scale:g}, "
                f"merged={self.merged}")


def project(x, A, dropout, memo, version_of):
    """dropout(x) A^T, (..., r). Maps that share A and read the same x (q, k and v of one layer with a
    shared A: the ShareLoRA paper's Shareqkv) compute it once: the first stores it in their common
    memo, the next ones find the same input object and the same A (version_of's _version: a step
    changes it) there. Not under dropout, which gives each map its own mask."""
    if memo is None or not isinstance(dropout, nn.Identity):
        return F.linear(dropout(x), A.to(x.dtype))
    key = (version_of._version, torch.is_grad_enabled(), x.dtype)
    if memo.get("x") is not x or memo.get("key") != key:
        memo.update(x=x, key=key, h=F.linear(x, A.to(x.dtype)))
    return memo["h"]


class _Memo(dict):
    """{"x": an input, "key": A's version..., "h": A x}, shared by the adapted maps below one module
    (a layer's attention). Emptied when that module's call ends, returns or fails (_forget), and
    copied or pickled empty: it never holds activations, or their graph, past the call."""

    def __reduce_ex__(self, protocol):
        return _Memo, ()


def _memo_below(owner):
    """A new memo for maps below the module `owner`, emptied after each of owner's calls."""
    if _forget not in owner._forward_hooks.values():
        owner.register_forward_hook(_forget, always_call=True)
    return _Memo()


def _forget(module, args, output):
    for m in module.modules():
        if isinstance(getattr(m, "memo", None), _Memo):  # AdaptedLinear's, or bank.MixedLinear's
            m.memo.clear()


# ---- 3. The configuration ------------------------------------------------------------------------

DEFAULT_LAYER_PATTERN = r"(?<![^.])\d+(?![^.])"  # the first all-digit part of a name: h.7, layers.12
MAX_RANK = 2**16  # r beyond any map's width here (GPT-2 XL: 6,400): refused before any shape is computed
MAX_PATTERN = 1000  # characters of a layer_pattern: compiling stays instant


@dataclass
class AdapterConfig:
    """preset: one of PRESETS; spec: a spec string that overrides the preset (grammar above); r: the
    rank; alpha: s = alpha / r (LoRA's convention; the spec's scale=1 drops it, as VeRA does);
    dropout: on the adapter's input (LoRA's convention); targets: names of linear modules to adapt
    (nn.Linear, or transformers' Conv1D), matched on the end of the qualified name ("q" matches
    transformer.h.7.attn.q, "attn.c_proj" works too); seed: for every random initial value, so that
    frozen random matrices can be rebuilt.

    For other people's models (part 2): split: {module: part names} for a fused map whose output is
    equal parts stacked, e.g. {"c_attn": ("q", "k", "v")}; a target "c_attn.q" then adapts the q
    part alone; {module: {part: rows}} for parts of other sizes or per head (_split_parts).
    layer_pattern: a regular expression whose first match in a module's name is its layer (the
    default, the first all-digit part, fits model.layers.7.q_proj and blocks.3.0). modules_to_save:
    modules trained whole beside the adapters (a classifier head), saved in the adapter file."""
    preset: str = "sharea"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("q", "v")
    seed: int = 0
    spec: str = None
    split: dict = None
    layer_pattern: str = DEFAULT_LAYER_PATTERN
    modules_to_save: tuple = ()

    def __post_init__(self):
        if isinstance(self.targets, str):  # "q,v" from a command line
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        _check_config(self)  # part 2: each field's type and range, in one sentence each
        self.targets, self.modules_to_save = tuple(self.targets), tuple(self.modules_to_save)
        # tuples, so that a config read back from JSON compares equal
        self.split = {k: dict(v) if isinstance(v, dict) else tuple(v)
                      for k, v in (self.split or {}).items()} or None
        self.components()  # validates preset and spec now rather than halfway through add_adapters

    @property
    def scale(self):
        return 1.0 if self.components()["scale"] == "1" else self.alpha / self.r

    def components(self):
        """-> parse_spec's dict of the preset or spec: what the code below calls `comps`."""
        if self.spec is None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}, "
                             "or give a spec")
        return parse_spec(self.spec if self.spec is not None else PRESETS[self.preset])

    def describe(self):
        """The resolved spec in canonical form: 'A=shared/train B=layer/train u=off v=off
        scale=alpha/r' for sharea."""
        c = self.components()
        parts = [f"{x}={c[x][0]}" + ("" if c[x][0] == "off" else "/train" if c[x][1] else "/frozen")
                 for x in COMPONENTS]
        share = [f"share={c['share']}"] if c["share"] != "layers" else []
        return " ".join(parts + [f"scale={c['scale']}"] + share)


# ---- 4. Adding adapters to a model ---------------------------------------------------------------

def add_adapters(model, config, groups=None):
    """Freeze the model and wrap every linear map that config.targets names.

    Maps are grouped for sharing (group_maps): a `shared` component is one tensor per group, by
    default one per target across the layers (transformer.h.7.attn.q is in group
    transformer.h.*.attn.q). Works on any model built from nn.Linear or transformers' Conv1D layers;
    part 2 handles the rest of other people's models. `groups` ({group: [map names]}) replaces that
    grouping: load_adapter passes the one an adapter file recorded (see _file_groups). Returns the model."""
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError("this model already has adapters: load a fresh base model to add new ones")
    comps = config.components()
    maps = find_targets(model, config)  # {map name: (module name, rows)}
    check_supported(model, maps)
    groups = groups or group_maps(maps, config.layer_pattern, comps["share"])
    saved = find_modules_to_save(model, config, maps)
    d = {n: map_dims(model, n, maps) for n in maps}  # (d_out, d_in)
    _check_sizes(groups, d, comps, config.r)
    for p in model.parameters():  # "mark only the adapters as trainable" (loralib)
        p.requires_grad_(False)
    for module in saved.values():  # ... and the modules the user trains whole
        module.requires_grad_(True)
    for group, names in groups.items():
        _wrap_group(model, config, group, names, maps, d)
    _avoid_fused_paths(model)
    _declare_shared_copies(model)  # so that transformers' save_pretrained saves each once
    return model


def group_maps(maps, layer_pattern, share):
    """{group: [map names]}: the maps one shared tensor serves, by the spec's `share`:
    layers:  the name with its layer index as * (transformer.h.*.attn.q): one tensor per target;
    targets: sibling maps of one layer together (transformer.h.7.attn.q+k+v);
    all:     both (transformer.h.*.attn.q+k+v).
    The layer index is the first match of layer_pattern."""
    label = {n: n for n in maps}
    if share != "layers":
        siblings = {}
        for n in maps:
            siblings.setdefault(n.rpartition(".")[0], []).append(n)
        for prefix, names in siblings.items():
            for n in names:
                label[n] = f"{prefix}.{'+'.join(m.rpartition('.')[2] for m in names)}"
    groups = {}
    for n in maps:
        group = label[n] if share == "targets" else re.sub(layer_pattern, "*", label[n], count=1)
        groups.setdefault(group, []).append(n)
    return groups


def _wrap_group(model, config, group, names, maps, d):
    """Replace the group's modules by AdaptedLinear wrappers that hold one tensor for each shared
    component (made once, from the group's first map) and their own for each per-layer one."""
    comps = config.components()
    zero = _zero_factor(comps)  # the component that starts at 0, so that ΔW = 0 at the start
    device = lambda n: model.get_submodule(maps[n][0]).weight.device
    make = lambda x, n: _initial_value(x, _key(n, x, comps, group), d[n], config.r, comps, zero,
                                       config.seed, device(n))
    shared = {x: make(x, names[0]) for x in COMPONENTS if comps[x][0] == "shared"}
    memos = {}  # maps of one layer that read the same input and share A compute A x once
    for n in names:
        module, rows = maps[n]
        parts = {x: shared[x] if comps[x][0] == "shared" else make(x, n)
                 for x in COMPONENTS if comps[x][0] != "off"}
        memo, owner = None, module.rpartition(".")[0]  # the module that calls it: an attention
        if comps["share"] != "layers" and comps["A"][0] == "shared":
            if owner not in memos:
                memos[owner] = _memo_below(model.get_submodule(owner))
            memo = memos[owner]
        wrapped = AdaptedLinear(model.get_submodule(module), parts["A"], parts["B"], parts.get("u"),
                                parts.get("v"), scale=config.scale, dropout=config.dropout, name=n,
                                group=group, config=config, rows=rows, memo=memo)
        parent_name, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)


def _key(name, x, comps, group):
    """Where component x of the map `name` is saved: under its group for a shared one
    (transformer.h.*.attn.q.lora_A), under the map for a per-layer one
    (transformer.h.7.attn.q.lora_B)."""
    return f"{group if comps[x][0] == 'shared' else name}.lora_{x}"


def _zero_factor(comps):
    """ΔW must be 0 at the start, so one factor starts at zero. It must be a trainable one, and only
    one: two zero factors in one product give each other zero gradients forever. LoRA's choice is B;
    with B frozen (VeRA) it is v; then u, then A, for the rarer corners of the spec space."""
    return next(x for x in ("B", "v", "u", "A") if comps[x][0] != "off" and comps[x][1])


def _shape(x, d, r):
    d_out, d_in = d
    return {"A": (r, d_in), "B": (d_out, r), "u": (r,), "v": (d_out,)}[x]


def _initial_value(x, key, d, r, comps, zero, seed, device="cpu"):
    """docs/METHOD.md's initialisation (its section 5), for a map of dims d = (d_out, d_in). Random
    values come from a generator seeded by (seed, key), so the same configuration rebuilds the same
    frozen random matrices, on any machine."""
    shape = _shape(x, d, r)
    if x == zero:
        t = torch.zeros(shape)
    elif x in ("A", "B"):  # Kaiming-uniform, a = √5, as nn.Linear and loralib: U(±1/√fan_in)
        digest = hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
        g = torch.Generator().manual_seed(int(digest[:15], 16))
        bound = 1 / math.sqrt(shape[1])
        t = torch.empty(shape).uniform_(-bound, bound, generator=g)
    else:  # u and v start at 1; VeRA's u (λ_d, v being the zero factor) at 0.1, its d_initial
        t = torch.full(shape, 0.1 if (x == "u" and zero == "v") else 1.0)
    # adapters live in float32 even on a bfloat16 base: they are what the optimizer updates
    return nn.Parameter(t.to(device), requires_grad=comps[x][1])


def adapted_layers(model):
    return [m for m in model.modules() if isinstance(m, AdaptedLinear)]


def _require_adapters(model):
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("this model has no adapters: call add_adapters(model, config) or "
                         "load_adapter first")
    return layers


# ---- 5. Counting ---------------------------------------------------------------------------------

def count_trainable(model):
    """Trainable parameters, each tensor counted once (a shared tensor is one tensor)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_breakdown(model):
    """One row per target group: {"target", "layers", "A", "B", "u", "v", "total"}, trainable
    counts."""
    rows = {}  # group -> its row
    for m in _require_adapters(model):
        row = rows.setdefault(m.group, {"target": m.group, "layers": 0, "seen": set(),
                                        **{x: 0 for x in COMPONENTS}})
        row["layers"] += 1
        for x in COMPONENTS:
            p = getattr(m, f"lora_{x}")
            if p is not None and p.requires_grad and id(p) not in row["seen"]:
                row["seen"].add(id(p))
                row[x] += p.numel()
    for row in rows.values():
        del row["seen"]
        row["total"] = sum(row[x] for x in COMPONENTS)
    whole = {}  # so that the table's total is count_trainable(model)
    for label, p in _other_trainables(model).values():
        whole[label] = whole.get(label, 0) + p.numel()
    return list(rows.values()) + [{"target": k, "layers": 1, **{x: 0 for x in COMPONENTS},
                                   "total": n} for k, n in whole.items()]


def parameter_table(model):
    """The breakdown as a printable table, with the total and its share of all parameters."""
    rows = trainable_breakdown(model)
    width = max(len("target"), *(len(r["target"]) for r in rows))
    cols = (*COMPONENTS, "total")
    lines = [f"{'target':<{width}} {'layers':>6} " + " ".join(f"{x:>10}" for x in cols)]
    for r in rows:
        lines.append(f"{r['target']:<{width}} {r['layers']:>6} " + " ".join(f"{r[x]:>10,}" for x in cols))
    total = sum(r["total"] for r in rows)
    everything = sum(p.numel() for p in model.parameters())
    for name in quantized_maps(model):  # a packed weight holds two 4-bit values per element
        layer = model.get_submodule(name)
        everything += math.prod(dims(layer)) - layer.weight.numel()
    share = 100 * total / everything
    lines.append(f"trainable: {total:,} of {everything:,} parameters ({share:.3f}%)")
    return "\n".join(lines)


# ---- 6. Merging ----------------------------------------------------------------------------------

@torch.no_grad()
def merge(model):
    """Add each layer's ΔW into its W (in float32, then cast back): inference then costs what the
    base model costs. With a shared A each layer still gets its own ΔW_l =
    s·diag(v_l)·B_l·diag(u_l)·A. Explicit by design: never a side effect of train()/eval()
    (loralib's merge-on-eval surprised users)."""
    layers = _require_adapters(model)
    q = next((m for m in layers if quantization(m)), None)  # on the adapted maps' bases
    if q is not None:  # ΔW added to 4-bit W would have to be quantized again: not what was trained
        raise ValueError(f"{q.name} has a quantized base ({quantization(q)}): adding ΔW would "
                         "mean quantizing W + ΔW again, which is not the model the adapter was "
                         "trained with; keep the adapter unmerged (it runs as trained), or use "
                         "export_merged, which writes dequant(W) + ΔW in float32")
    for m in layers:
        if not m.merged:
            w = _delta_view(m, _stored(m).weight)  # its rows of W, laid out as ΔW's
            w.copy_((w.float() + m.delta_weight().view(w.shape)).to(w.dtype))
            m.merged = True
    return model


@torch.no_grad()
def unmerge(model):
    """Subtract ΔW again, so the adapter can train on. W comes back to rounding: in float32 at most
    1.1e-7 from the original after 10 merge/unmerge cycles (tiny Llama and GPT-2 of
    tests/test_portability.py, measured 2026-12-02); in bfloat16 the round trip loses W's low bits,
    so keep a float32 base to merge repeatedly."""
    for m in _require_adapters(model):
        if m.merged:
            w = _delta_view(m, _stored(m).weight)
            w.copy_((w.float() - m.delta_weight().view(w.shape)).to(w.dtype))
            m.merged = False
    return model


# ---- 7. The adapter's state dict: each shared tensor once ----------------------------------------

def adapter_state_dict(model, trainable_only=False):
    """{key: tensor} with each tensor once: a shared component under its group's key
    (transformer.h.*.attn.q.lora_A), a per-layer one under its layer's
    (transformer.h.7.attn.q.lora_B). model.state_dict() would repeat a shared tensor under every
    layer's name instead. It returns every tensor; save_adapter (part 2) then stores a frozen one
    still at its seeded value as seed + fingerprint only. To rebuild the sharing, load_adapter runs
    add_adapters with the stored configuration and grouping, then copies these tensors in."""
    out = {}
    for m in _require_adapters(model):
        cfg = m.config.components()
        for x in COMPONENTS:
            p = getattr(m, f"lora_{x}")
            if p is not None and (p.requires_grad or not trainable_only):
                out[_key(m.name, x, cfg, m.group)] = p
    return out


# ==================================================================================================
# END OF PART 1: the method. What follows is for other people's models, the adapter file, exports.
# ==================================================================================================


# ---- 8. Other people's models: layers that are not nn.Linear -------------------------------------

def _stored(layer):
    """The layer that holds W: below one wrapper, or two when two parts of one fused map are adapted."""
    while isinstance(layer, AdaptedLinear):
        layer = layer.base
    return layer


def is_conv1d(layer):
    """transformers' Conv1D (GPT-2, GPT-J's ancestors): a linear map with W stored (d_in, d_out) and
    y = x W + b. Recognised by its class name and its `nf` (= d_out), so that no transformers import
    is needed."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and getattr(layer, "weight", None) is not None


def is_linear(layer):
    return isinstance(layer, nn.Linear) or is_conv1d(layer)


def dims(layer):
    """(d_out, d_in) of a linear map, however it stores W: nn.Linear (d_out, d_in), Conv1D (d_in, d_out),
    and layers whose weight is packed (4-bit quantized) but which say in_features / out_features."""
    layer = _stored(layer)
    if is_conv1d(layer):
        return tuple(reversed(layer.weight.shape))
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.out_features, layer.in_features
    return tuple(layer.weight.shape)


def quantization(layer):
    """None for a float weight. For a quantized one (bitsandbytes' packed 4-bit or int8 weights: not
    floating point), a short name: its quant_type ("nf4", "fp4") or its storage dtype ("int8")."""
    w = _stored(layer).weight
    if w.is_floating_point():
        return None
    return getattr(w, "quant_type", None) or str(w.dtype).removeprefix("torch.")


def quantized_maps(model):
    """Names of the model's linear maps whose weight is quantized."""
    return [n for n, m in model.named_modules()
            if not isinstance(m, AdaptedLinear) and is_linear(m) and quantization(m)]


@torch.no_grad()
def applied_weight(layer):
    """(d_out, d_in) float32: the W a linear layer actually multiplies by, read off by running it on the
    identity matrix (row i of the output is W e_i) with its bias set aside for that call. For a
    quantized layer that is dequant(W), what an adapter on it was trained against, whichever library
    packed it; no library import is needed."""
    layer = _stored(layer)
    bias = getattr(layer, "bias", None)
    if bias is not None:
        layer.bias = None
    try:
        return layer(torch.eye(dims(layer)[1], device=layer.weight.device)).float().t().contiguous()
    finally:
        if bias is not None:
            layer.bias = bias


def _delta_view(m, w):
    """The rows of w (the stored base weight of adapter m, or a copy of it) that ΔW of m changes, as
    a view (blocks, rows per block, d_in) that ΔW fills in order: merge and base_state_dict write
    into it in place. Conv1D stores W transposed; its view is transposed back."""
    w = w.t() if is_conv1d(_stored(m)) else w
    start, stop, period = m.rows or (0, w.size(0), w.size(0))
    return w.unflatten(0, (-1, period))[:, start:stop]


def _module_path(path, wrapper_paths):
    """x.c_attn.base.base -> x.c_attn: the name a module had before it was wrapped (twice, when two
    parts of one fused map are adapted; the outer wrapper sits at the module's own name)."""
    while path.endswith(".base") and path[:-5] in wrapper_paths:
        path = path[:-5]
    return path


# ---- 9. Other people's models: which modules are the targets, fused maps split into parts --------

def find_targets(model, config):
    """{map name: (module name, rows)} for every target: a linear module whose qualified name ends in
    the target (rows None), or a part of a fused map that config.split names (rows = (start, stop,
    period), see AdaptedLinear; e.g. transformer.h.7.attn.c_attn.q for the target "c_attn.q")."""
    linears = {n: m for n, m in model.named_modules() if is_linear(m)}
    matched = {}
    for t in config.targets:
        found = {n: (n, None) for n in linears if _ends_with(n, t)}
        found.update(_split_parts(model, linears, t, config.split or {}))
        if not found:
            raise ValueError(_no_match(model, t, linears))
        for name, where in found.items():
            if name in matched:
                raise ValueError(f"two targets both match {name}: list each layer once")
            matched[name] = where
    wholes = {m for m, rows in matched.values() if rows is None}
    both = sorted(m for m, rows in matched.values() if rows is not None and m in wholes)
    if both:
        raise ValueError(f"{both[0]} is a target both whole and in parts: adapt it one way")
    return matched


def _ends_with(name, target):
    return name == target or name.endswith("." + target)


def map_dims(model, name, maps):
    """(d_out, d_in) of a map: its module's, or its part's."""
    module, rows = maps[name]
    d_out, d_in = dims(model.get_submodule(module))
    return ((rows[1] - rows[0]) * (d_out // rows[2]) if rows else d_out), d_in


def _split_parts(model, linears, target, split):
    """{map name: (module name, rows)} for a target "<module>.<part>" that config.split divides.
    A split names its parts in one of two ways: ("q", "k", "v"), equal parts one after the other
    (GPT-2's c_attn); or {"q": 64, "k": 64, "v": 64}, each part's rows in one block that repeats
    until the outputs are filled (GPT-NeoX's query_key_value with head size 64: per head q, k, v;
    Phi-3's qkv_proj: {"q": 3072, "k": 1024, "v": 1024}, one block). So "c_attn.q" with split
    {"c_attn": ("q", "k", "v")} is rows (0, d, 3d) of every c_attn, named ....c_attn.q. Where two
    split keys match a module, the longer one holds ("crossattention.c_attn" beside "c_attn")."""
    head, _, part = target.rpartition(".")
    found = {}
    for n, layer in linears.items():
        key = max((k for k in split if _ends_with(n, k)), key=len, default=None)
        if key is None or part not in split[key] or not _ends_with(n, head):
            continue
        block = _block(key, n, split[key], dims(layer)[0])
        _refuse_wrong_layout(model, n, key, block)
        start = sum(block[p] for p in list(block)[:list(block).index(part)])
        found[f"{n}.{part}"] = (n, (start, start + block[part], sum(block.values())))
    return found


def _block(key, name, parts, d_out):
    """{part: rows} of one block of the fused map `name`, of d_out outputs, that split[key] describes."""
    if not isinstance(parts, dict):  # equal parts, one block
        if d_out % len(parts):
            raise ValueError(f"split {key}: {name} has {d_out} outputs, not divisible into "
                             f"{len(parts)} parts")
        return {p: d_out // len(parts) for p in parts}
    if d_out % sum(parts.values()):
        raise ValueError(f"split {key}: {name} has {d_out} outputs, which blocks of "
                         f"{sum(parts.values())} rows ({parts}) do not fill: give each part's rows in "
                         "one block (one head, or the whole map)")
    return dict(parts)


# The fused maps of transformers' attention classes whose layout is not equal thirds, or whose
# parts are not q, k, v: (class name, map) -> its block, read off the module as its forward reads
# it (transformers 5.23). A split on such a map must give this layout; equal thirds are refused.
_per_head = lambda h: {"q": h, "k": h, "v": h}
_FUSED_LAYOUTS = {
    ("GPTNeoXAttention", "query_key_value"): lambda a: _per_head(a.head_size),  # (heads, 3, h)
    ("GPTNeoXJapaneseAttention", "query_key_value"): lambda a: _per_head(a.head_size),
    ("BloomAttention", "query_key_value"): lambda a: _per_head(a.head_dim),
    ("PersimmonAttention", "query_key_value"): lambda a: _per_head(a.head_dim),
    ("FalconAttention", "query_key_value"): lambda a: (  # per kv group: its q heads, one k, one v
        {"q": a.head_dim * a.num_heads // a.num_kv_heads, "k": a.head_dim, "v": a.head_dim}
        if a.new_decoder_architecture else  # Falcon-40B/180B
        {"q": a.head_dim * a.num_heads, "k": a.head_dim, "v": a.head_dim} if a.multi_query  # 7B
        else _per_head(a.head_dim)),  # Falcon-RW
    ("Phi3Attention", "qkv_proj"): lambda a: {  # grouped-query: k and v smaller than q
        "q": a.head_dim * a.config.num_attention_heads, "k": a.head_dim * a.num_key_value_heads,
        "v": a.head_dim * a.num_key_value_heads},
    ("CodeGenAttention", "qkv_proj"): lambda a: {  # 4 blocks ("mp_num"), each [q; v; k]
        p: a.head_dim * a.num_attention_heads // 4 for p in ("q", "v", "k")},
    ("GPTBigCodeAttention", "c_attn"): lambda a: (
        {"k": a.embed_dim, "v": a.embed_dim} if a.is_cross_attention else
        {"q": a.embed_dim, "k": a.kv_dim, "v": a.kv_dim} if a.multi_query else _per_head(a.head_dim)),
    ("GPT2Attention", "c_attn"): lambda a: (  # a cross-attention's c_attn is [k; v]: q is q_attn
        {"k": a.embed_dim, "v": a.embed_dim} if a.is_cross_attention else None),
}


def _refuse_wrong_layout(model, name, key, block):
    """A split that gives a known fused map (_FUSED_LAYOUTS) other parts than its forward reads."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    try:
        layout = _FUSED_LAYOUTS.get((type(parent).__name__, child), lambda a: None)(parent)
    except AttributeError:  # another transformers version, whose class reads differently: not known
        layout = None
    if layout is None:
        return
    d_out = dims(model.get_submodule(name))[0]
    labels = lambda b: [p for p, n in b.items() for _ in range(n)] * (d_out // sum(b.values()))
    mine, true = labels(block), labels(layout)
    pairs = set(zip(mine, true))
    if len(mine) == len(true) == d_out and len(pairs) == len(set(mine)) == len(set(true)) \
            and all(a == b for a, b in pairs if a in layout):
        return
    per = "one block" if sum(layout.values()) == d_out else f"{d_out // sum(layout.values())} blocks"
    raise ValueError(f"split {key!r} cuts {name} ({type(parent).__name__}) into {block}, but its "
                     f"{d_out} outputs are {layout} in {per}: give split={{{child!r}: {layout}}} "
                     "for it, or a split key that does not match it")


# ---- 10. Other people's models: what cannot work is refused before any change --------------------

def _check_config(c):
    """AdapterConfig's checks: a ValueError naming the field and what it takes."""
    strings = lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
    count = lambda n: isinstance(n, int) and not isinstance(n, bool) and n > 0
    parts = lambda v: (strings(v) and len(set(v)) == len(v) > 0) or (isinstance(v, dict) and v and all(
        isinstance(p, str) and count(n) for p, n in v.items()))
    for name, ok in (("preset", isinstance(c.preset, str)), ("spec", c.spec is None or isinstance(c.spec, str)),
                     ("targets", strings(c.targets)),
                     ("seed", isinstance(c.seed, int) and not isinstance(c.seed, bool) and 0 <= c.seed < 2**63),
                     ("split", c.split is None or (isinstance(c.split, dict) and all(
                         isinstance(k, str) and parts(v) for k, v in c.split.items()))),
                     ("layer_pattern", isinstance(c.layer_pattern, str) and len(c.layer_pattern) <= MAX_PATTERN),
                     ("modules_to_save", strings(c.modules_to_save))):
        if not ok:
            takes = (": give {module: (part names, ...)} or {module: {part: rows per block}}"
                     if name == "split" else "")
            raise ValueError(f"AdapterConfig.{name} has the wrong type{' or range' if name in ('seed', 'layer_pattern') else ''}: "
                             f"{getattr(c, name)!r:.200}{takes}")
    try:
        re.compile(c.layer_pattern)
    except (re.error, TypeError) as e:
        raise ValueError(f"layer_pattern {c.layer_pattern!r} is not a regular expression: {e}") from None
    if not c.targets:
        raise ValueError("targets is empty: name at least one linear layer to adapt, e.g. ('q', 'v')")
    if isinstance(c.r, bool) or not isinstance(c.r, int) or not 0 < c.r <= MAX_RANK:
        raise ValueError(f"r must be a whole number in [1, {MAX_RANK}] (the rank, e.g. 8), got {c.r!r}")
    if not 0 <= c.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout!r}")
    if not isinstance(c.alpha, (int, float)) or not math.isfinite(c.alpha):
        raise ValueError(f"alpha must be a finite number (s = alpha / r), got {c.alpha!r}")


def _check_sizes(groups, d, comps, r):
    """Before any change: r fits every map, and a shared tensor has one shape for all its maps."""
    for group, names in groups.items():
        for n in names:
            if r > min(d[n]):
                raise ValueError(f"r = {r} is larger than {n} ({d[n][1]} -> {d[n][0]}) allows: use r <= {min(d[n])}")
        for x, dim, what in (("A", 1, "inputs"), ("B", 0, "outputs"), ("v", 0, "outputs")):
            sizes = sorted({d[n][dim] for n in names})
            if comps[x][0] == "shared" and len(sizes) > 1:
                raise ValueError(f"cannot share {x} across {group}: its maps have different numbers of {what} "
                                 f"({sizes}); use {x}=layer or separate targets")


def _no_match(model, target, linears):
    """Why a target matched nothing, in one sentence."""
    other = next(((n, m) for n, m in model.named_modules() if _ends_with(n, target)), None)
    if other is not None:
        why = f"{other[0]} is a {type(other[1]).__name__}, not a linear layer (nn.Linear or transformers' Conv1D)"
    else:
        ends = ", ".join(sorted({n.split(".")[-1] for n in linears})[:12])
        why = f"no module is named so; the linear layers end in: {ends}"
    return f"target {target!r} matches no linear layer: {why}"


def check_supported(model, maps):
    """Refuse, before any change, the maps whose adapter would be silently ignored or whose merge would
    change another module."""
    for module, _ in maps.values():
        parent_name = module.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):
            # F.multi_head_attention_forward reads out_proj.weight and .bias itself, never calls out_proj
            raise ValueError(f"{module} belongs to nn.MultiheadAttention, which reads its weights directly: an "
                             "adapter there would be ignored; adapt the layers around it (e.g. linear1, linear2)")
        _refuse_tied(model, module, [model.get_submodule(module).weight], "merging an adapter would change both")


def _refuse_tied(model, module, params, why):
    """A parameter of `module` that another module holds too (an lm_head tied to the embedding)."""
    owners = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    for p in params:
        tied = [n for n in owners[id(p)] if not n.startswith(module + ".")]
        if tied:
            raise ValueError(f"{module} shares a weight with {tied[0]} (tied weights): {why}; untie it first (e.g. "
                             "m.weight = nn.Parameter(m.weight.clone())) or leave it out")


def find_modules_to_save(model, config, maps):
    """{name: module} for config.modules_to_save (matched like targets): trained whole, saved whole."""
    found = {}
    for t in config.modules_to_save:
        names = [n for n, _ in model.named_modules() if n and _ends_with(n, t)]
        if not names:
            raise ValueError(f"modules_to_save {t!r} matches no module of the model")
        for n in names:
            inside = [m for m, _ in maps.values() if _ends_with(m, n) or m.startswith(n + ".")]
            if inside:
                raise ValueError(f"{n} is in modules_to_save and holds the target {inside[0]}: choose one")
            found[n] = model.get_submodule(n)
            _refuse_tied(model, n, (p for p in found[n].parameters()), "training it whole would train both")
    return found


def _avoid_fused_paths(model):
    """torch's nn.TransformerEncoderLayer has a fused inference path that reads linear1.weight and
    linear2.weight itself, skipping an adapter there; nn.TransformerEncoder's nested-tensor path reads
    their biases. The first is not taken when a submodule has a hook (so each adapted map gets one that
    does nothing), the second not when use_nested_tensor is off. Both are only speed-ups."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            for m in module.modules():
                if isinstance(m, AdaptedLinear) and not m._forward_pre_hooks:
                    m.register_forward_pre_hook(lambda module, args: None)
        if isinstance(module, nn.TransformerEncoder) and any(isinstance(m, AdaptedLinear) for m in module.modules()):
            module.use_nested_tensor = False


def _declare_shared_copies(model):
    """transformers' save_pretrained (and so Trainer's checkpoints) refuses a tensor that several
    names hold, unless a module declares the other names tied to one, as a tied lm_head is, in its
    `_tied_weights_keys`. So each wrapper declares its copies of a shared component, and the file
    holds the tensor once, under its first map's name; loading that name (Trainer resumes with
    load_state_dict(strict=False)) fills the one tensor that all maps hold. Only saving reads it."""
    first = {}  # id of a component -> the first name it has in the state dict
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLinear):
            names = {f"lora_{x}": getattr(m, f"lora_{x}") for x in COMPONENTS}
            copies = {k: first.setdefault(id(p), f"{name}.{k}") for k, p in names.items() if p is not None}
            m._tied_weights_keys = {k: v for k, v in copies.items() if v != f"{name}.{k}"} or None


def check_adapters_run(model, *args, **kwargs):
    """Run model(*args, **kwargs) once, without gradients, and raise a ValueError naming the adapted
    maps it never called: a model that multiplies by a layer's .weight itself (MobileBERT's MLM
    head, cls.predictions.dense) skips that layer's adapter, which would then never train and
    would change the outputs when merged. Cheap: call it once after add_adapters."""
    called = set()
    hooks = [m.register_forward_pre_hook(lambda mod, a: called.add(mod.name)) for m in _require_adapters(model)]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    never = [m.name for m in adapted_layers(model) if m.name not in called]
    if never:
        raise ValueError(f"the model never called {len(never)} adapted map(s), e.g. {never[0]}: it reads "
                         "their weight itself, so their adapter would not train; leave them out of targets")


# ---- 11. The adapter file ------------------------------------------------------------------------

def saved_modules(model):
    """{name: module} of the adapter's modules_to_save (trained whole, saved whole)."""
    layers = adapted_layers(model)
    wanted = layers[0].config.modules_to_save if layers else ()
    return {n: m for n, m in model.named_modules() if n and any(_ends_with(n, t) for t in wanted)}


def _saved_state_dict(model):
    return {f"{n}.{k}": t for n, module in saved_modules(model).items() for k, t in module.state_dict().items()}


def _other_trainables(model):
    """{name: (label, parameter)} for what trains besides the adapters: a module of modules_to_save
    ("classifier (whole)"), or "(other trainable)", unfrozen by hand, which save_adapter refuses to
    leave behind. A parameter several modules hold appears once."""
    adapter_ids = {id(p) for m in adapted_layers(model) for p in (m.lora_A, m.lora_B, m.lora_u, m.lora_v)
                   if p is not None}
    owned = {id(p): name for name, module in saved_modules(model).items() for p in module.parameters()}
    return {n: (f"{owned[id(p)]} (whole)" if id(p) in owned else "(other trainable)", p)
            for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids}


def _refuse_unsaved(model):
    """A tensor that trains but is neither an adapter nor in modules_to_save would be lost on saving."""
    names = [n for n, (label, _) in _other_trainables(model).items() if label == "(other trainable)"]
    if names:
        raise ValueError(f"{names[0]} trains but is neither an adapter nor in modules_to_save, so it would not be "
                         "saved: add its module to AdapterConfig(modules_to_save=...) or freeze it")


def _map_dims(m):
    """(d_out, d_in) of an adapted map, read off its factors: A is r x d_in, B is d_out x r."""
    return m.lora_B.size(0), m.lora_A.size(1)


def map_shapes(model):
    """{map name: [d_out, d_in]} of every adapted map: what an adapter file records of its base
    ("shapes"), to compare a file with a model."""
    return {m.name: list(_map_dims(m)) for m in adapted_layers(model)}


def _fingerprint(t):
    t = t.detach().double().cpu()
    return [float(t.sum()), float((t * t).sum())]


def save_adapter(model, path, base=None):
    """Write the adapter to one safetensors file, atomically (a temporary file, then a rename).

    The metadata holds the configuration, the base model's identity (`base`, default the model's
    name_or_path, and the shape of every adapted map) and, for frozen tensors that are still their
    seeded random values, a fingerprint instead of the tensor: they are rebuilt from the seed on load,
    so a VeRA file holds only its vectors, as in the VeRA paper."""
    layers = _require_adapters(model)
    config = layers[0].config
    comps = config.components()
    _refuse_unsaved(model)
    tensors, regenerated = {}, {}
    for key, t in adapter_state_dict(model).items():
        if not t.requires_grad:  # frozen: is it still what a fresh add_adapters would make from the seed?
            m = next(m for m in layers if key.startswith((m.group + ".lora_", m.name + ".lora_")))
            fresh = _initial_value(key[-1], key, _map_dims(m), config.r, comps, _zero_factor(comps), config.seed)
            # (compared in t's dtype: on a GPU, train.py stores frozen matrices in bfloat16)
            if torch.equal(fresh.data.to(t.dtype).cpu(), t.detach().cpu()):
                regenerated[key] = _fingerprint(fresh)
                continue
        tensors[key] = t
    tensors.update(_saved_state_dict(model))
    metadata = {
        "format": "sharelora", "version": "1",
        "config": json.dumps(asdict(config)),
        "base": json.dumps(base if base is not None else getattr(model, "name_or_path", None)),
        "shapes": json.dumps(map_shapes(model)),  # (d_out, d_in) of each map
        "groups": json.dumps({m.name: m.group for m in layers}),  # what layer_pattern grouped: never re-run from a file
        "regenerated": json.dumps(regenerated),
        # trained on a quantized base (QLoRA, QShareA): the adapter learned against dequant(W)
        "base_quantized": json.dumps("+".join(sorted({quantization(m) for m in layers} - {None})) or None),
    }
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: give save_adapter a file name, e.g. "
                         f"{os.path.join(path, 'adapter.safetensors')}")
    _write_safetensors(path, tensors, metadata)


def _write_atomic(path, data):
    """Write bytes or text to a temporary file, then rename it over path (atomic on POSIX and Windows:
    a crash leaves the old file or the new one; a failed write, a full disk, leaves nothing behind).
    Through open(), the file gets the permissions every other file gets (the umask's)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# The safetensors format, written and read here with the standard library, byte-compatible with the
# safetensors package: an 8-byte little-endian header length n, n bytes of JSON header
# {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}
# padded with spaces to a multiple of 8, then the tensors' little-endian bytes back to back.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100_000_000  # bytes, the safetensors package's own limit


def _write_safetensors(path, tensors, metadata=None):
    """{name: tensor} (+ {str: str} metadata) as one safetensors file, written atomically. Tensors are
    laid out by element size, largest first, so that each starts aligned, as the package does."""
    _require_little_endian()
    flat = {k: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for k, t in tensors.items()}
    header, offset = {}, 0
    for k in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[k]
        if t.dtype not in _DTYPES.values():
            raise ValueError(f"{k} is {t.dtype}, which sharelora.py does not write: cast it to float32 first")
        header[k] = {"dtype": next(n for n, d in _DTYPES.items() if d == t.dtype), "shape": list(t.shape),
                     "data_offsets": [offset, offset + flat[k].numel()]}
        offset += flat[k].numel()
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    out = bytearray(struct.pack("<Q", len(text)) + text) + bytearray(offset)
    body = torch.frombuffer(out, dtype=torch.uint8)[8 + len(text):]  # a view of out's memory
    for k, e in header.items():
        if k != "__metadata__":
            body[e["data_offsets"][0]:e["data_offsets"][1]].copy_(flat[k])
    _write_atomic(path, out)


def _read_safetensors(path):
    """({name: tensor}, metadata) of a safetensors file. ValueError, saying what is wrong, for a
    malformed one; every size is checked against the file's before anything is allocated."""
    _require_little_endian()
    with open(path, "rb") as f:
        data = bytearray(f.read())
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else None
    if n is None or n > min(len(data) - 8, _MAX_HEADER):
        raise ValueError(f"its header (of {n} bytes, it says) does not fit in its {len(data)} bytes")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("its header is not a JSON object with {str: str} metadata")
    size, spans = len(data) - 8 - n, []
    for k, e in header.items():
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not (isinstance(e, dict) and e.get("dtype") in _DTYPES and isinstance(e.get("shape"), list)
                and all(map(is_int, e["shape"])) and isinstance(e.get("data_offsets"), list)
                and len(e["data_offsets"]) == 2 and all(map(is_int, e["data_offsets"]))):
            raise ValueError(f"{k!r} lacks a dtype, shape or data_offsets of the format")
        begin, end = e["data_offsets"]
        if end > size or end - begin != math.prod(e["shape"]) * _DTYPES[e["dtype"]].itemsize:
            raise ValueError(f"{k!r} declares bytes {begin}..{end} for its shape, of a {size}-byte body")
        spans.append((begin, end))
    spans.sort()
    if [b for b, _ in spans] != [0] + [e for _, e in spans[:-1]] or (spans[-1][1] if spans else 0) != size:
        raise ValueError("its tensors overlap, or leave bytes of the file unaccounted for")
    body = torch.frombuffer(data, dtype=torch.uint8)[8 + n:]
    return {k: body[e["data_offsets"][0]:e["data_offsets"][1]].clone().view(_DTYPES[e["dtype"]])
            .reshape(e["shape"]) for k, e in header.items()}, meta


def _require_little_endian():
    if sys.byteorder != "little":  # torch's raw bytes are the machine's; the format's are little-endian
        raise OSError("sharelora.py writes and reads safetensors files on little-endian machines only")


def read_adapter(path):
    """-> (AdapterConfig, metadata dict, {key: tensor}); a ValueError naming the file for anything a
    damaged or foreign file can hold: unreadable bytes, missing or malformed metadata, tensors that are
    not floating point or not finite."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        tensors, meta = _read_safetensors(path)
    except (ValueError, OSError, RecursionError) as e:  # json's and unicode's errors are ValueErrors too
        raise ValueError(f"{path} is not a readable adapter file (truncated or corrupt?): {e}") from None
    if meta.get("format") == "sharelora-bank":
        raise ValueError(f"{path} is an adapter bank (bank.py), not an adapter file: export one of its tasks with "
                         "`python bank.py export BANK TASK FILE`, or pass it as a bank (--bank)")
    if meta.get("format") != "sharelora":
        raise ValueError(f"{path} is a safetensors file but not a sharelora adapter (no sharelora metadata)")
    config, meta = _parse_metadata(path, meta)
    for key, t in tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{path} holds {key} with {'inf or nan values' if t.is_floating_point() else t.dtype}: "
                             "an adapter holds finite floating-point tensors; use an earlier checkpoint")
    return config, meta, tensors


def _parse_metadata(path, meta):
    """(AdapterConfig, {key: value}) of an adapter file's metadata, each value decoded from JSON."""
    try:
        meta = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
        config = AdapterConfig(**meta["config"])
        # every number bounded before any is used to size a tensor: a width is at most 2**31
        size = lambda x: type(x) is int and 0 < x < 2**31
        number = lambda x: type(x) in (int, float) and math.isfinite(x)
        pair = lambda v, ok: isinstance(v, list) and len(v) == 2 and all(map(ok, v))
        if not (isinstance(meta["shapes"], dict) and all(pair(v, size) for v in meta["shapes"].values())
                and isinstance(meta["regenerated"], dict)
                and all(pair(v, number) for v in meta["regenerated"].values())
                and (isinstance(meta.get("groups", {}), dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in meta.get("groups", {}).items()))
                and all(meta.get(k) is None or isinstance(meta[k], str) for k in ("base", "base_quantized"))):
            raise TypeError("shapes, regenerated, groups or base do not have their form")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"has damaged metadata ({e})"
        raise ValueError(f"{path} {what}: save the adapter again, or restore the file") from None
    return config, meta


@torch.no_grad()
def load_adapter(model, path):
    """Load an adapter file into `model`: a fresh base (the sharing is rebuilt from the stored
    configuration with add_adapters, then the tensors are copied in) or a model that already carries
    adapters of the same configuration. Checks the base's shapes first, leaving the model untouched if
    the adapter was made for another one. Returns the model."""
    config, meta, tensors = read_adapter(path)
    try:
        return _load_checked(model, path, config, meta, tensors)
    except ValueError as e:  # whatever does not fit (targets, split, frozen tensors): the file is named
        raise ValueError(e if str(path) in str(e) else f"{path}: {e}") from None


def _load_checked(model, path, config, meta, tensors):
    layers = adapted_layers(model)
    if any(m.merged for m in layers):  # ΔW of the adapter in the model is inside W: it would stay there
        raise ValueError(f"the model's adapter is merged into its weights: call sharelora.unmerge(model) "
                         f"before loading {path}")
    if layers and layers[0].config != config:
        raise ValueError(f"the model's adapters ({layers[0].config.describe()}) differ from those in {path} "
                         f"({config.describe()}): load it onto a fresh base model")
    # every check comes before the first change to the model. The maps this configuration adapts in
    # this model must be exactly those it was trained on, with the same shapes.
    d, group_of, saved = _layout(model, config, layers, _file_groups(path, meta, config))
    _check_base(path, meta, d)
    narrowest = min((min(v) for v in d.values()), default=config.r)
    if config.r > narrowest:  # before any tensor of r rows is made
        raise ValueError(f"{path} has r = {config.r}, more than its narrowest map ({narrowest}) allows: "
                         "it is damaged; save the adapter again")
    comps = config.components()
    expected = {}  # key -> (the dims of a map that holds it, component), as adapter_state_dict will name them
    for name in d:
        for x in COMPONENTS:
            if comps[x][0] != "off":
                expected.setdefault(_key(name, x, comps, group_of[name]), (d[name], x))
    _check_tensors(path, config, meta, tensors, expected, saved)
    if not layers:
        grouped = {}
        for name, group in group_of.items():
            grouped.setdefault(group, []).append(name)
        add_adapters(model, config, groups=grouped)
    for key, p in {**adapter_state_dict(model), **_saved_state_dict(model)}.items():
        if key in tensors:
            p.copy_(tensors[key])
    return model


def _file_groups(path, meta, config):
    """{map: group} as the adapter file recorded it. A layer_pattern is a regular expression, and one
    read from a file could be crafted to backtrack for hours on a module name (515 s was measured on
    one name): so the grouping it made is stored when the file is written, and loading never runs a
    pattern from a file. A file written before "groups" was stored is grouped by the default pattern
    (a fixed one of ours) alone."""
    if "groups" in meta:
        return meta["groups"]
    if config.layer_pattern != DEFAULT_LAYER_PATTERN:
        raise ValueError(f"{path} has a custom layer_pattern but no recorded grouping (an older file): "
                         "save the adapter again with this sharelora.py")
    return None


def _layout(model, config, layers, file_groups=None):
    """({map: (d_out, d_in)}, {map: group}, {key: tensor of modules_to_save}) that `config` has or
    would have in `model`, read off its adapters or, on a fresh base, worked out without a change
    (with the grouping an adapter file recorded, when given)."""
    if layers:
        return ({m.name: _map_dims(m) for m in layers}, {m.name: m.group for m in layers},
                _saved_state_dict(model))
    maps = find_targets(model, config)
    if file_groups is not None:  # (a map the file does not know is its own group: _check_base refuses it)
        groups = {}
        for name in maps:
            groups.setdefault(file_groups.get(name, name), []).append(name)
    else:
        groups = group_maps(maps, config.layer_pattern, config.components()["share"])
    saved = find_modules_to_save(model, config, maps)
    return ({n: map_dims(model, n, maps) for n in maps}, {n: g for g, names in groups.items() for n in names},
            {f"{n}.{k}": t for n, m in saved.items() for k, t in m.state_dict().items()})


def _check_base(path, meta, d):
    """The maps in the model are those the adapter was made for, each of the same shape."""
    theirs = meta["shapes"]
    size = lambda s: "x".join(map(str, s)) if s else "missing"
    for name in sorted(d.keys() | theirs.keys()):
        have = list(d[name]) if name in d else None
        if have != theirs.get(name):
            raise ValueError(f"{path} was made for base {meta.get('base') or '(unnamed)'!r}, where {name} is "
                             f"{size(theirs.get(name))}; in this model it is {size(have)}: load the adapter "
                             "onto the base it was trained on")


def _check_tensors(path, config, meta, tensors, expected, saved):
    """The file holds exactly the tensors the configuration makes, in their shapes; the frozen ones it
    leaves out rebuild from the seed to what was saved."""
    comps = config.components()
    unknown = sorted(set(tensors) - set(expected) - set(saved))
    if unknown:
        raise ValueError(f"{path} holds tensors this configuration does not have: {unknown[:3]}")
    for key, t in saved.items():
        if key not in tensors or tensors[key].shape != t.shape:
            raise ValueError(f"{path} lacks {key} of modules_to_save, or holds it in another shape")
    for key, (dims_, x) in expected.items():
        if key in tensors:
            want = _shape(x, dims_, config.r)
            if tuple(tensors[key].shape) != want:
                raise ValueError(f"{key} is {tuple(tensors[key].shape)} in {path} but {want} in the model")
        elif key in meta["regenerated"]:
            fresh = _initial_value(x, key, dims_, config.r, comps, _zero_factor(comps), config.seed)
            if not _close(_fingerprint(fresh), meta["regenerated"][key]):
                raise ValueError(f"rebuilding the frozen {key} from seed {config.seed} gave other values than "
                                 "when it was saved (another torch random generator?)")
        else:
            raise ValueError(f"{path} lacks {key}: the file is incomplete")


def _close(a, b, rel=1e-9):
    return all(abs(x - y) <= rel * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))


# ---- 12. Leaving this project: merged weights and the PEFT layout --------------------------------

@torch.no_grad()
def base_state_dict(model, add_delta=False):
    """The base model's state dict under the names it had before add_adapters, without adapter
    tensors: what a plain model loads. add_delta=True adds each ΔW to its W (see merged_state_dict).
    The model is left as it is."""
    _require_adapters(model)
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    state = model.state_dict()
    for name in quantized_maps(model):  # a quantized W leaves as dequant(W), in float32
        layer = model.get_submodule(name)
        for k in layer.state_dict():  # the library's packing state: absmax, quant_map, SCB, ...
            if k not in ("weight", "bias"):
                state.pop(f"{name}.{k}", None)
        state[f"{name}.weight"] = applied_weight(layer)
    out = {}
    for key, t in state.items():
        owner, _, leaf = key.rpartition(".")
        if not leaf.startswith("lora_"):
            out[f"{_module_path(owner, wrappers)}.{leaf}" if owner else leaf] = t
    changed = {}  # weight key -> float32 copy, with every ΔW of its maps added or removed
    for name, m in wrappers.items():
        sign = 1 if add_delta and not m.merged else -1 if not add_delta and m.merged else 0
        if sign:
            key = f"{_module_path(name, wrappers)}.weight"
            view = _delta_view(m, changed.setdefault(key, out[key].float().clone()))
            view += sign * m.delta_weight().to(view.device).view(view.shape)
    out.update({k: w.to(out[k].dtype) for k, w in changed.items()})
    return out


def merged_state_dict(model):
    """The base weights with every ΔW added, under the base's own names: a plain model with the
    adapter built in."""
    return base_state_dict(model, add_delta=True)


def export_merged(model, path):
    """Save the merged model with the model's own save_pretrained when it has one (model.py's GPT writes
    the Hugging Face GPT-2 layout; a transformers model its own), else merged_state_dict as one
    safetensors file at `path`, for the plain model's load_state_dict. On a quantized base each W is
    written as dequant(W) + ΔW in float32 (applied_weight): what the adapter was trained against, in a
    model that is no longer quantized."""
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None and quantized_maps(model):
        raise ValueError("the model was loaded quantized by transformers, whose save_pretrained writes quantized "
                         "weights and cannot take dequant(W) + ΔW: save sharelora.merged_state_dict(model) yourself "
                         "(each W laid out d_out x d_in, as the quantized layers hold it)")
    state = merged_state_dict(model)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path, state_dict=state)
    else:
        _write_safetensors(path, state)  # tied tensors are written apart: each one's bytes are copied


@torch.no_grad()
def export_peft(model, path, base_model_name_or_path=None, fused=None, fan_in_fan_out=None, task_type=None):
    """Write `adapter_config.json` + `adapter_model.safetensors` that PEFT's LoRA loads with the same
    outputs. Every configuration converts exactly: u and v fold into A and B (A'_l = diag(u_l) A,
    B'_l = diag(v_l) B_l) and a shared tensor is written out once per layer, since PEFT has no sharing
    (the file grows back to LoRA's size). s is kept by setting lora_alpha = s · r.

    Parts of one fused map (config.split, or `fused` = {their module: (our modules, ...)} for a
    framework that fuses maps we keep apart, e.g. model.HF_FUSED for GPT-2's c_attn = q, k, v) become
    one LoRA of rank n·r whose B is block-diagonal (zero rows for a part that is not adapted): the
    same update. fan_in_fan_out: True for weights stored (d_in, d_out), as transformers' Conv1D does;
    None detects it from the adapted layers. task_type: PEFT's (e.g. "CAUSAL_LM", "SEQ_CLS"), or None."""
    layers = _require_adapters(model)
    _refuse_unsaved(model)
    tensors, ranks, alphas = _peft_tensors(_peft_modules(model, fused))
    for key, t in _saved_state_dict(model).items():
        tensors[f"base_model.model.{key}"] = t
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    if fan_in_fan_out is None:
        fan_in_fan_out = any(is_conv1d(_stored(m)) for m in layers)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r0, "lora_alpha": a0, "lora_dropout": layers[0].config.dropout, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "target_modules": sorted(ranks), "use_rslora": False,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r0},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != a0},
        "modules_to_save": sorted(saved_modules(model)) or None,
        "inference_mode": True,
    }
    os.makedirs(path, exist_ok=True)
    _write_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors)
    _write_atomic(os.path.join(path, "adapter_config.json"), json.dumps(config, indent=2))


def _peft_modules(model, fused):
    """{the module PEFT adapts: {"rows": its d_out, "parts": [(output rows, A', B', s), ...]}}."""
    modules = {}
    wrappers = {n: w for n, w in model.named_modules() if isinstance(w, AdaptedLinear)}
    for name, m in wrappers.items():
        B, A = m.folded_factors()
        target, rows, height = _their_module(model, m, _module_path(name, wrappers), fused)
        modules.setdefault(target, {"rows": height, "parts": []})["parts"].append((rows, A, B, m.scale))
    return modules


def _peft_tensors(modules):
    """PEFT's lora_A / lora_B tensors, and each module's rank and alpha, of _peft_modules' parts."""
    tensors, ranks, alphas = {}, {}, {}
    for name, entry in modules.items():
        parts = sorted(entry["parts"], key=lambda p: int(p[0][0]))
        A = torch.cat([p[1] for p in parts])  # (n·r, d_in)
        B = torch.zeros(entry["rows"], A.size(0))  # block-diagonal: part i's rows, its own r columns
        col = 0
        for rows, a, b, _ in parts:
            B[rows, col:col + a.size(0)] = b
            col += a.size(0)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A  # a shared A is written once per layer here
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
        ranks[name], alphas[name] = A.size(0), parts[0][3] * A.size(0)
    return tensors, ranks, alphas


def _their_module(model, m, path, fused):
    """(the module PEFT adapts for our map m, the indices of its output rows that m changes, its
    d_out); path: the name of the module m adapts."""
    d_out = dims(_stored(m))[0]
    if m.rows is not None:  # a part of a fused map of this model
        start, stop, period = m.rows
        return path, torch.arange(d_out).view(-1, period)[:, start:stop].reshape(-1), d_out
    for theirs, ours in (fused or {}).items():  # a map that the other framework fuses with its siblings
        for i, o in enumerate(ours):
            if _ends_with(path, o):
                root = path[: len(path) - len(o)]
                heights = [dims(model.get_submodule(root + x))[0] for x in ours]
                return root + theirs, torch.arange(sum(heights[:i]), sum(heights[:i + 1])), sum(heights)
    return path, torch.arange(d_out), d_out
