"""Unit tests of the ``ceds_mediastinum`` bundle code: losses against hand-computed values, network, trainer phases."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import bundle_module

BUNDLE = "ceds_mediastinum"
TINY = (2, 4, 8, 16, 32)


@pytest.fixture
def losses():
    return bundle_module(BUNDLE, "losses")


@pytest.fixture
def networks():
    return bundle_module(BUNDLE, "networks")


@pytest.fixture
def trainer_mod():
    return bundle_module(BUNDLE, "trainer")


# ---------------------------------------------------------------------------------------------------- losses


def test_sharpen(losses):
    p = torch.tensor([0.8, 0.2, 0.5, 1.0, 0.0])
    # P^(1/T) / (P^(1/T) + (1-P)^(1/T)) by hand
    assert torch.allclose(losses.sharpen(p, 0.5)[:3], torch.tensor([0.64 / 0.68, 0.04 / 0.68, 0.5]), atol=1e-6)
    t01 = 0.8**10 / (0.8**10 + 0.2**10)
    assert losses.sharpen(p, 0.1)[0].item() == pytest.approx(t01, abs=1e-7)
    assert losses.sharpen(p, 0.1)[1].item() == pytest.approx(1 - t01, abs=1e-7)
    assert torch.allclose(losses.sharpen(p, 1.0)[:3], p[:3], atol=1e-6)
    sharp = losses.sharpen(p, 0.1)
    assert torch.isfinite(sharp).all() and sharp[3] > 0.999 and sharp[4] < 0.001
    with pytest.raises(ValueError):
        losses.sharpen(p, 0.0)


def test_correctness_target(losses):
    seg = torch.tensor([[[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]])  # argmax [1, 0, 0, 0]
    label = torch.tensor([[[1, 0, 0, 1]]])
    assert losses.correctness_target(seg, label).tolist() == [[1, 1, 1, 0]]
    assert losses.correctness_target(seg, label[:, 0]).tolist() == [[1, 1, 1, 0]]


def test_balanced_confidence_ce(losses):
    seg = torch.tensor([[[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]])  # argmax [1, 0, 0, 0]
    label = torch.tensor([[[1, 0, 0, 1]]])  # correct [1, 1, 1, 0]: 3 correct, 1 wrong -> weight of "wrong" = 3
    conf = torch.zeros(1, 2, 4)
    conf[0, 1, 3] = math.log(3.0)  # wrong voxel: softmax [1/4, 3/4] -> -log(1/4) = ln 4; others ln 2
    expected = (3 * math.log(2) * 1 + 3 * math.log(4)) / (3 * 1 + 3)
    loss = losses.ConfidenceCELoss()(conf, seg, label)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    # no wrong voxel: the weights fall back to 1 (plain mean)
    all_right = torch.tensor([[[1, 0, 0, 0]]])
    expected = (3 * math.log(2) + math.log(4 / 3)) / 4
    assert losses.ConfidenceCELoss()(conf, seg, all_right).item() == pytest.approx(expected, rel=1e-6)
    # balanced within each predicted class, then averaged: tumour {v0} (right) -> ln 2; background {v1, v2, v3}
    # (v3 wrong, weight 2 / 1) -> (2 ln 2 + 2 ln 4) / 4 = 1.5 ln 2
    per_class = losses.ConfidenceCELoss(balance="predicted_class")
    assert per_class(conf, seg, label).item() == pytest.approx(1.25 * math.log(2), rel=1e-6)
    # a predicted class that is all wrong (early in training) weighs its voxels equally instead of 0 / 0
    all_wrong = torch.tensor([[[0, 1, 1, 1]]])  # tumour {v0} wrong; background: v3 right, v1 and v2 wrong
    assert torch.isfinite(per_class(conf, seg, all_wrong))
    assert torch.isfinite(losses.ConfidenceCELoss()(conf, seg, 1 - torch.tensor([[[1, 0, 0, 0]]])))
    with pytest.raises(ValueError, match="balance"):
        losses.ConfidenceCELoss(balance="voxel")


def _consistency_case():
    student = torch.zeros(1, 2, 3)  # softmax [0.5, 0.5] everywhere
    teacher = torch.tensor([[[0.0, math.log(4.0), 0.0], [math.log(4.0), 0.0, 0.0]]])  # p1 = 0.8, 0.2, 0.5
    teacher_conf = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])  # P(correct) 0.73, 0.27, 0.5 -> mask 1, 0, 0
    return student, teacher, teacher_conf


def test_masked_consistency(losses):
    student, teacher, teacher_conf = _consistency_case()
    # T = 0.5: sharpen(0.8) = 16/17, sharpen(0.2) = 1/17 -> squared error (15/34)^2 per class at voxels 0 and 1
    d = (15 / 34) ** 2
    mean_loss = losses.ConfidenceMaskedConsistencyLoss(temperature=0.5, normalization="mean")
    mask_loss = losses.ConfidenceMaskedConsistencyLoss(temperature=0.5, normalization="mask")
    assert mean_loss(student, teacher, teacher_conf).item() == pytest.approx(2 * d / 6, rel=1e-5)
    assert mask_loss(student, teacher, teacher_conf).item() == pytest.approx(2 * d / 2, rel=1e-5)
    assert mean_loss(student, teacher, None).item() == pytest.approx(4 * d / 6, rel=1e-5)  # plain mean teacher
    # P(correct) exactly 0.5 is not above the threshold (the authors' round() gives 0 there too)
    assert mask_loss(student, teacher, torch.zeros(1, 2, 3)).item() == 0.0
    # gradients reach the student only
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    mean_loss(student, teacher, teacher_conf).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    with pytest.raises(ValueError):
        losses.ConfidenceMaskedConsistencyLoss(normalization="sum")


def test_per_class_mask_keeps_confident_tumour(losses):
    """The situation measured in training: the head trusts the background (P(correct) 0.9) and distrusts every
    tumour prediction (0.3). The threshold mask drops all tumour voxels, so the consistency only pulls towards
    background; the per-class mask keeps the most confident half of each predicted class, tumour included."""
    teacher = torch.tensor([[[3.0, 3.0, 3.0, 3.0, -3.0, -3.0, -3.0, -3.0]]])  # logit of background
    teacher = torch.cat([teacher, -teacher], 1)  # [1, 2, 8]: voxels 0-3 background, 4-7 tumour
    p_correct = torch.tensor([0.9, 0.95, 0.85, 0.92, 0.3, 0.35, 0.25, 0.2])
    confidence = torch.stack([torch.log(1 - p_correct), torch.log(p_correct)]).unsqueeze(0)  # softmax -> p_correct
    student = torch.zeros(1, 2, 8, requires_grad=True)  # undecided everywhere
    threshold = losses.ConfidenceMaskedConsistencyLoss(temperature=1.0, normalization="mask")
    per_class = losses.ConfidenceMaskedConsistencyLoss(temperature=1.0, normalization="mask", mask="per_class",
                                                       kept_fraction=0.5)
    threshold(student, teacher, confidence).backward()
    assert student.grad[0, 1, 4:].abs().sum() == 0  # no tumour voxel reaches the loss
    student.grad = None
    per_class(student, teacher, confidence).backward()
    kept = student.grad[0, 1].abs() > 0
    assert kept.tolist() == [False, True, False, True, True, True, False, False]  # 2 of 4 per class, most confident
    assert (student.grad[0, 1, 4:] < 0).sum() == 2  # gradient descent raises the tumour probability there
    student.grad = None
    background_only = losses.ConfidenceMaskedConsistencyLoss(temperature=1.0, normalization="mask",
                                                             mask="per_class", kept_fraction=[0.5, 1.0])
    background_only(student, teacher, confidence).backward()
    kept = student.grad[0, 1].abs() > 0
    assert kept.tolist() == [False, True, False, True, True, True, True, True]  # every predicted tumour voxel
    with pytest.raises(ValueError, match="kept_fraction"):
        losses.ConfidenceMaskedConsistencyLoss(mask="per_class", kept_fraction=[0.5, 0.0])
    with pytest.raises(ValueError, match="mask"):
        losses.ConfidenceMaskedConsistencyLoss(mask="soft")


def test_reference_masks_rank_by_probability_or_at_random(losses):
    """The ablations' references for the confidence head: the same per-class half, ranked by the teacher's own
    probability (the head's scores are ignored) or drawn at random (about half of each class, another half each
    call)."""
    teacher = torch.tensor([[[3.0, 1.0, 2.0, 0.5, -3.0, -0.2, -1.0, -2.0]]])  # logit of background
    teacher = torch.cat([teacher, -teacher], 1)  # voxels 0-3 background, 4-7 tumour, of different certainty
    confidence = torch.randn(1, 2, 8)
    probability = losses.ConfidenceMaskedConsistencyLoss(mask="probability", kept_fraction=0.5)
    assert probability.kept(teacher, confidence)[0, 0].tolist() == [1, 0, 1, 0, 1, 0, 0, 1]
    assert probability.kept(teacher, -confidence).equal(probability.kept(teacher, confidence))
    random = losses.ConfidenceMaskedConsistencyLoss(mask="random", kept_fraction=0.5)
    big = torch.randn(1, 2, 20_000)
    draws = [random.kept(big, torch.zeros(1, 2, 20_000))[0, 0] for _ in range(2)]
    for draw in draws:
        for cls in (0, 1):
            in_class = big.argmax(1)[0] == cls
            assert draw[in_class].mean().item() == pytest.approx(0.5, abs=0.01)
    assert not draws[0].equal(draws[1])
    # without a confidence (mean teacher mode) every mask keeps every voxel
    assert random.kept(teacher, None).sum() == 8 and probability.kept(teacher, None).sum() == 8


# ---------------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("spatial_dims,shape", [(3, (2, 1, 32, 32, 16)), (2, (2, 1, 32, 48))])
def test_network_shapes(networks, spatial_dims, shape):
    net = networks.CEDSNet(spatial_dims=spatial_dims, channels=TINY)
    x = torch.rand(shape)
    seg, conf = net(x)
    assert seg.shape == (2, 2, *shape[2:]) and conf.shape == (2, 2, *shape[2:])
    net.eval()
    with torch.no_grad():
        out = net(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 2, *shape[2:])
        both = net.forward_with_confidence(x)
        assert torch.allclose(both[0], out, atol=1e-5)
        net.return_confidence = True
        assert isinstance(net(x), tuple)


def test_network_default_widths_and_validation(networks):
    net = networks.CEDSNet()
    assert net.encoder.in_tr.out_channels == 16 and net.encoder.down_tr4.down_conv.out_channels == 256
    assert net.cbam.channel_attention.mlp[0].in_channels == 5  # [decoder-2 (2), logits (2), entropy (1)]
    n_all = len(list(net.parameters()))
    assert len(net.confidence_parameters()) + len(net.segmentation_parameters()) == n_all
    with pytest.raises(ValueError):
        networks.CEDSNet(channels=(16, 32, 64, 128))
    with pytest.raises(ValueError):
        networks.CEDSNet(channels=(16, 32, 48, 96, 192))
    with pytest.raises(ValueError):
        networks.CEDSNet(spatial_dims=1)


def test_network_torchscript(networks):
    net = networks.CEDSNet(channels=TINY).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    scripted = torch.jit.script(net)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_confidence_branch_is_detached(networks):
    """The confidence loss reaches only the confidence branch (the authors' two-optimiser update)."""
    net = networks.CEDSNet(channels=TINY)
    seg, conf = net(torch.rand(2, 1, 16, 16, 16))
    conf.sum().backward()
    assert all(p.grad is None for p in net.segmentation_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.confidence_parameters())


def test_cbam_residual(networks):
    block = networks.CBAMBlock(spatial_dims=3, channels=5, reduction=2)
    x = torch.rand(2, 5, 4, 4, 4)
    out = block(x)
    assert out.shape == x.shape
    with torch.no_grad():
        att = block.channel_attention(x)
        y = x * att
        expected = y * block.spatial_attention(y) + x
    assert torch.allclose(out, expected)


# ---------------------------------------------------------------------------------------------------- trainer


def test_cosine_lr_lambda(trainer_mod):
    f = trainer_mod.cosine_lr_lambda(total_steps=100, base_lr=0.01, min_lr=0.001)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1)
    assert f(150) == pytest.approx(0.1)


