"""The README's Python examples run as written (their /tmp paths moved into the test's folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = EXAMPLES[index].replace('"/tmp/', f'"{tmp_path}/')
    exec(compile(code, f"README.md python example {index + 1}", "exec"), {"__name__": f"readme_{index}"})
