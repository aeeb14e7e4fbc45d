"""Train a model of the AlexNet family from a recipe.

    accelerate launch -m alexdist.train recipes/bn.yaml [key=value ...]
    accelerate launch --multi_gpu --num_processes 2 -m alexdist.train recipes/quickstart.yaml   # 2 CPU ranks
    python -m alexdist.train recipes/quickstart.yaml train.epochs=1

Read top to bottom: recipe -> accelerator -> data on the device -> model/optimizer/schedule -> loop over
optimizer steps (each `grad_accum` micro-batches) -> evaluate each epoch -> final weights and summary.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alexdist.batches import TrainBatches, eval_batches
from alexdist.config import Recipe, ScheduleConfig, load_recipe
from alexdist.data import load_dataset
from alexdist.distributed import exit_now, is_launch_rank_zero, make_accelerator
from alexdist.errors import AlexdistError
from alexdist.models import build_model, count_params, resolve_input_size
from alexdist.tracking import RunLog, git_commit


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr after `step` optimizer steps out of `total`."""
    warmup = int(cfg.warmup_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    if cfg.name == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    else:  # onecycle: linear warmup (above), then linear decay
        shape = max(0.0, 1.0 - t)
    return cfg.final_frac + (1 - cfg.final_frac) * shape


def make_optimizer(model: torch.nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    o = recipe.optim
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
            weight_decay=o.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=o.weight_decay)


def _stats(loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed loss, correct, count] as float64 on the device (no host sync)."""
    correct = (logits.argmax(1) == labels).sum()
    return torch.stack([loss_sum.double(), correct.double(), torch.tensor(len(labels), dtype=torch.float64, device=labels.device)])


@torch.no_grad()
def evaluate(accelerator, model, x, y, batch_size: int, input_size: int) -> tuple[float, float]:
    """Test loss and accuracy over every test image exactly once, summed across ranks."""
    # The unwrapped module: DDP's forward would broadcast buffers, a collective, and ranks may hold
    # different numbers of test batches. Accelerate's autocast wrapper is kept.
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, correct, count
    for xb, yb in eval_batches(x, y, accelerator.process_index, accelerator.num_processes, batch_size, input_size):
        out = net(xb).float()
        sums += _stats(F.cross_entropy(out, yb, reduction="sum"), out, yb)
    net.train(was_training)
    loss, correct, count = accelerator.reduce(sums, reduction="sum").tolist()
    return loss / count, correct / count


def train(recipe: Recipe) -> dict:
    from alexdist.tracking import wandb_mode

    accelerator = make_accelerator(recipe, log_with=["wandb"] if wandb_mode(recipe) else None)
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    t_cfg = recipe.train
    input_size = resolve_input_size(recipe.model.name, recipe.model.input_size)

    # Rank 0 decodes the source and writes the cache; the others then read the cache.
    with accelerator.main_process_first():
        ds = load_dataset(recipe.data)
    train_x, train_y = ds.train_x.to(device), ds.train_y.to(device)
    test_x, test_y = ds.test_x.to(device), ds.test_y.to(device)
    batches = TrainBatches(
        train_x, train_y, t_cfg.batch_size, t_cfg.grad_accum, rank, world, t_cfg.seed, recipe.augment, input_size
    )
    if batches.steps_per_epoch == 0:
        from alexdist.errors import ConfigError

        raise ConfigError(
            f"the effective batch ({batches.effective_batch} = train.batch_size {t_cfg.batch_size} x {world} "
            f"processes x train.grad_accum {t_cfg.grad_accum}) is larger than the {len(train_y)} training images; "
            f"lower train.batch_size or train.grad_accum"
        )
    total_steps = t_cfg.epochs * batches.steps_per_epoch
    if t_cfg.max_steps:
        total_steps = min(total_steps, t_cfg.max_steps)

    torch.manual_seed(t_cfg.seed)  # the same initial weights on every rank and every world size
    model = build_model(recipe.model.name, input_size, recipe.model.dropout, recipe.model.width_mult)
    n_params = count_params(model)
    lr = recipe.optim.lr * (batches.effective_batch / recipe.optim.ref_batch if recipe.optim.ref_batch else 1.0)
    optimizer = make_optimizer(model, recipe, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, recipe.schedule))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # Dropout masks come from the global RNG: distinct per rank (as with separate GPUs), reproducible per seed.
    torch.manual_seed(t_cfg.seed * 1000 + rank + 1)

    info = {
        "world_size": world,
        "effective_batch": batches.effective_batch,
        "steps_per_epoch": batches.steps_per_epoch,
        "total_steps": total_steps,
        "peak_lr": lr,
        "params": n_params,
        "input_size": input_size,
        "device": str(device),
        "distributed_type": str(accelerator.distributed_type),
    }
    log = RunLog(accelerator, recipe)
    log.start(info)
    accelerator.print(
        f"alexdist: {recipe.model.name} @ {input_size}px ({n_params / 1e6:.2f} M params) on {world} x {device} | "
        f"effective batch {batches.effective_batch} = {t_cfg.batch_size} per process x {world} processes x "
        f"{t_cfg.grad_accum} accumulation | {batches.steps_per_epoch} steps/epoch, {total_steps} steps, "
        f"peak lr {lr:.4g} | precision {recipe.precision} | output {recipe.output_dir}"
    )

    step, best_acc, best_epoch, last_eval_step, ips = 0, -1.0, 0, -1, []
    test_loss = test_acc = float("nan")
    epoch = 0
    t_start = time.time()
    for epoch in range(1, t_cfg.epochs + 1):
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n (this rank)
        t_epoch = time.time()
        steps_this_epoch = 0
        bar = tqdm(total=batches.steps_per_epoch, desc=f"epoch {epoch}", disable=not (accelerator.is_main_process and sys.stderr.isatty()),
                   leave=False, dynamic_ncols=True)
        for micro in batches.epoch(epoch - 1):
            for xb, yb in micro:
                with accelerator.accumulate(model):
                    out = model(xb)
                    loss = F.cross_entropy(out, yb, label_smoothing=t_cfg.label_smoothing)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t_cfg.grad_clip:
                        accelerator.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
                    optimizer.step()
                    if accelerator.sync_gradients and not optimizer.step_was_skipped:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                # Accumulated on the device: no host sync per micro-step.
                sums += _stats(loss.detach() * len(yb), out.detach(), yb)
            step += 1
            steps_this_epoch += 1
            bar.update(1)
            if t_cfg.log_every and step % t_cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                log.event("step", step, epoch, loss=loss.item(), lr=scheduler.get_last_lr()[0])
            if step >= total_steps:
                break
        bar.close()
        epoch_time = time.time() - t_epoch
        tr_loss_sum, tr_correct, tr_n = accelerator.reduce(sums, reduction="sum").tolist()
        ips.append(tr_n / epoch_time)
        log.event(
            "train", step, epoch, loss=tr_loss_sum / tr_n, acc=tr_correct / tr_n, lr=scheduler.get_last_lr()[0],
            images_per_s=tr_n / epoch_time, epoch_time_s=epoch_time,
        )
        test_loss, test_acc = evaluate(accelerator, model, test_x, test_y, t_cfg.eval_batch_size, input_size)
        last_eval_step = step
        if test_acc > best_acc:
            best_acc, best_epoch = test_acc, epoch
        log.event("test", step, epoch, loss=test_loss, acc=test_acc)
        accelerator.print(
            f"epoch {epoch:3d} step {step:6d} | train loss {tr_loss_sum / tr_n:.4f} acc {tr_correct / tr_n:.4f} | "
            f"test loss {test_loss:.4f} acc {test_acc:.4f} | {tr_n / epoch_time:,.0f} img/s"
        )
        if step >= total_steps:
            break
    assert last_eval_step == step  # every run ends with a logged test evaluation

    # Final weights, one safetensors file with the model's name and input size in its metadata.
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        out = Path(recipe.output_dir) / "model.safetensors"
        tmp = out.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"model": recipe.model.name, "input_size": str(input_size),
                            "width_mult": str(recipe.model.width_mult)})
        tmp.replace(out)
    # A checksum of every rank's parameters: equal values prove the ranks stayed in sync.
    param_sum = sum(p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters())
    rank_sums = accelerator.gather(param_sum.reshape(1).to(device)).tolist()
    summary = {
        "status": "finished",
        "recipe": recipe.name,
        "model": recipe.model.name,
        "strategy": "ddp",
        "precision": recipe.precision,
        **info,
        "epochs_run": epoch,
        "steps": step,
        "final_test_acc": test_acc,
        "final_test_loss": test_loss,
        "best_test_acc": best_acc,
        "best_epoch": best_epoch,
        "images_per_s": sum(ips) / len(ips),
        "train_time_s": round(time.time() - t_start, 2),
        "git_commit": git_commit(),
        "rank_param_sums": rank_sums,
    }
    log.finish(summary)
    accelerator.print(f"alexdist: done | final test acc {test_acc:.4f} (best {best_acc:.4f} at epoch {best_epoch})")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m alexdist.train",
        description="Train from a recipe. Overrides are dotted key=value pairs, e.g. train.epochs=5 model.name=alexnet.",
    )
    ap.add_argument("recipe", help="recipe YAML (see recipes/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    args = ap.parse_args(argv)
    try:
        train(load_recipe(args.recipe, args.overrides))
    except AlexdistError as exc:
        if is_launch_rank_zero():  # every rank hits the same error: say it once
            print(f"alexdist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    exit_now(main())