def _schedule(trainer_mod, mode="ceds", warmup=0.05, confidence_interval=0.125, confidence_length=0.000625):
    return trainer_mod.CEDSSchedule(mode, warmup, confidence_interval, confidence_length)


def _progress(iteration, total):
    return bundle_module(BUNDLE, "semi_supervised").RunProgress(iteration, total)


def _make_trainer(trainer_mod, losses, networks, mode="ceds", unlabeled=True, max_epochs=1, consistency_rampup=1.0,
                  warmup=0.05, confidence_interval=0.125, confidence_length=0.000625, **kwargs):
    """A CEDS trainer wired as ``configs/train.json`` wires it (one optimiser, LR and EMA handlers)."""
    from monai.handlers import LrScheduleHandler
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = networks.CEDSNet(channels=TINY)
    image = torch.rand(2, 1, 16, 16, 16)
    label = (image > 0.6).long()
    labeled = [{"image": image, "label": label}]
    mean_teacher = bundle_module(BUNDLE, "mean_teacher")
    stream = mean_teacher.UnlabeledStream([{"image": torch.rand(1, 16, 16, 16)} for _ in range(2)] if unlabeled else [],
                                          batch_size=2, shuffle=False)
    schedule = _schedule(trainer_mod, mode, warmup, confidence_interval, confidence_length)
    loss = losses.CEDSLoss(schedule, DiceCELoss(to_onehot_y=True, softmax=True), losses.ConfidenceCELoss(),
                           losses.ConfidenceMaskedConsistencyLoss(), consistency_rampup=consistency_rampup)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, trainer_mod.cosine_lr_lambda(total_steps=10, base_lr=0.1, min_lr=0.01))
    teacher = mean_teacher.ema_network(net)
    handlers = [LrScheduleHandler(lr_scheduler, epoch_level=False, print_lr=False),
                mean_teacher.EMAUpdateHandler(teacher, net, when=lambda engine: engine.updates_teacher(),
                                              copied=net.CONFIDENCE_BRANCH)]
    trainer = trainer_mod.CEDSTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=labeled,
        network=net,
        optimizer=optimizer,
        optim_set_to_none=True,
        loss_function=loss,
        schedule=schedule,
        ema=teacher,
        unlabeled=stream,
        train_handlers=handlers,
        **kwargs,
    )
    trainer.lr_scheduler = lr_scheduler
    return trainer, net


