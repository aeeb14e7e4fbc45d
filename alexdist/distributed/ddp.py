"""DDP (Accelerate's default): every rank holds the whole model and optimizer; gradients are all-reduced in
backward, skipped on accumulation micro-batches by Accelerate's `accumulate`; rank 0's buffers are broadcast at
every forward. The reference behaviour: strategy.Strategy's defaults are DDP's.

Checkpoints: Accelerate's save_state would write one unsharded file under DDP's `module.` names; the weights
are written instead by rank 0 as safetensors shards (huggingface_hub's `save_torch_state_dict`, at most
checkpoint.max_shard_size each) under the model's own names, the same for 1 or N processes, so a checkpoint
moves between world sizes as it is. The optimizer, scheduler and RNG states are Accelerate's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alexdist.distributed.collectives import plain_module
from alexdist.distributed.strategy import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def register_checkpoint_hooks(self, accelerator, max_shard_size: str, after_weights) -> None:
        from huggingface_hub import load_torch_model, save_torch_state_dict

        def save_hook(models, weights, output_dir):
            for m in models:
                if accelerator.is_main_process:  # DDP ranks hold identical weights: one writer
                    save_torch_state_dict(plain_module(accelerator, m).state_dict(), output_dir,
                                          max_shard_size=max_shard_size)
                    after_weights()
            weights.clear()

        def load_hook(models, input_dir):
            for m in models:
                load_torch_model(plain_module(accelerator, m), input_dir, strict=True, map_location="cpu")
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    @classmethod
    def consolidate(cls, path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(path / f)))
        return out
