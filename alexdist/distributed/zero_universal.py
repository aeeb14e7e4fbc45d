"""ZeRO-1/2 checkpoints on another world size, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds each rank's partition of the fp32 weights and optimizer state, cut for the world size
that wrote it. On a resume with another number of processes, rank 0 converts the checkpoint with DeepSpeed's
own converter (`python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`: one folder per
parameter holding its fp32 value and optimizer states) into a scratch copy beside it, and every rank loads that
with the engine's universal loader, which cuts the partitions for the new world size. The checkpoint itself is
not touched; the scratch copy is removed once loaded. ZeRO-1/2; ZeRO-3 is refused with the way out. A conversion
or a load that fails on one rank is agreed on before any other collective, so every rank stops with its line.

Where DeepSpeed falls short: its converter extracts Adam's `exp_avg`/`exp_avg_sq` by name and fails on SGD,
whose only state is `momentum_buffer`. Its loader, though, loads whatever state files a parameter's folder
holds into the optimizer state of the same name. So for SGD the scratch copy's optimizer files carry the
momentum under Adam's name (and zeros as `exp_avg_sq`), and after conversion each parameter's `exp_avg.pt`
is renamed back to `momentum_buffer.pt` (and `exp_avg_sq.pt` dropped): the same flat values, sliced and
merged by DeepSpeed's own code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from alexdist import faults
from alexdist.errors import CheckpointError, SetupError, brief
from alexdist.fileio import check_space

DS_TAG = "pytorch_model"  # the tag Accelerate's save_state gives DeepSpeed's checkpoint


def refusal(path: Path, saved_world: int, world: int, stage: int) -> SetupError | None:
    """Why this ZeRO checkpoint cannot move to `world` processes, or None when it can."""
    if stage == 3:
        return SetupError(
            f"checkpoint {path} holds ZeRO-3 partitions for {saved_world} processes, this run has {world}; "
            f"resume with {saved_world} processes, or convert it to plain weights with "
            f"`alexdist export {path} OUT.safetensors` (the optimizer state does not carry over)"
        )
    return None


def scratch_dir(path: Path) -> Path:
    """Where the universal copy of checkpoint `path` is built (a dot name: never taken for a checkpoint)."""
    return path.with_name(f".universal-{path.name}")


def convert(path: Path) -> Path:
    """Rank 0: the universal copy of `path` (its DeepSpeed tag converted, every other file linked)."""
    out = scratch_dir(path)
    shutil.rmtree(out, ignore_errors=True)
    check_space(path.parent, 2 * tree_bytes(path), what=f"the universal copy of {path.name} beside it")
    out.mkdir()
    for f in path.iterdir():
        if f.is_file():
            _link_or_copy(f, out / f.name)  # Accelerate's files (scheduler, RNG, EMA, trainer state) as they are
    source = path / DS_TAG
    sgd = _momentum_as_adam(source, out / ".ds-input")
    if sgd:
        source = out / ".ds-input"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(out / DS_TAG), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"DeepSpeed could not convert {path} to a universal checkpoint ({last[:200]}); "
                              f"resume with the checkpoint's number of processes, or export its weights")
    if sgd:
        shutil.rmtree(out / ".ds-input")
        for param in (out / DS_TAG / "zero").iterdir():
            if (param / "exp_avg.pt").is_file():
                os.replace(param / "exp_avg.pt", param / "momentum_buffer.pt")
                (param / "exp_avg_sq.pt").unlink()
    return out


def _momentum_as_adam(source: Path, dest: Path) -> bool:
    """If `source`'s optimizer is SGD with momentum: a copy of it in `dest` whose per-rank optimizer files name
    the momentum `exp_avg` (and zeros `exp_avg_sq`), the names DeepSpeed's converter reads. False otherwise."""
    import torch

    files = sorted(source.glob("*_optim_states.pt"))
    # Checked by safety.check_pickles before any of this; DeepSpeed's own format needs the full unpickler.
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    groups = [s["optimizer_state_dict"]["base_optimizer_state"]["state"] for s in states]
    if not all("momentum_buffer" in g for gs in groups for g in gs.values()):
        return False
    dest.mkdir()
    for f in source.iterdir():
        if f not in files and f.is_file():
            _link_or_copy(f, dest / f.name)
    for f, state, gs in zip(files, states, groups, strict=True):
        for g in gs.values():
            g["exp_avg"] = g.pop("momentum_buffer")
            g["exp_avg_sq"] = torch.zeros_like(g["exp_avg"])
        torch.save(state, dest / f.name)
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no space, no time), or a copy on a filesystem that has none (some network and FUSE ones)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load(accelerator, engine, universal: Path, step: int = -1) -> None:
    """Every rank: load the universal copy into the engine, cut for this world size, with no collective. The
    load's one collective, the all-gather that refills the module's weights from the fp32 master partitions
    (ZeRO-1/2's `update_lp_params`, at the end of DeepSpeed's `load_checkpoint`), is left to the caller: a rank
    whose load failed would never join it, and the others would wait there for distributed.setup_timeout_s."""
    optimizer = engine.optimizer
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads it from its config at load time
    optimizer.update_lp_params = lambda: None  # an instance attribute over the method, for this load only
    try:
        faults.universal_load_point(step)
        accelerator.load_state(str(universal))
    except Exception as exc:
        raise CheckpointError(f"could not load the universal copy {universal} ({brief(exc)}); resume with the "
                              f"checkpoint's number of processes, or export its weights") from None
    finally:
        del optimizer.update_lp_params
        engine._config.load_universal_checkpoint = False  # later saves are ordinary ZeRO checkpoints


