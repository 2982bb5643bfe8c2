"""`gptexp bench`: gptexp measured against the book's own package (llms-from-scratch), side by side.

Every figure is timed in one process next to its baseline from the book's package, as the median
of several repetitions after a warm-up (training variants interleaved round by round, so a noisy
neighbour slows all of them alike); the data windows are built in child processes so their peak
memory is clean. The result is printed as a table, written as JSON (`ratios`: gptexp over the
book, > 1 is better) and logged as an MLflow run in experiment `bench`.

Slow figures get a time budget: after the warm-up and the first repetition, another repetition
runs only while it fits the budget, so the full bench stays within ~10 minutes on 2 idle CPU
cores (other processes on the machine slow it down and are recorded as the load average).
The repetitions done are recorded next to every figure. Where bf16 has no hardware support (the
bench measures the bf16 matmul peak itself), the bf16 figures are measured on a smaller shape,
said so in `notes`, and torch.compile is measured in fp32.

The modules, one concern each: `sizes` (what is measured, how long it may take), `timing`
(repetitions within a budget), `machine` (CPU flags, matmul peaks, load), `baseline` (the book's
package), `training` (training steps through `runner.train_step`, AdamW implementations),
`inference` (evaluation, generation), `windows` (data windows) with `fork_server` (their clean
peak memory), `results` (ratios, table, JSON), `mlflow_run` (the MLflow run), `run` (`run_bench`,
all of it in order) and `cli` (the command). `data_prepare` is a bench of its own
(`python -m gptexp.bench.data_prepare`): streamed corpus preparation against tiktoken's batched encoder.
"""
