"""The version floors in pyproject.toml hold every library API alexdist uses.

A CI job on the floor versions does not fit (every torch build is several GB), so the floors are checked
against a table: every API of torch's less settled corners, Accelerate, DeepSpeed, huggingface_hub, safetensors
and pydantic that alexdist/ touches must be listed here with the first release that has it, and each
release must be at or below the floor pyproject.toml declares. Using a new API without a row fails
`test_every_library_api_alexdist_uses_is_in_the_table`; a row newer than its floor fails the other test.
"Checked" says where the version comes from: a released wheel/sdist downloaded and read, or release notes.
"""

from __future__ import annotations

import ast
import re

from helpers import ROOT
from packaging.version import Version

SINCE: dict[str, tuple[str, str, str]] = {
    # torch: whatever torch core/tensor API exists since 2.0 is not listed; these corners move.
    "torch.nn.utils.get_total_norm": ("torch", "2.6", "PyTorch 2.6 release notes (with clip_grads_with_norm_)"),
    "torch.serialization.get_unsafe_globals_in_checkpoint": ("torch", "2.6", "PyTorch 2.6 release notes"),
    "torch.distributed.broadcast": ("torch", "1.0", "torch.distributed API"),
    "torch.distributed.all_reduce": ("torch", "1.0", "torch.distributed API"),
    "torch._foreach_norm": ("torch", "1.13", "foreach ops (torch/_foreach_norm, used by torch's own clip_grad_norm_)"),
    "torch._utils._flatten_dense_tensors": ("torch", "1.0", "torch/_utils.py, used by DDP's own buffer coalescing"),
    "torch._utils._unflatten_dense_tensors": ("torch", "1.0", "torch/_utils.py, as above"),
    "torch.distributed.is_available": ("torch", "1.0", "torch.distributed API"),
    "torch.distributed.get_backend": ("torch", "1.0", "torch.distributed API"),
    "torch.distributed.is_initialized": ("torch", "1.0", "torch.distributed API"),
    "torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook": (
        "torch", "1.8", "DDP communication hooks (torch 1.8 release notes)"),
    "torch.distributed.DistNetworkError": ("torch", "2.2", "torch/distributed/__init__.py history"),
    "torch.distributed.DistStoreError": ("torch", "2.3", "torch/distributed/__init__.py history"),
    "torch.distributed.distributed_c10d._set_pg_timeout": ("torch", "2.3", "used when set_timeout is absent"),
    "torch.distributed.set_timeout": ("torch", "2.14", "optional: looked up with getattr, fallback above"),
    "torch.distributed.distributed_c10d": ("torch", "2.0", "its registry _world.pg_map lists every process group"),
    # FSDP2 and DCP: public under torch.distributed.fsdp from 2.6 (pytorch#141868, "targeting 2.6"); fully_shard
    # of a list of modules from 2.5 (pytorch#130949, July 2024); DCP's state_dict helpers from 2.2.
    "torch.distributed.fsdp.fully_shard": ("torch", "2.6", "pytorch#141868: public torch.distributed.fsdp"),
    "torch.distributed.fsdp.FSDPModule": ("torch", "2.6", "pytorch#141868"),
    "torch.distributed.fsdp.MixedPrecisionPolicy": ("torch", "2.6", "pytorch#141868"),
    "torch.distributed.checkpoint.DefaultLoadPlanner": ("torch", "2.0", "torch.distributed.checkpoint 2.0"),
    "torch.distributed.checkpoint.state_dict.get_state_dict": ("torch", "2.2", "PyTorch 2.2 release notes (DCP)"),
    "torch.distributed.checkpoint.state_dict.set_state_dict": ("torch", "2.2", "PyTorch 2.2 release notes (DCP)"),
    "torch.distributed.checkpoint.state_dict.get_model_state_dict": ("torch", "2.2", "PyTorch 2.2 release notes"),
    "torch.distributed.checkpoint.state_dict.StateDictOptions": ("torch", "2.2", "PyTorch 2.2 release notes"),
    "torch.utils.flop_counter.FlopCounterMode": ("torch", "2.1", "PyTorch 2.1 release notes"),
    "torch.utils.data.DataLoader": ("torch", "2.0", "persistent_workers 1.7, prefetch_factor=None without workers 2.0"),
    "torch.utils.data.Dataset": ("torch", "1.0", "torch.utils.data"),
    "torch.utils.data.Sampler": ("torch", "1.0", "torch.utils.data"),
    "torch.utils.data.get_worker_info": ("torch", "1.2", "torch.utils.data"),
    "torch._foreach_copy_": ("torch", "2.1", "PyTorch 2.1 (foreach copy)"),
    "torch._foreach_lerp_": ("torch", "2.0", "foreach lerp, used by torch.optim's Adam since 2.0"),
    "torch._disable_dynamo": ("torch", "2.1", "torch/_compile.py, which wraps the optimizer's methods since 2.1"),
    "torch.optim.SGD(fused)": ("torch", "2.4", "fused SGD/AdamW on the CPU: PyTorch 2.4 release notes"),
    "torch.optim.lr_scheduler.LRScheduler": ("torch", "2.0", "renamed from _LRScheduler in 2.0"),
    "torch.optim.lr_scheduler.LambdaLR": ("torch", "1.0", "torch.optim"),
    "torch.backends.cuda.matmul.allow_tf32": ("torch", "1.7", "TF32 switches"),
    "torch.backends.cudnn.allow_tf32": ("torch", "1.7", "TF32 switches"),
    "torch.backends.cudnn.benchmark": ("torch", "1.0", "cuDNN switches"),
    # Accelerate (wheels 1.0.0, 1.2.0 and 1.3.0 read)
    "accelerate.Accelerator": ("accelerate", "1.0", "accelerator.py 1.0.0"),
    "accelerate.Accelerator(dynamo_plugin)": ("accelerate", "1.2", "accelerator.py: not in 1.0.0, in 1.2.0"),
    "accelerate.Accelerator.unwrap_model(keep_torch_compile)": ("accelerate", "1.3", "not in 1.2.0, in 1.3.0"),
    "accelerate.Accelerator.register_save_state_pre_hook": ("accelerate", "1.0", "accelerator.py 1.0.0"),
    "accelerate.Accelerator.register_load_state_pre_hook": ("accelerate", "1.0", "accelerator.py 1.0.0"),
    "accelerate.utils.DeepSpeedPlugin": ("accelerate", "1.0", "utils/dataclasses.py 1.0.0"),
    "accelerate.utils.broadcast_object_list": ("accelerate", "1.0", "utils/operations.py 1.0.0"),
    "accelerate.utils.gather_object": ("accelerate", "1.0", "utils/operations.py 1.0.0"),
    "accelerate.utils.DistributedType": ("accelerate", "1.0", "utils/dataclasses.py 1.0.0"),
    "accelerate.utils.InitProcessGroupKwargs": ("accelerate", "1.0", "backend field in 1.0.0"),
    "accelerate.utils.TorchDynamoPlugin": ("accelerate", "1.0", "utils/dataclasses.py 1.0.0"),
    "accelerate.Accelerator.register_for_checkpointing": ("accelerate", "1.0", "accelerator.py 1.0.0"),
    "accelerate.utils.ProjectConfiguration": ("accelerate", "1.0", "utils/dataclasses.py 1.0.0 (logging_dir)"),
    # DeepSpeed (sdists 0.14.0, 0.15.0, 0.19.1 and 0.19.2 read)
    "deepspeed.utils.safe_get_full_fp32_param": ("deepspeed", "0.14", "utils/__init__.py 0.14.0"),
    "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint": (
        "deepspeed", "0.14", "utils/zero_to_fp32.py 0.14.0 (tag=)"),
    "deepspeed.DynamicLossScaler minimum-scale message": ("deepspeed", "0.14", "runtime/fp16/loss_scaler.py 0.14.0"),
    "deepspeed.checkpoint.ds_to_universal --inject_missing_state": (
        "deepspeed", "0.15", "sdist 0.15.0 read (DeepSpeed #5608); its loader reads any <state>.pt per parameter"),
    # huggingface_hub (wheels 0.24 ... 0.34 read)
    "huggingface_hub.save_torch_state_dict": ("huggingface_hub", "0.24", "serialization/_torch.py 0.24.0"),
    "huggingface_hub.load_torch_model": ("huggingface_hub", "0.27", "not in 0.26.0, in 0.27.0"),
    "huggingface_hub.ModelCardData": ("huggingface_hub", "0.10", "repocard_data.py, huggingface_hub 0.10"),
    "hf download (the command our messages name)": ("huggingface_hub", "0.34", "entry point not in 0.33.0, in 0.34.0"),
    # timm (wheels 1.0.9, 1.0.12 and 1.0.31 read)
    "timm.optim.Lars": ("timm", "1.0.9", "timm/optim/lars.py with trust_clip and always_adapt, 1.0.9 read"),
    "timm.optim.param_groups_weight_decay": ("timm", "1.0.12", "exported from timm.optim: not in 1.0.9, in 1.0.12"),
    # safetensors, pydantic
    "safetensors.safe_open": ("safetensors", "0.3", "safetensors 0.3 (metadata)"),
    "safetensors.torch.load_file": ("safetensors", "0.3", "safetensors 0.3"),
    "safetensors.torch.save_file": ("safetensors", "0.3", "safetensors 0.3 (metadata=)"),
    "pydantic.BaseModel": ("pydantic", "2.0", "pydantic v2"),
    "pydantic.fields.FieldInfo": ("pydantic", "2.0", "pydantic v2 (field metadata: description, bounds)"),
    "pydantic.ConfigDict": ("pydantic", "2.0", "pydantic v2"),
    "pydantic.Field": ("pydantic", "2.0", "pydantic v2"),
    "pydantic.ValidationError": ("pydantic", "2.0", "pydantic v2"),
    "pydantic.field_validator": ("pydantic", "2.0", "pydantic v2"),
    "pydantic.model_validator": ("pydantic", "2.0", "pydantic v2"),
}

