"""Semi-supervised CdUgJL pieces of the liver bundle on hand-built tensors: distillation, contrast, KL, consistency,
ramps, the training loss, the trainer's teacher and student passes, and the uncertainty-quality metrics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import BUNDLES, bundle_module, use_bundle


@pytest.fixture(scope="module")
def distillation():
    return bundle_module("cdugjl_liver", "distillation")


@pytest.fixture(scope="module")
def consistency():
    return bundle_module("cdugjl_liver", "consistency")


@pytest.fixture(scope="module")
def mean_teacher():
    return bundle_module("cdugjl_liver", "mean_teacher")


@pytest.fixture(scope="module")
def trainer():
    return bundle_module("cdugjl_liver", "trainer")


@pytest.fixture(scope="module")
def metrics():
    return bundle_module("cdugjl_liver", "metrics")


def _features(seed: int = 0, channels=(4, 6, 8, 8, 8), size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, size >> i, size >> i, generator=g) for i, c in enumerate(channels)]


# ---------------------------------------------------------------------------------------------- distillation


def test_identical_teacher_and_student_give_zero_distillation(distillation):
    feats = _features()
    projections = distillation.FeatureProjections([4, 6, 8, 8, 8], stages=(1, 2, 3, 4))
    loss = distillation.FeatureDistillationLoss(stages=(1, 2, 3, 4))
    attention, feature = loss(feats, [f.clone() for f in feats], projections(feats))
    assert attention.item() == pytest.approx(0.0, abs=1e-7)
    assert feature.item() == pytest.approx(0.0, abs=1e-6)
    attention, feature = loss(feats, _features(seed=1), projections(feats))
    assert attention.item() > 1e-3 and feature.item() > 1e-2


def test_feature_distillation_zero_vectors_and_gradients(distillation):
    feats = [torch.relu(f) for f in _features()]
    feats[2][:, :, :4] = 0  # all-zero feature vectors (ReLU) must not count as mismatched
    projections = distillation.FeatureProjections([4, 6, 8, 8, 8], stages=(2,))
    loss = distillation.FeatureDistillationLoss(stages=(2,))
    attention, feature = loss(feats, [f.clone() for f in feats], projections(feats))
    assert attention.item() == pytest.approx(0.0, abs=1e-7) and feature.item() == pytest.approx(0.0, abs=1e-6)
    assert not list(loss.parameters())
    student = [f.clone().requires_grad_(True) for f in _features(seed=3)]
    attention, feature = loss(student, feats, projections(student))
    (attention + feature).backward()
    assert student[2].grad.abs().sum() > 0 and student[1].grad is None  # only the listed stage
    assert all(p.grad is not None for p in projections.parameters())


def test_attention_map_is_normalised(distillation):
    a = distillation.attention_map(torch.randn(3, 5, 8, 8))
    assert a.shape == (3, 64)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))


def test_dirichlet_kl_matches_torch_and_is_zero_for_identical(distillation):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 3, 5, generator=g) * 5 + 0.5
    q = torch.rand(4, 3, 5, generator=g) * 5 + 0.5
    kl = distillation.dirichlet_kl(p, q, dim=1)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(p.movedim(1, -1)), torch.distributions.Dirichlet(q.movedim(1, -1))
    )
    torch.testing.assert_close(kl[:, 0], reference, rtol=1e-4, atol=1e-5)
    assert (kl >= 0).all()
    loss = distillation.DirichletKLLoss()
    assert loss(p, p.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(q, p).item() > 0


def test_region_map_and_teacher_regions(distillation):
    label = torch.zeros(1, 1, 4, 4)
    label[0, 0, 1, 1] = 1
    organs = torch.zeros(1, 1, 4, 4)
    organs[0, 0, :2, :2] = 1
    regions = distillation.region_map(label, organs)
    assert regions[0, 1, 1] == distillation.TUMOUR and regions[0, 0, 0] == distillation.LIVER
    assert regions[0, 3, 3] == distillation.BACKGROUND
    assert set(distillation.region_map(label).unique().tolist()) == {0, 2}  # no organs: tumour vs non-tumour
    alpha = torch.ones(1, 2, 2, 2)
    alpha[0, 1, 0, 0] = 20  # confident tumour
    alpha[0, 0, 0, 1] = 20  # confident background
    alpha[0, 1, 1, 0] = 3  # less confident tumour
    alpha[0, 0, 1, 1] = 3  # less confident background
    teacher = distillation.teacher_region_map(alpha, kept_fraction=0.5)  # the more confident half of each class
    assert teacher[0].tolist() == [[distillation.TUMOUR, distillation.BACKGROUND], [-1, -1]]
    every = distillation.teacher_region_map(alpha, kept_fraction=1.0)
    assert every[0].tolist() == [[distillation.TUMOUR, distillation.BACKGROUND]] * 2


def test_teacher_region_map_gates_a_confident_teacher(distillation):
    """A teacher with evidence everywhere (``K / S`` below 0.5 at every voxel, as trained teachers are) still has its
    least confident voxels of each class removed: the gate does not depend on the scale of the evidence."""
    torch.manual_seed(0)
    evidence = torch.rand(2, 2, 16, 16) * 50 + 5  # S >= 10: K / S <= 0.2
    regions = distillation.teacher_region_map(evidence, kept_fraction=0.9)
    for cls, region in ((0, distillation.BACKGROUND), (1, distillation.TUMOUR)):
        predicted = evidence.argmax(1) == cls
        ignored = (regions == -1) & predicted
        assert 0.05 < ignored.sum() / predicted.sum() <= 0.11
        uncertainty = 2 / evidence.sum(1)
        assert uncertainty[ignored].min() >= uncertainty[predicted & (regions == region)].max()  # the least confident


def test_region_embeddings_average_features(distillation):
    features = torch.zeros(1, 2, 2, 2)
    features[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    regions = torch.tensor([[[0, 0], [1, -1]]])
    emb, valid = distillation.region_embeddings(features, regions, num_regions=3)
    torch.testing.assert_close(emb[0, 0], torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(emb[0, 1], torch.tensor([3.0, 0.0]))
    assert valid.tolist() == [[True, True, False]]
    # at half resolution (features 1x1 for 2x2 regions) the region still pools its fractional weight
    emb, valid = distillation.region_embeddings(torch.ones(1, 2, 1, 1), regions)
    torch.testing.assert_close(emb[0, :2], torch.ones(2, 2))


def test_info_nce_positives_negatives(distillation):
    eye = torch.eye(3)
    regions = torch.tensor([0, 1, 2])
    aligned = distillation.region_info_nce(eye, eye, regions, temperature=0.1)
    swapped = distillation.region_info_nce(eye, eye[[1, 0, 2]], regions, temperature=0.1)
    assert aligned.item() < 1e-3 < swapped.item()
    # same region in two samples: never a negative of each other, both positives
    two = distillation.region_info_nce(eye[[0, 0, 1]], eye[[0, 0, 1]], torch.tensor([0, 0, 1]), 0.1)
    assert two.item() < 1e-3
    # a single region: no negatives, zero loss that is still part of the graph
    x = torch.randn(2, 3, requires_grad=True)
    none = distillation.region_info_nce(x, x, torch.tensor([1, 1]))
    assert none.item() == 0.0 and none.requires_grad


def _region_batch():
    """Features where each region (background, liver, tumour) has its own direction, and the region map."""
    regions = torch.zeros(2, 16, 16, dtype=torch.long)
    regions[:, 4:12, 4:12] = 1
    regions[:, 6:10, 6:10] = 2
    directions = torch.eye(3)[:, :, None, None]  # [R, C=3, 1, 1]
    features = sum((regions[:, None] == r) * directions[r] for r in range(3)).float()  # [2, 3, 16, 16]
    return features, regions


def test_contrast_head_cannot_empty_the_term(distillation):
    """The keys are the teacher's own region embeddings: training the student's head alone cannot push the loss
    below the floor their geometry sets (a head shared by both sides took the same batch to 1e-5 in 50 steps), and
    no parameter of the module acts on the teacher's side."""
    torch.manual_seed(0)
    regions = torch.zeros(8, 16, 16, dtype=torch.long)
    regions[:, 4:12, 4:12] = 1
    regions[:, 6:10, 6:10] = 2
    base = torch.randn(32)
    # regions the teacher barely tells apart
    directions = torch.stack([base + 0.35 * torch.randn(32) for _ in range(3)])
    teacher = sum((regions[:, None] == r) * directions[r][None, :, None, None] for r in range(3)).float()
    teacher = teacher + 0.05 * torch.randn_like(teacher)
    student = teacher + 0.5 * torch.randn_like(teacher)
    head = distillation.RegionHead(32, stage=0, embed_dim=64)
    loss = distillation.RegionContrastiveLoss(stage=0)
    assert not list(loss.parameters())
    optimiser = torch.optim.Adam(head.parameters(), 1e-3)
    for _ in range(200):
        value = loss(*head([student], regions), [teacher], regions)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
    assert value.item() > 0.01
    with pytest.raises(ValueError, match="equal widths"):
        distillation.RegionHead(32, 16, embed_dim=0)


