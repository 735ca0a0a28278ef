"""The shell blocks of the docs that tests run: found by a marker, parsed into commands, so a test starts exactly
what a reader copies (the two cannot drift apart).

A marked block follows an HTML comment ``<!-- tested: NAME -->`` and is a fenced ``bash`` block of simple
commands: variable assignments (``KV='...'``, quotes may span lines), ``#`` comments, backslash line
continuations, ``VAR=value`` prefixes (the command's environment) and a trailing ``&``. ``$VAR`` and ``${VAR}``
expand to the block's own assignments; anything else (pipes, ``$(...)``, an unknown variable) is an error, so the
block stays runnable by this parser and by a shell alike.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["ShellCommand", "doc_block", "doc_block_commands", "parse_commands"]

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.S)
_UNSUPPORTED = ("|", ";", "&&", "||", "$(", "`", ">", "<")


@dataclass(frozen=True)
class ShellCommand:
    """One command of a tested block.

    Attributes:
        argv: the program and its arguments, quotes removed and variables expanded.
        env: the ``VAR=value`` prefixes.
        background: the command ends with ``&``.
    """

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    background: bool = False

    def option(self, name: str) -> str:
        """The value of ``--name VALUE`` (the last one if repeated).

        Raises:
            KeyError: the command has no such option with a value.
        """
        for index in range(len(self.argv) - 1, 0, -1):
            if self.argv[index - 1] == name:
                return self.argv[index]
        raise KeyError(f"{' '.join(self.argv[:4])} ...: no {name} VALUE")

    def has_flag(self, name: str) -> bool:
        """Whether ``name`` appears as an argument."""
        return name in self.argv

    def with_option(self, name: str, value: str) -> ShellCommand:
        """A copy with every ``--name``'s value replaced.

        Raises:
            KeyError: the command has no such option (a test must not silently run something else).
        """
        self.option(name)
        argv = list(self.argv)
        for index in range(1, len(argv)):
            if argv[index - 1] == name:
                argv[index] = value
        return replace(self, argv=tuple(argv))

    def with_program(self, *program: str) -> ShellCommand:
        """A copy with ``argv[0]`` replaced by ``program`` (e.g. ``python`` by ``sys.executable``)."""
        return replace(self, argv=(*program, *self.argv[1:]))


def doc_block(path: Path, name: str) -> str:
    """The text of the fenced block that follows ``<!-- tested: NAME -->`` in ``path``.

    Raises:
        LookupError: no such block, or more than one.
    """
    pattern = re.compile(rf"<!-- tested: {re.escape(name)} -->\n```(?:bash|sh)\n(.*?)```", re.S)
    blocks = pattern.findall(path.read_text())
    if len(blocks) != 1:
        raise LookupError(f"{path.name}: expected one block marked '<!-- tested: {name} -->', found {len(blocks)}")
    return str(blocks[0])


def parse_commands(block: str) -> list[ShellCommand]:
    """The commands of a block (see the module docstring for what it may contain).

    Raises:
        ValueError: a construct this parser does not run, or a variable the block does not assign.
    """
    variables: dict[str, str] = {}
    commands: list[ShellCommand] = []
    for line in _logical_lines(block):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        background = words[-1] == "&"
        if background:
            words = words[:-1]
        for word in words:
            if word in _UNSUPPORTED or any(word.startswith(op) for op in ("$(", "`")):
                raise ValueError(f"unsupported shell syntax {word!r} in: {line}")
        words = [_expand(word, variables, line) for word in words]
        env: dict[str, str] = {}
        while words and (match := _ASSIGNMENT.match(words[0])):
            env[match.group(1)] = match.group(2)
            words = words[1:]
        if not words:  # a plain assignment: a variable for the rest of the block
            if background:
                raise ValueError(f"an assignment cannot run in the background: {line}")
            variables.update(env)
            continue
        commands.append(ShellCommand(argv=tuple(words), env=env, background=background))
    return commands


def doc_block_commands(path: Path, name: str) -> list[ShellCommand]:
    """:func:`parse_commands` of :func:`doc_block`."""
    return parse_commands(doc_block(path, name))


def _logical_lines(block: str) -> list[str]:
    """Physical lines joined at backslash continuations and inside quotes that span lines."""
    lines: list[str] = []
    current = ""
    for raw in block.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        try:
            shlex.split(current, comments=True)
        except ValueError:  # a quote still open: the string goes on on the next line
            current += "\n"
            continue
        lines.append(current)
        current = ""
    if current:
        raise ValueError(f"unterminated command at the end of the block: {current}")
    return lines


def _expand(word: str, variables: dict[str, str], line: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise ValueError(f"${name} is not assigned earlier in the block: {line}")
        return variables[name]

    return _VARIABLE.sub(value, word)
