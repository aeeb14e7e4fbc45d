"""Checkpoints: what they record (state.py), when to save and what rotation keeps (policy.py), the Checkpointer
that writes, rotates and resumes through the strategy's backend (checkpointer.py), manifests, pickle checks,
FSDP2's DCP backend (dcp.py), ZeRO's universal checkpoint (zero_universal.py), consolidation into one weights
file (consolidate.py), and the run directory's lock and space checks (run_dir.py)."""
