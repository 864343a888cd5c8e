"""
quantize.py: a 4-bit (or 8-bit) frozen base under the adapters, as in QLoRA (Dettmers et al. 2023,
arXiv 2305.14314) and the ShareLoRA paper's QShareA.

An adapter never changes the base's weights, so they need no precision for training: QLoRA stores them
in 4-bit NormalFloat (NF4: 16 levels placed at the quantiles of a normal distribution, which is how
trained weights are spread), one absmax scale per block of 64 weights, and the scales themselves
quantized again ("double quantization"): about 0.52 bytes per weight instead of 4 (float32) or 2
(bfloat16). GPT-2 XL's 1.47 billion block weights go from 5.5 GiB to 0.72 GiB (bench.py --only quant,
README). Each forward dequantizes W to the compute dtype and multiplies; the adapter sees the same
inputs and learns against dequant(W).

    none   float32, or bfloat16 on a GPU (runtime.place): the default
    nf4    bitsandbytes Linear4bit, quant_type "nf4", blocks of 64, double quantization (QLoRA's setting)
    int8   bitsandbytes Linear8bitLt with int8 weights (one scale per output row)

What is quantized: the linear maps of the transformer blocks (attn.q, k, v, c_proj, mlp.c_fc, c_proj).
The embeddings and the output layer tied to them stay as they are, as in QLoRA: they are one matrix
read by a lookup and by the loss, where 4-bit errors would land on every token's logits.

bitsandbytes is optional (`pip install -r requirements-quant.txt`) and imported only when asked for.
sharelora.py never imports it: it reads a quantized layer's shape from in_features / out_features and
its effective weight by running it (sharelora.applied_weight).
"""
import functools
import logging

import torch
import torch.nn as nn

KINDS = ("none", "nf4", "int8")
NF4_BLOCK = 64  # weights per absmax scale (QLoRA's block size)
BLOCK_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def bitsandbytes():
    """The bitsandbytes module, or one sentence saying how to get it."""
    # On CPUs with AVX512-BF16, importing bitsandbytes looks for an optional faster kernel package
    # (`kernels`) and logs a warning when it is absent; the built-in path it falls back to is the one
    # tested here, so the warning says nothing the user must act on.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ValueError("quantize=nf4 and quantize=int8 need bitsandbytes: pip install -r requirements-quant.txt "
                         f"(it pins the tested version), or use quantize=none ({e})") from None
    return bnb


def check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"quantize must be one of {', '.join(KINDS)}, not {kind!r}")
    return kind


@torch.no_grad()
def quantize(model, kind, compute_dtype=torch.float32, double_quant=True):
    """Replace the block linears of model.py's GPT (before add_adapters) by quantized layers holding
    the same weights, quantized on the weights' device; kind 'none' leaves the model as it is.
    compute_dtype: what nf4 dequantizes to for each product (float32 on a CPU, bfloat16 on a GPU).
    double_quant: nf4's scales in 8 bits too (QLoRA's setting; transformers' BitsAndBytesConfig
    leaves it off unless bnb_4bit_use_double_quant=True). Returns the model, with model.quantized = kind."""
    if check_kind(kind) == "none":
        return model
    if getattr(model, "quantized", "none") != "none":
        raise ValueError(f"the model is quantized ({model.quantized}) already")
    bnb = bitsandbytes()
    for name, layer in list(model.named_modules()):
        if not (name.startswith("transformer.h.") and name.endswith(BLOCK_LINEARS)):
            continue
        if type(layer) is not nn.Linear:  # an adapter already wraps it, or something else sits there
            raise ValueError(f"{name} is a {type(layer).__name__}, not a plain nn.Linear: quantize the base "
                             "before adding adapters")
        w, device = layer.weight.detach(), layer.weight.device
        if kind == "nf4":
            new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=double_quant)
            new.weight = bnb.nn.Params4bit(w.float().cpu(), requires_grad=False, quant_type="nf4",
                                           blocksize=NF4_BLOCK, compress_statistics=double_quant)
            new.support_avx512bf16_for_cpu = False  # see the note on bitsandbytes' CPU paths below
        else:  # threshold 0: no float16 outlier columns, every weight in int8
            new = _int8_linear(bnb)(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
            new.weight = bnb.nn.Int8Params(w.float().cpu(), requires_grad=False, has_fp16_weights=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().float().cpu(), requires_grad=False)
        new = new.to(device)  # bitsandbytes quantizes when the layer is moved to its device
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)
    model.quantized = kind
    return model


# bitsandbytes' CPU paths change with the module's mode, which would make an evaluation compute
# something other than what training computes (measured on this project's Xeon, bitsandbytes 0.50.2):
# - Linear4bit, in eval mode without gradients, on a CPU with AVX512-BF16, repacks its weights once
#   and multiplies in bfloat16 from then on, in training too (5e-3 away from F.linear(x, dequant(W))
#   at 128 inputs). Switched off per layer (support_avx512bf16_for_cpu), so every product is
#   F.linear(x, dequant(W)) in compute_dtype.
# - Linear8bitLt in training mode dequantizes W and multiplies in the input's dtype; in eval mode it
#   quantizes the activations to int8 as well (LLM.int8, through float16). The class below runs the
#   training-mode path in both modes. On a GPU both modes multiply in int8 (LLM.int8).

@functools.cache
def _int8_linear(bnb):
    class Int8Linear(bnb.nn.Linear8bitLt):
        """Linear8bitLt that computes in eval mode as it does in training mode."""

        def forward(self, x):
            training, self.training = self.training, True
            try:
                return super().forward(x)
            finally:
                self.training = training

    return Int8Linear


def stored_bytes(model):
    """Bytes of the model's tensors as stored: packed 4-bit weights and their scales included, a tied
    tensor once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():  # nf4's scales live in a QuantState beside the packed weight
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            total += sum(t.numel() * t.element_size() for t in _state_tensors(qs))
        # int8: one float32 scale per output row, on the weight until the first forward moves it to .state
        scb = getattr(w, "SCB", None)
        scb = scb if scb is not None else getattr(getattr(m, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def _state_tensors(qs):
    out = [t for t in (qs.absmax, qs.code) if isinstance(t, torch.Tensor)]
    if getattr(qs, "state2", None) is not None:
        out += [t for t in (qs.state2.absmax, qs.state2.code) if isinstance(t, torch.Tensor)]
    return out
