"""The GPT-2 architecture of the book's chapter 4, with two numerics behind one key.

`impl: book` computes exactly what the book computes (explicit causal mask, softmax, dropout on
the attention weights, the book's LayerNorm and tanh-GELU formulas), so a seeded training run
matches the book's package to the last digit. `impl: fast` computes the same function with
fused library kernels (scaled_dot_product_attention, F.layer_norm, F.gelu): same parameters,
same state_dict keys, same initialisation, logits within ~1e-5 in fp32, and usable under bf16
autocast and torch.compile.

Parameters are created in the book's order, so `torch.manual_seed(s); GPTModel(cfg)` gives
bit-identical weights to the book's `GPTModel(cfg)`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("book", "fast")

GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 256,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

MODEL_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


def check_model_cfg(cfg: dict) -> str:
    """Validate a model cfg dict; return its impl. Raises ValueError with one clear line."""
    missing = [k for k in MODEL_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}: give all of {', '.join(MODEL_KEYS)}")
    impl = cfg.get("impl", "book")
    if impl not in IMPLS:
        raise ValueError(f"model impl {impl!r} is unknown: use 'book' or 'fast'")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ValueError(
            f"emb_dim {cfg['emb_dim']} is not divisible by n_heads {cfg['n_heads']}: "
            "choose n_heads that divides emb_dim"
        )
    return impl


@dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to the context.

    Shapes: keys[i], values[i] are (batch, n_heads, context_length, head_dim); positions
    [0, pos) are filled. One new token then costs one forward over one position.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    pos: int = 0


class _CpuDropout(torch.autograd.Function):
    """Inverted dropout whose keep mask comes from numpy's PCG64, seeded from torch's generator.

    Same distribution as F.dropout (drop with probability p to 2**-32, scale kept ones by 1/(1-p)),
    reproducible under torch.manual_seed, and ~3x cheaper on CPU than torch's bernoulli_ (which
    dominates dropout's cost on the attention weights). The mask is kept as one byte per element.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())
        bits = np.random.Generator(np.random.PCG64(seed)).integers(0, 2**32, x.numel(), dtype=np.uint32)
        drop = torch.from_numpy(bits < round(p * 2**32)).view(x.shape)
        ctx.save_for_backward(drop)
        ctx.scale = 1.0 / (1.0 - p)
        return x.mul(ctx.scale).masked_fill_(drop, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return grad.mul(ctx.scale).masked_fill_(drop, 0.0), None


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout for `impl: fast`: the numpy-mask kernel in eager CPU mode, torch's elsewhere
    (under torch.compile the compiler generates and fuses its own random numbers)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    return _CpuDropout.apply(x, p)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int, impl: str = "book"):
        super().__init__()
        self.impl = impl
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "fast":
            return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * ((x - mean) / torch.sqrt(var + self.eps)) + self.shift


