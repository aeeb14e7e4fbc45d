"""tracking.profile_steps writes a torch.profiler trace of those steps on rank 0; the summary has every rank's peak
memory."""


import pytest

from alexdist.config import load_recipe
from alexdist.errors import ConfigError


def test_profile_steps_must_be_a_start_and_an_end():
    for bad in ("[5]", "[4,2]", "[0,3]"):
        with pytest.raises(ConfigError, match=r"tracking.profile_steps is \[start, end\]"):
            load_recipe("quickstart", [f"tracking.profile_steps={bad}"])
