"""
Take a trained adapter out of this project.

    python tools/export.py --out_dir=out-e2e-gpt2m-sharea --to=hf   --dest=export-hf     # merged GPT-2
    python tools/export.py --out_dir=out-e2e-gpt2m-sharea --to=peft --dest=export-peft   # PEFT LoRA adapter

hf: the base with the adapter merged in, in the Hugging Face GPT-2 layout (config.json +
model.safetensors): transformers' GPT2LMHeadModel.from_pretrained(dest) gives the same logits.
peft: adapter_config.json + adapter_model.safetensors for PEFT's LoRA on transformers' GPT-2
(PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), dest)). Every preset converts
exactly; shared tensors are written once per layer, since PEFT has no sharing.
An adapter trained on a quantized base (train.py --quantize) is loaded onto the same quantized base;
hf then writes dequant(W) + ΔW in float32 (sharelora.export_merged).
The destination is written whole (data.common.write_folder): a failed or killed export leaves the
previous one as it was. It may be a new or empty folder, or an earlier export (its export.json says
so); a folder holding anything else (a run, a base) is refused.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: the project's modules
sys.path.insert(0, ROOT)
from data.common import TEXT, Parser, quiet_ctrl_c

# torch and the model are imported after the options are read (a mistake shows at once)


MARKER = "export.json"  # what was exported, from what: marks a folder this command may replace
WRITES = ("config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors", MARKER)


def options(argv=None):
    """The command line, checked before torch loads."""
    p = Parser(prog="export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", type=TEXT, help="a training run's folder")
    p.add_argument("--adapter", type=TEXT, help="an adapter file, instead of out_dir's")
    p.add_argument("--init_from", type=TEXT, help="the base model; default: the one the adapter names")
    p.add_argument("--to", choices=("hf", "peft"), required=True)
    p.add_argument("--dest", type=TEXT, required=True, help="the folder to write")
    return p.parse_args(argv)


def main(argv=None):
    args = options(argv)
    import runtime
    runtime.run(export, args)


def export(args):
    import runtime
    import sharelora
    from model import HF_FUSED

    # hf writes dequant(W) + ΔW, so it needs the base as trained; peft writes the adapter's tensors alone
    model, info = runtime.load_model(args.out_dir, args.adapter, args.init_from, device="cpu", dtype="float32",
                                     merge=False, quantize="auto" if args.to == "hf" else "none")
    if info["adapter"] is None:
        runtime.fail("no adapter found: give --out_dir of an adapter run or --adapter FILE")
    held = [f for f in (runtime.CKPT_FILE, runtime.ADAPTER_FILE) if os.path.exists(os.path.join(args.dest, f))]
    is_base = os.path.isdir(args.dest) and os.path.isdir(info["base"]) and os.path.samefile(info["base"], args.dest)
    if held or is_base:
        runtime.fail(f"--dest {args.dest} holds a training run or the base model ({', '.join(held) or 'the base'}), "
                     "which the export would overwrite: choose a new folder")
    # a local base is named relative to the current folder, as PEFT would resolve it from here
    base = os.path.relpath(info["base"]) if os.path.exists(info["base"]) else info["base"]

    def write(folder):
        if args.to == "hf":
            sharelora.export_merged(model, folder)
        else:
            sharelora.export_peft(model, folder, base_model_name_or_path=base, fused=HF_FUSED,
                                  fan_in_fan_out=True, task_type="CAUSAL_LM")  # transformers' GPT-2: Conv1D weights
        runtime.write_text(os.path.join(folder, MARKER), json.dumps(
            {"to": args.to, "adapter": os.path.abspath(info["adapter"]), "base": base}, indent=1) + "\n")

    runtime.write_folder(args.dest, write, "--dest", WRITES, MARKER)
    print(f"wrote {args.dest} ({args.to}) from {info['adapter']} on {info['base']}")
    if info["trained_on"] != "none" and args.to == "hf":
        print(f"the base was {info['trained_on']}: the merged weights are dequant(W) + ΔW in float32, what the adapter "
              "was trained against; the exported model is no longer quantized")
    elif info["trained_on"] != "none":
        print(f"the adapter was trained with quantize={info['trained_on']}: transformers quantizes GPT-2's fused c_attn "
              "as one matrix, so no BitsAndBytesConfig reproduces that base exactly (close: load_in_4bit with "
              "bnb_4bit_quant_type='nf4' for nf4, load_in_8bit for int8); --to=hf keeps the weights it was trained on")


if __name__ == "__main__":
    quiet_ctrl_c()  # until runtime.run: Ctrl-C while torch loads ends quietly
    main()
