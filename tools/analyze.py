"""
The ShareLoRA paper's singular-value analysis (Song et al. 2024, section 5): how the energy of each
layer's update ΔW_l = s·diag(v_l)·B_l·diag(u_l)·A_l spreads over its r singular values.

    python tools/analyze.py --out_dir=out-compare/lora --out_dir=out-compare/sharea --png=sv.png

For every adapted map it prints σ_i / σ_1 for i = 1..r, and the effective rank exp(H(σ/Σσ)) (1: one
direction carries everything; r: all directions carry the same). The paper reports that ShareA's
singular values decay more smoothly than LoRA's: sharing A makes each layer use more of its rank.
With matplotlib installed, --png plots the per-target means.
"""
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: the project's modules
sys.path.insert(0, ROOT)
from data.common import TEXT, Parser, quiet_ctrl_c, write_binary

# torch, runtime and sharelora are imported where they are used, so that a mistake in the options
# shows at once, not after the seconds that importing torch takes


def normalized_singular_values(model):
    """{map name: tensor (r,) of σ_i / σ_1}, for every adapted map of the model."""
    import torch

    import sharelora
    out = {}
    for m in sharelora.adapted_layers(model):
        s = torch.linalg.svdvals(m.delta_weight())[: m.lora_A.size(0)]  # rank r at most: the rest are ~0
        out[m.name] = s / s[0] if s[0] > 0 else s
    return out


def effective_rank(s):
    p = s / s.sum()
    return math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())


def table(name, svs):
    r = max(len(s) for s in svs.values())
    lines = [f"## {name}", f"{'map':<28} {'eff. rank':>9}  σ_i/σ_1 for i = 1..{r}"]
    for layer, s in svs.items():
        lines.append(f"{layer:<28} {effective_rank(s):>9.2f}  " + " ".join(f"{x:.3f}" for x in s.tolist()))
    mean = sum(effective_rank(s) for s in svs.values()) / len(svs)
    lines.append(f"mean effective rank {mean:.2f} of {r}")
    return "\n".join(lines)


def options(argv=None):
    """The command line, checked before torch loads."""
    p = Parser(prog="analyze.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", type=TEXT, action="append", default=[], help="a training run's folder (repeat to compare)")
    p.add_argument("--adapter", type=TEXT, action="append", default=[], help="an adapter file (repeat to compare)")
    p.add_argument("--png", type=TEXT, help="write a plot here (needs matplotlib)")
    args = p.parse_args(argv)
    if not args.out_dir and not args.adapter:
        p.error("give at least one --out_dir or --adapter")
    if args.png and (os.path.isdir(args.png) or not args.png.endswith(".png")):
        p.error(f"--png {args.png} must be a file name ending in .png")
    return args


def main(argv=None):
    args = options(argv)
    import runtime
    runtime.run(analyze, args)


def analyze(args):
    import torch

    import runtime
    runs = [(d, dict(out_dir=d)) for d in args.out_dir] + [(a, dict(adapter=a)) for a in args.adapter]
    curves = {}
    for name, where in runs:
        model, info = runtime.load_model(**where, device="cpu", dtype="float32", merge=False)
        if info["adapter"] is None:
            runtime.fail(f"{name} holds no adapter (a whole model was trained there): give a run with an adapter")
        svs = normalized_singular_values(model)
        print(table(name, svs) + "\n")
        curves[name] = torch.stack(list(svs.values())).mean(0)
    if args.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            runtime.fail("--png needs matplotlib: pip install matplotlib (the tables above need nothing)")
        for name, c in curves.items():
            plt.plot(range(1, len(c) + 1), c.tolist(), marker="o", label=name)
        plt.xlabel("singular value index i")
        plt.ylabel("σ_i / σ_1 (mean over the adapted maps)")
        plt.legend()
        write_binary(args.png, lambda f: plt.savefig(f, dpi=120, bbox_inches="tight", format="png"))
        print(f"wrote {args.png}")


if __name__ == "__main__":
    quiet_ctrl_c()  # until runtime.run: Ctrl-C while torch loads ends quietly
    main()
