"""
Shared low-rank adapters: LoRA, ShareLoRA (ShareA / ShareB / ShareAB), Tied-LoRA and VeRA in one layer.

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
parameters (section 4 of the paper).

Tied-LoRA (Renduchintala et al. 2024, arXiv 2311.09578) ties A and B across layers and gives each layer
two cheap scaling vectors back, u (r) and v (d_out), each part trainable or frozen:

        y = W x + s · v ⊙ (B (u ⊙ (A dropout(x))))          (METHOD.md's formula; ⊙ is elementwise)

VeRA (Kopiczko et al. 2024, arXiv 2310.11454) is the corner of that space where A and B are frozen
random matrices and only u and v train (and s = 1).

So every method here is one formula with four components A, B, u, v, each with a placement
(`layer`: one per layer, `shared`: one for all layers of a target, `off`: the constant 1, u and v
only) and a training setting (`train` or `frozen`). Read this file top to bottom: the adapted layer,
the configuration, adding adapters to a model, counting, merging, saving, exporting.
Imports only torch and the standard library, so it can be copied into any project.
"""
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

COMPONENTS = ("A", "B", "u", "v")


# ---- 1. One adapted linear map ------------------------------------------------------------------

class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus the update s · v ⊙ B(u ⊙ A x).

    The components are given, not created here, because a shared component is one nn.Parameter that
    several AdaptedLinear modules hold at once (PyTorch lists it once in model.parameters(), so the
    optimizer updates it once, with the sum of the layers' gradients). u and v may be None (off).
    """

    def __init__(self, base, A, B, u=None, v=None, scale=1.0, dropout=0.0, name="", group="", config=None):
        super().__init__()
        self.base = base
        self.lora_A, self.lora_B, self.lora_u, self.lora_v = A, B, u, v  # (r, d_in), (d_out, r), (r,), (d_out,)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name, self.group, self.config = name, group, config  # for saving: see adapter_state_dict
        self.merged = False

    @property
    def weight(self):  # so that code reading `module.weight` (dtype, device, shape) keeps working
        return self.base.weight

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # ΔW is inside base.weight already: no adapter work at all
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(f"{self.name} is merged: call sharelora.unmerge(model) before training")
            return y
        # x -> A -> B: r·(d_in + d_out) multiply-adds per token, never the d_out·d_in of ΔW. u and v are
        # folded into the factors first (diag(u)·A is r x d_in, diag(v)·B is d_out x r): the same
        # product as scaling the activations, but elementwise work on the small matrices instead of on
        # every token's r- and d_out-wide vectors (tied and VeRA then train in LoRA's memory).
        # s is applied on the r-wide side, where it is cheapest. Components are cast to the input's
        # dtype, so a bfloat16 base works without autocast too.
        B, A = self.folded_factors()
        h = F.linear(self.dropout(x), A.to(x.dtype)) * self.scale  # (..., r)
        return y + F.linear(h, B.to(x.dtype))  # (..., d_out)

    def folded_factors(self):
        """(B', A') in float32 with v and u folded in: B' = diag(v) B, A' = diag(u) A, so ΔW = s · B' A'.
        Differentiable: forward uses it too (the adapters are float32 already, so .float() is free)."""
        A, B = self.lora_A.float(), self.lora_B.float()
        if self.lora_u is not None:
            A = self.lora_u.float()[:, None] * A
        if self.lora_v is not None:
            B = self.lora_v.float()[:, None] * B
        return B, A

    def delta_weight(self):
        """ΔW = s · diag(v) · B · diag(u) · A, in float32 (d_out, d_in): used only to merge and export."""
        B, A = self.folded_factors()
        return self.scale * (B @ A)

    def extra_repr(self):
        return f"group={self.group!r}, r={self.lora_A.size(0)}, scale={self.scale:g}, merged={self.merged}"


# ---- 2. The configuration: presets are spec strings ---------------------------------------------

# A spec is a space-separated list of settings; a preset is a named spec. Grammar:
#     spec    := setting (" " setting)*
#     setting := X "=" placement ["/" training]  |  "scale=" ("alpha/r" | "1")
#     X := A | B | u | v      placement := layer | shared | off (u, v only)      training := train | frozen
# Unspecified: A=layer, B=layer, u=off, v=off, training=train, scale=alpha/r. So "A=shared" is ShareA,
# and every configuration of the Tied-LoRA paper (its Table 1) can be written down, e.g. its vB®uA®
# with frozen u: "A=shared B=shared u=layer/frozen v=layer".
PRESETS = {
    "lora": "A=layer B=layer",  # Hu et al.
    "sharea": "A=shared B=layer",  # ShareLoRA's ShareA: about half of LoRA's parameters, same quality
    "shareb": "A=layer B=shared",  # ShareB
    "shareab": "A=shared B=shared",  # ShareAB: every layer adds the same ΔW
    "tied": "A=shared B=shared u=layer v=layer",  # Tied-LoRA vB®uA®, all trained
    "vera": "A=shared/frozen B=shared/frozen u=layer v=layer scale=1",  # VeRA: frozen random A, B
}


@dataclass
class AdapterConfig:
    """preset: one of PRESETS; spec: a spec string that overrides the preset (grammar above);
    r: the rank; alpha: s = alpha / r (LoRA's convention; the spec's scale=1 drops it, as VeRA does);
    dropout: on the adapter's input (LoRA's convention); targets: names of nn.Linear modules to adapt,
    matched on the end of the qualified name ("q" matches transformer.h.7.attn.q, "attn.c_proj" works
    too); seed: for every random initial value, so that frozen random matrices can be rebuilt."""
    preset: str = "sharea"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("q", "v")
    seed: int = 0
    spec: str = None

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ValueError("targets is empty: name at least one linear layer to adapt, e.g. ('q', 'v')")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (the rank, e.g. 8), got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number (s = alpha / r), got {self.alpha!r}")
        self.components()  # validates preset and spec now rather than halfway through add_adapters

    @property
    def scale(self):
        return 1.0 if self.components()["scale"] == "1" else self.alpha / self.r

    def components(self):
        """-> {"A": (placement, trainable), "B": ..., "u": ..., "v": ..., "scale": "alpha/r" | "1"}"""
        if self.spec is None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}, or give a spec")
        return parse_spec(self.spec if self.spec is not None else PRESETS[self.preset])

    def describe(self):
        """The resolved spec in canonical form, e.g. 'A=shared/train B=layer/train u=off v=off scale=alpha/r'."""
        c = self.components()
        parts = [f"{x}={c[x][0]}" + ("" if c[x][0] == "off" else "/train" if c[x][1] else "/frozen") for x in COMPONENTS]
        return " ".join(parts + [f"scale={c['scale']}"])


def parse_spec(spec):
    out = {"A": ("layer", True), "B": ("layer", True), "u": ("off", False), "v": ("off", False), "scale": "alpha/r"}
    seen = set()
    for setting in spec.split():
        key, _, value = setting.partition("=")
        if key in seen:
            raise ValueError(f"spec {spec!r} sets {key} twice")
        seen.add(key)
        if key == "scale" and value in ("alpha/r", "1"):
            out["scale"] = value
            continue
        placement, _, training = value.partition("/")
        ok_placements = ("layer", "shared") if key in ("A", "B") else ("layer", "shared", "off")
        if key not in COMPONENTS or placement not in ok_placements or training not in ("", "train", "frozen") \
                or (placement == "off" and training):
            raise ValueError(f"bad spec setting {setting!r} in {spec!r}: write X=placement[/training] with X in "
                             "A, B, u, v, placement layer|shared (|off for u, v), training train|frozen; "
                             "or scale=alpha/r|1")
        out[key] = (placement, placement != "off" and training != "frozen")
    if not any(out[x][1] for x in COMPONENTS):
        raise ValueError(f"spec {spec!r} freezes every component: nothing would train")
    return out


# ---- 3. Adding adapters to a model ---------------------------------------------------------------

def add_adapters(model, config):
    """Freeze the model and wrap every nn.Linear whose qualified name ends in one of config.targets.

    Wrapped maps are grouped by their name with the layer index removed (every all-digit part of the
    name becomes *: transformer.h.7.attn.q is in group transformer.h.*.attn.q); a `shared` component
    is one tensor per group. Works on any model built from nn.Linear layers. Returns the model."""
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError("this model already has adapters: load a fresh base model to add new ones")
    comps = config.components()
    linears = {n: model.get_submodule(n) for n in find_targets(model, config.targets)}
    groups = {}
    for n in linears:
        groups.setdefault(_group(n), []).append(n)

    r = config.r
    for group, names in groups.items():
        shapes = {tuple(linears[n].weight.shape) for n in names}  # (d_out, d_in)
        for d_out, d_in in shapes:
            if r > min(d_out, d_in):
                raise ValueError(f"r = {r} is larger than {group} ({d_in} -> {d_out}) allows: use r <= {min(d_out, d_in)}")
        for x, dim, what in (("A", 1, "inputs"), ("B", 0, "outputs"), ("v", 0, "outputs")):
            if comps[x][0] == "shared" and len({s[dim] for s in shapes}) > 1:
                raise ValueError(f"cannot share {x} across {group}: its maps have different numbers of {what} "
                                 f"({sorted({s[dim] for s in shapes})}); use {x}=layer or separate targets")
    for p in model.parameters():  # "mark only the adapters as trainable" (loralib)
        p.requires_grad_(False)

    zero = _zero_factor(comps)
    for group, names in groups.items():
        make = lambda x, key, lin: _initial_value(x, key, lin, r, comps, zero, config.seed)
        shared = {x: make(x, _key(names[0], x, comps), linears[names[0]]) for x in COMPONENTS if comps[x][0] == "shared"}
        for n in names:
            parts = {x: shared[x] if comps[x][0] == "shared" else make(x, _key(n, x, comps), linears[n])
                     for x in COMPONENTS if comps[x][0] != "off"}
            wrapped = AdaptedLinear(linears[n], parts["A"], parts["B"], parts.get("u"), parts.get("v"),
                                    scale=config.scale, dropout=config.dropout, name=n, group=group, config=config)
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, wrapped)
    return model


def _group(name):
    """transformer.h.7.attn.q -> transformer.h.*.attn.q: the maps one shared tensor serves."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def find_targets(model, targets):
    """{qualified name: target} for every nn.Linear whose name ends in one of `targets`."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    matched = {}
    for t in targets:
        names = [n for n in linears if n == t or n.endswith("." + t)]
        if not names:
            some = ", ".join(sorted({n.split(".")[-1] for n in linears})[:12])
            raise ValueError(f"target {t!r} matches no nn.Linear in the model; its linear layers end in: {some}")
        for n in names:
            if n in matched:
                raise ValueError(f"targets {matched[n]!r} and {t!r} both match {n}: list each layer once")
            matched[n] = t
    return matched


def _key(name, x, comps):
    """Where component x of the map `name` is saved: under the group for a shared one
    (transformer.h.*.attn.q.lora_A), under the layer for a per-layer one (transformer.h.7.attn.q.lora_B)."""
    return f"{_group(name) if comps[x][0] == 'shared' else name}.lora_{x}"


def _zero_factor(comps):
    """ΔW must be 0 at the start, so one factor starts at zero. It must be a trainable one, and only one:
    two zero factors in one product give each other zero gradients forever. LoRA's choice is B; with B
    frozen (VeRA) it is v; then u, then A, for the rarer corners of the spec space."""
    return next(x for x in ("B", "v", "u", "A") if comps[x][0] != "off" and comps[x][1])


def _shape(x, linear, r):
    d_out, d_in = linear.weight.shape
    return {"A": (r, d_in), "B": (d_out, r), "u": (r,), "v": (d_out,)}[x]


def _initial_value(x, key, linear, r, comps, zero, seed):
    """METHOD.md's initialisation. Random values come from a generator seeded by (seed, key), so the same
    configuration rebuilds the same frozen random matrices, on any machine."""
    shape = _shape(x, linear, r)
    if x == zero:
        t = torch.zeros(shape)
    elif x in ("A", "B"):  # Kaiming-uniform with a = sqrt(5), as nn.Linear and loralib: U(±1/sqrt(fan_in))
        g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16))
        bound = 1 / math.sqrt(shape[1])
        t = torch.empty(shape).uniform_(-bound, bound, generator=g)
    else:  # u and v start at 1, except VeRA's u (λ_d) at 0.1, the paper's d_initial, when v is the zero factor
        t = torch.full(shape, 0.1 if (x == "u" and zero == "v") else 1.0)
    # adapters live in float32 even on a bfloat16 base: they are what the optimizer updates
    return nn.Parameter(t.to(linear.weight.device), requires_grad=comps[x][1])


def adapted_layers(model):
    return [m for m in model.modules() if isinstance(m, AdaptedLinear)]


def _require_adapters(model):
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("this model has no adapters: call add_adapters(model, config) or load_adapter first")
    return layers


# ---- 4. Counting ---------------------------------------------------------------------------------

def count_trainable(model):
    """Trainable parameters, each tensor counted once (a shared tensor is one tensor)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_breakdown(model):
    """One row per target group: {"target", "layers", "A", "B", "u", "v", "total"} (trainable counts)."""
    rows = {}
    for m in _require_adapters(model):
        row = rows.setdefault(m.group, {"target": m.group, "layers": 0, "seen": set(), **{x: 0 for x in COMPONENTS}})
        row["layers"] += 1
        for x in COMPONENTS:
            p = getattr(m, f"lora_{x}")
            if p is not None and p.requires_grad and id(p) not in row["seen"]:
                row["seen"].add(id(p))
                row[x] += p.numel()
    for row in rows.values():
        del row["seen"]
        row["total"] = sum(row[x] for x in COMPONENTS)
    return list(rows.values())


