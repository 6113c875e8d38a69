"""`make test` runs ruff and its format check before the suite and mypy beside its first tests, failing when
any of them fails, in runs that hold every test once, and mypy's settings name each untyped library instead
of silencing imports or errors globally (README, pyproject.toml)."""

from __future__ import annotations

import itertools
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: mypy's own dependency tomli is the same parser
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


# CI runs `make test`: it is
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_runs_ruff_before_pytest_and_fails_on_mypy():
    # -n prints the recipes without running them; -o: take the set-up as done (no venv or apt work)
    out = subprocess.run(
        ["make", "-n", "-o", ".venv/bin/sarlang", "-o", "/usr/bin/chromedriver", "test"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()

    def first(word: str) -> int:
        return next(i for i, line in enumerate(out) if word in line)

    last_pytest = max(i for i, line in enumerate(out) if "-m pytest" in line)
    assert first("ruff check") < first("ruff format --check") < first("-m pytest") < last_pytest, out
    # mypy beside the first tests; that its failure stops the recipe before the last run: the test below
    assert first("mypy") < last_pytest, out
    for tool in ("ruff check", "ruff format --check"):
        line = out[first(tool)]
        assert all(path in line.split() for path in ("sarlang_ray", "tests", "benchmarks")), line
    # the suite in runs that together hold every test once: each marker expression is evaluated the way pytest
    # does (-m) for every combination of the marks a test can carry
    expressions = _pytest_mark_expressions(out)
    assert len(expressions) >= 2, out
    marks = ("fast", "serial", "slow", "needs_ray")
    for carried in itertools.product((False, True), repeat=len(marks)):
        has = dict(zip(marks, carried))
        matching = [e for e in expressions if Expression.compile(e).evaluate(has.__getitem__)]
        assert len(matching) == 1, (has, expressions)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("mypy_rc", [0, 1])
def test_make_test_fails_on_mypy_before_the_last_pytest_run(tmp_path, mypy_rc):
    """The recipe run for real with stand-ins (BIN: a folder whose ruff and python record their arguments
    and succeed; MYPY: a command exiting with mypy_rc): a failing mypy makes `make test` fail after the
    serial and fast runs and before the xdist run, a passing one lets all three run."""
    calls = tmp_path / "calls.txt"
    for tool in ("ruff", "python"):
        stand_in = tmp_path / tool
        stand_in.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        stand_in.chmod(0o755)
    proc = subprocess.run(
        ["make", "-o", f"{tmp_path}/sarlang", "-o", "/usr/bin/chromedriver", "test"]
        + [f"BIN={tmp_path}", f"MYPY=sh -c 'exit {mypy_rc}'"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    runs = [line for line in calls.read_text().splitlines() if " -m pytest " in line]
    assert (proc.returncode != 0) == bool(mypy_rc), proc.stdout + proc.stderr
    assert any("-m serial" in r for r in runs) and any("fast and not serial" in r for r in runs), runs
    assert any("-n 2" in r for r in runs) == (mypy_rc == 0), runs


def _pytest_mark_expressions(lines: list[str]) -> list[str]:
    """The ``-m`` expression of every pytest command in the shell lines, each command checked to select the
    ``tests`` folder (a line may hold several commands, joined by ``;``, ``&`` or ``&&``)."""
    out = []
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():  # continued lines joined
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        commands: list[list[str]] = [[]]
        for token in tokens:
            if token in (";", "&", "&&", "||", "|"):
                commands.append([])
            else:
                commands[-1].append(token)
        for cmd in commands:
            if "pytest" in cmd and cmd[cmd.index("pytest") - 1] == "-m":
                args = cmd[cmd.index("pytest") + 1 :]
                assert "tests" in args, cmd
                out.append(args[args.index("-m") + 1])
    return out


def test_mypy_settings_silence_nothing_globally():
    mypy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy["packages"] == ["sarlang_ray"] and mypy["warn_unused_ignores"] is True
    assert "ignore_missing_imports" not in mypy and "ignore_errors" not in mypy
    for override in mypy.get("overrides", []):
        assert "ignore_errors" not in override, override
        # only third-party modules may go unchecked, never the package itself
        assert not any(m.startswith("sarlang_ray") for m in override["module"]), override


def test_ruff_reports_a_line_over_110_characters():
    """The README's lint claim: the project's ruff settings make a line over 110 characters an error (E501),
    while one of exactly 110 passes."""
    ruff = Path(sys.executable).parent / "ruff"

    def check(source: str) -> subprocess.CompletedProcess:
        # the source through stdin, named as a file of tests/ so ruff applies the repository's pyproject.toml
        return subprocess.run(
            [str(ruff), "check", "--output-format", "concise", "--stdin-filename", "tests/_probe.py", "-"],
            cwd=REPO,
            input=source,
            check=False,  # the exit status is what is asserted
            capture_output=True,
            text=True,
            timeout=60,
        )

    words = "a b " * 26  # with spaces: ruff lets a line of one unbreakable word through
    at_limit, over_limit = f'X = "{words}"\n', f'X = "{words}c"\n'
    assert [len(line) - 1 for line in (at_limit, over_limit)] == [110, 111]
    ok = check(at_limit)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    over = check(over_limit)
    assert over.returncode == 1 and "E501" in over.stdout, over.stdout + over.stderr
