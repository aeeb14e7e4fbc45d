"""The Docker image definition: linted (hadolint) and checked for what users rely on. Building it and running the
quickstart in it (no registry, no network) is `make docker-check` (docker/check.sh): 6-15 min,
not in .ci/run (see there); the suite runs the launcher as PID 1 instead."""

import re

from helpers import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_image_pins_the_tested_torch_and_installs_dependencies_before_the_code():
    text = DOCKERFILE.read_text()
    pinned = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in text and '"torch==${TORCH_VERSION}"' in text
    # A code edit must not invalidate the dependency layer: pyproject.toml is copied and installed first.
    assert text.index("COPY pyproject.toml") < text.index("pip install ${PIP_OPTIONS} -r") < text.index("COPY alexdist")
    assert "optional-dependencies']['deepspeed']" in text