# Listed by hand: the AST scan cannot see these (a kwarg through **kw, a command in a message, an exception text).
NOT_IN_SOURCE_SCAN = {"torch.optim.SGD(fused)", "deepspeed.DynamicLossScaler minimum-scale message",
                      "deepspeed.checkpoint.ds_to_universal --inject_missing_state",
                      "hf download (the command our messages name)", "torch.distributed.set_timeout"}
WATCHED_TORCH = ("torch.nn.utils.", "torch.serialization.", "torch.distributed.", "torch.utils.", "torch._",
                 "torch.optim.lr_scheduler.", "torch.backends.")
WATCHED_IMPORTS = ("accelerate", "deepspeed", "huggingface_hub", "safetensors", "pydantic", "timm")
ACCELERATOR_NAMES = {"acc", "accelerator"}  # how alexdist names an Accelerator
ACCELERATOR_KWARGS = {"Accelerator": {"dynamo_plugin"}, "unwrap_model": {"keep_torch_compile"}}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append("torch.distributed" if node.id == "dist" else node.id)
        return ".".join(reversed(parts))
    return None


def used_apis() -> set[str]:
    found, imported = set(), set()
    for path in sorted((ROOT / "alexdist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and (
                    node.module.split(".")[0] in WATCHED_IMPORTS or f"{node.module}.".startswith(WATCHED_TORCH)):
                imported |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Attribute):
                name = _dotted(node)
                if (name and name.startswith(WATCHED_TORCH) and name.count(".") >= 2) or (
                        name and name.startswith("torch._") and name.count(".") == 1):
                    found.add(name)
                owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
                if owner in ACCELERATOR_NAMES and node.attr.startswith("register_"):
                    found.add(f"accelerate.Accelerator.{node.attr}")
            if isinstance(node, ast.Call):
                fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                for kw in node.keywords:
                    if kw.arg in ACCELERATOR_KWARGS.get(fn, ()):
                        found.add(f"accelerate.Accelerator{'' if fn == 'Accelerator' else '.' + fn}({kw.arg})")
    # Parent modules seen on the way to a listed attribute are not APIs of their own.
    return imported | {a for a in found if not any(other.startswith(a + ".") for other in found)}


