"""The GPU check's script, on this CPU: its dry run writes every row of the plan (CUDA-only rows marked
skipped), and its error column shows what went wrong, not the launcher's wrapper."""

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def _wheel(folder, name: str, version: str, requires: list[str] = ()) -> None:
    import zipfile

    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                   f"Name: {name}\nVersion: {version}\n{meta}")


def test_wheels_are_used_only_where_the_image_lacks_a_package_or_has_it_below_its_floor(tmp_path):
    import gpu_deps

    for name, version, req in [("pydantic", "2.14.4", ["pydantic-core==2.50.5", "typing-extensions>=4.14.1"]),
                               ("pydantic-core", "2.50.5", []), ("typing-extensions", "4.16.0", []),
                               ("timm", "1.0.31", []), ("deepspeed", "0.19.8", ["hjson"]), ("hjson", "3.1.0", [])]:
        _wheel(tmp_path, name, version, req)
    image = {"torch": "2.11.0", "accelerate": "1.15.0", "typing-extensions": "4.17.0", "timm": "1.0.9",
             "annotated-types": "0.7.0", "typing-inspection": "0.4.2", "pyyaml": "6.0", "safetensors": "0.8.0",
             "tqdm": "4.67", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "matplotlib": "3.10",
             "msgpack": "1.1", "ninja": "1.13", "py-cpuinfo": "9.0"}
    install, lines, missing, ds_ok = gpu_deps.plan(tmp_path, have=image.get, requires=lambda n: [])
    used = sorted(p.name.split("-")[0] for p in install)
    # pydantic and its exact pydantic-core: absent from the image; timm: the image's 1.0.9 is below the floor.
    assert used == ["deepspeed", "hjson", "pydantic", "pydantic_core", "timm"]
    assert "gpu_check: typing-extensions 4.17.0 from the image" in lines  # newer than the wheel: not shadowed
    assert "gpu_check: timm 1.0.31 from timm-1.0.31-py3-none-any.whl, the image has 1.0.9" in lines
    assert not missing and ds_ok
    del image["torch"]
    for f in tmp_path.glob("deepspeed-*"):
        f.unlink()
    _, lines, missing, ds_ok = gpu_deps.plan(tmp_path, have=image.get, requires=lambda n: [])
    assert missing == ["torch (needs >=2.6)"] and not ds_ok  # torch stops the check; DeepSpeed only skips rows
    assert "gpu_check: deepspeed missing (needs >=0.15): the DeepSpeed rows are skipped" in lines


def test_the_imagenet_row_is_in_the_plan_on_a_cpu_and_writes_photo_sized_jpegs_in_imagenets_layout(tmp_path):
    """The dry run runs it (no CUDA needed); its files are ImageNet-like (500 x 375 JPEGs of ~85 KB, not random
    noise's several hundred), so the streamed figure is a photo's decode."""
    import gpu_check
    from gpu_check_imagenet import fmt_imagenet, imagenet_folder, imagenet_row
    from PIL import Image

    for s in (gpu_check.CPU, gpu_check.GPU):
        rows = [r for r in gpu_check.plan(s) if r.run is imagenet_row]
        assert len(rows) == 1 and not rows[0].needs_cuda and "ImageNet" in rows[0].name
    root = imagenet_folder(tmp_path, 40, 8)
    files = sorted((root / "train").glob("n*/*.JPEG"))
    assert len(files) == 40 and len(list((root / "val").glob("n*/*.JPEG"))) == 8
    assert {Image.open(f).size for f in files} == {(500, 375), (375, 500)}
    assert all(20_000 < f.stat().st_size < 150_000 for f in files)
    line = fmt_imagenet("row", {"stream_images_per_s": 900.0, "memory_images_per_s": 3000.0,
                                "stream_to_memory": 0.3, "bound_by": "loader", "data_workers": 16, "batch": 256,
                                "image_size": 224, "peak_memory_gib": 9.5, "loss": 6.9})
    assert line.startswith("| row | 900 img/s streamed, 3,000 from memory |") and "the loader bounds a step" in line
