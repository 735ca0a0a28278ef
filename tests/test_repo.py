"""The repository keeps its promises: README commands, CI, examples."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "README must open with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_setup_commands() -> None:
    first_block_at = README.index("```bash")
    assert README[:first_block_at].strip().startswith("# tropical-sched")
    commands = _setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith("tropical simulate")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert _setup_commands()[1] in ci.splitlines()


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_run(example: Path) -> None:
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = example.with_suffix(".expected")
    if expected.exists():
        for line in expected.read_text().splitlines():
            assert line in result.stdout, f"{example.name}: missing output line {line!r}"
