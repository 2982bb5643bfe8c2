"""What a run is called and what the user adds to it: names, `--tag KEY=VALUE` and `--note TEXT`.

A run's default name says what it is, so that a table of runs reads without opening them: the
preset (the config file's name) and the settings given on top of it, e.g. `tiny lr=5e-3 ctx=32`;
a sweep trial is `trial 7 · ctx=64 lr=5.9e-3`, its number and the values searched.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .config import MAX_RUN_NAME, Config, load_config, parse_override

# Short names of the settings people vary; other keys show their last part (train.warmup_steps -> warmup_steps).
SHORT = {
    "model.context_length": "ctx",
    "model.emb_dim": "emb",
    "model.n_layers": "layers",
    "model.n_heads": "heads",
    "model.drop_rate": "drop",
    "data.stride_fraction": "stride",
    "data.source": "data",
    "train.batch_size": "bs",
    "train.num_epochs": "epochs",
    "train.weight_decay": "wd",
    "train.grad_accum_steps": "accum",
    "train.precision": "prec",
}
# MLflow's tag for a run's description (the UI's "Description" box).
MLFLOW_NOTE = "mlflow.note.content"
# Tag prefixes gptexp, Optuna and MLflow write: a --tag there would be overwritten or mislead.
RESERVED_TAG_PREFIXES = ("mlflow.", "gptexp.", "optuna.", "best.")
# MLflow's limits (mlflow.utils.validation): tag keys 250 characters, tag values 8,000.
MAX_TAG_KEY, MAX_TAG_VALUE = 250, 8000
_TAG_KEY = re.compile(r"[A-Za-z0-9_\-./ ]+")


def format_value(key: str, value: Any) -> str:
    """A setting's value as a person writes it: 5e-3, 5.9e-3, 0.1, 64, ctx/2 for a stride fraction."""
    if key == "data.stride_fraction" and isinstance(value, (int, float)):
        return "ctx" if value == 1 else f"{value:g}ctx"
    if key == "data.source" and isinstance(value, str):
        return Path(value).stem or value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and not 1e-2 <= abs(value) < 1e5:
            mantissa, exponent = f"{value:.1e}".split("e")
            return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
        return f"{value:.3g}"
    return str(value)


def describe(settings: Mapping[str, Any]) -> str:
    """'ctx=64 lr=5.9e-3' for {'model.context_length': 64, 'train.lr': 0.0059}."""
    return " ".join(f"{SHORT.get(k, k.rsplit('.', 1)[-1])}={format_value(k, v)}" for k, v in settings.items())


def _fit(name: str) -> str:
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 1] + "…"


def preset_name(config_path: str | Path) -> str:
    """The name a config file goes by: its stem (tiny), or its folder's for a generic config.yaml (best)."""
    p = Path(config_path)
    if p.stem == "config" and p.parent.name:
        return p.parent.name
    return p.stem


def train_run_name(config_path: str | Path, overrides: Iterable[str], config: Config) -> str:
    """`tiny lr=5e-3 ctx=32`: the preset and each --set that changes it, in the order given."""
    base = load_config(config_path).flat()
    ours = config.flat()
    changed: dict[str, Any] = {}
    for item in overrides:
        key = ".".join(parse_override(item)[0])
        if key in ours and ours[key] != base.get(key):
            changed[key] = ours[key]
    return _fit(" ".join(filter(None, (preset_name(config_path), describe(changed)))))


def trial_run_name(number: int, params: Mapping[str, Any]) -> str:
    """`trial 7 · ctx=64 lr=5.9e-3`: the trial's number and the values it searched."""
    return _fit(" · ".join(filter(None, (f"trial {number}", describe(params)))))


def parse_tag(text: str) -> tuple[str, str]:
    """An argparse type for --tag: 'KEY=VALUE' -> (KEY, VALUE), refused in one line when malformed."""
    key, sep, value = text.partition("=")
    key = key.strip()
    example = "e.g. --tag purpose=baseline"
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, {example} (got {text!r})")
    if len(key) > MAX_TAG_KEY or not _TAG_KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(
            f"key {key[:60]!r} must be up to {MAX_TAG_KEY} letters, digits, spaces or _ - . / ({example})"
        )
    if key.startswith(RESERVED_TAG_PREFIXES):
        raise argparse.ArgumentTypeError(
            f"key {key!r} is in a namespace gptexp or MLflow writes ({', '.join(RESERVED_TAG_PREFIXES)}): "
            "pick another (for a description use --note)"
        )
    if len(value) > MAX_TAG_VALUE:
        raise argparse.ArgumentTypeError(f"value of {key!r} is {len(value)} characters; the limit is {MAX_TAG_VALUE}")
    return key, value


def parse_note(text: str) -> str:
    """An argparse type for --note: MLflow's run description, refused when blank or too long."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is blank: give the text that describes the run")
    if len(text) > MAX_TAG_VALUE:
        raise argparse.ArgumentTypeError(f"is {len(text)} characters; the limit is {MAX_TAG_VALUE}")
    return text


def add_naming_arguments(
    p: argparse.ArgumentParser, what: str = "run", default: str = "the preset and the --set changes"
) -> None:
    """--run-name, --tag (repeatable) and --note, for `train` and `sweep` (`what`: the run they name)."""
    p.add_argument("--run-name", metavar="NAME", help=f"MLflow name of the {what} (default: {default})")
    p.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        type=parse_tag,
        metavar="KEY=VALUE",
        help=f"an MLflow tag on the {what} (repeatable)",
    )
    p.add_argument("--note", type=parse_note, metavar="TEXT", help=f"MLflow's description (note) of the {what}")


def user_tags(args: argparse.Namespace) -> dict[str, str]:
    """The tags --tag and --note ask for (a later --tag of the same key wins)."""
    tags = dict(getattr(args, "tags", None) or [])
    if getattr(args, "note", None):
        tags[MLFLOW_NOTE] = args.note
    return tags
