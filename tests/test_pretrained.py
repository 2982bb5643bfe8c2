"""Specification of loading GPT-2 weights from a Hugging Face safetensors file.

The files are small synthetic checkpoints in HF's layout; the oracle is a forward pass written
here directly on the HF tensors with GPT-2's math, independent of gptexp.model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gptexp.errors import GptexpError
from gptexp.model import GPTModel
from gptexp.pretrained import (
    GPT2_SIZES,
    gpt2_config_from_safetensors,
    gpt2_state_dict_from_hf,
    load_gpt2_safetensors,
)

VOCAB, N_POS, D, LAYERS, HEADS = 97, 16, 32, 2, 4


def make_hf(vocab: int = VOCAB, n_pos: int = N_POS, d: int = D, n_layers: int = LAYERS, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    hf = {"wte.weight": rand(vocab, d), "wpe.weight": rand(n_pos, d)}
    for i in range(n_layers):
        h = f"h.{i}."
        hf |= {
            h + "ln_1.weight": 1 + rand(d),
            h + "ln_1.bias": rand(d),
            h + "attn.c_attn.weight": rand(d, 3 * d),
            h + "attn.c_attn.bias": rand(3 * d),
            h + "attn.c_proj.weight": rand(d, d),
            h + "attn.c_proj.bias": rand(d),
            h + "ln_2.weight": 1 + rand(d),
            h + "ln_2.bias": rand(d),
            h + "mlp.c_fc.weight": rand(d, 4 * d),
            h + "mlp.c_fc.bias": rand(4 * d),
            h + "mlp.c_proj.weight": rand(4 * d, d),
            h + "mlp.c_proj.bias": rand(d),
        }
    return hf | {"ln_f.weight": 1 + rand(d), "ln_f.bias": rand(d)}


def reference_logits(hf: dict, ids: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GPT-2's forward on the HF tensors themselves (Conv1D: x @ W + b)."""
    b, n = ids.shape
    d = hf["wte.weight"].shape[1]
    hd = d // n_heads
    n_layers = len({k.split(".")[1] for k in hf if k.startswith("h.")})

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (d,), hf[name + ".weight"], hf[name + ".bias"], eps=1e-5)

    def conv1d(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ hf[name + ".weight"] + hf[name + ".bias"]

    x = hf["wte.weight"][ids] + hf["wpe.weight"][torch.arange(n)]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    for i in range(n_layers):
        h = f"h.{i}."
        qkv = conv1d(ln(x, h + "ln_1"), h + "attn.c_attn").split(d, -1)
        q, k, v = (t.view(b, n, n_heads, hd).transpose(1, 2) for t in qkv)
        att = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(future, -torch.inf), dim=-1)
        x = x + conv1d((att @ v).transpose(1, 2).reshape(b, n, d), h + "attn.c_proj")
        x = x + conv1d(F.gelu(conv1d(ln(x, h + "ln_2"), h + "mlp.c_fc"), approximate="tanh"), h + "mlp.c_proj")
    return ln(x, "ln_f") @ hf["wte.weight"].T


def save(hf: dict, path: Path) -> Path:
    save_file(hf, str(path), metadata={"format": "pt"})
    return path


def ids(vocab: int = VOCAB, n: int = N_POS) -> torch.Tensor:
    return torch.randint(0, vocab, (3, n), generator=torch.Generator().manual_seed(1))


def one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.mark.parametrize("impl", ["book", "fast"])
def test_logits_match_reference_forward(tmp_path: Path, impl: str) -> None:
    hf = make_hf()
    model = load_gpt2_safetensors(save(hf, tmp_path / "model.safetensors"), impl=impl, n_heads=HEADS)
    model.eval()
    assert model.cfg == {
        "vocab_size": VOCAB,
        "context_length": N_POS,
        "emb_dim": D,
        "n_heads": HEADS,
        "n_layers": LAYERS,
        "drop_rate": 0.0,
        "qkv_bias": True,
        "impl": impl,
    }
    x = ids()
    with torch.no_grad():
        got, want = model(x), reference_logits(hf, x, HEADS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Shorter inputs exercise the causal mask on a prefix of the context.
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :5]), reference_logits(hf, x[:, :5], HEADS), atol=1e-5, rtol=0)


