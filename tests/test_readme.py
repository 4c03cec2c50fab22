"""README's examples run as written: every python block (in order, one namespace) and the report commands."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"(<!-- fragment[^>]*-->\n)?```(python|bash)\n(.*?)```", re.S)


def _blocks(language: str) -> list[str]:
    return [
        code
        for fragment, lang, code in FENCE.findall(README.read_text())
        if lang == language and not fragment
    ]


def test_readme_has_examples():
    assert len(_blocks("python")) >= 4


def test_readme_python_and_report_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for code in _blocks("python"):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the point is to run them
    commands = [
        line for block in _blocks("bash") for line in block.splitlines() if line.startswith("dynamics ")
    ]
    assert any(c.startswith("dynamics report") for c in commands)
    for line in commands:
        args = shlex.split(line)
        exe = Path(sys.executable).with_name("dynamics")
        result = subprocess.run([str(exe), *args[1:]], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "report.pdf").stat().st_size > 10_000
    assert list((tmp_path / "figures").glob("*.png"))


@pytest.mark.parametrize("marker", ["main-command", "test-command"])
def test_setup_commands_install_cpu_torch_first(marker):
    text = README.read_text()
    block = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```", text, re.S)
    assert block, f"README lost its {marker} block"
    cmd = block.group(1)
    assert cmd.index("pip install torch==2.13.0") < cmd.index("pip install -e")