def load_on_this_world_size(accelerator, engine, path: Path) -> None:
    """Every rank: rank 0 converts checkpoint `path`, every rank loads the copy and says whether it could, rank 0
    removes it; a conversion or a load that failed on any rank stops every rank with that rank's line."""
    from alexdist.distributed.collectives import from_main

    error = None
    if accelerator.is_main_process:
        try:
            convert(path)
        except CheckpointError as exc:
            error = exc
        except Exception as exc:  # a full disk, a refused write: rank 0 alone sees it, every rank must hear it
            shutil.rmtree(scratch_dir(path), ignore_errors=True)
            error = CheckpointError(f"could not convert {path} to a universal checkpoint for this world size "
                                    f"({brief(exc)}); free space or fix the directory, or resume with the "
                                    f"checkpoint's number of processes")
    if error := from_main(accelerator, error):
        raise error
    copy = scratch_dir(path)
    try:
        failed = _load_everywhere(accelerator, engine, copy, checkpoint_step(path))
    finally:  # every rank has answered, so none reads the copy any more
        if accelerator.is_main_process:
            shutil.rmtree(copy, ignore_errors=True)
    if failed:
        rank, message = failed
        raise CheckpointError(message if accelerator.num_processes == 1 else f"rank {rank} {message}")
    engine.optimizer.update_lp_params()  # the load's all-gather, now that every rank holds its fp32 partition


def _load_everywhere(accelerator, engine, copy: Path, step: int) -> tuple[int, str] | None:
    """Every rank loads `copy` and reports how it went (a collective): the lowest failed rank and its line, or
    None when every rank loaded it."""
    from alexdist.distributed.collectives import first_failure

    error = None
    try:
        load(accelerator, engine, copy, step)
        align_optimizer_state(engine.optimizer.optimizer)  # the ZeRO optimizer's torch optimizer
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:
        error = (f"could not load the universal copy {copy} ({brief(exc)}); resume with the checkpoint's number "
                 f"of processes, or export its weights")
    return first_failure(accelerator, error)


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint directory `step-NNNNNNN` (-1 for another name): where a fault is injected."""
    head, _, digits = path.name.rpartition("-")
    return int(digits) if head == "step" and digits.isdigit() else -1


def align_optimizer_state(optimizer) -> None:
    """Put optimizer state where torch's own `Optimizer.load_state_dict` would: `step` as float32 on the
    parameter's device for fused or capturable kernels (the fused CUDA Adam reads it through a device pointer,
    unchecked), else where it is; other floating state in the parameter's dtype and device. DeepSpeed's
    universal loader sets the state directly (`step.pt` loaded without map_location: a CPU tensor)."""
    import torch

    for group in optimizer.param_groups:
        step_on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    if step_on_device:
                        state[key] = value.to(dtype=torch.float32, device=p.device)
                elif value.is_floating_point():
                    state[key] = value.to(dtype=p.dtype, device=p.device)
