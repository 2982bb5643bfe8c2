"""OpenAI's GPT-2 weights, read from a local Hugging Face `model.safetensors`, in the book's GPTModel.

Only safetensors is read (never pickle), so a downloaded checkpoint cannot run code on load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import GptexpError
from .model import GPTModel, check_model_cfg


class GPT2Size(NamedTuple):
    emb_dim: int
    n_layers: int
    n_heads: int


GPT2_SIZES: Mapping[str, GPT2Size] = MappingProxyType(
    {
        "gpt2": GPT2Size(768, 12, 12),
        "gpt2-medium": GPT2Size(1024, 24, 16),
        "gpt2-large": GPT2Size(1280, 36, 20),
        "gpt2-xl": GPT2Size(1600, 48, 25),
    }
)

# Causal-mask buffers that old transformers versions saved; the model builds its own mask.
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER = re.compile(r"h\.(\d+)\.")
_FIX = "give the model.safetensors of a Hugging Face GPT-2 checkpoint (gpt2, gpt2-medium, gpt2-large, gpt2-xl)"


def _normalise(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `transformer.` prefix that GPT2LMHeadModel adds and the ignored buffers."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        name = key.removeprefix("transformer.")
        if _IGNORED.fullmatch(name):
            continue
        if name in out:
            raise GptexpError(f"key {name!r} appears both with and without the 'transformer.' prefix")
        out[name] = value
    return out


def gpt2_state_dict_from_hf(hf: Mapping[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Map HF GPT-2 tensors to GPTModel state_dict keys (without the `mask` buffers).

    Every expected tensor must be present with its GPT-2 shape, and nothing else may be left;
    a problem raises GptexpError naming the HF key.
    """
    left = _normalise(hf)

    def take(key: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        if key not in left:
            raise GptexpError(f"missing key {key!r}: not a complete GPT-2 checkpoint")
        t = left.pop(key)
        if t.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True)):
            want = tuple("*" if s is None else s for s in shape)
            raise GptexpError(f"key {key!r} has shape {tuple(t.shape)}, expected {want}")
        return t

    wte = take("wte.weight", (None, None))
    vocab, d = wte.shape
    sd = {"tok_emb.weight": wte, "pos_emb.weight": take("wpe.weight", (None, d))}
    for i in range(n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        # HF's Conv1D stores (in, out); nn.Linear wants (out, in).
        qkv_w = take(h + "attn.c_attn.weight", (d, 3 * d)).t()
        qkv_b = take(h + "attn.c_attn.bias", (3 * d,))
        for name, w, bias in zip(("W_query", "W_key", "W_value"), qkv_w.split(d), qkv_b.split(d), strict=True):
            sd[f"{b}att.{name}.weight"], sd[f"{b}att.{name}.bias"] = w, bias
        sd[b + "att.out_proj.weight"] = take(h + "attn.c_proj.weight", (d, d)).t()
        sd[b + "att.out_proj.bias"] = take(h + "attn.c_proj.bias", (d,))
        sd[b + "ff.layers.0.weight"] = take(h + "mlp.c_fc.weight", (d, 4 * d)).t()
        sd[b + "ff.layers.0.bias"] = take(h + "mlp.c_fc.bias", (4 * d,))
        sd[b + "ff.layers.2.weight"] = take(h + "mlp.c_proj.weight", (4 * d, d)).t()
        sd[b + "ff.layers.2.bias"] = take(h + "mlp.c_proj.bias", (d,))
        for ln, norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
            sd[f"{b}{norm}.scale"] = take(f"{h}{ln}.weight", (d,))
            sd[f"{b}{norm}.shift"] = take(f"{h}{ln}.bias", (d,))
    sd["final_norm.scale"] = take("ln_f.weight", (d,))
    sd["final_norm.shift"] = take("ln_f.bias", (d,))
    # GPT-2 ties the head to wte, so files often omit it; GPTModel's head is untied, so it gets a copy.
    sd["out_head.weight"] = take("lm_head.weight", (vocab, d)) if "lm_head.weight" in left else wte.clone()
    if left:
        raise GptexpError(f"unexpected key {sorted(left)[0]!r}: not a GPT-2 checkpoint of {n_layers} layers")
    return {k: v.contiguous() for k, v in sd.items()}


def _file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir() and (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    if not p.is_file():
        raise GptexpError(f"{p}: no such file; {_FIX}")
    return p


def _unreadable(p: Path, e: Exception) -> GptexpError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return GptexpError(f"{p}: not a readable safetensors file ({reason}); {_FIX}")


def _config(shapes: Mapping[str, tuple[int, ...]], p: Path, n_heads: int | None, impl: str, drop_rate: float) -> dict:
    names = {k.removeprefix("transformer."): s for k, s in shapes.items()}
    for key in ("wte.weight", "wpe.weight"):
        if len(names.get(key, ())) != 2:
            raise GptexpError(f"{p}: missing or malformed key {key!r}; {_FIX}")
    vocab, d = names["wte.weight"]
    layers = {int(m.group(1)) for k in names if (m := _LAYER.match(k))}
    if not layers:
        raise GptexpError(f"{p}: no transformer blocks (h.0.*); {_FIX}")
    if n_heads is None:
        known = {s.emb_dim: s.n_heads for s in GPT2_SIZES.values()}
        if d not in known:
            raise GptexpError(f"{p}: emb_dim {d} is not a GPT-2 size ({sorted(known)}); pass n_heads")
        n_heads = known[d]
    cfg = {
        "vocab_size": vocab,
        "context_length": names["wpe.weight"][0],
        "emb_dim": d,
        "n_heads": n_heads,
        "n_layers": max(layers) + 1,
        "drop_rate": drop_rate,
        "qkv_bias": True,
        "impl": impl,
    }
    try:
        check_model_cfg(cfg)
    except ValueError as e:
        raise GptexpError(f"{p}: {e}") from None
    return cfg


def gpt2_config_from_safetensors(
    path: str | Path, *, n_heads: int | None = None, impl: str = "fast", drop_rate: float = 0.0
) -> dict:
    """The GPTModel cfg of a HF GPT-2 safetensors file, from tensor shapes only (no weights read)."""
    p = _file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError) as e:
        raise _unreadable(p, e) from None
    return _config(shapes, p, n_heads, impl, drop_rate)


def load_gpt2_safetensors(
    path: str | Path,
    *,
    impl: str = "fast",
    drop_rate: float = 0.0,
    n_heads: int | None = None,
    device: str | torch.device = "cpu",
) -> GPTModel:
    """A GPTModel holding the weights of a HF GPT-2 safetensors file, in eval mode on `device`."""
    p = _file(path)
    try:
        hf = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise _unreadable(p, e) from None
    cfg = _config({k: tuple(v.shape) for k, v in hf.items()}, p, n_heads, impl, drop_rate)
    try:
        sd = gpt2_state_dict_from_hf(hf, cfg["n_layers"])
    except GptexpError as e:
        raise GptexpError(f"{p}: {e}") from None
    model = GPTModel(cfg)
    # The mask buffers are not in the file; everything else must match exactly.
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(".att.mask")]
    if missing or result.unexpected_keys:
        raise GptexpError(f"{p}: weights do not fit GPTModel (missing {missing}, unexpected {result.unexpected_keys})")
    return model.to(device).eval()