def parameter_table(model):
    """The breakdown as a printable table, with the total and its share of all parameters."""
    rows = trainable_breakdown(model)
    width = max(len("target"), *(len(r["target"]) for r in rows))
    lines = [f"{'target':<{width}} {'layers':>6} " + " ".join(f"{x:>10}" for x in COMPONENTS) + f" {'total':>10}"]
    for r in rows:
        lines.append(f"{r['target']:<{width}} {r['layers']:>6} " + " ".join(f"{r[x]:>10,}" for x in COMPONENTS)
                     + f" {r['total']:>10,}")
    total = sum(r["total"] for r in rows)
    everything = sum(p.numel() for p in model.parameters())
    lines.append(f"trainable: {total:,} of {everything:,} parameters ({100 * total / everything:.3f}%)")
    return "\n".join(lines)


# ---- 5. Merging -----------------------------------------------------------------------------------

@torch.no_grad()
def merge(model):
    """Add each layer's ΔW into its W (in float32, then cast back): inference then costs what the base
    model costs. With a shared A each layer still gets its own ΔW_l = s·diag(v_l)·B_l·diag(u_l)·A.
    Explicit by design: never a side effect of train()/eval() (loralib's merge-on-eval surprised users)."""
    for m in _require_adapters(model):
        if not m.merged:
            w = m.base.weight
            w.copy_((w.float() + m.delta_weight()).to(w.dtype))
            m.merged = True
    return model


