"""Data windows built in fresh processes, so that each build's peak memory is its own.

One server process imports torch, the tokenizer and both dataset classes once, then forks a child
per request; `DataChildren` talks to it over pipes (one JSON line per request and per answer).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..datasets import GPTDatasetV1
from ..tokenizer import get_tokenizer
from .baseline import PassThrough


def _rss_kib(field_name: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(field_name)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_windows(spec: dict) -> list[dict]:
    """Build `spec`'s windows up to spec["reps"] times within its budget: seconds, peak KiB, window count."""
    torch.set_num_threads(spec["threads"])
    impl, source = spec["impl"], spec["source"]
    ctx, stride = spec["max_length"], spec["stride"]
    if impl == "book":
        import llms_from_scratch.ch02 as ch02

        cls = ch02.GPTDatasetV1
    else:
        cls = GPTDatasetV1
    if source == "text":
        text = Path(spec["text_path"]).read_text(encoding="ascii")
        tokenizer = get_tokenizer("gpt2")
        tokenizer.encode("warm up the tokenizer", allowed_special={"<|endoftext|>"})

        def build():
            return cls(text, tokenizer, ctx, stride)
    else:
        ids = np.load(spec["ids_path"])
        if impl == "book":
            tok = PassThrough(ids.tolist())  # the book's input form: a list of Python ints

            def build():
                return cls(None, tok, ctx, stride)
        else:

            def build():
                return cls.from_token_ids(ids, ctx, stride)

    results: list[dict] = []
    while len(results) < spec["reps"]:
        if results and sum(r["seconds"] for r in results) * (1 + 1 / len(results)) > spec["budget_s"]:
            break
        gc.collect()
        clean = _reset_peak()
        rss0 = _rss_kib("VmRSS")
        hwm0 = _rss_kib("VmHWM")
        t0 = time.perf_counter()
        ds = build()
        dt = time.perf_counter() - t0
        peak = _rss_kib("VmHWM") - (rss0 if clean else hwm0)
        n = len(ds)
        x, y = ds[n - 1]
        if not len(x) == len(y) == ctx:
            raise RuntimeError(f"{impl} window of {len(x)} tokens, expected {ctx}")
        del ds, x, y
        results.append({"seconds": dt, "peak_kib": peak, "windows": n, "clean_peak": clean})
    return results


def serve() -> None:
    """A process that has imported torch, the tokenizer and both dataset classes once, and forks a
    fresh child per request line (JSON spec) on stdin: each build gets a clean peak, at no import cost.
    One JSON answer line per request on stdout."""
    import llms_from_scratch.ch02  # noqa: F401  (imported once, before forking)

    get_tokenizer("gpt2")  # tiktoken keeps it: the children share the loaded BPE ranks

    out = sys.stdout
    sys.stdout = sys.stderr  # only answers go to the real stdout
    for line in sys.stdin:
        spec = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                payload = ["ok", build_windows(spec)]
            except BaseException as exc:
                payload = ["error", f"{type(exc).__name__}: {exc}"]
            with os.fdopen(w, "w") as f:
                f.write(json.dumps(payload))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            answer = f.read()
        _, status = os.waitpid(pid, 0)
        if not answer:
            answer = json.dumps(["error", f"the child died without an answer (wait status {status}; out of memory?)"])
        out.write(answer + "\n")
        out.flush()


class DataChildren:
    """Builds windows in fresh processes forked by one server (see serve)."""

    def __enter__(self):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding this gptexp package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from gptexp.bench.fork_server import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        return self

    def run(self, spec: dict) -> list[dict]:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the data fork server exited (code {self.proc.poll()})")
        status, payload = json.loads(line)
        if status != "ok":
            raise RuntimeError(f"data child {spec['impl']}/{spec['source']} failed: {payload}")
        return payload

    def __exit__(self, *exc):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        return False
