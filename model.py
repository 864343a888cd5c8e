"""
GPT-2 in one file: the model, loading the pretrained weights (hub name, local directory or file),
writing them back in the Hugging Face layout, and generation with a KV cache.

Read in order: the configuration, attention, the MLP, the block and GPT (with generate, loading and
saving), then generation's KV cache and sampling. After them, two memory savers a learner may skip, each
with its measured gain: a LayerNorm that keeps its output for backward, and the chunked loss that
never holds the whole logits tensor; last, reading checkpoint files.

Module names follow the GPT-2 checkpoint (transformer.wte, wpe, h, ln_f, attn, mlp), so loading is a
name-for-name copy plus two explicit changes: the checkpoint's Conv1D weights are stored transposed,
and its fused attn.c_attn is split into attn.q, attn.k, attn.v (see CausalSelfAttention).
"""
import contextlib
import json
import math
import os
import re
import socket
from dataclasses import dataclass, fields
from urllib.parse import urlparse

import torch
import torch.nn as nn
from torch.nn import functional as F

# (n_layer, n_head, n_embd) of the four released sizes: 124M, 350M, 774M and 1558M parameters
SIZES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length (the checkpoint's n_positions)
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # GPT-2 was trained with 0.1; 0.0 is the usual choice for fine-tuning
    bias: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, not {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}): "
                             "each head gets n_embd / n_head channels")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not 0 < self.layer_norm_eps < 1:
            raise ValueError(f"layer_norm_eps (config.json's layer_norm_epsilon) must be in (0, 1), not {self.layer_norm_eps!r}")

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}: choose one of {', '.join(SIZES)}")
        n_layer, n_head, n_embd = SIZES[name]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)


# ---- the model: attention, MLP, block, GPT -------------------------------------------------------