@torch.no_grad()
def unmerge(model):
    """Subtract ΔW again, so the adapter can train on. Exact in float32; in bfloat16 the round trip
    loses the low bits of W, so keep a float32 base if you merge and unmerge repeatedly."""
    for m in _require_adapters(model):
        if m.merged:
            w = m.base.weight
            w.copy_((w.float() - m.delta_weight()).to(w.dtype))
            m.merged = False
    return model


# ---- 6. Saving and loading -----------------------------------------------------------------------

def adapter_state_dict(model, trainable_only=False):
    """{key: tensor} with each tensor once: a shared component under its group's key
    (transformer.h.*.attn.q.lora_A), a per-layer one under its layer's (transformer.h.7.attn.q.lora_B).
    model.state_dict() would repeat a shared tensor under every layer's name instead."""
    out = {}
    for m in _require_adapters(model):
        cfg = m.config.components()
        for x in COMPONENTS:
            p = getattr(m, f"lora_{x}")
            if p is not None and (p.requires_grad or not trainable_only):
                out[_key(m.name, x, cfg)] = p
    return out


def _fingerprint(t):
    t = t.detach().double().cpu()
    return [float(t.sum()), float((t * t).sum())]


def save_adapter(model, path, base=None):
    """Write the adapter to one safetensors file, atomically (a temporary file, then a rename).

    The metadata holds the configuration, the base model's identity (`base`, default the model's
    name_or_path, and the shape of every adapted map) and, for frozen tensors that are still their
    seeded random values, a fingerprint instead of the tensor: they are rebuilt from the seed on load,
    so a VeRA file holds only its vectors, as in the VeRA paper."""
    from safetensors.torch import save_file
    layers = _require_adapters(model)
    config = layers[0].config
    comps = config.components()
    tensors, regenerated = {}, {}
    for key, t in adapter_state_dict(model).items():
        if not t.requires_grad:  # frozen: is it still what a fresh add_adapters would make from the seed?
            m = next(m for m in layers if key.startswith((m.group + ".lora_", m.name + ".lora_")))
            fresh = _initial_value(key[-1], key, m.base, config.r, comps, _zero_factor(comps), config.seed)
            # (compared in t's dtype: on a GPU, train.py stores frozen matrices in bfloat16)
            if torch.equal(fresh.data.to(t.dtype).cpu(), t.detach().cpu()):
                regenerated[key] = _fingerprint(fresh)
                continue
        tensors[key] = t.detach().to("cpu").contiguous()
    metadata = {
        "format": "sharelora", "version": "1",
        "config": json.dumps(asdict(config)),
        "base": json.dumps(base if base is not None else getattr(model, "name_or_path", None)),
        "shapes": json.dumps({m.name: list(m.base.weight.shape) for m in layers}),
        "regenerated": json.dumps(regenerated),
    }
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: give save_adapter a file name, e.g. {os.path.join(path, 'adapter.safetensors')}")
    tmp = f"{path}.tmp"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # atomic on POSIX and Windows: a crash leaves the old file or the new one
    finally:
        if os.path.exists(tmp):  # a failed write (a full disk) leaves nothing behind
            os.remove(tmp)


