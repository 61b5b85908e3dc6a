"""Strings from outside (file names, class names, config.json fields, URLs, CSV labels) made safe to show.

The one home of the rule: on a terminal and in a report such a string is shown with every control
character escaped (`shown`), so an escape sequence in a file or class name cannot clear the screen,
hide output or write the clipboard (OSC 52), and a bidi override cannot reorder what is read; in
Markdown it is escaped too (`markdown`), so it renders as the text it is; in a CSV cell a leading
`=`, `+`, `-`, `@`, tab or CR is neutralised (`spreadsheet_safe`), so a spreadsheet does not run it
as a formula (OWASP CSV injection). JSON keeps raw strings: its encoder escapes them.

And one spelling of a params value for people (`param_text`): as YAML writes it in a report, as an
option takes it in a help text.
"""

from __future__ import annotations

import os
import reprlib

# Bidi controls: embeddings and overrides (U+202A-U+202E), isolates (U+2066-U+2069) and the marks
# (LRM, RLM, ALM) make a line read in another order than it is stored.
BIDI = frozenset([*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C])
# Line and paragraph separators: str.splitlines (and so rich) breaks lines there; one line stays one.
SEPARATORS = frozenset([0x2028, 0x2029])
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(code: int) -> str:
    return _NAMED.get(chr(code)) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


# C0 controls (\n, \r and \t too), DEL and C1 controls (0x9b alone is a CSI on some terminals).
_SHOWN = {c: _escape(c) for c in [*range(0x20), *range(0x7F, 0xA0), *BIDI, *SEPARATORS]}
_MARKDOWN = {ord(c): "\\" + c for c in "\\`*_[]|#!~"} | {ord("<"): "&lt;", ord(">"): "&gt;", ord("&"): "&amp;"}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def decoded(value: object) -> str:
    """`value` as valid text: bytes that are not UTF-8 (a file name's, kept by Python as surrogates) as \\xNN."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        text = str(value)
        try:
            data = text.encode("utf-8", "surrogateescape")  # what os.fsencode does on POSIX
        except UnicodeEncodeError:  # a lone surrogate no byte maps to (JSON allows "\ud800"): as \uNNNN
            text = "".join(f"\\u{ord(c):04x}" if 0xD800 <= ord(c) < 0xDC80 or 0xDD00 <= ord(c) < 0xE000 else c
                           for c in text)
            data = text.encode("utf-8", "surrogateescape")
    return data.decode("utf-8", "backslashreplace")


def shown(value: object) -> str:
    """`value` as one line of inert text for a terminal: control and bidi characters as \\x1b, \\n, \\u202e.

    Text without a backslash comes back unchanged after unescaping; a backslash itself is kept, so
    shown(shown(x)) == shown(x) and a message built from shown() parts can be shown again whole.
    """
    return decoded(value).translate(_SHOWN)


def markdown(value: object) -> str:
    """`value` as Markdown text (a table cell too) that renders as itself: no HTML, link, emphasis or cell break."""
    return shown(value).translate(_MARKDOWN)


def param_text(value: object, command_line: bool = False) -> str:
    """A params value as YAML writes it (`null`, `true`, `0.001`, `[256, 256]`), or with `command_line` as
    its option takes it (`--image-shape 256 256`: a tuple's items space-separated).

    Not escaped: pass the result to `shown` or `markdown` where it may hold a name from outside.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value) if command_line else str(list(value))
    return str(value)


# A value from a file shown in a message: a few items a level, a few levels, a bounded string. A YAML
# alias tree of a few KB is a value of gigabytes once expanded; its repr() alone never ends.
_BRIEF = reprlib.Repr()  # keyword arguments only from Python 3.12
for (_name, _limit) in dict(maxlevel=2, maxlist=4, maxtuple=4, maxdict=4, maxset=4, maxfrozenset=4, maxstring=80,
                            maxother=80, maxlong=40).items():
    setattr(_BRIEF, _name, _limit)
MAX_LINE = 1000  # characters of one error line (a message names a few values and paths, each bounded)


def brief(value: object) -> str:
    """`repr(value)`, bounded (at most a few hundred characters, whatever the value holds)."""
    try:
        return _BRIEF.repr(value)
    except ValueError:  # an integer too long for str() (Python refuses beyond 4300 digits)
        return f"<an integer of {value.bit_length() if isinstance(value, int) else '?'} bits>"


def clipped(text: str, limit: int = 200) -> str:
    """`text` at most `limit` characters: its start and end kept, the middle as an ellipsis (a path stays
    recognisable by both)."""
    return text if len(text) <= limit else text[:limit * 3 // 5] + "…" + text[-(limit * 3 // 10):]


def one_line(message: object) -> str:
    """A message as one bounded line for a terminal: `shown`, cut to MAX_LINE characters with an ellipsis."""
    text = shown(message)
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 1] + "…"


def spreadsheet_safe(cell: object) -> object:
    """A CSV cell a spreadsheet will not run as a formula: text starting with =, +, -, @, tab or CR gets a `'`.

    Numbers are left alone; text that looks like a negative number ("-1", a class so named) gets
    the quote too, which a spreadsheet shows as the text it is.
    """
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell
