"""Text files a user gives (prompt lists, captions): UTF-8 with or without a byte-order mark, or UTF-16 with
one (what Notepad and PowerShell write); anything else is one line naming the file and how to convert it."""

from __future__ import annotations

import codecs
from pathlib import Path

from ..errors import ConfigError

CONVERT = "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`, or your editor's Save As)"


def read_text(path: Path, what: str) -> str:
    """The file's text; `what` names it in errors (e.g. '--prompts-file prompts.txt')."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror}") from e
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise ConfigError(f"{what} is cut UTF-16 (an odd byte at the end); {CONVERT}") from None
    if b"\x00" in data:
        raise ConfigError(f"{what} is not a text file (it holds NUL bytes: binary, or UTF-16 without a BOM)")
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is not part of the first line
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} is not UTF-8 (byte {e.start}: {data[e.start]:#04x}); {CONVERT}") from None


def prompt_lines(path: Path, what: str) -> list[str]:
    """One prompt a line: non-empty lines that do not start with #; a file with none is an error."""
    lines = read_text(path, what).splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"{what} has no prompt (one a line; # starts a comment)")
    return prompts