def read_adapter(path):
    """-> (AdapterConfig, metadata dict, {key: tensor}); a ValueError naming the file for anything a
    damaged or foreign file can hold: unreadable bytes, missing or malformed metadata, tensors that are
    not floating point or not finite."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable adapter file (truncated or corrupt?): {e}") from None
    if meta.get("format") != "sharelora":
        raise ValueError(f"{path} is a safetensors file but not a sharelora adapter (no sharelora metadata)")
    try:
        meta = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
        config = AdapterConfig(**meta["config"])
        if not isinstance(meta["shapes"], dict) or not isinstance(meta["regenerated"], dict):
            raise TypeError("shapes and regenerated must be objects")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"has damaged metadata ({e})"
        raise ValueError(f"{path} {what}: save the adapter again, or restore the file") from None
    for key, t in tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{path} holds {key} with {'inf or nan values' if t.is_floating_point() else t.dtype}: "
                             "an adapter holds finite floating-point tensors; use an earlier checkpoint")
    return config, meta, tensors


@torch.no_grad()
def load_adapter(model, path):
    """Load an adapter file into `model`: a fresh base (the sharing is rebuilt from the stored
    configuration with add_adapters, then the tensors are copied in) or a model that already carries
    adapters of the same configuration. Checks the base's shapes first, leaving the model untouched if
    the adapter was made for another one. Returns the model."""
    config, meta, tensors = read_adapter(path)
    layers = adapted_layers(model)
    if any(m.merged for m in layers):  # ΔW of the adapter in the model is inside W: it would stay there
        raise ValueError(f"the model's adapter is merged into its weights: call sharelora.unmerge(model) "
                         f"before loading {path}")
    if layers and layers[0].config != config:
        raise ValueError(f"the model's adapters ({layers[0].config.describe()}) differ from those in {path} "
                         f"({config.describe()}): load it onto a fresh base model")
    # every check comes before the first change to the model. The maps this configuration adapts in
    # this model must be exactly those it was trained on, with the same shapes.
    maps = {m.name: m.base for m in layers} if layers else {n: model.get_submodule(n) for n in find_targets(model, config.targets)}
    theirs = meta["shapes"]
    for name in sorted(maps.keys() | theirs.keys()):
        have = list(maps[name].weight.shape) if name in maps else None
        if have != theirs.get(name):
            size = lambda s: "x".join(map(str, s)) if s else "missing"
            raise ValueError(f"{path} was made for base {meta['base']!r}, where {name} is {size(theirs.get(name))}; "
                             f"in this model it is {size(have)}: load the adapter onto the base it was trained on")
    comps = config.components()
    expected = {}  # key -> (a map that holds it, component), as adapter_state_dict will name them
    for name, linear in maps.items():
        for x in COMPONENTS:
            if comps[x][0] != "off":
                expected.setdefault(_key(name, x, comps), (linear, x))
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"{path} holds tensors this configuration does not have: {unknown[:3]}")
    for key, (linear, x) in expected.items():
        if key in tensors:
            want = _shape(x, linear, config.r)
            if tuple(tensors[key].shape) != want:
                raise ValueError(f"{key} is {tuple(tensors[key].shape)} in {path} but {want} in the model")
        elif key in meta["regenerated"]:
            fresh = _initial_value(x, key, linear, config.r, comps, _zero_factor(comps), config.seed)
            if not _close(_fingerprint(fresh), meta["regenerated"][key]):
                raise ValueError(f"rebuilding the frozen {key} from seed {config.seed} gave other values than "
                                 "when it was saved (another torch random generator?)")
        else:
            raise ValueError(f"{path} lacks {key}: the file is incomplete")
    if not layers:
        add_adapters(model, config)
    for key, p in adapter_state_dict(model).items():
        if key in tensors:
            p.copy_(tensors[key])
    return model


def _close(a, b, rel=1e-9):
    return all(abs(x - y) <= rel * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))


# ---- 7. Leaving this project: merged weights and the PEFT layout ---------------------------------

@torch.no_grad()
def base_state_dict(model, add_delta=False):
    """The base model's state dict under the names it had before add_adapters, without adapter
    tensors: what a plain model loads. add_delta=True adds each ΔW to its W (see merged_state_dict).
    The model is left as it is."""
    out = {}
    wrappers = {m.name: m for m in _require_adapters(model)}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf.startswith("lora_"):
            continue
        module, _, param = owner.rpartition(".") if owner.endswith(".base") else ("", "", "")
        m = wrappers.get(module) if param == "base" else None
        if m is None:
            out[key] = t
        elif leaf == "weight" and add_delta and not m.merged:
            out[f"{module}.weight"] = (t.float() + m.delta_weight()).to(t.dtype)
        elif leaf == "weight" and not add_delta and m.merged:
            out[f"{module}.weight"] = (t.float() - m.delta_weight()).to(t.dtype)
        else:
            out[f"{module}.{leaf}"] = t
    return out


def merged_state_dict(model):
    """The base weights with every ΔW added, under the base's own names: a plain model with the
    adapter built in."""
    return base_state_dict(model, add_delta=True)


def export_merged(model, path):
    """Save the merged model with the model's own save_pretrained (model.py's GPT writes the Hugging
    Face GPT-2 layout, which transformers loads with the same logits)."""
    model.save_pretrained(path, state_dict=merged_state_dict(model))


@torch.no_grad()
def export_peft(model, path, base_model_name_or_path=None, fused=None, fan_in_fan_out=False):
    """Write `adapter_config.json` + `adapter_model.safetensors` that PEFT's LoRA loads with the same
    outputs. Every configuration converts exactly: u and v fold into A and B (A'_l = diag(u_l) A,
    B'_l = diag(v_l) B_l) and a shared tensor is written out once per layer, since PEFT has no sharing
    (the file grows back to LoRA's size). s is kept by setting lora_alpha = s · r.

    fused: {their module: (our modules, ...)} for a framework that fuses maps we keep apart, e.g.
    model.HF_FUSED for GPT-2's c_attn = q, k, v. The maps of one fused module become one LoRA of rank
    n·r whose B is block-diagonal (zero rows for a part that is not adapted), which is the same update.
    fan_in_fan_out: True for transformers' GPT-2, whose Conv1D stores weights transposed."""
    from safetensors.torch import save_file
    layers = _require_adapters(model)
    factors = {m.name: (*reversed(m.folded_factors()), m.scale) for m in layers}  # name -> (A', B', s)
    modules = {}
    for name in factors:
        match = next(((theirs, ours, name[: len(name) - len(o)]) for theirs, ours in (fused or {}).items()
                      for o in ours if name == o or name.endswith("." + o)), None)
        if match is None:
            modules[name] = factors[name]
            continue
        theirs, ours, root = match
        if root + theirs in modules:
            continue  # built with an earlier part of the same fused module
        parts = [factors.get(root + o) for o in ours]
        present = [p for p in parts if p is not None]
        r, scale = present[0][0].size(0), present[0][2]
        heights = [model.get_submodule(root + o).weight.size(0) for o in ours]
        A = torch.cat([p[0] for p in present])  # (n·r, d_in)
        B = torch.zeros(sum(heights), len(present) * r)  # block-diagonal: part i's rows, its own r columns
        row = col = 0
        for p, rows in zip(parts, heights):
            if p is not None:
                B[row:row + rows, col:col + r] = p[1]
                col += r
            row += rows
        modules[root + theirs] = (A, B, scale)
    ranks = {n: A.size(0) for n, (A, B, s) in modules.items()}
    alphas = {n: s * A.size(0) for n, (A, B, s) in modules.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r0, "lora_alpha": a0, "lora_dropout": layers[0].config.dropout, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "target_modules": sorted(modules), "use_rslora": False,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r0},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != a0},
        "inference_mode": True,
    }
    tensors = {}
    for n, (A, B, s) in modules.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = B.contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
