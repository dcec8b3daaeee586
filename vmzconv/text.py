"""Plain text for the terminal (no torch here: bulk's parent and the CLI use it)."""

from __future__ import annotations


def safe(text) -> str:
    """Attacker-chosen text (blob and module names, file names, reasons built from them) as one printable
    line: control characters, newlines and escape sequences become backslash escapes; printable Unicode
    stays as it is; undecodable file-name bytes (surrogates) become \\x.. escapes."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:                 # os.fsdecode's stand-in for an undecodable byte
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def render_table(rows: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """Columns padded to their widest cell; column indices in ``right`` are right-aligned. Every cell is
    escaped here (:func:`safe`), so no caller can forget: attacker text never reaches the terminal raw."""
    rows = [[safe(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows)
