"""The test tiers keep their word: a test that starts a process must be marked `slow` (see conftest.py)."""
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INNER = '''
import subprocess
import sys

import pytest


def test_quiet() -> None:
    assert 1 + 1 == 2


def test_unmarked_subprocess() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.slow
def test_marked_subprocess() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)
'''


@pytest.mark.slow
def test_an_unmarked_test_that_starts_a_process_fails(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nmarkers = ["slow: s", "distributed: d", "realdata: r"]\n')
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*test_unmarked_subprocess starts processes (subprocess.Popen)*not marked slow*"])
