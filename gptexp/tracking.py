"""MLflow: where runs live, how a run starts and ends, and the subscriber that records a run.

Every job is one MLflow run. The names below are the product's (dashboards depend on them):
per-epoch `epoch_train_loss`, `epoch_val_loss`, `epoch_train_ppl`, `epoch_val_ppl`,
`tokens_per_sec` (step = epoch, from 1); at the book's eval cadence `train_loss`, `val_loss`,
`tokens_seen`, `lr` (step = global step, from 0), and `tokens_seen` at each epoch's last step too;
artifacts `samples/`, `checkpoints/`, `plots/`, `config/`, `environment/`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

try:
    import fcntl
except ImportError:  # not POSIX: there, two jobs opening a new SQLite store at once can still race
    fcntl = None  # type: ignore[assignment]  # the module where it exists, None where it does not

from . import interrupts
from .errors import INTERRUPTS, GptexpError, RunFailed, first_line
from .provenance import environment_tags, git_state, pip_freeze, redact
from .runner import Callback, CheckpointEvent, EpochEvent, EvalEvent, StartEvent, StopTraining
from .tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    TAG_BACKEND,
    TAG_CORPUS,
    TAG_CORPUS_SHA256,
    TAG_DEVICES,
    TAG_ERROR,
    TAG_GIT_DIRTY,
    TAG_IMPL,
    TAG_NODES,
    TAG_NUM_PARAMETERS,
    TAG_RESUMED_FROM_EPOCH,
    TAG_STATUS,
    TAG_STOP,
    TAG_WORLD_SIZE,
)
from .text_view import visible
from .ui_view import mark_experiment

# The error and stop-reason tags (and the store error) quote this much of an error's first line.
TAG_TEXT_LIMIT = 300
# Characters of file names a dataset's source holds (MLflow caps a source at 65,535); the profile counts all.
MAX_SOURCE_CHARS = 32_000


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's SQLite store mlruns/mlflow.db (MLflow 3 refuses the file store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path("mlruns").resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GptexpError(
            f"cannot create the MLflow store folder {root} ({exc.strerror}): run from a writable "
            "folder or set MLFLOW_TRACKING_URI"
        ) from None
    return f"sqlite:///{root}/mlflow.db"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI; None for other stores and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


def _sqlite_dir(uri: str) -> Path | None:
    path = _sqlite_path(uri)
    return None if path is None else path.parent


@contextlib.contextmanager
def _first_use_lock(uri: str):
    """Holds an exclusive lock beside a SQLite store while MLflow opens it.

    MLflow creates and migrates the tables of a new store when it opens it; two processes that
    open a new store at once both do, and one fails ('table ... already exists').
    """
    db = _sqlite_path(uri)
    fd = None
    if db is not None and fcntl is not None:
        try:
            fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            # An existing store in a read-only folder can still be read (report, compare).
            if not db.is_file():
                raise GptexpError(
                    f"cannot create the MLflow store {db} ({exc.strerror}): create a writable "
                    "folder for it or point MLFLOW_TRACKING_URI elsewhere"
                ) from None
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def get_client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    try:
        with _first_use_lock(uri):
            return MlflowClient(tracking_uri=uri)
    except GptexpError:
        raise
    except Exception as exc:
        raise GptexpError(
            f"cannot open the MLflow store {redact(uri)} ({first_line(exc, TAG_TEXT_LIMIT)}): check MLFLOW_TRACKING_URI"
        ) from None


def require_writable(client, artifact_uri: str | None) -> None:
    """Refuse, before a run exists, a store or artifact folder this process cannot write.

    Otherwise the first write fails mid-run with a SQL or OS traceback. A SQLite store needs its
    file and its folder (for the journal); artifacts need their folder, created here if missing.
    """
    db = _sqlite_path(client.tracking_uri)
    fix = "make it writable or point MLFLOW_TRACKING_URI at a writable store"
    if db is not None and db.is_file():
        try:
            with open(db, "r+b"):
                pass
            _probe_folder(db.parent)
        except OSError as exc:
            raise GptexpError(f"cannot write the MLflow store {db} ({exc.strerror}): {fix}") from None
    folder = _local_path(artifact_uri) if artifact_uri else None
    if folder is not None:
        try:
            _probe_folder(folder)
        except OSError as exc:
            where = f" at {exc.filename}" if exc.filename and str(exc.filename) != str(folder) else ""
            raise GptexpError(f"cannot write artifacts to {folder} ({exc.strerror}{where}): {fix}") from None


def _probe_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".gptexp-probe-"):
        pass


# The OS errors that mean "this file cannot be written here", with what the user can do about it.
_WRITE_ERRORS = {
    errno.ENOSPC: "free space there or point MLFLOW_TRACKING_URI at a store on another disk",
    errno.EDQUOT: "free space in your quota or point MLFLOW_TRACKING_URI at a store elsewhere",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or point MLFLOW_TRACKING_URI elsewhere",
    errno.EROFS: "point MLFLOW_TRACKING_URI at a store on a writable file system",
    errno.EACCES: "make the folder writable or point MLFLOW_TRACKING_URI at a writable store",
    errno.EPERM: "make the folder writable or point MLFLOW_TRACKING_URI at a writable store",
}
# What SQLite says when it cannot write the store's database file.
_STORE_WRITE_ERRORS = ("database or disk is full", "attempt to write a readonly database")


@contextlib.contextmanager
def write_failures(client):
    """Wraps a tracked run: a file it cannot write becomes RunFailed, one line naming the file.

    Put outside `tracked_run`, so the run is ended FAILED (with the error in gptexp.error) first.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRORS:
            raise
        what = f"{(exc.strerror or '').lower()} writing {exc.filename or 'the run files'}"
        raise RunFailed(f"{what}: {_WRITE_ERRORS[exc.errno]}") from None
    except MlflowException as exc:
        problem = next((p for p in _STORE_WRITE_ERRORS if p in str(exc)), None)
        if problem is None:
            raise
        raise RunFailed(
            f"{problem} writing the MLflow store {redact(client.tracking_uri)} (the run may be left "
            "RUNNING there): free space or make it writable, or point MLFLOW_TRACKING_URI "
            "elsewhere"
        ) from None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created on first use; its artifacts beside a SQLite store; marked
    for MLflow's model-training view (gptexp.ui_view).

    Called just before a run is created, it refuses a store or artifact folder that cannot be written.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise GptexpError(
                f"experiment {name!r} is deleted in {redact(client.tracking_uri)}: "
                "restore it in the MLflow UI or pick another --experiment"
            )
        require_writable(client, exp.artifact_location)
        mark_experiment(client, exp)
        return exp.experiment_id
    location = None
    store_dir = _sqlite_dir(client.tracking_uri)
    if store_dir is not None:
        # Otherwise MLflow puts artifacts under ./mlruns of whatever folder the job ran in.
        location = (store_dir / "artifacts" / _slug(name)).resolve().as_uri()
    require_writable(client, location)
    try:
        client.create_experiment(name, artifact_location=location)
    except MlflowException:
        if client.get_experiment_by_name(name) is None:  # else another worker created it first
            raise
    exp = client.get_experiment_by_name(name)
    mark_experiment(client, exp)
    return exp.experiment_id


