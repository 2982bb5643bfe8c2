"""A sweep's study plots (Optuna's matplotlib figures), labelled with what they show.

Optuna labels its axes "Objective Value", "Intermediate Value" and "Step"; here they name the
objective (e.g. `best epoch_val_loss`) and the epoch each pruning report was made at. Parameter
importances are skipped until enough trials complete to rest on, and say how many they rest on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

# Below this many complete trials a parameter-importance estimate (a random forest fitted on the
# trials) is noise presented as a ranking: the plot is skipped, and says so.
MIN_TRIALS_FOR_IMPORTANCE = 5


def _objective_label(objective: str, reduce: str) -> str:
    return f"{reduce} {objective}" if reduce != "last" else objective


def _axes(result):
    """The first Axes of what an Optuna matplotlib function returns (an Axes or an array of them)."""
    return result if hasattr(result, "figure") else result.flatten()[0]


def plot_functions(objective: str, reduce: str, complete: int) -> dict[str, Callable]:
    """name -> function(study) returning a labelled matplotlib Figure, for the plots worth drawing now."""
    from optuna.visualization import matplotlib as ovm

    label = _objective_label(objective, reduce)

    def history(study):
        ax = _axes(ovm.plot_optimization_history(study, target_name=label))
        ax.set_title(f"Optimization history: {label} per trial")
        return ax.figure

    def importances(study):
        ax = _axes(ovm.plot_param_importances(study, target_name=label))
        ax.set_title(f"Parameter importances for {label} (from {complete} complete trials)")
        return ax.figure

    def parallel(study):
        ax = _axes(ovm.plot_parallel_coordinate(study, target_name=label))
        return ax.figure

    def intermediate(study):
        ax = _axes(ovm.plot_intermediate_values(study))
        ax.set_title(f"{objective} at each epoch, per trial (what the pruner saw)")
        from matplotlib.ticker import MaxNLocator

        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(objective)
        return ax.figure

    plots = {"optimization_history": history, "parallel_coordinate": parallel, "intermediate_values": intermediate}
    if complete >= MIN_TRIALS_FOR_IMPORTANCE:
        plots["param_importances"] = importances
    return plots


def log_plots(client, parent: str, study, objective: str, reduce: str) -> list[str]:
    """Draw the study's plots into the parent run's plots/; returns one line per plot not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    skipped = []
    if complete < MIN_TRIALS_FOR_IMPORTANCE:
        skipped.append(
            f"plot param_importances skipped: {complete} complete trial(s), it needs {MIN_TRIALS_FOR_IMPORTANCE}"
        )
    for name, draw in plot_functions(objective, reduce, complete).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = draw(study)
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            client.log_figure(parent, fig, f"plots/{name}.png")
            plt.close(fig)
        except Exception as exc:  # e.g. a study whose trials all failed has nothing to draw
            skipped.append(f"plot {name} skipped: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return skipped