def test_phase_schedule(trainer_mod):
    """The authors' constants as fractions (0.05 / 0.125 / 0.000625) on 8000 epochs of 20 iterations: warm-up
    epochs 1-400, re-training epochs 1001-1005, 2001-2005, ..., 7001-7005, mean teacher otherwise."""
    schedule = _schedule(trainer_mod)
    length = 20
    total = 8000 * length

    def first(epoch):  # the first iteration of a (1-based) epoch
        return (epoch - 1) * length + 1

    def phase(s, n):
        return s.phase(_progress(n, total))

    phases = {n: phase(schedule, n) for n in (1, first(401) - 1, first(401), first(1001) - 1, first(1001),
                                              first(1006) - 1, first(1006), first(2001), total)}
    assert phases == {1: "warmup", first(401) - 1: "warmup", first(401): "semi", first(1001) - 1: "semi",
                      first(1001): "confidence", first(1006) - 1: "confidence", first(1006): "semi",
                      first(2001): "confidence", total: "semi"}
    assert sum(phase(schedule, n) != "semi" for n in range(1, total + 1)) == 435 * length  # 400 + 7 x 5 epochs
    mt = _schedule(trainer_mod, mode="mean_teacher")
    assert phase(mt, first(1001)) == "semi" and phase(mt, 5) == "warmup"
    assert phase(_schedule(trainer_mod, mode="supervised"), total) == "warmup"
    assert phase(_schedule(trainer_mod, confidence_interval=0), first(1001)) == "semi"
    with pytest.raises(ValueError):
        _schedule(trainer_mod, mode="fixmatch")
    with pytest.raises(ValueError, match="warmup"):  # a number of epochs is not a fraction of the run
        _schedule(trainer_mod, warmup=400)


