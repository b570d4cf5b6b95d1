"""What a tool said on stderr besides its progress lines, for exact line counts."""

from __future__ import annotations

import re

#: ConsoleProgress's lines on a non-terminal: "[3] label ...", "    done (1.2 s)" / "    FAILED (1.2 s)",
#: and notes indented by six spaces
_PROGRESS = re.compile(r"^(\[\d+\] .* \.\.\.|    (done|FAILED) \(\d+\.\d s\)|      \S.*)$")


def said(err: str) -> list[str]:
    """stderr without progress lines and blank lines: what the tool told the user."""
    return [ln for ln in err.splitlines() if ln.strip() and not _PROGRESS.match(ln)]


def one_line(err: str) -> str:
    """The one line a tool says about an error: all of stderr but progress lines, exactly one
    line, and no traceback."""
    lines = said(err)
    assert len(lines) == 1, lines
    assert "Traceback" not in err
    return lines[0]
