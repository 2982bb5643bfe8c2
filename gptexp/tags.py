"""The names of the run tags gptexp sets and reads: one place, as dashboards and reports depend on them.

Our own tags are `gptexp.*`; `optuna.*` describe a sweep trial's Optuna side; `best.*` on a sweep's
parent run describe its best trial; the `mlflow.*` ones are MLflow's own, named here where we set or
read them.
"""

# What made the run: train, trial, sweep, eval, reproduce, bench, paper (an experiment's parent run)
# or paper_run (one cell and seed of it).
TAG_JOB = "gptexp.job"
TAG_BENCH_QUICK = "gptexp.quick"  # a bench run: true for `gptexp bench --quick`
# How the run ended: completed, failed, interrupted or a stop's own status (e.g. pruned).
TAG_STATUS = "gptexp.status"
TAG_ERROR = "gptexp.error"  # one line: why a FAILED run failed
TAG_STOP = "gptexp.stop_reason"  # one line: why a KILLED run was stopped

# Sweeps: the parent run and each trial's child run carry the study; a trial its number.
TAG_STUDY = "gptexp.study"
TAG_TRIAL = "gptexp.trial"
# The seed of the sampler that proposed the trial (see sweep_sampler.trial_seed).
TAG_SAMPLER_SEED = "gptexp.sampler_seed"
# The number of the trial whose worker stopped heartbeating and that this trial retries.
TAG_RETRY_OF_TRIAL = "gptexp.retry_of_trial"
TAG_OPTUNA_STUDY_NAME = "optuna.study_name"
TAG_OPTUNA_TRIAL_NUMBER = "optuna.trial_number"
TAG_OPTUNA_STATE = "optuna.state"  # COMPLETE, PRUNED or FAIL, as Optuna was told
TAG_OPTUNA_VALUE = "optuna.value"  # a complete trial's objective value, repr'd
TAG_OPTUNA_STORAGE = "optuna.storage"  # the study's storage URL, password redacted
# Prefix of the parent run's tags about its best trial: best.trial, best.run_id, best.<searched key>.
TAG_BEST_PREFIX = "best."
TAG_BEST_TRIAL = TAG_BEST_PREFIX + "trial"
TAG_BEST_RUN_ID = TAG_BEST_PREFIX + "run_id"

# What a training run trained.
TAG_IMPL = "gptexp.impl"  # the model implementation (config model.impl)
TAG_NUM_PARAMETERS = "gptexp.num_parameters"
TAG_CORPUS = "gptexp.corpus"
TAG_CORPUS_SHA256 = "gptexp.corpus_sha256"
TAG_GIT_DIRTY = "gptexp.git_dirty"  # whether the working tree had uncommitted changes
TAG_RESUMED_FROM_EPOCH = "gptexp.resumed_from_epoch"

# Where a run ran (provenance.environment_tags).
TAG_PYTHON_VERSION = "gptexp.python_version"
TAG_TORCH_VERSION = "gptexp.torch_version"
TAG_CUDA_VERSION = "gptexp.cuda_version"
TAG_DEVICE = "gptexp.device"
TAG_PRECISION = "gptexp.precision"
TAG_THREADS = "gptexp.threads"
TAG_CPU = "gptexp.cpu"
TAG_GPU = "gptexp.gpu"
TAG_PLATFORM = "gptexp.platform"
TAG_DETERMINISTIC = "gptexp.deterministic"  # whether torch.use_deterministic_algorithms was on
# The processes of the job (gptexp.distributed): 1 and none for a single process.
TAG_WORLD_SIZE = "gptexp.world_size"
TAG_BACKEND = "gptexp.backend"  # gloo, nccl or none
TAG_NODES = "gptexp.nodes"  # machines
TAG_DEVICES = "gptexp.devices"  # each device with its number of ranks, e.g. "cpu x2"
TAG_COMMAND = "gptexp.command"  # the command line, passwords redacted

# `gptexp eval`: the checkpoint it evaluated and, when given by run, that run.
TAG_CHECKPOINT = "gptexp.checkpoint"
TAG_SOURCE_RUN = "gptexp.source_run"

# `gptexp reproduce` and `gptexp rerun`.
TAG_EXPERIMENT_SPEC = "gptexp.experiment_spec"  # the name of the reproduced spec
TAG_VERDICT = "gptexp.verdict"  # pass or fail
TAG_MAX_ABS_DIFF = "gptexp.max_abs_diff"  # the largest difference from the expected figures
TAG_RERUN_OF = "gptexp.rerun_of"  # the run id a rerun repeats

# Paper experiments (gptexp.study): the parent run and each (cell, seed) child carry the spec name
# (TAG_EXPERIMENT_SPEC) and the code version; each child its cell, seed and resolved config's digest.
TAG_CELL = "gptexp.cell"
TAG_SEED = "gptexp.seed"
TAG_CONFIG_SHA256 = "gptexp.config_sha256"
TAG_CODE_VERSION = "gptexp.code_version"  # the commit, plus the digest of the diff when the tree is dirty

# MLflow's own.
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