def test_semi_supervised_modes_need_unlabelled_data(trainer_mod, losses, networks):
    """A semi-supervised schedule without unlabelled data is refused (the config falls back to 'supervised')."""
    with pytest.raises(ValueError, match="unlabelled data and an EMA teacher"):
        _make_trainer(trainer_mod, losses, networks, unlabeled=False)
    trainer, _ = _make_trainer(trainer_mod, losses, networks, mode="supervised", unlabeled=False)
    assert trainer.unlabeled is None


@pytest.mark.parametrize("warmup,total", [(0.05, 8000), (0.3, 7), (0.5, 3), (0.0, 10), (1.0, 4)])
def test_warmup_length(trainer_mod, warmup, total):
    """The warm-up is exactly the first ``round(warmup * total)`` iterations."""
    schedule = _schedule(trainer_mod, warmup=warmup)
    phases = [schedule.phase(_progress(n, total)) for n in range(1, total + 1)]
    n_warmup = round(warmup * total)
    assert phases[:n_warmup] == ["warmup"] * n_warmup and "warmup" not in phases[n_warmup:]


def test_short_retraining_window_runs_one_iteration(trainer_mod):
    """A re-training window shorter than one iteration still runs one, at the start of every period."""
    schedule = _schedule(trainer_mod, warmup=0.1, confidence_interval=0.25, confidence_length=0.001)
    phases = [schedule.phase(_progress(n, 20)) for n in range(1, 21)]  # period 5, window 1 (0.02 iterations)
    assert [n for n, p in enumerate(phases, 1) if p == "confidence"] == [6, 11, 16]