def test_transformer_prefix_old_buffers_and_tied_head_are_accepted(tmp_path: Path) -> None:
    hf = make_hf(seed=2)
    prefixed = {"transformer." + k: v for k, v in hf.items()} | {"lm_head.weight": hf["wte.weight"].clone()}
    for i in range(LAYERS):
        prefixed[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(N_POS, N_POS)).view(1, 1, N_POS, N_POS)
        prefixed[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    model = load_gpt2_safetensors(save(prefixed, tmp_path / "model.safetensors"), impl="fast", n_heads=HEADS)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(hf, x, HEADS), atol=1e-5, rtol=0)


def test_directory_holding_model_safetensors_is_accepted(tmp_path: Path) -> None:
    save(make_hf(), tmp_path / "model.safetensors")
    assert gpt2_config_from_safetensors(tmp_path, n_heads=HEADS)["n_layers"] == LAYERS


def test_known_size_infers_n_heads(tmp_path: Path) -> None:
    assert GPT2_SIZES["gpt2"].n_heads == 12
    hf = make_hf(vocab=50, n_pos=8, d=768, n_layers=1, seed=3)
    path = save(hf, tmp_path / "model.safetensors")
    cfg = gpt2_config_from_safetensors(path, impl="book")
    got = tuple(cfg[k] for k in ("n_heads", "emb_dim", "n_layers", "vocab_size", "context_length"))
    assert got == (12, 768, 1, 50, 8)
    model = load_gpt2_safetensors(path)
    assert model.cfg["n_heads"] == 12 and model.impl == "fast"
    x = ids(vocab=50, n=8)
    # d=768 gives logits of ~20, so fp32 summation order alone moves them by ~3e-5.
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(hf, x, 12), atol=1e-4, rtol=1e-5)


def test_mapping_yields_exactly_the_model_keys_but_masks() -> None:
    sd = gpt2_state_dict_from_hf(make_hf(), LAYERS)
    model = GPTModel(
        {
            "vocab_size": VOCAB,
            "context_length": N_POS,
            "emb_dim": D,
            "n_heads": HEADS,
            "n_layers": LAYERS,
            "drop_rate": 0.0,
            "qkv_bias": True,
        }
    )
    own = model.state_dict()
    assert set(sd) == {k for k in own if not k.endswith(".att.mask")}
    assert all(sd[k].shape == own[k].shape for k in sd)


def test_unknown_emb_dim_needs_n_heads(tmp_path: Path) -> None:
    path = save(make_hf(), tmp_path / "model.safetensors")
    for load in (gpt2_config_from_safetensors, load_gpt2_safetensors):
        with pytest.raises(GptexpError) as e:
            load(path)
        one_line_error(e, str(path), "emb_dim 32", "n_heads")


def test_n_heads_must_divide_emb_dim(tmp_path: Path) -> None:
    path = save(make_hf(), tmp_path / "model.safetensors")
    with pytest.raises(GptexpError) as e:
        load_gpt2_safetensors(path, n_heads=5)
    one_line_error(e, str(path), "n_heads 5")


def test_missing_key_is_named(tmp_path: Path) -> None:
    hf = make_hf()
    del hf["h.1.mlp.c_fc.bias"]
    path = save(hf, tmp_path / "model.safetensors")
    with pytest.raises(GptexpError) as e:
        load_gpt2_safetensors(path, n_heads=HEADS)
    one_line_error(e, str(path), "h.1.mlp.c_fc.bias")


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    hf = make_hf()
    hf["h.0.attn.c_proj.weight"] = torch.zeros(D, D + 1)
    path = save(hf, tmp_path / "model.safetensors")
    with pytest.raises(GptexpError) as e:
        load_gpt2_safetensors(path, n_heads=HEADS)
    one_line_error(e, str(path), "h.0.attn.c_proj.weight", f"({D}, {D + 1})")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    hf = make_hf() | {"h.0.attn.rotary.weight": torch.zeros(D)}
    path = save(hf, tmp_path / "model.safetensors")
    with pytest.raises(GptexpError) as e:
        load_gpt2_safetensors(path, n_heads=HEADS)
    one_line_error(e, str(path), "h.0.attn.rotary.weight")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    for load in (gpt2_config_from_safetensors, load_gpt2_safetensors):
        with pytest.raises(GptexpError) as e:
            load(path, n_heads=HEADS)
        one_line_error(e, str(path), "no such file")


RANDOM_BYTES = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(4)).tolist())


@pytest.mark.parametrize("content", [b"", RANDOM_BYTES], ids=["empty", "random"])
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    for load in (gpt2_config_from_safetensors, load_gpt2_safetensors):
        with pytest.raises(GptexpError) as e:
            load(path, n_heads=HEADS)
        one_line_error(e, str(path), "safetensors")
