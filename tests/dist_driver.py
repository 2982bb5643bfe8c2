"""One rank's side of a check of tests/test_distributed.py, run under torchrun (2 gloo processes):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_driver.py MODE OUT CONFIG [K=V...]

shards  iterate this rank's shares of the training loader (two epochs, from the config's seed) and the
        validation loader, then score a seeded model with the sharded evaluate_split and the book's
        calc_loss_loader; save what it saw and got to OUT/rank<R>.pt
nan     train (runner.run) with rank 1's weights poisoned with NaN after step 2; save what each rank raised

Each rank writes its own file; the test reads them and compares with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gptexp import distributed
from gptexp.config import load_config
from gptexp.data import prepare_data
from gptexp.evaluation import calc_loss_loader, evaluate_split
from gptexp.jobs import preflight
from gptexp.model import GPTModel
from gptexp.runner import Callback, StepEvent, run


def shards(world, config) -> dict:
    data = prepare_data(config)
    train, val = world.shard(data.train_loader), world.shard(data.val_loader)
    torch.manual_seed(config.train.seed)
    epochs = [[inputs for inputs, _ in train] for _ in range(2)]
    val_shares = [inputs for inputs, _ in val]
    rng = torch.get_rng_state()
    torch.manual_seed(config.train.seed)
    model = GPTModel(config.model_cfg()).eval()
    with torch.inference_mode():
        split = evaluate_split(model, data.val_ids, config.model.context_length, "cpu", 3, world=world)
        losses = [
            calc_loss_loader(val, model, "cpu", world=world),
            calc_loss_loader(train, model, "cpu", num_batches=3, world=world),
        ]
    return {"epochs": epochs, "val": val_shares, "rng": rng, "split": (split.loss, split.tokens), "losses": losses}


class PoisonRank1(Callback):
    def __init__(self, world):
        self.world = world

    def on_start(self, event) -> None:
        self.model = event.model

    def on_step(self, event: StepEvent) -> None:
        if event.global_step == 2 and self.world.rank == 1:
            with torch.no_grad():
                self.model.final_norm.scale.fill_(float("nan"))


def nan(world, config) -> dict:
    try:
        prepared = preflight(config, world=world)
        run(config, [PoisonRank1(world)], runtime=prepared.runtime, data=prepared.data, world=world)
    except Exception as exc:  # what each rank raised is the point
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def main() -> None:
    mode, out, config_path, *overrides = sys.argv[1:]
    config = load_config(config_path, overrides)
    with distributed.joined(distributed.launch_env()) as world:
        result = {"shards": shards, "nan": nan}[mode](world, config)
    torch.save(result, Path(out) / f"rank{world.rank}.pt")


if __name__ == "__main__":
    main()
