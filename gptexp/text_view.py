"""Generated text as a reader can see it: whitespace and control characters made visible.

A small model often continues a prompt with newlines and spaces only; printed raw, that is a
blank screen (or 40 blank lines in `compare`). `visible` shows such text on one line: a newline
as `\\n`, a tab as `\\t`, any other control or invisible character as its Python escape, and a
space that would not be seen (in a run of two or more, or at the end) as `␣`. A single leading
space stays: GPT-2's tokens carry their leading space, so nearly every completion starts with
one, and it reads as the gap after the prompt. The raw text is kept elsewhere (a run's
`samples/epoch-NNN.txt`); this is for display only.
"""

from __future__ import annotations

import re

VISIBLE_SPACE = "\u2423"  # ␣, the open box: the conventional glyph for a blank
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
# Spaces a reader cannot count or see: a run of two or more, or one at the end.
_HIDDEN_SPACES = re.compile(r" {2,}| $")


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def visible(text: str) -> str:
    """`text` on one line with its whitespace and control characters shown.

    Applying it to its own output changes nothing (the output holds no control character and no
    hidden space), so a reader may apply it to text that may already have been shown this way.
    Backslashes are left as they are, for that reason: the raw text is the unambiguous record.
    """
    shown = "".join(c if c == " " or c.isprintable() else _escape(c) for c in text)
    return _HIDDEN_SPACES.sub(lambda m: VISIBLE_SPACE * len(m.group()), shown)
