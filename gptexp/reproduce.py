"""Reproducible experiments: named specs in experiments/, `reproduce` and `rerun`.

A spec (experiments/NAME.yaml) pins everything a result depends on: the full run config, the
seed, the corpus checksum, the model numerics (`impl`), precision and device, and the expected
results with their tolerances (inline under `expected:` or in `expected_file:` beside it):

    name: ch05-verdict
    seed: 123
    corpus: {name: the-verdict, sha256: "b41e..."}
    impl: book
    precision: fp32
    device: cpu
    config: {experiment: ..., model: {...}, data: {...}, train: {...}, sample: {...}, checkpoint: {...}}
    expected_file: ch05-verdict.expected.yaml   # or expected: {evals: [...], sample: {...}}
    tolerances: {train_loss: 1.0e-3, val_loss: 1.0e-3, tokens_seen: 0}

`expected.evals` lists {step, train_loss, val_loss, tokens_seen} at the book's eval cadence;
`expected.sample` is {epoch, prompt, text}: the greedy sample after that epoch, prompt included,
compared exactly. `reproduce` trains the config through `jobs.train` (the one runner), compares
every point, tags the run `gptexp.experiment_spec` and `gptexp.verdict`, and logs the table as
`reproduce/comparison.csv`. `rerun` trains a new run from a run's recorded config.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, from_dict, load_yaml, yaml_problem
from .errors import GptexpError
from .tables import aligned
from .tags import TAG_EXPERIMENT_SPEC, TAG_JOB, TAG_MAX_ABS_DIFF, TAG_RERUN_OF, TAG_VERDICT

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
COMPARISON_ARTIFACT = "reproduce/comparison.csv"
DEFAULT_TOLERANCES = {"train_loss": 1e-3, "val_loss": 1e-3, "tokens_seen": 0.0}
EVAL_METRICS = ("train_loss", "val_loss", "tokens_seen")
_SPEC_KEYS = {
    "name",
    "description",
    "seed",
    "corpus",
    "impl",
    "precision",
    "device",
    "config",
    "expected",
    "expected_file",
    "tolerances",
}


@dataclass(frozen=True)
class ExpectedEval:
    step: int
    train_loss: float
    val_loss: float
    tokens_seen: int


@dataclass(frozen=True)
class ExpectedSample:
    epoch: int
    prompt: str
    text: str  # prompt + greedy continuation


@dataclass(frozen=True)
class Spec:
    name: str
    path: Path
    config: Config
    corpus_sha256: str
    evals: tuple[ExpectedEval, ...]
    sample: ExpectedSample | None
    tolerances: dict[str, float]
    produced_by: dict = field(default_factory=dict)
    description: str = ""


# ---------------------------------------------------------------------------- specs


def available_experiments(directory: Path | None = None) -> list[str]:
    """Names of the specs in experiments/ (NAME.yaml, not the *.expected.yaml results)."""
    folder = Path(directory or EXPERIMENTS_DIR)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.name.endswith(".expected.yaml"))


def resolve_spec_path(name_or_path: str, directory: Path | None = None) -> Path:
    """experiments/NAME.yaml for a name, else the path as given; GptexpError listing the names."""
    folder = Path(directory or EXPERIMENTS_DIR)
    candidates = [folder / f"{name_or_path}.yaml", folder / name_or_path, Path(name_or_path)]
    for p in candidates:
        if p.is_file():
            return p
    names = available_experiments(folder)
    known = ", ".join(names) if names else "none"
    raise GptexpError(
        f"no experiment {name_or_path!r}: the available experiments ({folder}) are {known}; "
        "or give the path of a spec YAML"
    )


def _spec_error(path: Path, message: str) -> GptexpError:
    return GptexpError(f"experiment spec {path}: {message}")


def _read_yaml_mapping(path: Path, what: str) -> dict:
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GptexpError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise GptexpError(f"{what} {path} {yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise GptexpError(f"{what} {path} must hold a mapping, not {type(raw).__name__}")
    return raw


def _number(path: Path, where: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise _spec_error(path, f"{where} must be a number (got {value!r})") from None
    if not math.isfinite(out):
        raise _spec_error(path, f"{where} must be finite (got {value!r})")
    return out


def _parse_expected(path: Path, raw: Any) -> tuple[tuple[ExpectedEval, ...], ExpectedSample | None, dict]:
    if not isinstance(raw, dict):
        raise _spec_error(path, "expected must be a mapping with evals and/or sample")
    evals = []
    for i, item in enumerate(raw.get("evals") or []):
        if not isinstance(item, dict) or not {"step", "train_loss", "val_loss", "tokens_seen"} <= set(item):
            raise _spec_error(path, f"expected.evals[{i}] needs step, train_loss, val_loss and tokens_seen")
        evals.append(
            ExpectedEval(
                int(_number(path, f"expected.evals[{i}].step", item["step"])),
                _number(path, f"expected.evals[{i}].train_loss", item["train_loss"]),
                _number(path, f"expected.evals[{i}].val_loss", item["val_loss"]),
                int(_number(path, f"expected.evals[{i}].tokens_seen", item["tokens_seen"])),
            )
        )
    steps = [e.step for e in evals]
    if len(set(steps)) != len(steps):
        raise _spec_error(path, "expected.evals lists a step twice")
    sample = None
    if raw.get("sample") is not None:
        s = raw["sample"]
        if not isinstance(s, dict) or not {"epoch", "text"} <= set(s) or not isinstance(s["text"], str):
            raise _spec_error(path, "expected.sample needs epoch and text (the prompt and its continuation)")
        sample = ExpectedSample(int(s["epoch"]), str(s.get("prompt", "")), s["text"])
    if not evals and sample is None:
        raise _spec_error(path, "expected holds no evals and no sample: nothing to compare")
    return tuple(evals), sample, dict(raw.get("produced_by") or {})


def load_experiment_spec(name_or_path: str | Path, directory: Path | None = None) -> Spec:
    """The validated spec: its pins must agree with its config, its expected results must parse."""
    path = resolve_spec_path(str(name_or_path), directory)
    raw = _read_yaml_mapping(path, "experiment spec")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise _spec_error(
            path, f"unknown key(s) {', '.join(sorted(unknown))}: a spec takes {', '.join(sorted(_SPEC_KEYS))}"
        )
    missing = [k for k in ("config", "seed", "corpus", "impl", "precision", "device") if k not in raw]
    if missing:
        raise _spec_error(
            path, f"missing {', '.join(missing)}: a spec pins the config, seed, corpus, impl, precision and device"
        )
    try:
        config = from_dict(raw["config"], origin=f"{path} config")
    except ConfigError as exc:
        raise _spec_error(path, str(exc)) from None
    corpus = raw["corpus"]
    if not isinstance(corpus, dict) or not isinstance(corpus.get("sha256"), str) or len(corpus["sha256"]) != 64:
        raise _spec_error(path, "corpus must be {name: ..., sha256: <64 hex digits>}")
    pins = {
        "seed": (raw["seed"], config.train.seed, "train.seed"),
        "impl": (raw["impl"], config.model.impl, "model.impl"),
        "precision": (raw["precision"], config.train.precision, "train.precision"),
        "device": (raw["device"], config.train.device, "train.device"),
        "corpus.name": (corpus.get("name", config.data.source), config.data.source, "data.source"),
    }
    for pin, (want, got, key) in pins.items():
        if want != got:
            raise _spec_error(path, f"{pin} pins {want!r} but config {key} is {got!r}: make them agree")
    if config.train.precision == "auto" or config.train.device == "auto":
        raise _spec_error(path, "precision and device must be explicit (not auto): results depend on them")

    if "expected" in raw and "expected_file" in raw:
        raise _spec_error(path, "give expected or expected_file, not both")
    if "expected_file" in raw:
        expected_path = path.parent / str(raw["expected_file"])
        if not expected_path.is_file():
            raise _spec_error(
                path,
                f"expected_file {expected_path} does not exist: produce it first "
                "(e.g. experiments/make_ch05_expected.py)",
            )
        expected_raw = _read_yaml_mapping(expected_path, "expected results")
        sha = expected_raw.get("corpus_sha256")
        if sha is not None and sha != corpus["sha256"]:
            raise _spec_error(
                path, f"{expected_path.name} was produced on corpus sha256 {sha}, the spec pins {corpus['sha256']}"
            )
    elif "expected" in raw:
        expected_raw = raw["expected"]
    else:
        raise _spec_error(path, "no expected results: add expected: {evals: [...], sample: {...}} or expected_file")
    evals, sample, produced_by = _parse_expected(path, expected_raw)

    tolerances = dict(DEFAULT_TOLERANCES)
    for key, value in (raw.get("tolerances") or {}).items():
        if key not in DEFAULT_TOLERANCES:
            raise _spec_error(path, f"tolerances.{key} is unknown: tolerances take {', '.join(DEFAULT_TOLERANCES)}")
        tolerances[key] = _number(path, f"tolerances.{key}", value)
        if tolerances[key] < 0:
            raise _spec_error(path, f"tolerances.{key} must be >= 0")
    return Spec(
        name=str(raw.get("name") or path.stem),
        path=path,
        config=config,
        corpus_sha256=corpus["sha256"].lower(),
        evals=evals,
        sample=sample,
        tolerances=tolerances,
        produced_by=produced_by,
        description=str(raw.get("description") or ""),
    )


# ---------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Row:
    metric: str
    step: int | None
    expected: Any
    got: Any
    diff: float | None  # |got - expected|; for text, None
    ok: bool


def compare(spec: Spec, result) -> list[Row]:
    """One row per expected point: each eval metric at its step, and the final sample."""
    got_evals = {e.global_step: e for e in result.evals}
    rows: list[Row] = []
    for exp in spec.evals:
        ev = got_evals.get(exp.step)
        for metric in EVAL_METRICS:
            want = getattr(exp, metric)
            if ev is None:
                rows.append(Row(metric, exp.step, want, None, None, False))
                continue
            got = getattr(ev, metric)
            diff = abs(float(got) - float(want))
            rows.append(Row(metric, exp.step, want, got, diff, diff <= spec.tolerances[metric]))
    extra = sorted(set(got_evals) - {e.step for e in spec.evals})
    if spec.evals and extra:
        # A run with more eval points than expected is not the expected run.
        rows.append(Row("eval_steps", None, len(spec.evals), len(got_evals), None, False))
    if spec.sample is not None:
        epoch = next((e for e in result.epochs if e.epoch == spec.sample.epoch), None)
        got = None if epoch is None else epoch.prompt + epoch.completion
        step = None if epoch is None else epoch.global_step
        rows.append(Row("sample", step, spec.sample.text, got, None, got == spec.sample.text))
    return rows


def max_diff(rows: list[Row], metrics=("train_loss", "val_loss")) -> float:
    diffs = [r.diff for r in rows if r.metric in metrics and r.diff is not None]
    return max(diffs) if diffs else math.nan


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "tokens_seen" or isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= 24 else text[:21] + "..."


def format_rows(rows: list[Row]) -> str:
    """The side-by-side table: metric, step, expected, got, |diff|, ok."""
    header = ("metric", "step", "expected", "got", "|diff|", "ok")
    body = []
    for r in rows:
        diff = "-" if r.diff is None else ("0" if r.diff == 0 else f"{r.diff:.2e}")
        if r.metric == "sample":
            diff = "equal" if r.ok else "differs"
        body.append(
            (
                r.metric,
                "-" if r.step is None else str(r.step),
                _fmt(r.expected, r.metric),
                _fmt(r.got, r.metric),
                diff,
                "ok" if r.ok else "FAIL",
            )
        )
    return aligned(header, body, right={1, 4})


def rows_to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "step", "expected", "got", "abs_diff", "ok"])
    for r in rows:
        w.writerow(
            [
                r.metric,
                "" if r.step is None else r.step,
                repr(r.expected) if isinstance(r.expected, float) else r.expected,
                "" if r.got is None else (repr(r.got) if isinstance(r.got, float) else r.got),
                "" if r.diff is None else repr(r.diff),
                "true" if r.ok else "false",
            ]
        )
    return buf.getvalue()


# ---------------------------------------------------------------------------- jobs


@dataclass
class ReproduceOutcome:
    spec: Spec
    run_id: str
    rows: list[Row]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"


def check_corpus(spec: Spec, data) -> None:
    if data.corpus.sha256 != spec.corpus_sha256:
        raise GptexpError(
            f"experiment {spec.name}: corpus {data.corpus.name} has sha256 {data.corpus.sha256} but "
            f"the spec pins {spec.corpus_sha256}: restore the pinned text (refusing to run)"
        )


def reproduce(
    name_or_path: str | Path, *, client=None, console: bool = True, directory: Path | None = None, callbacks=()
) -> ReproduceOutcome:
    """Run the spec's config as a tracked run and compare it with the expected results."""
    from . import jobs
    from .tracking import get_client

    spec = load_experiment_spec(name_or_path, directory)
    prepared = jobs.preflight(spec.config)
    check_corpus(spec, prepared.data)
    client = client or get_client()
    tick = time.perf_counter()
    outcome = jobs.train(
        spec.config,
        run_name=f"reproduce-{spec.name}",
        tags={TAG_JOB: "reproduce", TAG_EXPERIMENT_SPEC: spec.name},
        prepared=prepared,
        client=client,
        callbacks=list(callbacks),
        console=console,
    )
    assert outcome is not None  # reproduce is one process, the main one
    seconds = time.perf_counter() - tick
    rows = compare(spec, outcome.result)
    result = ReproduceOutcome(spec, outcome.run_id, rows, seconds)
    rid = outcome.run_id  # tagged job=reproduce and its spec when created; now its verdict
    client.set_tag(rid, TAG_VERDICT, result.verdict)
    client.set_tag(rid, TAG_MAX_ABS_DIFF, repr(max_diff(rows)))
    client.log_text(rid, rows_to_csv(rows), COMPARISON_ARTIFACT)
    client.log_text(rid, spec.path.read_text(encoding="utf-8"), f"reproduce/{spec.path.name}")
    return result


