"""How a run spreads over processes: the launcher's word (launcher), the Accelerator (accelerator), what each
distribution strategy does differently (strategy: the interface; ddp, deepspeed, fsdp: one object each), the
collectives every strategy shares (collectives), and process trees (processes).

Nothing is imported here: `alexdist.distributed.launcher` must stay importable without torch.
"""
