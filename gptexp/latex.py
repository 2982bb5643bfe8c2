"""LaTeX tables for papers: a booktabs `tabular` of mean ± std cells, the best bold.

The output needs `\\usepackage{booktabs}` and nothing else; every text cell is escaped (`_` is
`\\_`), numbers are set in math mode so that `\\pm` and `\\mathbf` work in any text font.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .report import latex_escape


def number(value: float, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--"
    return f"{value:.{decimals}f}"


def mean_pm_std(mean: float, std: float, decimals: int, *, bold: bool = False) -> str:
    """`$8.1234 \\pm 0.0123$` (no ± with a single seed, whose std is undefined)."""
    if mean is None or math.isnan(mean):
        return "--"
    body = number(mean, decimals)
    if std is not None and not math.isnan(std):
        body += rf" \pm {number(std, decimals)}"
    return f"$\\mathbf{{{body}}}$" if bold else f"${body}$"


def tabular(header: Sequence[str], rows: Sequence[Sequence[str]], align: str, *, comment: str = "") -> str:
    """A booktabs tabular: `header` is escaped here, `rows` are LaTeX already (escape text cells first)."""
    if len(align) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError("every row needs one cell per column of the alignment")
    lines = [f"% {latex_escape(line)}" for line in comment.splitlines() if line.strip()]
    lines += [
        "% needs \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{{align}}}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in header) + r" \\",
        "\\midrule",
    ]
    lines += [" & ".join(row) + r" \\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
