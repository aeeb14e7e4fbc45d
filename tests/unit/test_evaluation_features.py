"""Test-time augmentation: the mirror's logits are averaged with the image's, and every image is counted once in
the confusion matrix. (Evaluations of a whole run: tests/e2e/test_evaluation_features.py.)"""

import torch

from alexdist.data.batches import MemoryEvalSet
from alexdist.training.evaluation import evaluate_ranks, tta_logits


def test_tta_averages_the_mirror_and_counts_each_image_once():
    class Net(torch.nn.Module):  # logits that depend on the left/right asymmetry of the image
        def forward(self, x):
            d = (x[..., :16] - x[..., 16:]).mean((1, 2, 3))
            return torch.stack([d] + [torch.zeros_like(d)] * 9, dim=1)

    x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    y = torch.zeros(7, dtype=torch.long)
    net = Net()
    assert torch.allclose(tta_logits(net, x.float(), "flip"), torch.zeros(7, 10), atol=1e-6)  # mirror cancels it
    ev = evaluate_ranks(None, net, MemoryEvalSet(x, y, 32), 3, torch.float32, tta="flip_translate")
    assert sum(map(sum, ev.confusion)) == 7 and ev.tta_acc is not None


