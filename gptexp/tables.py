"""Plain-text tables for the console: the one column aligner every command prints with."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def aligned(header: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = (), indent: str = "") -> str:
    """Columns padded to their widest cell, those in `right` right-aligned, no trailing spaces."""
    rows = [[str(c) for c in r] for r in rows]
    header = [str(h) for h in header]
    right = set(right)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    return "\n".join(
        (
            indent
            + "  ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        ).rstrip()
        for cells in (header, *rows)
    )
