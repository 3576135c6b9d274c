"""Completion scripts and man pages, generated from the parsers and checked through the
real ``fleet`` command and the shells and roff that will read them."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from agents import FLEET

from fleet.shell import COMMANDS, man_file, manpage

ROOT = Path(__file__).resolve().parent.parent


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEET, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_shipped_man_page_is_what_the_parser_says(command: str) -> None:
    shipped = ROOT / "man" / man_file(command)
    assert shipped.read_text() == manpage(command), (
        f"{shipped} is stale: run python -m fleet.shell --write-man man"
    )


def test_every_man_page_is_installed_with_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["data-files"]
    installed = {Path(f).name for files in data.values() for f in files}
    assert installed == {man_file(c) for c in COMMANDS}
    for section, files in data.items():
        assert all(f.endswith(section[-1]) for f in files), section


@pytest.mark.skipif(shutil.which("groff") is None, reason="no groff to render with")
@pytest.mark.parametrize("command", COMMANDS)
def test_man_pages_render_without_warnings(command: str) -> None:
    rendered = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / "man" / man_file(command))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert rendered.returncode == 0
    assert rendered.stderr == ""


def test_bash_completion_is_valid_bash_and_knows_the_commands(tmp_path: Path) -> None:
    script = fleet("completion", "bash")
    assert script.returncode == 0, script.stderr
    for word in ("run", "audit", "replay", "completion", "--json"):
        assert word in script.stdout
    path = tmp_path / "fleet.bash"
    path.write_text(script.stdout)
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    # Completing `fleet ru` offers `run`, through bash itself.
    probe = (
        f"source {path}; COMP_WORDS=(fleet ru); COMP_CWORD=1; COMP_LINE='fleet ru'; "
        f"COMP_POINT=8; _shtab_fleet 2>/dev/null || true; echo ${{COMPREPLY[@]}}"
    )
    offered = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert "run" in offered.stdout.split()


@pytest.mark.parametrize("shell", ["zsh", "tcsh", "fish"])
def test_other_shells_get_a_script_for_each_command(shell: str) -> None:
    for command in COMMANDS:
        script = fleet("completion", shell, command)
        assert script.returncode == 0, script.stderr
        assert command in script.stdout
    if shell == "fish":
        assert "complete -c fleet -n" in fleet("completion", "fish").stdout


def test_an_unknown_shell_is_a_usage_error() -> None:
    wrong = fleet("completion", "powershell")
    assert wrong.returncode == 2
    assert "invalid choice" in wrong.stderr