def local_artifact_dir(client, run_id: str) -> Path | None:
    """The run's artifact folder when it is on this file system, else None."""
    return _local_path(client.get_run(run_id).info.artifact_uri)


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


# MLflow run ids are 32 lowercase hex digits; a prefix is searched only when it is one of those.
_RUN_ID_PREFIX = re.compile(r"[0-9a-f]{1,32}")
# How many runs a prefix search reads at most: enough to say "ambiguous" with a count.
_PREFIX_MATCHES = 50


def resolve_run_id(client, text: str) -> str:
    """The full id of the run `text` names: its whole id, or any unique prefix (gptexp prints 8 characters)."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    store = redact(client.tracking_uri)
    with contextlib.suppress(MlflowException):
        return client.get_run(text).info.run_id
    prefix = text.strip().lower()
    runs = []
    if _RUN_ID_PREFIX.fullmatch(prefix):
        experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        if experiments:
            runs = client.search_runs(
                experiments,
                filter_string=f"attributes.run_id LIKE '{prefix}%'",
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=_PREFIX_MATCHES,
            )
    if not runs:
        raise GptexpError(f"no run {text!r} in the MLflow store {store}: check the id (and MLFLOW_TRACKING_URI)")
    if len(runs) > 1:
        count = f"{len(runs)} or more" if len(runs) == _PREFIX_MATCHES else str(len(runs))
        raise GptexpError(f"run id prefix {text!r} matches {count} runs in {store}: give more characters of the id")
    return runs[0].info.run_id


def get_run(client, run_id: str):
    """The run `run_id` names (its id or a unique prefix); its full id is `.info.run_id`."""
    return client.get_run(resolve_run_id(client, run_id))


@contextlib.contextmanager
def tracked_run(
    client,
    experiment: str,
    *,
    run_name: str | None = None,
    tags: dict | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
):
    """Create (or reopen) a run; yield its id; end it with the status that tells the truth.

    FINISHED when the body returns; KILLED on Ctrl-C/SIGTERM or a subscriber's StopTraining
    (its reason in gptexp.stop_reason); FAILED on any other exception (its message in gptexp.error).
    Signals are deferred from before the run exists until it has ended (see gptexp.interrupts):
    the body stops at its safe points, and the ending is never interrupted.
    """
    with interrupts.deferred():
        if resume_run_id is None:
            interrupts.check()  # a stop asked for before the run exists: no run at all
        run_id = _open_run(client, experiment, run_name, tags, parent_run_id, resume_run_id)
        try:
            interrupts.check()
            yield run_id
        except StopTraining as exc:
            _end(client, run_id, "KILLED", {TAG_STOP: first_line(exc, TAG_TEXT_LIMIT), TAG_STATUS: exc.status})
            raise
        except INTERRUPTS:
            _end(client, run_id, "KILLED", {TAG_STOP: "interrupted (Ctrl-C or SIGTERM)", TAG_STATUS: "interrupted"})
            raise
        except BaseException as exc:
            _end(
                client,
                run_id,
                "FAILED",
                {TAG_ERROR: f"{type(exc).__name__}: {first_line(exc, TAG_TEXT_LIMIT)}", TAG_STATUS: "failed"},
            )
            raise
        _end(client, run_id, "FINISHED", {TAG_STATUS: "completed"})


def _open_run(
    client,
    experiment: str,
    run_name: str | None,
    tags: dict | None,
    parent_run_id: str | None,
    resume_run_id: str | None,
) -> str:
    if resume_run_id is not None:
        client.update_run(resume_run_id, status="RUNNING")
        return resume_run_id
    all_tags = dict(tags or {})
    if parent_run_id is not None:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_if_running(client, run_id: str, status: str, tags: dict) -> bool:
    """End `run_id` with `status` and `tags` if it is still RUNNING (its process died without ending
    it); whether it was. For launchers that outlive their workers (gptexp.launch)."""
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    _end(client, run_id, status, tags)
    return True


def _end(client, run_id: str, status: str, tags: dict) -> None:
    # A store that fails here must not hide the exception that ended the run.
    with contextlib.suppress(Exception):
        for k, v in tags.items():
            client.set_tag(run_id, k, redact(v)[:5000])
    with contextlib.suppress(Exception):
        client.set_terminated(run_id, status=status)


def log_flat_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(redact(v))[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client, run_id: str, values: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


def run_params(config) -> dict:
    """The whole resolved config, flattened; data.stride as the absolute stride used."""
    params = config.flat()
    params["data.stride"] = config.stride
    return params


class MlflowLogger(Callback):
    """Records a training run: params, tags, inputs, metrics, samples, plots and checkpoints."""

    def __init__(self, client, run_id: str, *, upload_checkpoints: bool = False):
        self.client = client
        self.run_id = run_id
        self.upload_checkpoints = upload_checkpoints
        self._evals: list[EvalEvent] = []
        self._epochs: list[EpochEvent] = []
        self._steps_per_epoch = 1
        # (metric, step) points already in the run: a resumed run re-runs its interrupted epoch.
        self._logged: set[tuple[str, int]] = set()

    def on_start(self, event: StartEvent) -> None:
        c, rid = self.client, self.run_id
        cfg = event.config
        self._steps_per_epoch = max(1, len(event.data.train_loader))
        log_flat_params(c, rid, run_params(cfg))
        git = git_state()
        tags = environment_tags(event.runtime.device, event.runtime.precision, event.runtime.threads)
        tags.update(
            {
                TAG_IMPL: cfg.model.impl,
                TAG_NUM_PARAMETERS: str(event.model.num_parameters()),
                TAG_CORPUS: redact(event.data.corpus.name),
                TAG_CORPUS_SHA256: event.data.corpus.sha256,
                TAG_GIT_DIRTY: str(git.dirty).lower(),
                TAG_WORLD_SIZE: str(event.placement.world_size),
                TAG_BACKEND: event.placement.backend,
                TAG_NODES: str(event.placement.nodes),
                TAG_DEVICES: event.placement.devices_summary(),
            }
        )
        if git.commit:
            tags[MLFLOW_GIT_COMMIT] = git.commit
        for k, v in tags.items():
            c.set_tag(rid, k, v)
        if event.resumed:
            c.set_tag(rid, TAG_RESUMED_FROM_EPOCH, str(event.start_epoch))
            self._reload_history(event.start_epoch)
            return
        c.log_text(rid, cfg.to_yaml(), "config/config.yaml")
        c.log_text(rid, pip_freeze(), "environment/pip-freeze.txt")
        if git.diff:
            c.log_text(rid, git.diff, "environment/git-diff.patch")
        self._log_dataset(event)

    def _reload_history(self, epochs_done: int) -> None:
        """The points logged before the interruption: kept for the plot, and never logged twice."""
        keys = self.client.get_run(self.run_id).data.metrics
        logged = {k: {m.step: m.value for m in self.client.get_metric_history(self.run_id, k)} for k in keys}
        self._logged = {(k, step) for k, points in logged.items() for step in points}

        def history(key):
            return logged.get(key, {})

        train, val, seen, lr = (history(k) for k in ("train_loss", "val_loss", "tokens_seen", "lr"))
        steps = sorted(s for s in val if s in train)
        epoch_of = lambda s: s // self._steps_per_epoch + 1  # noqa: E731
        self._evals = [
            EvalEvent(epoch_of(s), s, train[s], val[s], int(seen.get(s, 0)), lr.get(s, 0.0))
            for s in steps
            if epoch_of(s) <= epochs_done
        ]
        etrain, eval_ = history("epoch_train_loss"), history("epoch_val_loss")
        self._epochs = [
            EpochEvent(e, 0, etrain[e], eval_[e], 0, 0.0, 0.0, "", "")
            for e in sorted(eval_)
            if e in etrain and e <= epochs_done
        ]

    def _log(self, values: dict[str, float], step: int) -> None:
        """Log the points not in the run yet. MLflow cannot replace a point, so a step of the
        interrupted epoch that a resumed run computes again keeps its first value: the same bits
        on CPU in fp32 (the resume is exact there); elsewhere, the first trajectory's value."""
        fresh = {k: v for k, v in values.items() if (k, step) not in self._logged}
        if fresh:
            log_metrics(self.client, self.run_id, fresh, step=step)
            self._logged.update((k, step) for k in fresh)

    def _log_dataset(self, event: StartEvent) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        corpus, data = event.data.corpus, event.data
        files = [str(f) for f in corpus.files]
        # MLflow refuses a dataset source over 65,535 characters: a folder of thousands of files
        # is named by its first ones and counted in full.
        named, room = [], MAX_SOURCE_CHARS
        for f in files:
            room -= len(json.dumps(f)) + 2  # as written, with ", "
            if room < 0:
                break
            named.append(f)
        source = {"uri": redact(corpus.name), "files": named}
        if len(named) < len(files):
            source["more_files"] = len(files) - len(named)
        profile = {
            "sha256": corpus.sha256,
            "characters": corpus.characters,
            "files": len(files),
            "bytes": corpus.file_bytes,
            "train_tokens": int(len(data.train_ids)),
            "validation_tokens": int(len(data.val_ids)),
            "train_ratio": event.config.data.train_ratio,
        }
        if data.prepared is not None:
            # The book's split is by characters; each split's ids are one cache file, named by
            # the sha256 of the split's text.
            for split in data.prepared.splits:
                profile[f"{split.name}_characters"] = list(split.characters)
                profile[f"{split.name}_text_sha256"] = split.text_sha256
        # MLflow stores at most 36 characters of digest; the full sha256 is in the profile and a tag.
        dataset = Dataset(
            name=redact(corpus.name),
            digest=corpus.sha256[:36],
            source_type="local",
            source=json.dumps(source),
            profile=json.dumps(profile),
        )
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])

    def on_eval(self, event: EvalEvent) -> None:
        self._evals.append(event)
        self._log(
            {
                "train_loss": event.train_loss,
                "val_loss": event.val_loss,
                "tokens_seen": event.tokens_seen,
                "lr": event.lr,
            },
            step=event.global_step,
        )

    def on_epoch_end(self, event: EpochEvent) -> None:
        c, rid = self.client, self.run_id
        self._epochs.append(event)
        self._log(
            {
                "epoch_train_loss": event.train_loss,
                "epoch_val_loss": event.val_loss,
                "epoch_train_ppl": event.train_ppl,
                "epoch_val_ppl": event.val_ppl,
                "tokens_per_sec": event.tokens_per_sec,
            },
            step=event.epoch,
        )
        # Also at the epoch's last step, so a run ending between eval points still records all it
        # trained on; when that step was an eval step the point is already there (same value).
        self._log({"tokens_seen": event.tokens_seen}, step=event.global_step)
        c.log_table(
            rid,
            {
                "epoch": [event.epoch],
                "global_step": [event.global_step],
                # Shown with its whitespace made visible (gptexp.text_view): a blank completion is a
                # model's output worth seeing; the raw text is the epoch's .txt file beside it.
                "prompt": [visible(event.prompt)],
                "completion": [visible(event.completion)],
            },
            "samples/samples.json",
        )
        c.log_text(rid, event.prompt + event.completion + "\n", f"samples/epoch-{event.epoch:03d}.txt")
        self._plot()

    def _plot(self) -> None:
        from .plots import loss_figure

        fig = loss_figure(self._evals, self._epochs, self._steps_per_epoch)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                fig.savefig(Path(tmp) / "loss.png")
                self.client.log_artifact(self.run_id, str(Path(tmp) / "loss.png"), "plots")
                # MLflow's compare view shows only the files at a run's top level.
                self.client.log_artifact(self.run_id, str(Path(tmp) / "loss.png"))
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def on_checkpoint(self, event: CheckpointEvent) -> None:
        if self.upload_checkpoints:
            # The folder first, then the index naming it: an upload cut short leaves the index on
            # the previous checkpoint, which stays the one resumed from.
            self.client.log_artifacts(self.run_id, str(event.path), f"checkpoints/{event.path.name}")
            self.client.log_artifact(self.run_id, str(event.root / "index.json"), "checkpoints")


def checkpoint_root(client, run_id: str) -> tuple[Path, bool]:
    """Where the runner writes checkpoints: straight into a local artifact folder (atomic
    renames there), else the run's local cache (gptexp.artifact_cache), whose epochs the logger
    uploads. Returns (root, upload)."""
    from .artifact_cache import run_dir

    local = local_artifact_dir(client, run_id)
    if local is not None:
        return local / "checkpoints", False
    return run_dir(run_id) / "checkpoints", True
