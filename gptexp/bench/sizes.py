"""The bench's sizes: what it measures and how long it may take (FULL, QUICK; tests shrink them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..model import GPT_CONFIG_124M

# The tiny preset's model (configs/tiny.yaml): its steps are short, so per-step logging shows most there.
TINY_MODEL = {
    "vocab_size": 50257,
    "context_length": 64,
    "emb_dim": 32,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


@dataclass(frozen=True)
class Sizes:
    """What the bench measures and how long it may take. FULL and QUICK below; tests shrink it."""

    model: dict = field(default_factory=lambda: dict(GPT_CONFIG_124M))
    batch: int = 8  # training batch; sequence length = context_length
    train_reps: int = 3
    # Interleaved timed rounds, all training variants together: on 2 idle cores round 1 takes ~80 s,
    # and a second round fits for the headline variants (~40 s), not for all of them.
    train_budget_s: float = 150.0
    compile: bool = True
    bf16_slow_shape: tuple[int, int] = (1, 8)  # (batch, seq) for bf16 training without bf16 hardware
    peak_n: int = 2048  # largest square matmul for the peaks
    peak_reps: int = 3
    peak_budget_s: float = 2.0  # a size is skipped when one matmul would take longer
    opt_reps: int = 2
    eval_tokens: int = 513  # validation split: 2 windows of 256
    eval_bf16_slow_tokens: int = 65
    eval_reps: int = 3
    eval_budget_s: float = 12.0
    gen_new: int = 200
    gen_bf16_slow_new: int = 8
    gen_reps: int = 3
    gen_budget_s: float = 35.0  # the book's full-context loop gets one repetition where one is ~minutes
    data_s1_tokens: int = 200_000  # windows at stride 1
    data_big_tokens: int = 2_000_000  # windows at stride = context length
    data_reps: int = 3
    data_budget_s: float = 8.0  # per build kind: the book's stride-1 windows take seconds each
    optimizer_model: bool = True  # compare AdamW implementations on the model's parameters
    # Per-step logging on vs off (bench.step_logging): steps per repetition, repetitions of each.
    logging_model: dict = field(default_factory=lambda: dict(TINY_MODEL))
    logging_batch: int = 8
    logging_steps: int = 50  # one log_batch of 50 steps per repetition
    logging_reps: int = 3

    def flat(self) -> dict:
        d = dataclasses.asdict(self)
        model = d.pop("model")
        d.update({f"model.{k}": v for k, v in model.items()})
        logging_model = d.pop("logging_model")
        d.update({f"logging_model.{k}": v for k, v in logging_model.items()})
        return d


FULL = Sizes()
QUICK = Sizes(
    batch=1,
    train_reps=2,
    train_budget_s=30.0,
    compile=False,
    bf16_slow_shape=(1, 4),
    peak_n=1024,
    peak_reps=2,
    opt_reps=1,
    eval_tokens=257,
    eval_bf16_slow_tokens=33,
    eval_reps=2,
    eval_budget_s=8.0,
    gen_new=20,
    gen_bf16_slow_new=4,
    gen_reps=2,
    gen_budget_s=10.0,
    data_s1_tokens=20_000,
    data_big_tokens=200_000,
    data_reps=2,
    data_budget_s=3.0,
    logging_steps=20,
    logging_reps=2,
)
