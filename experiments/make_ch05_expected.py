"""Produce experiments/ch05-verdict.expected.yaml with the book's own package (llms-from-scratch).

The chapter-5 training run exactly as the book sets it up (section 5.2): seed 123, the book's
character split (train_ratio 0.9), loaders with batch 2 and stride = max_length = 256 (train
shuffled with drop_last, validation in order keeping every batch, num_workers 0), seed 123
again, GPTModel(GPT_CONFIG_124M with context 256), AdamW(lr=4e-4, weight_decay=0.1), and
train_model_simple(num_epochs=10, eval_freq=5, eval_iter=5, "Every effort moves you").
Threads: one per physical core, as gptexp's runner sets them. Text: the-verdict from the
registry/mirror, its sha256 checked against the spec.

Nothing here uses gptexp's model, loaders or loop: only its corpus loader and thread policy.

    TIKTOKEN_CACHE_DIR=... GPTEXP_DATA_MIRROR=... .venv/bin/python experiments/make_ch05_expected.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import io
import json
import platform
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SPEC = HERE / "ch05-verdict.yaml"
OUT = HERE / "ch05-verdict.expected.yaml"


class _Tee(io.TextIOBase):
    """Write to the console and keep a copy (train_model_simple prints its samples)."""

    def __init__(self, stream):
        self.stream, self.lines = stream, io.StringIO()

    def write(self, s):
        self.stream.write(s)
        self.stream.flush()
        return self.lines.write(s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT.name})")
    args = parser.parse_args(argv)

    import tiktoken
    import torch
    from llms_from_scratch.ch02 import create_dataloader_v1
    from llms_from_scratch.ch04 import GPTModel, generate_text_simple
    from llms_from_scratch.ch05 import text_to_token_ids, token_ids_to_text, train_model_simple

    from gptexp.corpus import load_corpus
    from gptexp.provenance import cpu_model
    from gptexp.runtime import set_threads

    spec = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    corpus = load_corpus(spec["corpus"]["name"])
    if corpus.sha256 != spec["corpus"]["sha256"]:
        raise SystemExit(f"corpus {corpus.name} has sha256 {corpus.sha256}, the spec pins {spec['corpus']['sha256']}")
    text_data = corpus.text

    threads = set_threads(0)  # one per physical core, as the runner does
    cfg = spec["config"]
    GPT_CONFIG_124M = {
        "vocab_size": 50257,  # Vocabulary size
        "context_length": 256,  # Shortened context length (orig: 1024)
        "emb_dim": 768,  # Embedding dimension
        "n_heads": 12,  # Number of attention heads
        "n_layers": 12,  # Number of layers
        "drop_rate": 0.1,  # Dropout rate
        "qkv_bias": False,  # Query-key-value bias
    }
    # The spec's config must be the book's: refuse to record numbers for anything else.
    assert {k: cfg["model"][k] for k in GPT_CONFIG_124M} == GPT_CONFIG_124M, cfg["model"]
    assert cfg["train"]["batch_size"] == 2 and cfg["train"]["num_epochs"] == 10 and cfg["train"]["seed"] == 123
    assert float(cfg["train"]["lr"]) == 4e-4 and float(cfg["train"]["weight_decay"]) == 0.1
    assert cfg["train"]["eval_freq"] == 5 and cfg["train"]["eval_iter"] == 5 and cfg["data"]["train_ratio"] == 0.9
    start_context = cfg["sample"]["start_context"]
    assert start_context == "Every effort moves you" and cfg["sample"]["max_new_tokens"] == 50

    tick = time.perf_counter()
    # --- the book, section 5.1.3 / 5.2 ---
    train_ratio = 0.90
    split_idx = int(train_ratio * len(text_data))
    train_data = text_data[:split_idx]
    val_data = text_data[split_idx:]

    torch.manual_seed(123)
    train_loader = create_dataloader_v1(
        train_data,
        batch_size=2,
        max_length=GPT_CONFIG_124M["context_length"],
        stride=GPT_CONFIG_124M["context_length"],
        drop_last=True,
        shuffle=True,
        num_workers=0,
    )
    val_loader = create_dataloader_v1(
        val_data,
        batch_size=2,
        max_length=GPT_CONFIG_124M["context_length"],
        stride=GPT_CONFIG_124M["context_length"],
        drop_last=False,
        shuffle=False,
        num_workers=0,
    )

    device = torch.device("cpu")
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    num_epochs = 10
    tokenizer = tiktoken.get_encoding("gpt2")
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        train_losses, val_losses, tokens_seen = train_model_simple(
            model,
            train_loader,
            val_loader,
            optimizer,
            device,
            num_epochs=num_epochs,
            eval_freq=5,
            eval_iter=5,
            start_context=start_context,
            tokenizer=tokenizer,
        )
    # --- end of the book's code ---
    seconds = time.perf_counter() - tick

    # The last sample train_model_simple printed (newlines shown as spaces), regenerated in full.
    model.eval()
    with torch.no_grad():
        ids = generate_text_simple(
            model,
            text_to_token_ids(start_context, tokenizer).to(device),
            max_new_tokens=50,
            context_size=GPT_CONFIG_124M["context_length"],
        )
    sample = token_ids_to_text(ids, tokenizer)
    printed = [ln for ln in tee.lines.getvalue().splitlines() if ln.startswith(start_context)]
    assert len(printed) == num_epochs and printed[-1] == sample.replace("\n", " "), (printed[-1:], sample)

    steps_per_epoch = len(train_loader)
    points = zip(train_losses, val_losses, tokens_seen, strict=True)
    evals = [
        {
            "step": i * 5,
            "epoch": i * 5 // steps_per_epoch + 1,
            "train_loss": float(t),
            "val_loss": float(v),
            "tokens_seen": int(n),
        }
        for i, (t, v, n) in enumerate(points)
    ]
    record = {
        "experiment": spec["name"],
        "produced_by": {
            "command": "TIKTOKEN_CACHE_DIR=... GPTEXP_DATA_MIRROR=... "
            ".venv/bin/python experiments/make_ch05_expected.py",
            "code": "llms_from_scratch.ch02.create_dataloader_v1, ch04.GPTModel, ch05.train_model_simple, "
            "ch04.generate_text_simple",
            "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "llms_from_scratch": importlib.metadata.version("llms-from-scratch"),
            "tiktoken": importlib.metadata.version("tiktoken"),
            "cpu": cpu_model(),
            "threads": threads,
            "device": "cpu",
            "precision": "fp32",
            "seconds": round(seconds, 1),
        },
        "corpus_sha256": corpus.sha256,
        "steps_per_epoch": steps_per_epoch,
        "evals": evals,
        "sample": {"epoch": num_epochs, "prompt": start_context, "text": sample},
    }
    # A copy in JSON first, so a run of half an hour is never lost to a formatting error below.
    backup = args.out.with_suffix(".json.tmp")
    backup.write_text(json.dumps(record, default=str, indent=1), encoding="utf-8")
    write_record(record, args.out)
    backup.unlink()
    print(f"wrote {args.out} ({len(evals)} eval points, {seconds:.0f} s)")
    return 0


def _plain(value):
    """YAML-safe builtins (torch.__version__ is a str subclass that safe_dump refuses)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def write_record(record: dict, path: Path) -> None:
    header = (
        "# Expected results of experiments/ch05-verdict.yaml, produced by the book's own package\n"
        "# (llms-from-scratch) with experiments/make_ch05_expected.py. Do not edit by hand: rerun it.\n"
    )
    path.write_text(
        header + yaml.safe_dump(_plain(record), sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8"
    )


if __name__ == "__main__":
    sys.exit(main())
