"""data.val_split: a stratified, seed-independent hold-out that every choice reads (the best checkpoint,
train.stop_at_acc, tracking.time_to_acc), while test accuracy is still measured and logged as test; refused in
one line when it would leave a class without training or validation images; fixed for the life of a run."""

from __future__ import annotations

import re

import pytest
import torch

from alexdist.data.validation import class_quotas, stratified_split
from alexdist.errors import DataError


def test_the_split_is_stratified_exact_and_independent_of_the_training_seed():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    a = stratified_split(labels, 0.1, ["a", "b", "c"])
    assert torch.bincount(labels[a.val_idx]).tolist() == [50, 30, 20]
    assert len(a.train_idx) == 900 and not set(a.train_idx.tolist()) & set(a.val_idx.tolist())
    b = stratified_split(labels, 100, ["a", "b", "c"])  # the same share as a count: the same images
    assert torch.equal(a.val_idx, b.val_idx) and a.fingerprint == b.fingerprint
    torch.manual_seed(123)  # the global RNG (train.seed's) plays no part
    assert stratified_split(labels, 0.1, ["a", "b", "c"]).fingerprint == a.fingerprint
    assert stratified_split(labels, 0.2, ["a", "b", "c"]).fingerprint != a.fingerprint


def test_quotas_add_up_to_the_count_by_largest_remainders():
    assert class_quotas([5, 5, 5], 4) == [2, 1, 1]
    assert sum(class_quotas([7, 11, 13, 1000], 97)) == 97


@pytest.mark.parametrize("spec, words", [(0.01, "leaves class 'rare' (10 training images) with no validation"),
                                         (0.99, "leaves class 'rare' (10 training images) with no training"),
                                         (1000, "holds out 1000 of the 1000 training images")])
def test_a_split_that_empties_a_class_or_the_training_set_is_refused_in_one_line(spec, words):
    labels = torch.tensor([0] * 990 + [1] * 10)
    with pytest.raises(DataError, match=re.escape(words)):
        stratified_split(labels, spec, ["common", "rare"])