def rerun(run_id: str, *, client=None, experiment: str | None = None, console: bool = True, callbacks=()):
    """A new run of `run_id`'s recorded config, tagged gptexp.rerun_of. Returns jobs.TrainOutcome."""
    from . import jobs
    from .tracking import get_client, get_run

    client = client or get_client()
    source = get_run(client, run_id)
    run_id = source.info.run_id  # the full id, when given a prefix
    config = jobs.run_config(client, run_id)
    if experiment is None:
        exp = client.get_experiment(source.info.experiment_id)
        experiment = exp.name if exp is not None and exp.lifecycle_stage == "active" else config.experiment
    tags = {TAG_RERUN_OF: run_id}
    name = source.info.run_name or run_id[:8]
    return jobs.train(
        config,
        experiment=experiment,
        run_name=f"rerun-{name}",
        tags=tags,
        client=client,
        callbacks=list(callbacks),
        console=console,
    )


# ---------------------------------------------------------------------------- CLI


def add_reproduce_arguments(p: argparse.ArgumentParser) -> None:
    """`gptexp reproduce`'s arguments; its description lists the specs in experiments/."""
    names = ", ".join(available_experiments()) or "none yet"
    p.description = (
        f"Experiments in {EXPERIMENTS_DIR}: {names}. A single-run spec trains one run and compares every expected "
        "point; a study spec (with seeds) trains every (cell, seed) not finished yet under one parent run and "
        "compares the aggregates. Exit 0 when everything is within tolerance, 1 otherwise."
    )
    p.add_argument("experiment", metavar="EXPERIMENT", help="a spec name in experiments/ (e.g. ch05-verdict) or a path")
    p.add_argument("--quiet", action="store_true", help="no per-step progress")
    p.add_argument(
        "--write-expected",
        action="store_true",
        help="a study spec (one with seeds): write its expected_file from this run's aggregates instead of checking",
    )