def test_swapping_regions_raises_the_contrastive_loss(distillation):
    torch.manual_seed(0)
    features, regions = _region_batch()
    head = distillation.RegionHead(3, stage=0, embed_dim=0)
    loss = distillation.RegionContrastiveLoss(stage=0, temperature=0.1)
    right = loss(*head([features], regions), [features], regions)
    swapped_regions = regions.clone()
    swapped_regions[regions == 1], swapped_regions[regions == 2] = 2, 1  # tumour <-> liver for the student
    wrong = loss(*head([features], swapped_regions), [features], regions)
    assert wrong.item() > right.item() + 0.1
    assert right.item() < 0.01


def test_contrast_pools_downsampled_features(distillation):
    features, regions = _region_batch()
    head = distillation.RegionHead(3, stage=1, embed_dim=0)
    loss = distillation.RegionContrastiveLoss(stage=1, temperature=0.1)
    coarse = torch.nn.functional.avg_pool2d(features, 2)  # the stage-1 map of a 2x smaller resolution
    assert loss(*head([features, coarse], regions), [features, coarse], regions).item() < 0.5


def test_load_teacher(distillation, tmp_path):
    nets = bundle_module("cdugjl_liver", "networks")
    small = dict(in_channels=3, channels=(4, 8, 8, 8, 8), quant_hidden=(8,), d_state=2)
    with pytest.raises(FileNotFoundError, match="train_teacher.json"):
        distillation.load_teacher(nets.MEAMTNet(**small), tmp_path / "teacher.pt")
    lazy = distillation.FrozenTeacher(nets.MEAMTNet(**small), tmp_path / "teacher.pt")  # no file needed yet
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        lazy.forward_all(torch.randn(1, 3, 32, 32))
    source = nets.MEAMTNet(**small)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "checkpoint_teacher.pt")
    teacher = distillation.load_teacher(nets.MEAMTNet(**small), tmp_path / "checkpoint_teacher.pt", "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for a, b in zip(teacher.state_dict().values(), source.state_dict().values()):
        torch.testing.assert_close(a, b)
    frozen = distillation.FrozenTeacher(nets.MEAMTNet(**small), tmp_path / "checkpoint_teacher.pt").train()
    assert not frozen.training and frozen.forward_all(torch.randn(1, 3, 32, 32))["alpha"].shape == (1, 2, 32, 32)


def test_teacher_worse_than_supervised_is_refused(distillation, tmp_path, caplog):
    nets = bundle_module("cdugjl_liver", "networks")
    small = dict(in_channels=3, channels=(4, 8, 8, 8, 8), quant_hidden=(8,), d_state=2)
    ckpt = tmp_path / "teacher" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(nets.MEAMTNet(**small).state_dict(), ckpt)
    x = torch.randn(1, 3, 32, 32)
    # no recorded Dice: no check without min_dice, refused with one
    distillation.FrozenTeacher(nets.MEAMTNet(**small), ckpt).forward_all(x)
    with pytest.raises(RuntimeError, match="no recorded validation Dice"):
        distillation.FrozenTeacher(nets.MEAMTNet(**small), ckpt, min_dice=0.5).forward_all(x)
    (ckpt.parent / "metrics.csv").write_text("val_mean_dice,0.61\n")  # as MONAI's MetricsSaver writes it
    assert distillation.recorded_dice(ckpt.parent) == pytest.approx(0.61)
    distillation.FrozenTeacher(nets.MEAMTNet(**small), ckpt, min_dice=0.6).forward_all(x)  # better: used
    worse = distillation.FrozenTeacher(nets.MEAMTNet(**small), ckpt, min_dice=0.7)
    with pytest.raises(RuntimeError, match="0.610, below teacher_min_dice 0.700"):
        worse.forward_all(x)
    assert not worse.loaded
    warned = distillation.FrozenTeacher(nets.MEAMTNet(**small), ckpt, min_dice=0.7, on_worse="warn")
    with caplog.at_level("ERROR"):
        assert warned.forward_all(x)["alpha"].shape == (1, 2, 32, 32)
    assert "WORSE THAN SUPERVISED" in caplog.text


# ---------------------------------------------------------------------------------------------- consistency


def test_kept_fraction(consistency):
    values = [consistency.kept_fraction(t, 10) for t in range(12)]
    assert values == sorted(values)
    assert values[0] == pytest.approx(0.75 + 0.25 * math.exp(-5)) and values[-1] == pytest.approx(1.0)
    assert consistency.kept_fraction(0, 10, start=0.5) == pytest.approx(0.5 + 0.5 * math.exp(-5))


def test_uncertainty_mask_keeps_the_least_uncertain_fraction_of_each_class(consistency):
    # every voxel has u = K / S < 0.5 (the case an absolute threshold ramped from 0.75 never masks); the tumour
    # voxels (class 1, the last 4) have less evidence than any background voxel
    total_evidence = torch.tensor([12.0, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 5, 6, 7, 8]).reshape(2, 1, 2, 4)
    share = torch.tensor([0.7] * 12 + [0.3] * 4).reshape(2, 1, 2, 4)
    teacher = torch.cat([share * total_evidence, (1 - share) * total_evidence], 1)
    mask = consistency.uncertainty_mask(teacher, fraction=0.75)
    assert mask.shape == (2, 1, 2, 4)
    # 9 of the 12 background voxels (the most evidence) and 3 of the 4 tumour voxels, not the 12 lowest u overall
    assert mask.flatten().tolist() == [0.0] * 3 + [1.0] * 9 + [0.0] + [1.0] * 3
    assert consistency.uncertainty_mask(teacher, fraction=1.0).sum().item() == 16
    assert consistency.uncertainty_mask(teacher, fraction=1e-6).sum().item() == 2  # at least one voxel per class
    # ties with the threshold are kept: 4 equal voxels, half requested
    assert consistency.uncertainty_mask(torch.ones(1, 2, 2, 2), fraction=0.5).sum().item() == 4


def test_consistency_mask_drops_uncertain_voxels(consistency):
    # EMA teacher: voxel 0 confident (u = 2 / 22), voxel 1 uncertain (u = 2 / 3), both predicting class 0
    teacher = torch.tensor([[20.0, 2.0], [2.0, 1.0]]).reshape(1, 2, 1, 2)
    assert consistency.uncertainty_mask(teacher, fraction=0.5).flatten().tolist() == [1.0, 0.0]
    student = torch.tensor([[20.0, 1.0], [2.0, 30.0]]).reshape(1, 2, 1, 2)  # agrees on voxel 0 only
    masked = consistency.UncertaintyConsistencyLoss()(student, teacher, fraction=0.5)
    p_s, p_t = student / student.sum(1, keepdim=True), teacher / teacher.sum(1, keepdim=True)
    torch.testing.assert_close(masked, ((p_s - p_t) ** 2).mean(1)[0, 0, 0])
    assert masked.item() == pytest.approx(0.0, abs=1e-6)
    everything = consistency.UncertaintyConsistencyLoss(use_mask=False)(student, teacher)
    assert everything.item() > 0.1
    # keeping every voxel equals the unmasked loss
    torch.testing.assert_close(consistency.UncertaintyConsistencyLoss()(student, teacher, fraction=1.0), everything)


# ---------------------------------------------------------------------------------------------- training loss


def _tiny_net(in_channels: int):
    nets = bundle_module("cdugjl_liver", "networks")
    torch.manual_seed(0)
    return nets.MEAMTNet(in_channels=in_channels, channels=(4, 8, 8, 8, 8), quant_hidden=(8,), d_state=2)


def _targets(n: int, size: int = 32) -> dict:
    label = torch.zeros(n, 1, size, size)
    label[:, :, 10:16, 10:16] = 1
    organs = torch.zeros(n, 1, size, size)
    organs[:, :, 4:24, 4:24] = 1
    return {
        "label": label,
        "organs": organs,
        "quant": torch.tensor([[9.0, 9.0, 36.0]]).repeat(n, 1),
        "quant_mask": torch.ones(n, 3),
        "spacing": torch.ones(n, 2),
    }


WEIGHTS = dict(attention_weight=1.0, feature_weight=0.5, contrast_weight=0.4, distill_kl_weight=0.1)


@pytest.fixture(scope="module")
def losses():
    return bundle_module("cdugjl_liver", "losses")


def _progress(fraction: float):
    """A RunProgress at ``fraction`` of a 1000-iteration run."""
    return bundle_module("cdugjl_liver", "semi_supervised").RunProgress(round(fraction * 1000) + 1, 1000)


def _loss(losses, distillation, **weights):
    kwargs = {**WEIGHTS, "consistency_weight": 0.1, "edge_weight": 0.1, **weights}
    return losses.CdUgJLLoss(
        distillation=distillation.FeatureDistillationLoss(),
        contrast=distillation.RegionContrastiveLoss(stage=2),
        consistency_rampup=0.5,
        **kwargs,
    )


def _student(network):
    """The tiny network with identity distillation heads (:class:`scripts.student.DistillationStudent`)."""
    distillation = bundle_module("cdugjl_liver", "distillation")
    return bundle_module("cdugjl_liver", "student").DistillationStudent(
        network, distillation.FeatureProjections([4, 8, 8, 8, 8]), distillation.RegionHead(8, stage=2, embed_dim=0))


def _teacher_outputs(teacher, x, targets=None):
    """The CE teacher's outputs on ``x`` with the regions of :meth:`CdUgJLTrainer.run_teacher`: from the label
    (``targets``) for labelled slices, from the teacher's prediction otherwise."""
    distillation = bundle_module("cdugjl_liver", "distillation")
    outputs = teacher.forward_all(x)
    if targets is not None:
        return {**outputs, "regions": distillation.region_map(targets["label"], targets["organs"])}
    return {**outputs, "regions": distillation.teacher_region_map(outputs["alpha"])}


def test_semi_supervised_loss_identical_teacher(losses, distillation):
    """A teacher identical to the student (same weights, same input) gives zero attention, feature and KL terms."""
    net = _tiny_net(2).train()
    student = _student(net).train()
    x_l, x_u = torch.randn(2, 2, 32, 32), torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        teacher = {"labelled": _teacher_outputs(net, x_l, _targets(2)), "unlabelled": _teacher_outputs(net, x_u)}
    outputs = student(x_l, project=True, regions=teacher["labelled"]["regions"])
    unlabelled = student(x_u, project=True, regions=teacher["unlabelled"]["regions"])
    result = _loss(losses, distillation)(outputs, _targets(2), unlabelled, teacher, _progress(0.2))
    terms = {"seg", "quant", "edge", "attention", "feature", "distill_kl", "contrast"}
    assert set(result) == {"loss", "consistency_weight"} | {f"loss_{t}" for t in terms}
    for name in ("attention", "feature", "distill_kl"):
        assert result[f"loss_{name}"].item() == pytest.approx(0.0, abs=1e-5), name
    result["loss"].backward()
    assert all(p.grad is not None for p in net.stem.parameters())


@pytest.fixture(scope="module")
def ssl_batch():
    """Student outputs on 2 labelled and 2 unlabelled slices, the CE teacher's on both and the EMA's, computed once."""
    net = _tiny_net(2).train()
    student = _student(net).train()
    with torch.no_grad():
        ce_teacher = _tiny_net(3).eval()
        teacher = {
            "labelled": _teacher_outputs(ce_teacher, torch.randn(2, 3, 32, 32), _targets(2)),
            "unlabelled": _teacher_outputs(ce_teacher, torch.randn(2, 3, 32, 32)),
            "ema": net.forward_all(torch.randn(2, 2, 32, 32))["alpha"],
        }
    outputs = student(torch.randn(2, 2, 32, 32), project=True, regions=teacher["labelled"]["regions"])
    unlabelled = student(torch.randn(2, 2, 32, 32), project=True, regions=teacher["unlabelled"]["regions"])
    return outputs, _targets(2), unlabelled, teacher


@pytest.mark.parametrize("zeroed", ["attention_weight", "feature_weight", "contrast_weight", "distill_kl_weight",
                                    "consistency_weight", "edge_weight", "quant_weight"])
def test_zero_weight_removes_term(losses, distillation, ssl_batch, zeroed):
    name = "loss_" + {"distill_kl_weight": "distill_kl"}.get(zeroed, zeroed[: -len("_weight")])
    assert name in _loss(losses, distillation)(*ssl_batch, _progress(0.2))
    terms = [k for k in _loss(losses, distillation, **{zeroed: 0.0})(*ssl_batch, _progress(0.2)) if k != "loss"]
    assert name not in terms and len([t for t in terms if t.startswith("loss_")]) == 8 - 1


def test_terms_follow_their_inputs(losses, distillation, ssl_batch):
    """Labelled slices without CE images: distillation on the unlabelled slices only; no unlabelled batch: no
    consistency, no unlabelled distillation; the unlabelled terms move the loss."""
    outputs, targets, unlabelled, teacher = ssl_batch
    loss = _loss(losses, distillation)
    full = loss(outputs, targets, unlabelled, teacher, _progress(0.6))
    unlabelled_only = loss(outputs, targets, unlabelled, {k: teacher[k] for k in ("unlabelled", "ema")}, _progress(0.6))
    assert "loss_attention" in unlabelled_only and unlabelled_only["loss_attention"] != full["loss_attention"]
    labelled_only = loss(outputs, targets, None, teacher, _progress(0.6))
    assert "loss_consistency" not in labelled_only and "loss_attention" in labelled_only
    assert full["loss_consistency"] > 0 and full["consistency_weight"] == pytest.approx(0.1)


def test_supervised_only_and_missing_inputs(losses):
    """All SSL weights 0 = the multi-task loss of the teacher and supervised runs."""
    net = _tiny_net(2).train()
    outputs = net(torch.randn(2, 2, 32, 32))
    targets = _targets(2)
    supervised = losses.CdUgJLLoss(edge_weight=0.1)(outputs, targets, None, None, _progress(0.3))
    reference = losses.MultiTaskLoss(edge_weight=0.1)(outputs, targets, None, None, _progress(0.3))
    torch.testing.assert_close(supervised["loss"], reference["loss"])
    with pytest.raises(ValueError):
        losses.CdUgJLLoss(attention_weight=1.0)


def test_consistency_weight_and_kl_ramp_follow_progress(losses, distillation, ssl_batch):
    """The consistency weight and the KL annealing read the progress argument."""
    loss = _loss(losses, distillation)
    start = loss(*ssl_batch, _progress(0.0))
    assert start["consistency_weight"].item() == pytest.approx(0.1 * math.exp(-5))
    assert loss(*ssl_batch, _progress(0.5))["consistency_weight"].item() == pytest.approx(0.1)
    alpha, label = ssl_batch[0]["alpha"], ssl_batch[1]["label"]
    seg = loss.seg_loss
    assert seg(alpha, label, 0.0) < seg(alpha, label, 0.05) < seg(alpha, label, 1.0)  # KL annealed over 0.1


class _Records(torch.utils.data.Dataset):
    def __init__(self, n: int, keys=("image", "strong", "ce")):
        self.n, self.keys = n, keys

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        sizes = {"image": 2, "strong": 2, "ce": 3}
        return {k: torch.full((sizes[k], 32, 32), float(i)) for k in self.keys}


def _liver_trainer(trainer, mean_teacher, loss, labelled, epochs=1, epoch_length=None, teacher=None, ema=True,
                   unlabelled=2, **kwargs):
    student = _student(_tiny_net(2))
    stream = mean_teacher.UnlabeledStream(_Records(unlabelled), batch_size=2, shuffle=False)
    return trainer.CdUgJLTrainer(
        device="cpu", max_epochs=epochs, epoch_length=epoch_length, train_data_loader=labelled, network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=1e-3), loss_function=loss, unlabeled=stream,
        teacher=teacher, ema=mean_teacher.ema_network(student.network) if ema else None,
        prepare_batch=trainer.MultiTaskPrepareBatch(), decollate=False, **kwargs,
    )


