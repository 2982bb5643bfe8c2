"""`make gpu-check`: what a CUDA machine must show before gptexp's GPU path is trusted.

1. parity  `impl: fast` against `impl: book` logits on the GPU in fp32, same weights (max |diff|).
2. bench   GPT-2 124M (the book's GPT_CONFIG_124M) training steps in bf16 autocast with `compile`
           (regional, as train.compile) and fused AdamW, through the runner's own train_step:
           tokens/s and MFU, the model FLOPs (nanoGPT's 6N + 12 L T d per token, N without the
           position embedding) against the device's dense bf16 peak from PEAK_BF16.
3. ddp     `gptexp train --nproc <GPUs>` (torchrun's engine, NCCL) on the tiny preset in fp32
           without dropout, against the same job on one GPU: both FINISHED, the final validation
           loss the same to 1e-4, the run tagged nccl with every GPU. Needs 2 GPUs (else skipped).

Prints one line per check and a JSON summary (also written to --out); exits 0 when every check
passes, 1 when one fails, and 2 with one line when there is no CUDA device.

    python scripts/gpu_check.py [--batch 16] [--steps 20] [--out bench-results/gpu-check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by the name torch reports; the SXM parts.
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12}
PARITY_TOL = 1e-4
DDP_TOL = 1e-4


def peak_for(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def parity(device: torch.device) -> dict:
    from gptexp.model import GPT_CONFIG_124M, GPTModel

    torch.manual_seed(123)
    book = GPTModel({**GPT_CONFIG_124M, "impl": "book", "drop_rate": 0.0}).to(device).eval()
    fast = GPTModel({**GPT_CONFIG_124M, "impl": "fast", "drop_rate": 0.0}).to(device).eval()
    fast.load_state_dict(book.state_dict())
    idx = torch.randint(0, GPT_CONFIG_124M["vocab_size"], (2, GPT_CONFIG_124M["context_length"]), device=device)
    with torch.inference_mode():
        diff = (book(idx) - fast(idx)).abs().max().item()
    return {"max_abs_diff": diff, "ok": diff < PARITY_TOL}


def bench(device: torch.device, batch: int, steps: int) -> dict:
    from gptexp.config import Config
    from gptexp.model import GPT_CONFIG_124M, GPTModel, compile_blocks
    from gptexp.runner import make_optimizer, train_step
    from gptexp.runtime import Runtime

    cfg = {**GPT_CONFIG_124M, "impl": "fast"}
    torch.manual_seed(123)
    model = GPTModel(cfg).to(device)
    runtime = Runtime(device, "bf16", torch.get_num_threads())
    optimizer = make_optimizer(model, Config(), runtime)
    forward = compile_blocks(model)
    ctx = cfg["context_length"]
    x = torch.randint(0, cfg["vocab_size"], (batch, ctx), device=device)
    y = torch.randint(0, cfg["vocab_size"], (batch, ctx), device=device)
    for step in range(5):  # compilation and allocator warm-up
        train_step(model, optimizer, x, y, runtime, step=step, forward=forward)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        train_step(model, optimizer, x, y, runtime, step=step, forward=forward)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_sec = steps * batch * ctx / seconds
    n = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    flops_per_token = 6 * n + 12 * cfg["n_layers"] * cfg["emb_dim"] * ctx
    name = torch.cuda.get_device_name(device)
    peak = peak_for(name)
    return {
        "device": name,
        "batch": batch,
        "context": ctx,
        "steps": steps,
        "tokens_per_sec": tokens_per_sec,
        "model_tflops": flops_per_token * tokens_per_sec / 1e12,
        "mfu": None if peak is None else flops_per_token * tokens_per_sec / peak,
        "peak_bf16_tflops": None if peak is None else peak / 1e12,
        "ok": True,
    }


def ddp(gpus: int) -> dict:
    if gpus < 2:
        return {"skipped": f"needs 2 GPUs, this machine has {gpus}", "ok": True}
    from mlflow.tracking import MlflowClient

    settings = [
        "train.device=cuda",
        "train.precision=fp32",
        "model.drop_rate=0",
        "train.num_epochs=2",
        f"train.batch_size={4 * gpus}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
        results = {}
        for name, nproc in (("one", 1), ("all", gpus)):
            args = [
                sys.executable,
                "-m",
                "gptexp",
                "train",
                "--config",
                str(REPO / "configs" / "tiny.yaml"),
                "--experiment",
                f"gpu-check-{name}",
                "--nproc",
                str(nproc),
            ]
            for item in settings:
                args += ["--set", item]
            start = time.perf_counter()
            done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                return {"ok": False, "failed": name, "stderr": done.stderr[-2000:]}
            client = MlflowClient(env["MLFLOW_TRACKING_URI"])
            (run,) = client.search_runs([client.get_experiment_by_name(f"gpu-check-{name}").experiment_id])
            results[name] = {
                "seconds": time.perf_counter() - start,
                "status": run.info.status,
                "epoch_val_loss": run.data.metrics["epoch_val_loss"],
                "backend": run.data.tags.get("gptexp.backend"),
                "devices": run.data.tags.get("gptexp.devices"),
            }
    diff = abs(results["one"]["epoch_val_loss"] - results["all"]["epoch_val_loss"])
    ok = (
        diff < DDP_TOL
        and results["all"]["backend"] == "nccl"
        and all(r["status"] == "FINISHED" for r in results.values())
    )
    return {"gpus": gpus, **results, "epoch_val_loss_diff": diff, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="124M bench batch (windows of 256 tokens)")
    parser.add_argument("--steps", type=int, default=20, help="timed 124M steps after 5 warm-up steps")
    parser.add_argument("--out", default=str(REPO / "bench-results" / "gpu-check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
            "run it on a machine with an NVIDIA GPU and a CUDA build of torch",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda", 0)
    summary = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "device": torch.cuda.get_device_name(device),
    }
    summary["parity"] = parity(device)
    print(f"parity  fast vs book logits, fp32: max |diff| {summary['parity']['max_abs_diff']:.2e}", flush=True)
    summary["bench"] = b = bench(device, args.batch, args.steps)
    mfu = "n/a (no peak for this GPU in PEAK_BF16)" if b["mfu"] is None else f"{100 * b['mfu']:.1f}%"
    print(
        f"bench   124M bf16 compile on {b['device']}: {b['tokens_per_sec']:,.0f} tokens/s, "
        f"{b['model_tflops']:.1f} TFLOP/s, MFU {mfu}",
        flush=True,
    )
    summary["ddp"] = d = ddp(summary["gpus"])
    if "skipped" in d:
        print(f"ddp     skipped: {d['skipped']}")
    elif "failed" in d:
        print(f"ddp     the {d['failed']} run failed: {d['stderr'].strip().splitlines()[-1:]}")
    else:
        print(
            f"ddp     {d['gpus']} GPUs ({d['all']['backend']}, {d['all']['devices']}): epoch_val_loss "
            f"{d['all']['epoch_val_loss']:.6f} vs {d['one']['epoch_val_loss']:.6f} on one GPU "
            f"(diff {d['epoch_val_loss_diff']:.1e}); {d['all']['seconds']:.0f} s vs {d['one']['seconds']:.0f} s"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    ok = all(summary[k]["ok"] for k in ("parity", "bench", "ddp"))
    print(f"gpu-check: {'pass' if ok else 'FAIL'} ({out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
