"""FSDP2 (distributed.strategy=fsdp) trains like DDP, resumes exactly, moves between world sizes through DCP's
resharding, exports the run's weights, and refuses what it does not do in one line. 2 CPU ranks over gloo.

FSDP2 computes in whatever dtype the parameters have, so unlike ZeRO it is compared with DDP in float64, where
the same training agrees to ~1e-17 whatever order the kernels sum in (helpers.FP64_BOUND)."""


import pytest

from alexdist.errors import SetupError


def test_fsdp_refuses_fp16_and_zero_offload_in_one_line():
    from alexdist.config import load_recipe
    from alexdist.distributed.fsdp import FSDP2Strategy

    for override, words in [("precision=fp16", "use precision=bf16"),
                            ("distributed.deepspeed.offload_optimizer=true", "is a DeepSpeed .ZeRO-Offload. option")]:
        with pytest.raises(SetupError, match=words):
            FSDP2Strategy().refuse_unsupported(load_recipe("quickstart", [override]))


