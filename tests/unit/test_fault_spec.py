"""ALEXDIST_FAULT parsing: which point, steps and rank a fault fires at (pure functions)."""

import pytest

from alexdist.faults import Fault, parse


def test_a_point_a_step_and_the_default_rank_0():
    assert parse("train:7") == [Fault("train", 7, 7, 0)]


def test_ranges_open_ranges_every_rank_and_several_faults():
    got = parse("nan:5-6:1, save.weights:8-:*,hang:3:1")
    assert got == [Fault("nan", 5, 6, 1), Fault("save.weights", 8, None, None), Fault("hang", 3, 3, 1)]


def test_matches_only_its_point_steps_and_rank():
    f = parse("nan:5-6:1")[0]
    assert [f.matches("nan", s, 1) for s in (4, 5, 6, 7)] == [False, True, True, False]
    assert not f.matches("nan", 5, 0) and not f.matches("train", 5, 1)
    every = parse("enospc:8-:*")[0]
    assert every.matches("enospc", 8, 3) and every.matches("enospc", 1000, 0) and not every.matches("enospc", 7, 0)


@pytest.mark.parametrize("spec", ["explode:3", "train", "train:3:1:2", "train:x"])
def test_a_bad_spec_is_refused_naming_the_valid_points(spec):
    with pytest.raises(ValueError):
        parse(spec)


def test_nothing_set_means_no_faults():
    assert parse("") == [] and parse(" , ") == []