def test_trainer_passes_teachers_outputs_and_progress_to_the_loss(trainer, mean_teacher, losses, caplog):
    """One iteration: the CE teacher on both batches' CE phases, the EMA on the weak views, the student on the
    labelled slices and the strong views, all handed to the loss with the run's progress; the loss's terms reach
    ``engine.state.output``."""
    calls = []
    real = losses.MultiTaskLoss(edge_weight=0.1)

    def loss(outputs, targets, unlabelled_outputs, teacher, progress):
        calls.append((outputs["alpha"].shape[0], unlabelled_outputs["alpha"].shape[0],
                      {k: v["alpha"].shape[0] if isinstance(v, dict) else v.shape[0] for k, v in teacher.items()},
                      progress.fraction))
        return real(outputs, targets, unlabelled_outputs, teacher, progress)

    labelled = [{**_targets(3), "image": torch.randn(3, 2, 32, 32), "ce": torch.randn(3, 3, 32, 32)}] * 2
    engine = _liver_trainer(trainer, mean_teacher, loss, labelled, epochs=2, teacher=_tiny_net(3).eval())
    engine.run()
    assert calls == [(3, 2, {"labelled": 3, "unlabelled": 2, "ema": 2}, i / 4) for i in range(4)]
    assert {"loss", "loss_seg", "loss_quant", "loss_edge"} <= set(engine.state.output)
    # the same run as 4 epochs of 1 iteration: the same progress
    calls.clear()
    _liver_trainer(trainer, mean_teacher, loss, labelled, epochs=4, epoch_length=1, teacher=_tiny_net(3).eval()).run()
    assert [c[3] for c in calls] == [i / 4 for i in range(4)]
    # labelled slices without CE images (MONAI Label): the teacher on the unlabelled batch only, warned once
    calls.clear()
    plain = [{k: v for k, v in labelled[0].items() if k != "ce"}] * 2
    with caplog.at_level("WARNING"):
        _liver_trainer(trainer, mean_teacher, loss, plain, teacher=_tiny_net(3).eval()).run()
    assert [set(c[2]) for c in calls] == [{"unlabelled", "ema"}] * 2
    assert sum("no 'ce'" in r.message for r in caplog.records) == 1
    disabled = bundle_module("cdugjl_liver", "distillation").FrozenTeacher(_tiny_net(3), "absent.pt", enabled=False)
    assert _liver_trainer(trainer, mean_teacher, loss, plain, teacher=disabled).teacher is None