def _ran_phase(output: dict) -> str:
    """The phase an iteration ran, read from its losses: the warm-up has no consistency weight, the mean teacher no
    confidence loss, the re-training window both (and every phase a segmentation loss)."""
    assert output["loss_seg"] > 0.0
    if output["consistency_weight"] == 0.0:
        return "warmup"
    return "confidence" if output["loss_confidence"] > 0.0 else "semi"


def test_phases_follow_iterations_not_epochs(trainer_mod, losses, networks):
    """The same schedule on 20 iterations, as 4 epochs of 5 or 2 epochs of 10, runs the same phase in every
    iteration, with the same consistency weights; the warm-up is round(0.2 x 20) = 4 iterations and a re-training
    window straddles an epoch boundary of the first run."""
    from ignite.engine import Events

    schedule = {"warmup": 0.2, "confidence_interval": 0.45, "confidence_length": 0.1, "consistency_rampup": 0.5}
    expected = ["warmup"] * 4 + ["semi"] * 5 + ["confidence"] * 2 + ["semi"] * 7 + ["confidence"] * 2
    runs = []
    for max_epochs, epoch_length in ((4, 5), (2, 10)):
        trainer, _ = _make_trainer(trainer_mod, losses, networks, max_epochs=max_epochs, epoch_length=epoch_length,
                                   decollate=False, **schedule)
        ran = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: ran.append((_ran_phase(e.state.output), round(e.state.output["consistency_weight"], 6))),
        )
        trainer.run()
        assert trainer.state.iteration == 20
        assert [p for p, _ in ran] == expected
        assert trainer.lr_scheduler.last_epoch == 20  # the learning rate follows the run's iterations
        runs.append(ran)
    assert runs[0] == runs[1]
    # the weight ramps over the first half of the run: exp(-5 (1 - t / 0.5)^2) at t = 4 / 20, then 1 from t = 0.5
    weights = [w for _, w in runs[0]]
    assert weights[4] == pytest.approx(math.exp(-5 * (1 - 0.2 / 0.5) ** 2), abs=1e-6)
    assert weights[10:] == [1.0] * 10  # the re-training windows keep the consistency


