"""Damaged checkpoints and run records: every command that reads them refuses them in one line
(exit 2) or, for a damaged index, falls back to the epoch folders; none prints a traceback or
leaves a run RUNNING. Also: run ids by unique prefix, and `tokens_seen` at each epoch's end.

One real run is trained once (tiny preset, stopped after its first checkpoint, so it can be
resumed); each case damages a copy of it, a new MLflow run holding the same artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from gptexp import checkpoint as ckpt
from gptexp import jobs
from gptexp.cli import main
from gptexp.config import load_config
from gptexp.runner import Callback, EpochEvent, EvalEvent, StopTraining
from gptexp.tracking import MlflowLogger, experiment_id, local_artifact_dir

from conftest import TINY

SOURCE_EXPERIMENT = "damage-source"
STEPS_PER_EPOCH = 9  # the tiny preset on the-verdict: 9 batches of 8 x 64 tokens
PROMPT = ["--prompt", "Every effort", "--max-new-tokens", "3"]


class StopAfterFirstCheckpoint(Callback):
    def on_checkpoint(self, event):
        raise StopTraining("stopped by the test after epoch 1", status="stopped")


@pytest.fixture(scope="module")
def source_run(mlflow_store):
    """A 2-epoch tiny run stopped (KILLED) right after its epoch-1 checkpoint: (client, run_id)."""
    config = load_config(TINY, ["train.num_epochs=2"])
    with pytest.raises(StopTraining):
        jobs.train(config, experiment=SOURCE_EXPERIMENT, callbacks=[StopAfterFirstCheckpoint()], console=False)
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name(SOURCE_EXPERIMENT).experiment_id])
    assert run.info.status == "KILLED"
    return client, run.info.run_id


def _link_big_files(src: str, dst: str) -> None:
    # Weights and state are never written in place (damages and checkpoints replace files), so
    # copies can share them; everything else is copied, as MLflow rewrites some artifacts in place.
    if Path(src).name in (ckpt.WEIGHTS, ckpt.STATE):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def clone_run(client, run_id: str, experiment: str = "damaged") -> tuple[str, Path]:
    """A new KILLED run holding a copy of `run_id`'s artifacts: (its id, its artifact folder)."""
    new = client.create_run(experiment_id(client, experiment), run_name="clone", tags={"gptexp.job": "train"})
    rid = new.info.run_id
    folder = local_artifact_dir(client, rid)
    shutil.copytree(local_artifact_dir(client, run_id), folder, copy_function=_link_big_files, dirs_exist_ok=True)
    client.set_terminated(rid, status="KILLED")
    return rid, folder


def replace(path: Path, data: bytes | str) -> None:
    """Write a new file in place of `path` (never through a hard link shared with the source)."""
    path.unlink(missing_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)


def epoch1(artifacts: Path) -> Path:
    return artifacts / "checkpoints" / "epoch-0001"


def edit_model_config(artifacts: Path, edit: Callable[[dict], None]) -> None:
    path = epoch1(artifacts) / ckpt.MODEL_CONFIG
    cfg = json.loads(path.read_text())
    edit(cfg)
    replace(path, json.dumps(cfg))


def edit_both_configs(artifacts: Path, text: Callable[[str], str]) -> None:
    """The run's config/config.yaml (read by resume, rerun) and the checkpoint's (eval, generate)."""
    for path in (artifacts / "config" / "config.yaml", epoch1(artifacts) / ckpt.RUN_CONFIG):
        replace(path, text(path.read_text()))


def edit_state(artifacts: Path, edit: Callable[[dict], object]) -> None:
    path = epoch1(artifacts) / ckpt.STATE
    state = torch.load(path, weights_only=True)
    path.unlink()
    torch.save(edit(state), path)


