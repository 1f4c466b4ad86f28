"""The README's promises that code can check: CI runs its test command, and its exit-code table is
the codes kiln has."""

import re
from pathlib import Path

from kiln.optimizer import errors

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    assert len(commands) == 1
    assert commands[0] in (ROOT / ".ci/run").read_text().splitlines()


def test_the_exit_code_table_lists_every_code():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("Exit codes, the same for every command:"):].split("\n\n")[1]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert documented == {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