@pytest.mark.parametrize("iteration,phase", [(1, "warmup"), (2, "semi"), (3, "confidence")])
def test_phase_updates(trainer_mod, losses, networks, iteration, phase):
    """Each phase moves the right parameters (one optimiser: the others get no gradient and are skipped): the
    segmentation in every phase, the confidence branch in the warm-up and the re-training window, the teacher after
    the warm-up, with the student's confidence branch copied into it."""
    from ignite.engine import Events

    # 3 epochs of 1 iteration: warm-up, then a 1-iteration re-training window every 2 iterations from the start
    trainer, net = _make_trainer(trainer_mod, losses, networks, max_epochs=iteration, warmup=1 / 3,
                                 confidence_interval=2 / 3, confidence_length=1 / 3, decollate=False)
    trainer.state.max_epochs = 3  # the schedule of a 3-iteration run, stopped after `iteration`
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda e: e.terminate())
    assert trainer.schedule.phase(_progress(iteration, 3)) == phase
    before = {}

    @trainer.on(Events.ITERATION_STARTED(once=iteration))
    def _snapshot(engine):
        before["seg"] = [p.clone() for p in net.segmentation_parameters()]
        before["conf"] = [p.clone() for p in net.confidence_parameters()]
        before["teacher"] = [p.clone() for p in trainer.ema.parameters()]

    trainer.run()
    out = trainer.state.output

    def moved(a, b):
        return any(not torch.equal(x, y) for x, y in zip(a, b))

    assert trainer.state.iteration == iteration
    assert moved(before["seg"], net.segmentation_parameters())
    assert moved(before["conf"], net.confidence_parameters()) == (phase != "semi")
    assert moved(before["teacher"], trainer.ema.parameters()) == (phase != "warmup")
    assert math.isfinite(float(out["loss"].detach()))
    assert (out["loss_consistency"] > 0) == (phase != "warmup")
    assert (out["consistency_weight"] > 0) == (phase != "warmup")
    if phase == "semi":  # first iteration after the warm-up: the teacher copies the student (decay 0)
        assert all(torch.equal(t, s) for t, s in zip(trainer.ema.parameters(), net.parameters()))
    if phase == "confidence":  # the re-trained confidence branch is the teacher's, not averaged into it
        teacher = trainer.ema.module
        assert all(torch.equal(t, s) for t, s in zip(teacher.confidence_parameters(), net.confidence_parameters()))
        assert moved(teacher.segmentation_parameters(), net.segmentation_parameters())  # averaged