def add_rerun_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: the source run's)")
    p.add_argument("--quiet", action="store_true", help="no per-step progress")


def cmd_reproduce(args) -> int:
    from . import paper, study

    if study.is_study_spec(_read_yaml_mapping(resolve_spec_path(args.experiment), "experiment spec")):
        return paper.cmd_reproduce_study(args)
    if args.write_expected:
        raise GptexpError(f"--write-expected is for study specs (with seeds); {args.experiment} is a single run")
    out = reproduce(args.experiment, console=not args.quiet)
    spec = out.spec
    print(f"experiment {spec.name} ({spec.path}) - run {out.run_id}")
    if spec.produced_by:
        by = spec.produced_by
        keys = ("llms_from_scratch", "torch", "python", "cpu", "date")
        print("expected from: " + ", ".join(f"{k} {by[k]}" for k in keys if k in by))
    print(format_rows(out.rows))
    for r in out.rows:
        if r.metric == "sample" and spec.sample is not None:
            if r.ok:
                print(f"sample after epoch {spec.sample.epoch} (equal): {r.got!r}")
            else:
                label = f"expected sample after epoch {spec.sample.epoch}:"
                print(f"{label} {r.expected!r}")
                print(f"{'got:':<{len(label)}} {r.got!r}")
    bad = sum(not r.ok for r in out.rows)
    tol = ", ".join(f"{k} {v:g}" for k, v in spec.tolerances.items())
    print(
        f"verdict: {out.verdict} - {len(out.rows) - bad}/{len(out.rows)} points within tolerance ({tol}); "
        f"max |diff| of the losses {max_diff(out.rows):.3g}; {out.seconds:.0f} s"
    )
    return 0 if out.passed else 1


def cmd_rerun(args) -> int:
    from .tracking import get_client, resolve_run_id

    client = get_client()
    source_id = resolve_run_id(client, args.run_id)
    outcome = rerun(source_id, client=client, experiment=args.experiment, console=not args.quiet)
    source = client.get_run(source_id).data.metrics
    new = client.get_run(outcome.run_id).data.metrics
    print(f"run {outcome.run_id} reran {source_id}")
    rows = [
        (
            key,
            f"{source[key]:.6f}",
            f"{new[key]:.6f}",
            "identical" if source[key] == new[key] else f"differs by {abs(new[key] - source[key]):.3g}",
        )
        for key in ("epoch_train_loss", "epoch_val_loss", "train_loss", "val_loss", "tokens_seen")
        if key in source and key in new
    ]
    if rows:
        print(aligned(("metric", "source", "rerun", ""), rows, right={1, 2}, indent="  "))
    return 0