def declared_floors() -> dict[str, Version]:
    """`name>=version` requirement strings of pyproject.toml (dependencies and extras)."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^]]*\])?\s*>=\s*([0-9][0-9.]*)', text)
    return {name.lower().replace("-", "_"): Version(v) for name, v in found}


def test_every_library_api_alexdist_uses_is_in_the_table():
    unknown = sorted(used_apis() - set(SINCE))
    assert not unknown, f"add these to SINCE with the first release that has them: {unknown}"


def test_the_table_lists_only_apis_that_are_used():
    stale = sorted(set(SINCE) - used_apis() - NOT_IN_SOURCE_SCAN)
    assert not stale, f"no longer used, remove from SINCE: {stale}"


def test_every_floor_is_at_least_the_newest_api_it_must_cover():
    floors = declared_floors()
    optional = {"torch.distributed.set_timeout"}
    for api, (dist, since, where) in SINCE.items():
        if api in optional:
            continue
        assert dist in floors, f"{dist} has no >= floor in pyproject.toml"
        assert floors[dist] >= Version(since), f"{api} needs {dist}>={since} ({where}); pyproject says {floors[dist]}"


def test_the_docker_base_is_the_torch_the_project_is_tested_with():
    pinned = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={pinned}" in dockerfile
    assert Version(pinned) >= declared_floors()["torch"]
