"""Plain-text tables for the terminal (no torch here: bulk's parent and the CLI use it)."""

from __future__ import annotations


def render_table(rows: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """Columns padded to their widest cell; column indices in ``right`` are right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows)