def test_student_passes_keep_strong_views_out_of_batch_norm(trainer, mean_teacher, losses):
    torch.manual_seed(0)
    engine = _liver_trainer(trainer, mean_teacher, losses.MultiTaskLoss(), [{}])
    student = engine.network.train()
    norms = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    labelled, strong = torch.randn(3, 2, 32, 32), 3.0 + 2.0 * torch.randn(2, 2, 32, 32)
    reference = copy.deepcopy(student)
    expected = reference(labelled)
    outputs, unlabelled = engine.run_student(labelled, {"strong": strong}, {}, _progress(0.0))
    # labelled slices: as a labelled-only pass, whatever the strong views are
    torch.testing.assert_close(outputs["alpha"], expected["alpha"])
    torch.testing.assert_close(outputs["features"][2], expected["features"][2])
    # unlabelled slices: normalised with their own batch statistics
    torch.testing.assert_close(unlabelled["alpha"], copy.deepcopy(reference)(strong)["alpha"])
    # running statistics: the labelled pass only; the layers track again afterwards
    for mine, theirs in zip(norms, [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean)
        torch.testing.assert_close(mine.running_var, theirs.running_var)
        assert mine.track_running_stats and int(mine.num_batches_tracked) == 1
    # the unlabelled pass is part of the graph
    unlabelled["alpha"].sum().backward()
    assert all(p.grad is not None for p in student.network.stem.parameters())
    # one shared pass: the strong views change the labelled slices
    engine.network = reference
    engine.separate_norm_statistics = False
    shared, _ = engine.run_student(labelled, {"strong": strong}, {}, _progress(0.0))
    assert not torch.allclose(shared["alpha"], expected["alpha"])
    # no unlabelled batch: one ordinary pass
    shared_none, none = engine.run_student(labelled, None, {}, _progress(0.0))
    assert none is None and shared_none["alpha"].shape[0] == 3


def test_student_runs_the_distillation_heads_where_the_teacher_ran(trainer, mean_teacher, losses, distillation):
    """The projections and the region head run inside the student's forward, for the slices the CE teacher saw and
    over the teacher's regions (so that DDP, which wraps the student, sees them), and the loss moves them; in one
    shared pass the rows the teacher did not see get no region."""
    torch.manual_seed(0)
    engine = _liver_trainer(trainer, mean_teacher, _loss(losses, distillation), [{}], teacher=_tiny_net(3).eval())
    labelled, targets = torch.randn(2, 2, 32, 32), _targets(2)
    unlabelled = {"image": torch.randn(2, 2, 32, 32), "strong": torch.randn(2, 2, 32, 32),
                  "ce": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        teacher = engine.run_teacher(labelled, {**targets, "ce": torch.randn(2, 3, 32, 32)}, unlabelled, None)
    torch.testing.assert_close(teacher["labelled"]["regions"], distillation.region_map(targets["label"],
                                                                                         targets["organs"]))
    torch.testing.assert_close(teacher["unlabelled"]["regions"],
                               distillation.teacher_region_map(teacher["unlabelled"]["alpha"], 0.9))
    outputs, unlabelled_outputs = engine.run_student(labelled, unlabelled, teacher, _progress(0.5))
    student = engine.network
    for out, seen in ((outputs, teacher["labelled"]), (unlabelled_outputs, teacher["unlabelled"])):
        expected, valid = student.heads["region"](out["features"], seen["regions"])
        torch.testing.assert_close(out["region_embeddings"], expected)
        assert out["region_valid"].equal(valid) and len(out["projected"]) == 4
    terms = engine.loss_function(outputs, targets, unlabelled_outputs, teacher, _progress(0.5))
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.heads.parameters())
    # without the teacher's regions: no heads; a student without heads refuses to be asked for them
    plain, _ = engine.run_student(labelled, None, {}, _progress(0.5))
    assert "projected" not in plain and "region_embeddings" not in plain
    headless = bundle_module("cdugjl_liver", "student").DistillationStudent(_tiny_net(2)).train()
    with pytest.raises(ValueError, match="no projections or region head"):
        headless(labelled, project=True, regions=targets["label"][:, 0].long())
    # one shared pass, the teacher on the unlabelled batch only: the labelled rows pool over no region
    engine.separate_norm_statistics = False
    shared, shared_unlabelled = engine.run_student(labelled, unlabelled, {"unlabelled": teacher["unlabelled"]},
                                                   _progress(0.5))
    assert not shared["region_valid"].any() and shared_unlabelled["region_valid"].equal(
        unlabelled_outputs["region_valid"])


@pytest.mark.parametrize("overlays", [[], ["train_teacher.json"]], ids=["student", "teacher"])
def test_student_holds_every_trained_parameter(overlays):
    """``student`` (what the trainer trains and ``multi_gpu_train.json`` wraps in DDP) holds the served network and
    the distillation heads, all on ``@device`` and all optimised; the loss holds no parameter, so one DDP module
    serves every trainable operation. The teacher run trains no heads."""
    from monai.bundle import ConfigParser

    bundle = BUNDLES / "cdugjl_liver"
    use_bundle(bundle)
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in ("train.json", *overlays, "cpu_demo.json")])
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('meta')"
    student = parser.get_parsed_content("student")
    assert student is parser.get_parsed_content("student_def")
    assert student.network is parser.get_parsed_content("network")
    assert not list(parser.get_parsed_content("loss").parameters())
    heads = list(student.heads.parameters())
    assert bool(heads) != bool(overlays) and all(p.device.type == "meta" for p in student.parameters())
    optimised = [p for group in parser.get_parsed_content("optimizer").param_groups for p in group["params"]]
    assert [id(p) for p in optimised] == [id(p) for p in student.parameters()]


