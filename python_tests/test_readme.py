"""The README's code and commands are the ones that work."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _block(marker: str) -> str:
    m = re.search(r"<!-- readme-example: %s -->\s*```python\n(.*?)```" % re.escape(marker), README, re.S)
    assert m, f"README example {marker!r} not found"
    return m.group(1)


def test_minimal_loop_runs_and_learns_something():
    scope: dict = {}
    exec(compile(_block("minimal-loop"), "README.md:minimal-loop", "exec"), scope)
    info = scope["info"]
    assert not bool(info.skipped)
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in scope["wnet"].parameters())


def test_ci_runs_the_readme_test_command():
    test_cmd = "python -m pytest python_tests -q"
    assert test_cmd in README
    assert test_cmd in (REPO / ".ci" / "run").read_text()
