"""rsb.engine's scoring: top-k and ReaL counts against crafted cases and against timm's validate.py scorer. (The
training step against train.py: test_train.py; a non-finite loss: test_checkpoint.py.)"""

from __future__ import annotations

import pytest
import torch

from rsb.engine import topk_correct
from rsb.evaluation import real_correct


def test_real_scoring_on_crafted_cases():
    top = torch.tensor(
        [
            [3, 1, 2, 0, 4],  # top-1 in a multi-label list
            [1, 2, 3, 4, 5],  # unscored (empty list): counts nowhere
            [9, 8, 7, 6, 5],  # only the 5th prediction is listed: top-5 hit, top-1 miss
            [0, 1, 2, 3, 4],  # nothing listed
            [2, 0, 1, 3, 4],
        ]
    )  # second label of a multi-label list
    real = [[3, 7], [], [5], [9], [1, 2]]
    assert real_correct(top, real) == {"top1": 2, "top5": 3, "count": 4}


def test_topk_scoring():
    top = torch.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [0, 6, 7, 8, 9], [9, 8, 7, 6, 4]])
    assert topk_correct(top, torch.tensor([1, 2, 5, 4])) == {"top1": 1, "top5": 3, "count": 4}  # 4 is 5th: a hit


class Logits(torch.nn.Module):
    """A model that returns given logits, batch after batch."""

    num_classes = 6

    def __init__(self, logits):
        super().__init__()
        self.logits, self.at = logits, 0

    def forward(self, x):
        out = self.logits[self.at : self.at + len(x)]
        self.at += len(x)
        return out


def test_scores_equal_an_independent_count_with_ties_and_multi_label_real():
    """predict + topk_correct against timm.utils.accuracy (validate.py's scorer), and ReaL against the count by
    hand: ties in the logits, several ReaL labels, an unscored image."""
    from timm.utils import accuracy

    from rsb.engine import predict

    logits = torch.tensor(
        [
            [5.0, 1, 1, 0, 0, 0],  # label 0: top-1
            [1.0, 3, 3, 0, 0, 0],  # tie for first between 1 and 2; label 2
            [0.0, 0, 0, 0, 1, 2],  # label 0 ties with 1, 2, 3 for 3rd-5th: whichever topk picks
            [9.0, 8, 7, 6, 5, 4],  # label 4: exactly 5th, a top-5 hit
            [0.0, 0, 9, 0, 0, 0],
        ]
    )  # label 3
    labels = torch.tensor([0, 2, 0, 4, 3])
    loader = [(torch.zeros(3, 1), labels[:3]), (torch.zeros(2, 1), labels[3:])]
    top, y = predict(Logits(logits), loader, torch.device("cpu"), None, channels_last=False, k=5)
    assert torch.equal(y, labels)
    ours = topk_correct(top, y)
    acc1, acc5 = accuracy(logits, labels, topk=(1, 5))
    assert 100 * ours["top1"] / ours["count"] == pytest.approx(acc1.item())
    assert 100 * ours["top5"] / ours["count"] == pytest.approx(acc5.item())
    real = [[0, 1], [1, 2], [], [4], [2, 3]]  # image 2 unscored; ties at image 1 are right either way
    by_hand = {"top1": 3, "top5": 4, "count": 4}  # top-1 hits: images 0, 1, 4; top-5 adds image 3 (label 4)
    assert real_correct(top, real) == by_hand


@pytest.mark.parametrize("slots", [1, 2])
def test_a_slots_state_restores_every_stream_and_its_batchnorm_statistics(tmp_path, slots):
    """What a checkpoint inside an epoch holds of the slots (virtual ranks): after state() and more draws and
    BatchNorm updates, restore() gives each slot the Python, NumPy and torch draws and the statistics it had, also
    through torch.save / torch.load(weights_only=True), as the checkpoint is verified."""
    import random

    import numpy as np

    from rsb.engine import Slots

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    s = Slots(model, list(range(7, 7 + slots)), torch.device("cpu"))

    def run_slot(k: int) -> tuple:
        s.enter(k)
        model(torch.randn(2, 3, 4, 4))  # a forward in train mode: this slot's BatchNorm statistics move
        draws = random.random(), float(np.random.rand()), float(torch.rand(1))
        s.leave(k)
        return draws

    for k in range(slots):
        run_slot(k)
    torch.save(s.state(), tmp_path / "slots.pt")
    first = [run_slot(k) for k in range(slots)]
    bn_first = [b.clone() for b in s.bn]
    s.restore(torch.load(tmp_path / "slots.pt", weights_only=True))
    again = [run_slot(k) for k in range(slots)]
    assert again == first, "every stream of every slot continues as before"
    assert all(torch.equal(a, b) for a, b in zip(bn_first, s.bn)), "BatchNorm statistics and counters restored"