@pytest.mark.parametrize("enabled", [True, False])
def test_confidence_reset_at_each_window_start(trainer_mod, losses, networks, enabled):
    """``ConfidenceResetHandler`` re-initialises the student's confidence branch (weights and batch-norm statistics)
    and drops its momentum at the first iteration of each re-training window only, leaving the segmentation and its
    optimiser state alone; disabled, it does nothing."""
    from ignite.engine import Events

    # 6 iterations: warm-up (1), window (2), semi (3), window (4, 5), semi (6)
    trainer, net = _make_trainer(trainer_mod, losses, networks, max_epochs=6, warmup=1 / 6,
                                 confidence_interval=3 / 6, confidence_length=2 / 6, decollate=False)
    handler = trainer_mod.ConfidenceResetHandler(trainer.schedule, enabled=enabled)
    starts = [handler.window_starts(_progress(n, 6)) for n in range(1, 7)]
    assert starts == [False, True, False, True, False, False]
    handler.attach(trainer)
    norm = net.confidence_out.conv_block.adn.N
    ended, started = {}, {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _end(engine):
        ended[engine.state.iteration] = ([p.clone() for p in net.confidence_parameters()],
                                         [p.clone() for p in net.segmentation_parameters()])

    @trainer.on(Events.ITERATION_STARTED)  # after the handler, attached first
    def _start(engine):
        i = engine.state.iteration
        optimizer = engine.optimizer
        started[i] = ([p.clone() for p in net.confidence_parameters()],
                      [p.clone() for p in net.segmentation_parameters()],
                      sum(p in optimizer.state for p in net.confidence_parameters()),
                      sum(p in optimizer.state for p in net.segmentation_parameters()),
                      norm.running_mean.clone(), norm.running_var.clone())

    trainer.run()
    for i in range(2, 7):
        confidence, segmentation, confidence_state, segmentation_state, mean, var = started[i]
        reset = enabled and starts[i - 1]
        assert all(torch.equal(a, b) for a, b in zip(segmentation, ended[i - 1][1]))
        assert any(not torch.equal(a, b) for a, b in zip(confidence, ended[i - 1][0])) == reset
        assert segmentation_state > 0
        if reset:  # as at construction: no momentum, batch-norm statistics 0 / 1
            assert confidence_state == 0
            assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(var, torch.ones_like(var))
        elif i > 2:  # trained in the warm-up and the first window: momentum kept
            assert confidence_state > 0


@pytest.mark.parametrize("separate", [True, False])
def test_student_sees_labelled_patches_as_in_supervised_training(trainer_mod, losses, networks, separate):
    """After the warm-up the student's labelled pass is the supervised one (clean input, batch statistics and running
    statistics of the labelled patches alone), the noised unlabelled patches leave the running statistics alone,
    and the teacher and the consistency see the unlabelled patches only; the authors' single pass
    (``separate_norm_statistics=False``) noises both and mixes their statistics."""
    trainer, net = _make_trainer(trainer_mod, losses, networks, separate_norm_statistics=separate)
    net.train()
    for m in net.modules():  # no dropout: two passes over the same input give the same output
        if isinstance(m, torch.nn.Dropout3d | torch.nn.Dropout):
            m.p = 0.0
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    image = torch.rand(2, 1, 16, 16, 16)
    unlabelled = {"image": torch.rand(2, 1, 16, 16, 16) + 2.0}  # other statistics than the labelled patches
    semi = _progress(10, 10)
    assert trainer.schedule.phase(semi) != "warmup"

    def running():
        return [m.running_mean.clone() for m in norms]

    start = running()
    labelled, unlabelled_out = trainer.run_student(image, unlabelled, None, semi)
    after_student = running()
    for m, mean in zip(norms, start):
        m.running_mean.copy_(mean)
    reference = trainer.inferer(image, net)  # what a supervised iteration computes
    supervised = running()
    teacher = trainer.run_teacher(image, None, unlabelled, semi)
    if separate:
        assert torch.equal(labelled[0], reference[0]) and torch.equal(labelled[1], reference[1])
        assert all(torch.equal(a, b) for a, b in zip(after_student, supervised))
        assert teacher["seg"].shape[0] == unlabelled_out[0].shape[0] == 2
    else:
        assert not torch.allclose(labelled[0], reference[0])
        assert not all(torch.equal(a, b) for a, b in zip(after_student, supervised))
        assert teacher["seg"].shape[0] == 4
    label = (image > 0.6).long()
    terms = trainer.loss_function(labelled, label, unlabelled_out, teacher, semi)
    # the consistency is the masked loss over exactly the rows the teacher saw
    student = unlabelled_out[0] if separate else torch.cat([labelled[0], unlabelled_out[0]])
    expected = trainer.loss_function.consistency_loss(student, teacher["seg"], teacher["confidence"])
    assert torch.allclose(terms["loss_consistency"], expected)