def truncate(path: Path) -> None:
    replace(path, path.read_bytes()[: path.stat().st_size // 2])


def wrong_shapes(artifacts: Path) -> None:
    path = epoch1(artifacts) / ckpt.WEIGHTS
    weights = load_file(path)
    weights["pos_emb.weight"] = weights["pos_emb.weight"][:32].contiguous()
    path.unlink()
    save_file(weights, path)


def absurd_emb_dim(artifacts: Path) -> None:
    # A coherent lie: model config and the checkpoint's run config agree; only the weights tell.
    edit_model_config(artifacts, lambda c: c.update(emb_dim=10**12))
    path = epoch1(artifacts) / ckpt.RUN_CONFIG
    raw = yaml.safe_load(path.read_text())
    raw["model"]["emb_dim"] = 10**12
    replace(path, yaml.safe_dump(raw))


def invalid_values(text: str) -> str:
    raw = yaml.safe_load(text)
    raw["train"]["lr"] = "fast"
    return yaml.safe_dump(raw)


EVAL_RUN, EVAL_CKPT, GEN_RUN, GEN_CKPT, GEN_ROOT, RESUME, RERUN = (
    "eval --run",
    "eval --checkpoint",
    "generate --run",
    "generate --checkpoint",
    "generate --checkpoint root",
    "train --resume",
    "rerun",
)
READERS = (EVAL_RUN, EVAL_CKPT, GEN_RUN, GEN_CKPT, RESUME)


@dataclass(frozen=True)
class Damage:
    name: str
    apply: Callable[[Path], None]
    refused_by: tuple[str, ...]  # commands that must refuse it (exit 2)
    ok_for: tuple[str, ...] = ()  # commands that must not need the damaged file (exit 0)
    commands: tuple[str, ...] = field(default=READERS)


def _index(text: str) -> Callable[[Path], None]:
    return lambda a: replace(a / "checkpoints" / ckpt.INDEX, text)


# Damages that some commands must work around are tried with the cheap commands (generate, not a
# whole evaluation; one real resume), those that every reader must refuse with all of them.
INDEX_READERS = (GEN_RUN, GEN_ROOT)
# State is needed only to resume: generating from a folder with good weights works.
STATE_READERS, STATE_OK_FOR = (GEN_RUN, GEN_CKPT, RESUME), (GEN_RUN, GEN_CKPT)
DAMAGES = [
    # A damaged index is ignored: the epoch folders describe themselves.
    Damage("index.json is []", _index("[]"), (), INDEX_READERS, INDEX_READERS),
    Damage(
        'index.json is {"last": 5}',
        _index('{"last": 5, "best": 5}'),
        (),
        (*INDEX_READERS, RESUME),
        (*INDEX_READERS, RESUME),
    ),
    Damage(
        "index.json points outside",
        _index('{"last": "../../etc", "best": "../../etc"}'),
        (),
        INDEX_READERS,
        INDEX_READERS,
    ),
    Damage("index.json is not JSON", _index("{not json"), (), INDEX_READERS, INDEX_READERS),
    Damage("state.pt is a list", lambda a: edit_state(a, lambda s: [1, 2, 3]), (RESUME,), STATE_OK_FOR, STATE_READERS),
    Damage(
        "state.pt lacks keys", lambda a: edit_state(a, lambda s: {"epoch": 1}), (RESUME,), STATE_OK_FOR, STATE_READERS
    ),
    Damage(
        "state.pt has wrong types",
        lambda a: edit_state(a, lambda s: dict(s, epoch="1", rng=[])),
        (RESUME,),
        STATE_OK_FOR,
        STATE_READERS,
    ),
    Damage(
        "state.pt holds a foreign class",
        lambda a: edit_state(a, lambda s: dict(s, extra=argparse.Namespace())),
        (RESUME,),
        STATE_OK_FOR,
        STATE_READERS,
    ),
    Damage("state.pt is truncated", lambda a: truncate(epoch1(a) / ckpt.STATE), (RESUME,), STATE_OK_FOR, STATE_READERS),
    Damage("state.pt is missing", lambda a: (epoch1(a) / ckpt.STATE).unlink(), (RESUME,), STATE_OK_FOR, STATE_READERS),
    Damage("model.safetensors is truncated", lambda a: truncate(epoch1(a) / ckpt.WEIGHTS), READERS),
    Damage("model.safetensors is empty", lambda a: replace(epoch1(a) / ckpt.WEIGHTS, b""), READERS),
    Damage("model.safetensors has wrong shapes", wrong_shapes, READERS),
    Damage("model_config.json has an absurd emb_dim", absurd_emb_dim, READERS),
    Damage(
        "model_config.json contradicts config.yaml",
        lambda a: edit_model_config(a, lambda c: c.update(context_length=256)),
        READERS,
    ),
    Damage("model_config.json is not JSON", lambda a: replace(epoch1(a) / ckpt.MODEL_CONFIG, "{"), READERS),
    Damage("model_config.json lacks keys", lambda a: edit_model_config(a, lambda c: c.pop("emb_dim")), READERS),
    Damage(
        "config.yaml is not YAML",
        lambda a: edit_both_configs(a, lambda t: "model: [unclosed\n"),
        (*READERS, RERUN),
        commands=(*READERS, RERUN),
    ),
    Damage(
        "config.yaml is not a mapping",
        lambda a: edit_both_configs(a, lambda t: "- a\n- b\n"),
        (*READERS, RERUN),
        commands=(*READERS, RERUN),
    ),
    Damage(
        "config.yaml has invalid values",
        lambda a: edit_both_configs(a, invalid_values),
        (*READERS, RERUN),
        commands=(*READERS, RERUN),
    ),
]
CASES = [pytest.param(d, c, id=f"{d.name} / {c}") for d in DAMAGES for c in d.commands]


def argv(command: str, run_id: str, artifacts: Path) -> list[str]:
    return {
        EVAL_RUN: ["eval", "--run", run_id],
        EVAL_CKPT: ["eval", "--checkpoint", str(artifacts / "checkpoints"), "--no-track"],
        GEN_RUN: ["generate", "--run", run_id, *PROMPT],
        GEN_CKPT: ["generate", "--checkpoint", str(epoch1(artifacts)), *PROMPT],
        GEN_ROOT: ["generate", "--checkpoint", str(artifacts / "checkpoints"), *PROMPT],
        RESUME: ["train", "--resume", run_id],
        RERUN: ["rerun", run_id, "--quiet"],
    }[command]


def running_runs(client) -> list[str]:
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(exps) if r.info.status == "RUNNING"]


@pytest.mark.parametrize("damage,command", CASES)
def test_no_command_given_a_damaged_checkpoint_prints_a_traceback_or_leaves_a_run_running(
    source_run, damage, command, capsys
):
    client, source = source_run
    run_id, artifacts = clone_run(client, source)
    damage.apply(artifacts)
    capsys.readouterr()
    code = main(argv(command, run_id, artifacts))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("gptexp: error:") and len(err.strip().splitlines()) == 1, err
    if command in damage.refused_by:
        assert code == 2, f"{command} accepted {damage.name}: {out}"
    if command in damage.ok_for:
        assert code == 0, err
    assert running_runs(client) == []


def test_an_index_entry_pointing_outside_checkpoints_is_not_followed(source_run):
    client, source = source_run
    run_id, artifacts = clone_run(client, source)
    # A complete checkpoint planted beside checkpoints/, named by the index.
    shutil.copytree(epoch1(artifacts), artifacts / "planted", copy_function=_link_big_files)
    replace(artifacts / "checkpoints" / ckpt.INDEX, json.dumps({"last": "../planted", "best": "../planted"}))
    assert jobs.run_checkpoint(client, run_id, "last") == epoch1(artifacts)
    assert ckpt.resolve_checkpoint_path(artifacts / "checkpoints") == epoch1(artifacts)
    assert ckpt.latest_checkpoint(artifacts / "checkpoints") == epoch1(artifacts)


def test_read_index_keeps_only_bare_epoch_folder_names(tmp_path):
    def index(raw) -> dict:
        (tmp_path / ckpt.INDEX).write_text(json.dumps(raw))
        return ckpt.read_index(tmp_path)

    good = {"last": "epoch-0003", "best": "epoch-0002", "best_val_loss": 5.5, "best_epoch": 2}
    assert index(good) == good
    assert index([]) == {}
    assert index({"last": 5}) == {}
    assert index({"last": "../../etc", "best": "epoch-0002"}) == {"best": "epoch-0002"}
    assert index({"last": "epoch-0001/../../x", "best": "/abs/epoch-0001"}) == {}
    assert index({"last": "epoch-0001\n"}) == {}


def test_a_state_holding_a_foreign_class_is_refused_without_advice_to_load_it_unsafely(source_run, capsys):
    client, source = source_run
    run_id, artifacts = clone_run(client, source)
    edit_state(artifacts, lambda s: dict(s, extra=argparse.Namespace()))
    capsys.readouterr()
    assert main(["train", "--resume", run_id]) == 2
    err = capsys.readouterr().err
    assert "not a gptexp training state" in err and "argparse.Namespace" in err
    assert "weights_only" not in err and "can still be loaded" not in err and "\x1b" not in err
    assert client.get_run(run_id).info.status == "KILLED"


def test_an_absurd_emb_dim_is_refused_from_the_safetensors_header_without_building_the_model(source_run):
    client, source = source_run
    _, artifacts = clone_run(client, source)
    absurd_emb_dim(artifacts)
    with pytest.raises(ckpt.CheckpointError, match=r"emb_dim 1000000000000 in model_config.json, 32 in"):
        ckpt.load_model(epoch1(artifacts))


def test_eval_refuses_a_set_that_changes_the_checkpoints_architecture(source_run, capsys):
    client, source = source_run
    capsys.readouterr()
    assert main(["eval", "--run", source, "--no-track", "--set", "model.context_length=256"]) == 2
    err = capsys.readouterr().err
    assert "model.context_length 256" in err and "gives 64" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- run ids by prefix


def test_commands_accept_the_printed_8_character_run_id(source_run, capsys):
    client, source = source_run
    other, artifacts = clone_run(client, source)
    capsys.readouterr()
    assert main(["generate", "--run", source[:8], *PROMPT]) == 0
    assert main(["compare", source[:8], other[:8]]) == 0
    assert f"({source[:8]})  vs  " in capsys.readouterr().out
    # Commands that reach the run, then stop at what the clone lacks, naming its full id.
    assert main(["eval", "--run", other[:8], "--which", "best", "--set", "model.context_length=32"]) == 2
    assert f"checkpoint {epoch1(artifacts)}: config.yaml with --set gives" in capsys.readouterr().err
    edit_both_configs(artifacts, lambda t: t.replace("num_epochs: 2", "num_epochs: 1"))
    assert main(["train", "--resume", other[:8]]) == 2
    assert f"run {other} already trained all 1 epochs" in capsys.readouterr().err
    edit_both_configs(artifacts, invalid_values)
    assert main(["rerun", other[:8], "--quiet"]) == 2
    assert f"run {other}'s recorded config cannot be used" in capsys.readouterr().err


def test_an_ambiguous_or_unknown_prefix_is_one_line_naming_the_count(mlflow_store, capsys):
    client = MlflowClient(mlflow_store)
    exp = experiment_id(client, "prefixes")
    # 17 runs: two of them share a first hex digit, whatever ids MLflow draws.
    ids = [client.create_run(exp).info.run_id for _ in range(17)]
    for rid in ids:
        client.set_terminated(rid)
    firsts = [rid[0] for rid in ids]
    shared = max(set(firsts), key=firsts.count)
    everywhere = [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    count = sum(rid.startswith(shared) for rid in everywhere)
    capsys.readouterr()
    assert main(["compare", shared, ids[0]]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"gptexp: error: run id prefix '{shared}' matches {count} runs in {mlflow_store}: "
        "give more characters of the id"
    )
    assert main(["eval", "--run", "ffffffffffffffff", "--no-track"]) == 2
    assert "no run 'ffffffffffffffff'" in capsys.readouterr().err
    assert main(["eval", "--run", "x' OR '1", "--no-track"]) == 2
    assert "no run \"x' OR '1\"" in capsys.readouterr().err


# ---------------------------------------------------------------------------- tokens_seen


def test_tokens_seen_is_logged_at_each_epochs_last_step_once(source_run, mlflow_store):
    client, source = source_run
    points = [(m.step, m.value) for m in client.get_metric_history(source, "tokens_seen")]
    # evals at global steps 0 and 5; epoch 1 ends at step 8 after 9 batches of 8 x 64 tokens
    assert sorted(points) == [(0, 512), (5, 6 * 512), (STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH * 512)]
    # An epoch whose last step is an eval step: that point is already logged, not logged again.
    rid = client.create_run(experiment_id(client, "epoch-end")).info.run_id
    logger = MlflowLogger(client, rid)
    logger.on_eval(EvalEvent(1, 8, 6.0, 6.5, 4608, 1e-3))
    logger.on_epoch_end(EpochEvent(1, 8, 5.9, 6.4, 4608, 100.0, 1.0, " text", "Every effort"))
    client.set_terminated(rid)
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "tokens_seen")] == [(8, 4608)]
