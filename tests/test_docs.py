"""The README's promises that can be checked mechanically."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_screen = text.split("---", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", first_screen)


def test_first_screen_has_exactly_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("vmzconv demo") and "torch==2.13.0" in cmds[0]
    assert "pytest" in cmds[1] and "torch==2.13.0" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_pyproject_declares_a_torch_range_not_a_pin():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.1"' in text and "torch==" not in text