# ---------------------------------------------------------------------------------------------- metrics


def test_rank_auroc_matches_pairwise_count(metrics):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    positives = torch.rand(200, generator=g) < 0.3
    pos, neg = scores[positives], scores[~positives]
    pairwise = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean().item()
    assert metrics.rank_auroc(scores, positives) == pytest.approx(pairwise, abs=1e-9)
    assert metrics.rank_auroc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == 1.0
    assert math.isnan(metrics.rank_auroc(torch.rand(5), torch.zeros(5, dtype=torch.bool)))


def test_expected_calibration_error(metrics):
    confidence = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, True, True, False, True, False])
    # bin of 0.95: accuracy 0.75 (gap 0.2, weight 4/6); bin of 0.55: accuracy 0.5 (gap 0.05, weight 2/6)
    expected = 4 / 6 * 0.2 + 2 / 6 * 0.05
    assert metrics.expected_calibration_error(confidence, correct, n_bins=10) == pytest.approx(expected)
    assert metrics.expected_calibration_error(torch.ones(3), torch.ones(3, dtype=torch.bool)) == pytest.approx(0)


def test_calibration_and_auroc_metrics_per_case(metrics):
    prob = torch.zeros(2, 4, 4)
    prob[1, :2] = 0.9  # predicted tumour in the top half
    prob[0] = 1 - prob[1]
    ref = torch.zeros(2, 4, 4)
    ref[1, :1] = 1  # tumour in the first row only: row 1 is a false positive
    ref[0] = 1 - ref[1]
    uncertainty = torch.full((1, 4, 4), 0.1)
    uncertainty[0, 1] = 0.8  # the false positives are the uncertain voxels
    ece = metrics.CalibrationErrorMetric(n_bins=10, region="foreground")
    ece([prob], [ref])
    # foreground = rows 0-1, all at confidence 0.9, half of them right
    assert ece.aggregate().item() == pytest.approx(0.4)
    for region in ("all", "foreground"):
        auroc = metrics.UncertaintyAUROCMetric(region=region)
        auroc([torch.cat([prob, uncertainty])], [ref])
        assert auroc.aggregate().item() == pytest.approx(1.0)


def test_quantification_error_x_and_y(metrics):
    from monai.data import MetaTensor

    label = torch.zeros(1, 8, 8, 1)
    label[0, 2:4, 4:6, 0] = 1  # centre (2.5, 4.5) px, spacing 2 mm -> (5, 9) mm
    label = MetaTensor(label, affine=torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0])))
    pred = torch.tensor([[[6.0, 7.0, 16.0]]])
    for quantity, expected in (("x", 1.0), ("y", 2.0), ("centre", math.hypot(1, 2)), ("area", 0.0)):
        metric = metrics.QuantificationErrorMetric(quantity)
        metric([pred[0]], [label])
        assert metric.aggregate().item() == pytest.approx(expected), quantity
