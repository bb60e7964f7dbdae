"""The shell blocks of the project's Markdown docs, split into the commands a reader would run.

Used by tests/unit/test_doc_commands.py (every command parses, every file it names exists) and
tests/integration/test_doc_walkthrough.py (docs/cluster.md §1, every block in order, runs as
written), test_readme_blocks.py and test_readme_jobs.py (README's blocks, likewise).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!-- doc-test: ([\w-]+) -->\s*$")
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "2>", "2>>"}


@dataclass
class Block:
    file: str
    heading: str  # the nearest "## " heading above the block
    line: int  # 1-based line of the opening fence
    text: str
    marker: str | None  # name of a <!-- doc-test: NAME --> line right above the fence


@dataclass
class Command:
    block: Block
    line: str  # the logical line it came from (continuations joined)
    argv: list[str]  # words, $(...) replaced by the placeholder SUBSHELL_VALUE
    subshells: list[str]  # the $(...) texts of that line, for checking what they run


SUBSHELL_VALUE = "SUBSHELL_VALUE"


def find_subshells(line: str) -> list[str]:
    """The ``$(...)`` of ``line`` (outermost; parentheses inside are balanced, as in the docs)."""
    found, start = [], line.find("$(")
    while start >= 0:
        depth, end = 0, start + 1
        while end < len(line):
            depth += {"(": 1, ")": -1}.get(line[end], 0)
            if depth == 0:
                break
            end += 1
        found.append(line[start:end + 1])
        start = line.find("$(", end + 1)
    return found


def replace_subshells(line: str) -> str:
    for subshell in find_subshells(line):
        line = line.replace(subshell, SUBSHELL_VALUE, 1)
    return line


def bash_blocks(path: Path) -> list[Block]:
    """Every ```bash block of the Markdown file ``path``."""
    blocks, heading, marker = [], "", None
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        text = lines[i]
        if text.startswith("## "):
            heading = text[3:].strip()
        found = MARKER.match(text)
        fence = FENCE.match(text)
        if found:
            marker = found[1]
        elif fence:
            body_start = i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            if fence[1] == "bash":
                blocks.append(Block(str(path.relative_to(ROOT)), heading, body_start,
                                    "\n".join(lines[body_start:i]), marker))
            marker = None
        elif text.strip():
            marker = None
        i += 1
    return blocks


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and quoted newlines kept inside their line."""
    out, current, continued = [], "", False
    for raw in text.splitlines():
        current = current + raw if continued or not current else f"{current}\n{raw}"
        continued = current.endswith("\\")
        if continued:  # backslash-newline: bash drops both, inside quotes too
            current = current[:-1]
            continue
        try:
            shlex.split(replace_subshells(current), comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        if current.strip():
            out.append(current)
        current = ""
    if current.strip():
        out.append(current)
    return out


def commands(block: Block) -> list[Command]:
    """The simple commands of ``block``: split at ``&&``, ``;``, ``|``, ``&``, without redirections,
    comments or leading ``VAR=value`` assignments."""
    return [command for line in logical_lines(block.text) for command in _line_commands(block, line)]


def _line_commands(block: Block, line: str) -> list[Command]:
    """The commands of one logical line, then those inside its ``$(...)``."""
    result = []
    subshells = find_subshells(line)
    lexer = shlex.shlex(replace_subshells(line), posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    words: list[str] = []
    for word in [*lexer, ";"]:
        if word in OPERATORS:
            argv = _strip(words)
            if argv:
                result.append(Command(block, line, argv, subshells))
            words = []
        else:
            words.append(word)
    for subshell in subshells:
        result.extend(_line_commands(block, subshell[2:-1]))
    return result


def _strip(words: list[str]) -> list[str]:
    argv, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in REDIRECTS:
            skip = True
            if argv and re.fullmatch(r"\d", argv[-1]):  # the fd of 2>&1
                argv.pop()
        else:
            argv.append(word)
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0], re.S):
        argv.pop(0)
    return argv
