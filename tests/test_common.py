"""The module both bundles ship (``scripts/mean_teacher.py``): identical copies, and what each piece does."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BUNDLES, bundle_module

BUNDLE_NAMES = ("cdugjl_liver", "ceds_mediastinum")
COMMON = ("mean_teacher.py",)


@pytest.mark.parametrize("name", COMMON)
def test_copies_are_identical(name):
    liver, ct = (BUNDLES / b / "scripts" / name for b in BUNDLE_NAMES)
    assert liver.read_bytes() == ct.read_bytes(), f"{liver} and {ct} differ: change both (a bundle ships alone)"


@pytest.fixture(params=BUNDLE_NAMES)
def mean_teacher(request):
    return bundle_module(request.param, "mean_teacher")


def test_sigmoid_rampup(mean_teacher):
    ramp = mean_teacher.sigmoid_rampup
    assert ramp(0, 10) == pytest.approx(math.exp(-5)) and ramp(5, 10) == pytest.approx(math.exp(-1.25))
    assert ramp(10, 10) == 1.0 and ramp(25, 10) == 1.0 and ramp(-3, 10) == pytest.approx(math.exp(-5))
    assert ramp(3, 0) == 1.0
    # in fractions of the run: the weight at the end of a 5 % warm-up of a ramp over the whole run
    assert ramp(0.05, 1.0) == pytest.approx(math.exp(-5 * 0.95**2))


def test_ema_network_warm_up_and_handler(mean_teacher):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = mean_teacher.ema_network(torch.nn.DataParallel(net), decay=0.9)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    handler = mean_teacher.EMAUpdateHandler(ema, net)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    handler(None)  # first update: a copy of the student (weights loaded after construction are picked up)
    torch.testing.assert_close(ema.module[0].weight, torch.ones(2, 2))
    # warm-up: the k-th later update has decay min(1 - 1 / (k + 1), 0.9), the running mean of the students at first
    expected = 1.0
    for k, value in enumerate((3.0, 5.0, 2.0, 7.0, 4.0, 6.0, 8.0, 1.0, 9.0, 3.0, 5.0), start=1):
        with torch.no_grad():
            net[0].weight.fill_(value)
        net(torch.randn(4, 2))  # moves the batch-norm statistics and counter
        handler(None)
        decay = min(1.0 - 1.0 / (k + 1), 0.9)
        expected = decay * expected + (1.0 - decay) * value
        torch.testing.assert_close(ema.module[0].weight, torch.full((2, 2), expected))
    assert decay == 0.9  # the warm-up is over
    assert ema.module[1].num_batches_tracked == net[1].num_batches_tracked == 11
    assert mean_teacher.unwrap(torch.nn.DataParallel(net)) is net and mean_teacher.unwrap(net) is net


def test_top_fraction_per_class(mean_teacher):
    # class 0: scores 1..8, class 1: scores 0.1..0.4 (lower than every class-0 voxel)
    score = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 0.1, 0.2, 0.3, 0.4]).reshape(1, 1, 12)
    classes = torch.tensor([0] * 8 + [1] * 4).reshape(1, 1, 12)
    mask = mean_teacher.top_fraction_per_class(score, classes, 0.5)
    assert mask.flatten().tolist() == [0.0] * 4 + [1.0] * 4 + [0.0, 0.0, 1.0, 1.0]  # half of each class
    assert mean_teacher.top_fraction_per_class(score, classes, 1.0).sum() == 12
    assert mean_teacher.top_fraction_per_class(score, classes, 1e-6).sum() == 2  # at least one per class
    ties = mean_teacher.top_fraction_per_class(torch.ones(1, 1, 4), torch.zeros(1, 1, 4, dtype=torch.long), 0.5)
    assert ties.sum() == 4  # ties with the cut are kept


class _Records(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.full((1, 4, 4), float(i))}


def test_unlabeled_stream_cycles_and_empty_disables(mean_teacher):
    stream = mean_teacher.UnlabeledStream(_Records(3), batch_size=2, shuffle=False)
    firsts = [stream.next()["image"][:, 0, 0, 0].tolist() for _ in range(4)]
    assert firsts == [[0, 1], [2], [0, 1], [2]]
    empty = mean_teacher.UnlabeledStream(_Records(0))
    assert not empty and empty.next() is None
