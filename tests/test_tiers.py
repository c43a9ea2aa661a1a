"""The two test commands README gives: the full one is exactly what .ci/run runs; the fast one
deselects a marker that pytest.ini registers (with --strict-markers, a misspelt mark is an error)."""

import configparser
import os

from conftest import REPO


def _readme_commands():
    with open(os.path.join(REPO, "README.md")) as f:
        return [line.strip() for line in f if line.startswith("    ") and "pytest" in line]


def test_readme_runs_the_tests_as_ci_does():
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = [line.strip() for line in f if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(ci) == 1 and ci[0] in _readme_commands(), (ci, _readme_commands())


def test_the_fast_tier_deselects_a_registered_marker():
    assert 'python -m pytest -q -m "not slow" tests' in _readme_commands()
    ini = configparser.ConfigParser()
    ini.read(os.path.join(REPO, "pytest.ini"))
    assert "--strict-markers" in ini["pytest"]["addopts"].split()
    assert any(m.strip().startswith("slow:") for m in ini["pytest"]["markers"].splitlines())