class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        C = config.n_embd
        # The checkpoint fuses the three projections into one c_attn (768 -> 2304). We keep them as three
        # nn.Linear maps because each one is an adapter target of its own (LoRA's GPT-2 recipe adapts q
        # and v, not k): a plain nn.Linear per target lets sharelora.py find and wrap it by name without
        # knowing anything about GPT-2, instead of masking thirds of a fused output (loralib's
        # MergedLinear). The FLOPs are the same; the loader splits c_attn and save_pretrained re-fuses it.
        self.q = nn.Linear(C, C, bias=config.bias)
        self.k = nn.Linear(C, C, bias=config.bias)
        self.v = nn.Linear(C, C, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.layer = config.n_head, config.dropout, layer

    def forward(self, x, cache=None):
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        split = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        mask, causal = None, T > 1
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, nh, past + T, hs)
            if cache.mask is not None:  # left-padded rows (see KVCache)
                mask, causal = cache.mask, False
            elif past > 0 and T > 1:  # new queries see all the past and the causal part of the present
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                causal = False
            elif past > 0:  # one new query attends to everything cached
                causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new" is the tanh approximation of GELU
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.name_or_path = "scratch"  # what the weights are: set by from_pretrained
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # GPT-2 ties the output layer to the input embedding
        # GPT-2's init: N(0, 0.02), and the projections into the residual stream scaled by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, cache=None):
        """idx (B, T) -> the final hidden states (B, T, n_embd), before the vocabulary projection."""
        B, T = idx.size()
        past = cache.pos if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"a sequence of {past + T} tokens is longer than the model's context of "
                             f"{self.config.block_size}: shorten the input")
        pos = cache.positions(T, idx.device) if cache is not None else torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, cache=None, label_smoothing=0.0, return_logits=True, rows=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss).

        With `targets` (B, T), the loss is the mean cross-entropy over the positions whose target is
        not -100 (so a prompt can be left out of the loss; no such position: loss 0). return_logits=False
        is the training path: the vocabulary projection is computed only where the loss counts, in
        chunks, and logits is None. `rows`, the flat indices of those positions ((n,) long, on idx's
        device, e.g. computed on the CPU beside the batch), spares the GPU a synchronisation: finding
        them here from a boolean mask makes the host wait for the device, which alone knows how many
        there are. With a `cache` (KVCache), idx holds only the new positions."""
        with self.precision(idx.device.type):
            x = self.hidden(idx, cache)
            if targets is None:
                return self.lm_head(x), None
            if return_logits:
                logits = self.lm_head(x)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                       ignore_index=-100, label_smoothing=label_smoothing)
                return logits, loss
            if rows is None:
                rows = (targets.reshape(-1) != -100).nonzero().squeeze(1)
            weight = self.lm_head.weight if torch.is_grad_enabled() else self.lm_head.weight.detach()
            h = x.reshape(-1, x.size(-1)).index_select(0, rows)
            loss = LinearCrossEntropy.apply(h, weight, targets.reshape(-1).index_select(0, rows), label_smoothing,
                                            loss_chunk_rows(h.size(0), self.config.vocab_size, h.device))
            return None, loss

    def precision(self, device_type):
        """Autocast to model.compute_dtype, the dtype runtime.place stored the frozen matrices in, when
        the caller has not set autocast up itself: such a model (bfloat16 matrices, float32 vectors and
        embeddings) then runs as it is, e.g. straight from runtime.load_model."""
        dtype = getattr(self, "compute_dtype", None)
        if dtype is None or torch.is_autocast_enabled(device_type):
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
                 use_cache=True):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens.

        temperature=0 always takes the most likely token (greedy); otherwise sample from the softmax at
        that temperature, restricted to the top_k most likely tokens and/or the smallest set whose
        probability reaches top_p. A row that produced eos_token keeps emitting it; generation stops
        early once every row has. With use_cache, the prompt runs once and each new token costs one
        position; without it, every step re-runs the last block_size tokens."""
        total = idx.size(1) + max_new_tokens
        if use_cache and total > self.config.block_size:
            raise ValueError(f"prompt plus max_new_tokens is {total} tokens, more than the context of "
                             f"{self.config.block_size}: lower max_new_tokens or pass use_cache=False")
        cache = KVCache(self.config.n_layer, total) if use_cache else None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        step_input = idx
        with self.precision(idx.device.type):
            for _ in range(max_new_tokens):
                if cache is None:
                    step_input = idx[:, -self.config.block_size:]
                logits = self.lm_head(self.hidden(step_input, cache)[:, -1, :])  # only the last position's
                next_token = sample_next(logits, temperature, top_k, top_p)  # (B, 1)
                if eos_token is not None:
                    next_token = next_token.masked_fill(done[:, None], eos_token)
                    done |= next_token[:, 0] == eos_token
                idx = torch.cat((idx, next_token), dim=1)
                step_input = next_token
                if eos_token is not None and done.all():
                    break
        return idx

    # ---- loading and saving the Hugging Face GPT-2 layout ----------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """Load GPT-2 weights from
        - a hub name: gpt2, gpt2-medium, gpt2-large, gpt2-xl (or openai-community/gpt2, any repo id),
          downloaded once into the Hugging Face cache (resumable) and read with safetensors;
        - a local directory in the Hugging Face layout: config.json plus model.safetensors (or a sharded
          model.safetensors.index.json, or pytorch_model.bin, read with weights_only=True);
        - a local .safetensors file (its config.json beside it, or the size inferred from the shapes).
        `overrides` set GPTConfig fields that are not in the checkpoint, e.g. dropout=0.1."""
        config_dict, state = _read_checkpoint(str(name_or_path))
        config = _config_from_checkpoint(config_dict, state, overrides)
        model = cls(config)
        model.load_hf_state_dict(state)
        model.name_or_path = str(name_or_path)
        return model

    def load_hf_state_dict(self, state):
        ours = {}
        for key, t in state.items():
            key = key.removeprefix("transformer.")
            if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # tied to wte, and the causal-mask buffers of old checkpoints
            if key.endswith(CONV1D):
                t = t.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
            fused, parts = next(iter(HF_FUSED.items()))
            if f".{fused}." in key:  # split the fused projection into q, k, v
                for name, part in zip(parts, t.chunk(len(parts), dim=0)):
                    ours["transformer." + key.replace(fused, name)] = part
            else:
                ours["transformer." + key] = t
        expected = {k for k in self.state_dict() if k != "lm_head.weight"}
        missing, unexpected = sorted(expected - ours.keys()), sorted(ours.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"the checkpoint is not a GPT-2 of this size: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        with torch.no_grad():
            params = dict(self.named_parameters())
            for key, t in ours.items():
                if params[key].shape != t.shape:
                    raise ValueError(f"{key} has shape {tuple(t.shape)} in the checkpoint, "
                                     f"{tuple(params[key].shape)} in the model")
                params[key].copy_(t)

    def save_pretrained(self, path, state_dict=None):
        """Write config.json and model.safetensors in the layout of transformers' GPT2LMHeadModel, so that
        `GPT2LMHeadModel.from_pretrained(path)` loads it. `state_dict` (our names) defaults to the
        model's own; sharelora.export_merged passes the merged weights."""
        from safetensors.torch import save_file
        state = state_dict if state_dict is not None else self.state_dict()
        fused, (first, *others) = next(iter(HF_FUSED.items()))
        hf = {}
        for key, t in state.items():
            if key == "lm_head.weight" or any(f".{o}." in key for o in others):
                continue  # tied; k and v go into c_attn together with q
            if f".{first}." in key:
                key = key.replace(f".{first}.", f".{fused}.")
                t = torch.cat([state[key.replace(fused, n)] for n in (first, *others)], dim=0)
            if key.endswith(CONV1D):
                t = t.t()
            hf[key] = t.detach().to("cpu").contiguous()
        c = self.config
        config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
                      n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                      n_inner=None, activation_function="gelu_new", layer_norm_epsilon=c.layer_norm_eps,
                      resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                      bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True)
        os.makedirs(path, exist_ok=True)
        save_file(hf, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        mask = os.umask(0)  # save_file makes the file 0600; give it what open() gives every other file
        os.umask(mask)
        os.chmod(os.path.join(path, "model.safetensors"), 0o666 & ~mask)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


# ---- generation: the KV cache and choosing the next token ----------------------------------------

class KVCache:
    """Keys and values of every layer for the positions seen so far, so that generating a token costs
    one position's work instead of re-running the whole prefix. Preallocated for max_len positions;
    `pos` is the number of positions filled. Allocation waits for the first keys, so the cache takes
    their dtype (float32, or bfloat16 under autocast) and device.

    Prompts of different lengths in one batch: `pad` (B,) holds how many padding tokens precede each
    row's prompt (left padding: every row's next token then goes to the same position). A row's
    positions count from its first real token, and its real tokens never attend to its padding; a
    padding position attends only to itself (so that it stays finite, and no one reads it)."""

    def __init__(self, n_layer, max_len, pad=None):
        self.n_layer, self.max_len, self.pos, self.pad = n_layer, max_len, 0, pad
        self.k = self.v = None  # (n_layer, B, n_head, max_len, head_size) once allocated
        self.spare = None  # beam search: the buffers reorder() writes into next
        self.mask = None  # with pad: this forward pass's attention mask, (B, 1, T, pos + T)

    def positions(self, T, device):
        """The position ids of the next T tokens: (T,), or (B, T) with padding."""
        pos = torch.arange(self.pos, self.pos + T, dtype=torch.long, device=device)
        if self.pad is None:
            self.mask = None
            return pos
        keys = torch.arange(self.pos + T, device=device)
        real = keys[None, :] >= self.pad[:, None]  # (B, keys): not padding
        seen = keys[None, :] <= pos[:, None]  # (T, keys): causal
        self.mask = ((real[:, None, :] & seen[None]) | (keys[None, :] == pos[:, None])[None])[:, None]  # heads
        return (pos[None, :] - self.pad[:, None]).clamp(min=0)

    def update(self, layer, k, v):
        """Store this forward pass's k, v (B, nh, T, hs) for `layer`; return all positions so far."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_empty(self.n_layer, B, nh, self.max_len, hs)
            self.v = torch.empty_like(self.k)
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def reorder(self, index):
        """Keep the rows `index` of the batch (beam search: each surviving beam takes its parent's cache).
        The rows are gathered into a second pair of buffers, which then swap roles: one contiguous copy
        per layer and no new memory each step (a fresh tensor per step, as k[:, index] makes, cost 5x the
        time: 215 ms against 41 ms per step for 120 beams of GPT-2 124M on 2 CPU cores)."""
        rows = len(index)
        if self.spare is None or self.spare[0].size(1) < rows:
            self.spare = tuple(self.k.new_empty((self.n_layer, rows) + self.k.shape[2:]) for _ in range(2))
        k, v = (buf[:, :rows] for buf in self.spare)
        for layer in range(self.n_layer):
            torch.index_select(self.k[layer], 0, index, out=k[layer])
            torch.index_select(self.v[layer], 0, index, out=v[layer])
        self.spare = (self.k._base if self.k._base is not None else self.k,
                      self.v._base if self.v._base is not None else self.v)
        self.k, self.v = k, v
        if self.pad is not None:
            self.pad = self.pad[index]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, vocab) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the set has reached top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


# ---- memory savers: a LayerNorm that keeps its output, the chunked loss --------------------------

class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose training step keeps its output for backward instead of its input.

    Why: in a block, LayerNorm's output is what the adapters on q, k, v (or c_fc) keep for their own
    gradients, while nn.LayerNorm keeps its input, the residual stream, which nothing else keeps. Saving
    the output instead lets one tensor serve both and the input is freed: one (T, C) tensor less per
    block, 1/11 of an adapted block's activations (gpt2-medium at 256 positions: 266 -> 243 MiB). The
    backward recovers the normalised input from the output, x̂ = (y - bias) / weight (Apex's
    "memory_efficient" LayerNorm). That division is only as exact as the weight is far from zero, so the
    output is kept only where every |weight| >= 0.01 · max(1, |bias|), which bounds the error of x̂ by
    about 1e-5 in float32, checked at every call (weights can change behind autograd's back, through
    .data). Elsewhere it is the plain nn.LayerNorm: on a GPU (the check would make the host wait for the
    device at every call; train.py runs bfloat16 autocast there anyway), under autocast or other dtypes,
    and under torch.compile, whose partitioner decides for itself what backward keeps or recomputes."""

    def forward(self, x):
        if (torch.is_grad_enabled() and x.device.type == "cpu" and self.weight is not None
                and x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and self._invertible()):
            return OutputSavingLayerNorm.apply(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return super().forward(x)

    def _invertible(self):
        w, b = self.weight.detach(), self.bias
        bound = 0.01 * (b.detach().abs().clamp(min=1) if b is not None else 1)
        return bool((w.abs() >= bound).all())


class OutputSavingLayerNorm(torch.autograd.Function):
    """y = LayerNorm(x), saving y and 1/std for backward (see LayerNorm)."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):
        y, _, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(y, rstd, weight, bias)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rstd, weight, bias = ctx.saved_tensors
        xhat = (y - bias).div_(weight) if bias is not None else y / weight
        # aten's fused backward, given x̂ itself as the input (mean 0, 1/std 1), returns
        # weight·dy - mean(weight·dy) - x̂·mean(weight·dy·x̂); times 1/std that is the gradient for x
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3]]
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(dy, xhat, ctx.shape, torch.zeros_like(rstd),
                                                               torch.ones_like(rstd), weight, bias, mask)
        return (dx.mul_(rstd) if dx is not None else None), None, dw, db, None


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits h @ W.T, made and consumed a chunk of rows at a time.

    Why: for a 4 x 256 batch the logits are 1024 x 50,257 floats = 206 MB, and autograd would keep them
    and then make their gradient, as large again: the two biggest tensors of an adapter's training step.
    The gradient of the loss with respect to the logits has a closed form, softmax - target
    distribution, so the forward pass turns each chunk of logits into its loss and straight into the
    gradients for h (and W, when it trains), then frees the chunk. Backward only scales what it stored.

    Measured (README, "Against transformers + PEFT", `python bench.py`, 2-core CPU): a training step in
    about a third of PEFT's training memory, which holds the 4 x 256 x 50,257 logits (196 MiB) and their
    gradient; freeing each chunk before making the next took the step from 150 / 316 / 548 / 878 MiB to
    126 / 292 / 523 / 856 MiB for gpt2 ... gpt2-xl.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, label_smoothing, chunk_rows):
        # h (N, C): the hidden states whose target counts; weight (V, C); targets (N,)
        N, V = h.size(0), weight.size(0)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, N, chunk_rows):
            hc, t = h[s:s + chunk_rows], targets[s:s + chunk_rows]
            logits = (hc @ weight.t()).float()  # (n, V), float32 for a stable softmax
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            mean_logit = logits.mean(dim=-1) if label_smoothing > 0 else None
            # one pass of exp over the chunk, in place: e = exp(logits - max), lse = max + log(sum e),
            # and e / sum e is the softmax the gradient needs (logsumexp + softmax would do it twice)
            top = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(top).exp_()
            total = e.sum(dim=-1)
            lse = top.squeeze(1) + total.log()
            nll = lse - target_logit
            if label_smoothing > 0:  # same definition as F.cross_entropy(label_smoothing=...)
                nll = (1 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
            loss += nll.sum()
            if need_h or need_w:
                # the gradient of the summed loss: softmax minus the target distribution, |g| <= 1, which
                # float16 holds; the mean's 1/N comes after the products, in float32. (Scaled by 1/N
                # first, GPT-2's softmax entries, ~1/50,257, fall below float16's smallest numbers: in a
                # CPU emulation most became 0 and the gradient was 1.2% off at 8,192 tokens.)
                g = e.mul_((1 / total)[:, None])
                g[torch.arange(len(t), device=g.device), t] -= 1 - label_smoothing
                if label_smoothing > 0:
                    g -= label_smoothing / V
                if need_h:
                    grad_h[s:s + chunk_rows] = g.to(weight.dtype) @ weight
                if need_w:
                    grad_w += (g.to(hc.dtype).t() @ hc).float()
            # drop this chunk before the next one is made: the names would otherwise keep it alive
            # while `hc @ weight.t()` allocates the next, two chunks at the peak instead of one
            logits = e = g = None
        n = max(N, 1)  # no position counts: loss 0, gradients 0
        ctx.save_for_backward(grad_h.div_(n) if need_h else None, grad_w.div_(n) if need_w else None)
        ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def loss_chunk_rows(n_rows, vocab_size, device):
    """Rows per chunk of the chunked loss: at most 32 MB of float32 logits on a CPU (166 rows of GPT-2's
    vocabulary), 256 MB on a GPU, where larger products keep it busy (a choice, not measured here: no
    GPU was available), in chunks of equal size: 255 rows go as 128 + 127 (26 MB at the peak), not
    166 + 89, for the same two weight passes."""
    budget = 2**23 if device.type == "cpu" else 2**26  # float32 values
    chunks = max(1, math.ceil(n_rows / max(1, budget // vocab_size)))
    return max(1, math.ceil(n_rows / chunks))


# ---- reading checkpoint files --------------------------------------------------------------------

# the checkpoint's Conv1D modules, stored (in, out): these weights are transposed on the way in and out
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the checkpoint's fused module and the maps we keep apart, in the order of its output rows; also what
# sharelora.export_peft(..., fused=HF_FUSED) needs to write an adapter on q, k or v for transformers' GPT-2
HF_FUSED = {"attn.c_attn": ("attn.q", "attn.k", "attn.v")}


def _read_checkpoint(name_or_path):
    """-> (the config.json dict or None, the state dict in the checkpoint's own names)."""
    if os.path.isdir(name_or_path):
        d = name_or_path
        config = _read_json(os.path.join(d, "config.json")) if os.path.exists(os.path.join(d, "config.json")) else None
        for weights in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if os.path.exists(os.path.join(d, weights)):
                return config, _read_weights(os.path.join(d, weights))
        raise FileNotFoundError(f"{d} holds no model.safetensors or pytorch_model.bin: point to a "
                                "directory written by transformers' save_pretrained")
    if os.path.isfile(name_or_path):
        beside = os.path.join(os.path.dirname(name_or_path), "config.json")
        return (_read_json(beside) if os.path.exists(beside) else None), _read_weights(name_or_path)
    if name_or_path.endswith((".safetensors", ".bin")) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name_or_path} does not exist: give a hub name ({', '.join(SIZES)}), "
                                "a directory in the Hugging Face layout, or a .safetensors file")
    repo = f"openai-community/{name_or_path}" if name_or_path in SIZES else name_or_path
    try:
        from huggingface_hub import constants, hf_hub_download
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if not offline:
            try:  # no DNS means no network: read the local cache only, instead of retrying for ~30 s
                socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
            except OSError:
                offline = True
        config = _read_json(hf_hub_download(repo, "config.json", local_files_only=offline))
        return config, _read_weights(hf_hub_download(repo, "model.safetensors", local_files_only=offline))
    except Exception as e:  # no network, unknown repo, hub client missing: one message for all
        raise FileNotFoundError(
            f"could not get {repo!r} from the Hugging Face hub ({type(e).__name__}); without a network, "
            "pass a local directory with config.json and model.safetensors (e.g. written by transformers' "
            "save_pretrained) or a .safetensors file instead") from None


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore it or write it again") from None


def _read_weights(path):
    """The state dict in a weights file; a ValueError naming the file when it is not one. A pickle
    (.bin) is read with weights_only=True: it can hold tensors, never code that would run."""
    try:
        if path.endswith(".index.json"):  # sharded: every shard named in the index's weight_map
            shards = sorted(set(_read_json(path)["weight_map"].values()))
            return {k: v for s in shards for k, v in _read_weights(os.path.join(os.path.dirname(path), s)).items()}
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # truncated, a huge header, random bytes, a pickle holding code or other objects
        raise ValueError(f"{path} is not a readable weights file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}): restore it, or save the model again") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def _config_from_checkpoint(config, state, overrides):
    if config is not None and not isinstance(config, dict):
        raise ValueError("the checkpoint's config.json is not a JSON object")
    if config is not None:
        missing = [k for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd") if k not in config]
        if missing:
            raise ValueError(f"the checkpoint's config.json lacks {', '.join(missing)}: write it with "
                             "transformers' save_pretrained, or delete it to infer the size from the weights")
        unsupported = [k for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn") if config.get(k)]
        if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh") or unsupported:
            raise ValueError(f"this checkpoint uses GPT-2 options that model.py does not implement: "
                             f"{unsupported or config['activation_function']}")
        if config.get("n_inner") not in (None, 4 * config["n_embd"]):
            raise ValueError("this checkpoint's MLP is not 4 x n_embd wide, which model.py assumes")
        args = dict(block_size=config["n_positions"], vocab_size=config["vocab_size"],
                    n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                    layer_norm_eps=config.get("layer_norm_epsilon", 1e-5))
    else:  # a bare weights file: the shapes give everything but the number of heads
        wte = next((v for k, v in state.items() if k.endswith("wte.weight")), None)
        wpe = next((v for k, v in state.items() if k.endswith("wpe.weight")), None)
        if wte is None or wpe is None or wte.dim() != 2 or wpe.dim() != 2:
            raise ValueError("the checkpoint holds no GPT-2 embeddings (wte.weight, wpe.weight): is it a GPT-2?")
        n_layer = 1 + max(int(m.group(1)) for k in state if (m := re.search(r"(?:^|\.)h\.(\d+)\.", k)))
        n_embd = wte.size(1)
        n_head = {(l, e): h for l, h, e in SIZES.values()}.get((n_layer, n_embd))
        if n_head is None:
            raise ValueError(f"cannot tell the number of heads of a {n_layer}-layer, {n_embd}-wide model "
                             "from its weights alone: put its config.json beside the weights file")
        args = dict(block_size=wpe.size(0), vocab_size=wte.size(0), n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    known = {f.name for f in fields(GPTConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown GPTConfig field(s) {bad}: choose from {sorted(known)}")
    return GPTConfig(**{**args, **overrides})
