"""Which of the wheels in .whl/ (benchmarks/gpu_wheels.sh) the GPU machine needs: run by gpu_check.sh before
anything else, stdlib only.

    python3 benchmarks/gpu_deps.py WHEEL_DIR TARGET   # installs what is needed into TARGET; exit 2 if unmet

A package is taken from the image when the image has it at or above its floor (pyproject.toml's `>=`, and what
the wheels themselves require, e.g. pydantic's exact pydantic-core), and from a wheel only when the
image lacks it or has an older one: a wheel never shadows a newer installed package. Prints one line
per package saying which was used. Exit 2, with one line, when a package the check needs is in neither place;
DeepSpeed (and what only it needs) is optional: without it the DeepSpeed rows are skipped (`deepspeed: skip`
is printed, and gpu_check.sh passes it on).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What alexdist imports on the GPU check's paths (datasets, wandb and the ONNX tools are not on them).
# Each before the packages it requires (see plan).
NEEDED = ["torch", "accelerate", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "typing-extensions", "pyyaml", "safetensors", "tqdm", "huggingface-hub", "numpy", "timm", "matplotlib"]
OPTIONAL = ["deepspeed", "hjson", "msgpack", "ninja", "py-cpuinfo"]  # DeepSpeed and its own requirements


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:4])


def parse_requirement(text: str) -> tuple[str, str, str] | None:
    """'pydantic-core==2.41.5' -> ('pydantic-core', '==', '2.41.5'); None for an extra's requirement. Only
    the first `>=` or `==` clause counts (upper bounds are the package manager's business, not ours)."""
    if "extra ==" in text:
        return None
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^]]*\])?\s*(?:\(?\s*(>=|==)\s*([0-9][0-9a-zA-Z.]*))?", text)
    if not m:
        return None
    return norm(m.group(1)), m.group(2) or "", m.group(3) or ""


def satisfies(have: str, op: str, want: str) -> bool:
    if not op:
        return True
    if op == "==":
        return version_tuple(have) == version_tuple(want)
    return version_tuple(have) >= version_tuple(want)


def project_floors() -> dict[str, tuple[str, str]]:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^]]*\])?\s*>=\s*([0-9][0-9.]*)', text)
    return {norm(n): (">=", v) for n, v in found}


def wheels(folder: Path) -> dict[str, tuple[Path, str, list[str]]]:
    """name -> (wheel file, version, Requires-Dist lines) for each wheel in `folder`."""
    out = {}
    for whl in sorted(folder.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            requires = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                        if line.startswith("Requires-Dist:")]
        out[norm(name)] = (whl, version, requires)
    return out


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plan(wheel_dir: Path, have=installed, requires=metadata.requires) -> tuple[list[Path], list[str], list[str], bool]:
    """(wheels to install, lines to print, missing required packages, deepspeed usable). Packages are decided in
    order, each before what it requires: the requirements of the copy chosen (image or wheel) become floors for
    the packages after it, so e.g. the image's pydantic is kept with the image's pydantic-core."""
    carried = wheels(wheel_dir) if wheel_dir.is_dir() else {}
    floors = project_floors()
    install, lines, missing, ds_ok = [], [], [], True
    for name in NEEDED + OPTIONAL:
        op, want = floors.get(norm(name), ("", ""))
        floor = f" (needs {op}{want})" if op else ""
        image, wheel = have(name), carried.get(norm(name))
        if image and satisfies(image, op, want):
            lines.append(f"gpu_check: {name} {image} from the image")
            reqs = requires(name) or []
        elif wheel and satisfies(wheel[1], op, want):
            install.append(wheel[0])
            lines.append(f"gpu_check: {name} {wheel[1]} from {wheel[0].name}"
                         + (f", the image has {image}" if image else ""))
            reqs = wheel[2]
        elif name in OPTIONAL:
            ds_ok, reqs = False, []
            lines.append(f"gpu_check: {name} missing{floor}: the DeepSpeed rows are skipped")
        else:
            missing.append(f"{name}{floor}" + (f" (the image has {image})" if image else ""))
            reqs = []
        for req in filter(None, map(parse_requirement, reqs)):
            if req[1] and (req[0] not in floors or req[1] == "=="):
                floors[req[0]] = (req[1], req[2])
    return install, lines, missing, ds_ok


def main() -> int:
    wheel_dir, target = Path(sys.argv[1]), sys.argv[2]
    install, lines, missing, ds_ok = plan(wheel_dir)
    print("\n".join(lines), file=sys.stderr)
    if missing:
        print(f"gpu_check: missing {', '.join(missing)}, neither installed nor in {wheel_dir}/: run `bash "
              f"benchmarks/gpu_wheels.sh` where pip reaches a package index and copy its .whl/ folder here",
              file=sys.stderr)
        return 2
    if install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", target, *map(str, install)], check=True)
    print("deepspeed: ok" if ds_ok else "deepspeed: skip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