class GELU(nn.Module):
    def __init__(self, impl: str = "book"):
        super().__init__()
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "fast":
            return F.gelu(x, approximate="tanh")
        # The constant is a float32 0-d tensor, as in the book; a Python float would round differently.
        c = torch.sqrt(torch.tensor(2.0 / torch.pi))
        return 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg: dict, impl: str = "book"):
        super().__init__()
        d = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), GELU(impl), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    mask: torch.Tensor  # the registered buffer below (nn.Module's attribute lookup does not say so)

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, impl="book"):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out {d_out} is not divisible by num_heads {num_heads}")
        self.impl = impl
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # A persistent buffer in the book, so it is part of the state_dict; kept for key parity.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape  # (b, n, d_out) -> (b, heads, n, head_dim)
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, n, _ = x.shape
        keys = self._heads(self.W_key(x))
        queries = self._heads(self.W_query(x))
        values = self._heads(self.W_value(x))
        start = 0
        if cache is not None:
            keys, values, start = self._extend_cache(cache, layer, keys, values)

        if self.impl == "fast":
            ctx = self._fast_attention(queries, keys, values, start)
        else:
            scores = queries @ keys.transpose(2, 3)  # (b, heads, n, start + n)
            scores.masked_fill_(self.mask.bool()[start : start + n, : start + n], -torch.inf)
            weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
            weights = self.dropout(weights)
            ctx = weights @ values
        ctx = ctx.transpose(1, 2).reshape(b, n, self.d_out)
        return self.out_proj(ctx)

    def _fast_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        p = self.dropout.p if self.training else 0.0
        b, h, n, hd = q.shape
        if p > 0.0 and start == 0 and q.device.type == "cpu" and not torch.compiler.is_compiling():
            # Training with dropout on the attention weights: no fused CPU kernel does this, and
            # SDPA's fallback builds the mask and scales q and k anew every call. One baddbmm adds
            # the causal -inf bias and the 1/sqrt(d) scale inside the GEMM; the dropout is ours.
            q, k, v = (t.reshape(b * h, n, hd) for t in (q, k, v))
            scores = torch.baddbmm(self._causal_bias(n, q), q, k.transpose(1, 2), alpha=1.0 / math.sqrt(hd))
            weights = fast_dropout(torch.softmax(scores, dim=-1), p, True)
            return torch.bmm(weights, v).view(b, h, n, hd)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if n == 1:
            # One new query after the cached ones: it sees every key, so no mask at all.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        # Past keys are all visible; among the new ones, the usual causal triangle.
        allowed = ~self.mask.bool()[start : start + n, : start + n]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)

    def _causal_bias(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, n) float: 0 on and below the diagonal, -inf above; cached per size/device/dtype."""
        key = (n, like.device, like.dtype)
        cache = self.__dict__.setdefault("_bias_cache", {})
        bias = cache.get(key)
        if bias is None:
            bias = torch.zeros(n, n, device=like.device, dtype=like.dtype)
            bias.masked_fill_(self.mask.bool()[:n, :n], -torch.inf)
            cache.clear()
            cache[key] = bias
        return bias

    def _extend_cache(self, cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor):
        b, h, n, hd = k.shape
        if len(cache.keys) <= layer:
            ctx_len = self.mask.shape[0]
            cache.keys.append(k.new_empty(b, h, ctx_len, hd))
            cache.values.append(v.new_empty(b, h, ctx_len, hd))
        start = cache.pos
        if start + n > cache.keys[layer].shape[2]:
            raise ValueError(f"KV cache holds {cache.keys[layer].shape[2]} positions; {start + n} requested")
        cache.keys[layer][:, :, start : start + n] = k
        cache.values[layer][:, :, start : start + n] = v
        return cache.keys[layer][:, :, : start + n], cache.values[layer][:, :, : start + n], start


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict, impl: str = "book"):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            dropout=cfg["drop_rate"],
            num_heads=cfg["n_heads"],
            qkv_bias=cfg["qkv_bias"],
            impl=impl,
        )
        self.ff = FeedForward(cfg, impl)
        self.norm1 = LayerNorm(cfg["emb_dim"], impl)
        self.norm2 = LayerNorm(cfg["emb_dim"], impl)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])
        self.impl = impl

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if self.impl == "fast":
            p, training = self.drop_shortcut.p, self.training
            x = x + fast_dropout(self.att(self.norm1(x), cache, layer), p, training)
            return x + fast_dropout(self.ff(self.norm2(x)), p, training)
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2 as in the book. cfg: the book's GPT_CONFIG keys, plus optional `impl` (book|fast)."""

    def __init__(self, cfg: dict):
        super().__init__()
        impl = check_model_cfg(cfg)
        self.cfg = dict(cfg, impl=impl)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, impl) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"], impl)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    @property
    def impl(self) -> str:
        return self.cfg["impl"]

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """in_idx: (batch, n) token ids -> logits (batch, n, vocab_size).

        With a cache, in_idx holds only the new tokens; they sit at positions cache.pos onwards.
        """
        n = in_idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + n > self.pos_emb.num_embeddings:
            raise ValueError(f"{start + n} positions exceed context_length {self.pos_emb.num_embeddings}")
        pos = torch.arange(start, start + n, device=in_idx.device)
        x = self.tok_emb(in_idx) + self.pos_emb(pos)
        # fast: the submodule's flag, not self.training, as compile_blocks' view shares its submodules only.
        x = fast_dropout(x, self.drop_emb.p, self.drop_emb.training) if self.impl == "fast" else self.drop_emb(x)
        for i, block in enumerate(self.trf_blocks):
            # Without a cache the layer index is unused; not passing it keeps the blocks' calls
            # identical, so a compiled block is not re-specialised per layer.
            x = block(x, cache, i) if cache is not None else block(x)
        if cache is not None:
            cache.pos += n
        return self.out_head(self.final_norm(x))

    def num_parameters(self, non_embedding: bool = False) -> int:
        """All parameters, or those that do matmul work (the untied out_head counts; lookups don't)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel() + self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, context_length: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L d T."""
        T = context_length or self.cfg["context_length"]
        L, d = self.cfg["n_layers"], self.cfg["emb_dim"]
        return 6 * self.num_parameters(non_embedding=True) + 12 * L * d * T


class GPTModelFast(GPTModel):
    """The book's name for the fast model: `GPTModel` with `impl: fast`.

    The book's GPTModelFast has its own parameter names (a fused `qkv`, torch's LayerNorm);
    this one keeps GPTModel's, so checkpoints and state_dicts move freely between the two.
    With qkv_bias False (the book's configs) a seeded init equals the book's GPTModelFast in
    values: its `qkv` rows are our W_query, W_key and W_value weights, drawn in the same order.
    """

    def __init__(self, cfg: dict):
        if cfg.get("impl", "fast") != "fast":
            raise ValueError(f"GPTModelFast is impl 'fast', got impl {cfg['impl']!r}: use GPTModel for it")
        super().__init__(dict(cfg, impl="fast"))


def compile_blocks(model: GPTModel, **compile_kwargs) -> GPTModel:
    """Regional compilation: a view of `model` whose transformer blocks run under torch.compile.

    The blocks are identical, so one compiled graph serves them all: compiling takes seconds
    instead of the minutes a whole-model torch.compile takes on a CPU, for the same step time
    (PyTorch's regional-compilation recipe). The view shares every parameter, buffer and
    train/eval flag with `model`, and `model` stays eager for KV-cached generation, whose shapes
    change every token.
    """
    view = copy.copy(model)
    view._modules = dict(model._modules)  # copy.copy would share the dict, and so the swap below
    # torch.compile of a module returns a module (OptimizedModule); its stubs say only "callable".
    blocks = (cast(nn.Module, torch.compile(b, **compile_kwargs)) for b in model.trf_blocks)
    view._modules["trf_blocks"] = nn.Sequential(*blocks)
    return view
