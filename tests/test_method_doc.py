"""
docs/METHOD.md against sharelora.py. The document's tables and quoted names are read here and each row
is checked against the code, so that changing one without the other fails: the presets (names, specs,
resolved components, the zero factor), each count formula (evaluated from its text) on maps with
d_in != d_out, the worked counts on GPT-2-shaped models built on the meta device (their shapes, no
weights allocated), the grouping examples, the ΔW formula (evaluated from its text) on one
AdaptedLinear with random u and v, the keys that the saving section quotes, and the function names of
its last section.
"""
import inspect
import re

import pytest
import torch
import torch.nn as nn

import sharelora as sl
from conftest import ROOT
from model import SIZES, GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")

DOC = (ROOT / "docs" / "METHOD.md").read_text(encoding="utf-8")
MODELS = {"GPT-2 124M": "gpt2", "GPT-2 Medium": "gpt2-medium"}  # the worked tables' names


def _tables(text):
    """Every markdown table of text as (header cells, [row cells]), in order."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and lines[i + 1].startswith("|---") and not lines[i - 1].startswith("|"):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            found.append((_cells(line), rows))
    return found


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _code(cell):
    """`x` -> x"""
    return cell.strip().strip("`")


def _section(number):
    """The text of "## <number>. ..." up to the next section."""
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", DOC, flags=re.M | re.S)
    assert match, f"docs/METHOD.md has no section {number}"
    return match.group(0)


def _table(header_start):
    """The rows of the one table whose header starts so, as {first column: {header: cell}}."""
    tables = [(h, rows) for h, rows in _tables(DOC) if " | ".join(h).startswith(header_start)]
    assert len(tables) == 1, f"{len(tables)} tables in docs/METHOD.md start with {header_start!r}"
    header, rows = tables[0]
    assert rows, f"the table {header_start!r} is empty"
    return {_code(r[0]): dict(zip(header, r)) for r in rows}


PRESET_ROWS = _table("preset | spec in `PRESETS`")
SPEC_ROWS = _table("spec | what it is")
FORMULA = "trainable parameters"


def _formula_count(text, n, L, r, d_in, d_out):
    """A count formula of the document (`n·(r·d_in + L·r·d_out)`), evaluated."""
    expression = _code(text).replace("·", "*")
    assert re.fullmatch(r"[\w*+() ]+", expression), text
    return eval(expression, {"__builtins__": {}}, dict(n=n, L=L, r=r, d_in=d_in, d_out=d_out))


def _config(name, **kw):
    return sl.AdapterConfig(**({"spec": name} if "=" in name else {"preset": name}), **kw)


def _gpt(n_layer=None, size=None, **kw):
    if size:
        with torch.device("meta"):  # GPT-2's shapes without its weights
            return GPT(GPTConfig.from_name(size, vocab_size=256, block_size=64))
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=n_layer, n_head=2, n_embd=16, **kw))


# ---- the presets ------------------------------------------------------------------------------------

def test_the_preset_table_names_every_preset_with_its_spec():
    assert set(PRESET_ROWS) == set(sl.PRESETS)
    for name, row in PRESET_ROWS.items():
        assert _code(row["spec in `PRESETS`"]) == sl.PRESETS[name], name


@pytest.mark.parametrize("name", sorted(sl.PRESETS))
def test_the_preset_table_resolves_each_spec_as_the_code_does(name):
    row = PRESET_ROWS[name]
    config = sl.AdapterConfig(preset=name)
    comps = config.components()
    resolved = dict(part.split("=") for part in config.describe().split())
    for x in sl.COMPONENTS:
        assert row[x] == resolved[x], (name, x)
    assert row["s"] == resolved["scale"] and row["share"] == comps["share"], name
    assert row["starts at 0"] == sl._zero_factor(comps), name
    model = sl.add_adapters(_gpt(n_layer=2), config)  # ... and it is the one that does start at 0
    for m in sl.adapted_layers(model):
        for x in sl.COMPONENTS:
            t = getattr(m, f"lora_{x}")
            if t is not None:
                assert bool(t.eq(0).all()) == (x == row["starts at 0"]), (name, m.name, x)


# ---- the counts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [("mlp.c_fc",), ("mlp.c_proj",), ("q", "v")])
@pytest.mark.parametrize("name", sorted(PRESET_ROWS) + sorted(SPEC_ROWS))
def test_each_count_formula_is_what_the_code_counts(name, targets):
    """On a 3-layer model of width 16 at r = 4: c_fc is 16 -> 64 and c_proj 64 -> 16, so a formula
    that swaps d_in and d_out, or L and r, gives another number."""
    L, r = 3, 4
    model = sl.add_adapters(_gpt(n_layer=L), _config(name, r=r, targets=targets))
    d_out, d_in = sl.dims(model.get_submodule(sl.adapted_layers(model)[0].name))
    row = PRESET_ROWS.get(name) or SPEC_ROWS[name]
    expected = _formula_count(row[FORMULA], len(targets), L, r, d_in, d_out)
    assert sl.count_trainable(model) == expected
    assert sum(group["total"] for group in sl.trainable_breakdown(model)) == expected


def _worked_counts():
    """(preset, size, targets, r, count) for every number of the worked-count tables."""
    out = []
    for header, rows in _tables(_section(4)):
        settings = [re.fullmatch(r"(GPT-2 \w+) \(L (\d+), d (\d+)\), targets ([\w,]+), r (\d+)", h)
                    for h in header[1:]]
        if header[0] != "preset" or not all(settings):
            continue
        for row in rows:
            for s, cell in zip(settings, row[1:]):
                if cell != "—":
                    name, L, d, targets, r = s.groups()
                    assert SIZES[MODELS[name]][0::2] == (int(L), int(d)), s.group(0)  # (n_layer, n_embd)
                    out.append((_code(row[0]), MODELS[name], tuple(targets.split(",")), int(r),
                                int(cell.replace(",", ""))))
    return out


WORKED = _worked_counts()


def test_the_worked_counts_cover_every_preset_on_both_sizes():
    for name in sl.PRESETS:
        assert {size for p, size, *_ in WORKED if p == name} == set(MODELS.values()), name


@pytest.mark.parametrize("name,size,targets,r,count", WORKED)
def test_each_worked_count_is_the_code_count_and_the_formula(name, size, targets, r, count):
    model = sl.add_adapters(_gpt(size=size), sl.AdapterConfig(preset=name, r=r, targets=targets))
    assert sl.count_trainable(model) == count
    L, _, d = SIZES[size]
    assert set(targets) <= {"q", "k", "v"}  # each d -> d
    assert _formula_count(PRESET_ROWS[name][FORMULA], len(targets), L, r, d, d) == count


# ---- what "shared" spans ----------------------------------------------------------------------------

def test_the_grouping_examples_are_the_groups_the_code_makes():
    model = _gpt(n_layer=8)  # the examples name layer 7
    config = sl.AdapterConfig(preset="lora", targets=("q", "v"))
    maps = sl.find_targets(model, config)
    rows = _table("`share=` | one group")
    assert {_code(k.split()[0]) for k in rows} == {"layers", "targets", "all"}
    for key, row in rows.items():
        share = _code(key.split()[0])
        named = set(re.findall(r"`([^`]+)`", row["group name, GPT-2 targets q, v"]))
        assert named and named <= set(sl.group_maps(maps, config.layer_pattern, share)), share


# ---- the formula --------------------------------------------------------------------------------

def _doc_delta_formula():
    line = next(l for l in _section(1).splitlines() if l.strip().startswith("ΔW = "))
    return line.split("=", 1)[1].split("(d_out")[0].strip()  # s · diag(v) · B · diag(u) · A


@pytest.mark.parametrize("with_u,with_v", [(True, True), (True, False), (False, True), (False, False)])
def test_delta_w_is_the_documented_formula_and_forward_merge_use_it(with_u, with_v):
    g = torch.Generator().manual_seed(3)
    d_in, d_out, r, s = 7, 5, 3, 1.7
    base = nn.Linear(d_in, d_out)
    A, B = (nn.Parameter(torch.randn(shape, generator=g)) for shape in ((r, d_in), (d_out, r)))
    u = nn.Parameter(torch.rand(r, generator=g) + 0.5) if with_u else None
    v = nn.Parameter(torch.rand(d_out, generator=g) + 0.5) if with_v else None
    layer = sl.AdaptedLinear(base, A, B, u, v, scale=s).eval()
    ones = torch.ones
    names = dict(s=s * torch.eye(d_out), B=B, A=A, diag=torch.diag,  # s as s·I, so that · is @
                 u=u if with_u else ones(r), v=v if with_v else ones(d_out))
    delta = eval(_doc_delta_formula().replace("·", "@"), {"__builtins__": {}}, names)
    x = torch.randn(4, d_in, generator=g)
    W = base.weight.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), x @ (W + delta).T + base.bias, rtol=1e-5, atol=1e-5)
        unmerged = layer(x)
        sl.merge(layer)
        torch.testing.assert_close(base.weight, W + delta, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        sl.unmerge(layer)
        torch.testing.assert_close(base.weight, W, rtol=0, atol=1e-6)


# ---- saving -------------------------------------------------------------------------------------

def test_the_keys_the_saving_section_quotes_are_the_adapter_state_dict_keys(tmp_path):
    quoted = set(re.findall(r"`(transformer\.h\.[\w.*]+\.lora_[ABuv])`", _section(7)))
    assert len(quoted) >= 2
    model = sl.add_adapters(_gpt(n_layer=8), sl.AdapterConfig(preset="sharea", targets=("q", "v")))
    assert quoted <= set(sl.adapter_state_dict(model))
    # "a vera file holds only the u and v vectors": A and B are fingerprints in its metadata
    vera = sl.add_adapters(_gpt(n_layer=2), sl.AdapterConfig(preset="vera", targets=("q", "v")))
    sl.save_adapter(vera, tmp_path / "vera.safetensors")
    _, meta, tensors = sl.read_adapter(tmp_path / "vera.safetensors")
    assert {k[-1] for k in tensors} == {"u", "v"} and {k[-1] for k in meta["regenerated"]} == {"A", "B"}


# ---- where each part is -------------------------------------------------------------------------

def _part_one_names():
    """The public names that sharelora.py defines before its "END OF PART 1" banner."""
    source = inspect.getsource(sl).splitlines()
    banner = next(i for i, line in enumerate(source, 1) if "END OF PART 1" in line and line.startswith("#"))
    return {n for n in sl.__all__ if callable(getattr(sl, n)) and inspect.getsourcelines(getattr(sl, n))[1] < banner}


def test_the_function_table_names_what_exists_and_all_of_part_one():
    rows = _table("what | in `sharelora.py`")
    named = set()
    for row in rows.values():
        owner, *members = re.findall(r"`(\w+)`", row["in `sharelora.py`"])
        assert hasattr(sl, owner), owner
        if "(" in row["in `sharelora.py`"]:  # `Class` (`member`, ...)
            assert all(hasattr(getattr(sl, owner), m) for m in members), (owner, members)
            named.add(owner)
        else:
            assert all(hasattr(sl, m) for m in members), members
            named.update([owner, *members])
    assert _part_one_names() <= named
