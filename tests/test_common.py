"""The modules both bundles ship (``scripts/architecture.py``, tested in ``test_architecture.py``,
``scripts/case_meta.py``, ``scripts/dicom_series.py`` (tested in ``test_dicom.py``), ``scripts/mean_teacher.py``,
``scripts/modality.py`` (tested in ``test_input_checks.py``), ``scripts/semi_supervised.py``,
``scripts/surface_metrics.py`` and ``scripts/datalist.py``, tested in ``test_undefined_distances.py`` and
``test_liver_data.py``): identical copies, and what each piece does."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLES, bundle_module

BUNDLE_NAMES = ("cdugjl_liver", "ceds_mediastinum")
COMMON = ("architecture.py", "case_meta.py", "datalist.py", "dicom_seg.py", "dicom_series.py", "mean_teacher.py",
          "modality.py", "semi_supervised.py", "surface_metrics.py")


@pytest.mark.parametrize("name", COMMON)
def test_copies_are_identical(name):
    liver, ct = (BUNDLES / b / "scripts" / name for b in BUNDLE_NAMES)
    assert liver.read_bytes() == ct.read_bytes(), f"{liver} and {ct} differ: change both (a bundle ships alone)"


@pytest.fixture(params=BUNDLE_NAMES)
def case_meta(request):
    return bundle_module(request.param, "case_meta")


def test_case_name(case_meta):
    name = case_meta.case_name
    assert name(["/a/liver_001_t2w.nii.gz", "/a/liver_001_dwi.nii.gz"], ("_t2w", "_dwi")) == "liver_001"
    assert name("/a/liver_001_dwi.NII.GZ", ("_t2w", "_dwi")) == "liver_001"
    assert name("MR1234.nii", ("_t2w",)) == "MR1234" and name("_t2w.nii.gz", ("_t2w",)) == "_t2w"
    assert name("ct_007.nii.gz") == "ct_007" and name("ct_007_t2w.nii.gz") == "ct_007_t2w"
    formatter = case_meta.CaseNameFormatter(("_t2w", "_dwi"))
    assert formatter({"filename_or_obj": "/x/liver_002_t2w.nii.gz", "patch_index": None}, None) == {
        "subject": "liver_002", "idx": None}


def test_voxel_spacing(case_meta):
    from monai.data import MetaTensor

    affine = torch.tensor([[0.0, -0.8, 0.0, 5.0], [0.7, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 1.0], [0, 0, 0, 1.0]])
    volume = MetaTensor(torch.zeros(1, 1, 4, 4, 2), affine=affine)  # axes swapped: column lengths, not the diagonal
    assert case_meta.voxel_spacing(volume).tolist() == [[pytest.approx(0.7), pytest.approx(0.8), 5.0]]
    batch = MetaTensor(torch.zeros(2, 1, 4, 4), affine=torch.stack([affine, 2 * affine]))
    batch.is_batch = True
    assert case_meta.voxel_spacing(batch).tolist() == [[pytest.approx(0.7), pytest.approx(0.8)],
                                                       [pytest.approx(1.4), pytest.approx(1.6)]]
    assert case_meta.voxel_spacing(torch.zeros(3, 1, 4, 4)).tolist() == [[1.0, 1.0]] * 3


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
    per_class = mean_teacher.top_fraction_per_class(score, classes, [0.5, 1.0])  # all of class 1
    assert per_class.flatten().tolist() == [0.0] * 4 + [1.0] * 8


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


def test_ema_handler_updates_only_when_asked(mean_teacher):
    net = torch.nn.Linear(2, 2)
    ema = mean_teacher.ema_network(net, decay=0.5)
    handler = mean_teacher.EMAUpdateHandler(ema, net, when=lambda engine: engine == "update")
    handler("skip")
    assert int(ema.n_averaged) == 0
    handler("update")
    assert int(ema.n_averaged) == 1


def test_ema_handler_copies_named_submodules(mean_teacher):
    """``copied`` submodules are the student's after every update; the others are averaged (decay 0.5)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    ema = mean_teacher.ema_network(net, decay=0.5)
    handler = mean_teacher.EMAUpdateHandler(ema, net, copied=["1"])
    handler(None)  # the first update copies everything
    first = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    handler(None)
    for (name, averaged), old, new in zip(ema.module.named_parameters(), first, net.parameters()):
        expected = new if name.startswith("1.") else 0.5 * (old + new)
        torch.testing.assert_close(averaged, expected)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_semi_supervised_trainer_without_unlabelled_data_is_supervised_training(bundle):
    """With no unlabelled stream and no teacher, the shared trainer takes the same steps as MONAI's
    SupervisedTrainer, with and without gradient accumulation; the loss's terms reach ``engine.state.output``."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    semi = bundle_module(bundle, "semi_supervised")
    data = [{"image": torch.randn(4, 3), "label": torch.randn(4, 1)} for _ in range(3)]
    mse = torch.nn.MSELoss()

    def terms(outputs, targets, unlabelled_outputs, teacher, progress):
        assert unlabelled_outputs is None and teacher is None
        loss = mse(outputs, targets)
        return {"loss": loss, "loss_mse": loss.detach(), "progress": torch.tensor(progress.fraction)}

    for accumulation in (1, 2):
        weights, outputs = [], []
        for kind in ("monai", "shared"):
            torch.manual_seed(0)
            net = torch.nn.Linear(3, 1)
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            common = dict(device="cpu", max_epochs=2, train_data_loader=data, network=net, optimizer=opt,
                          decollate=False, accumulation_steps=accumulation)
            if kind == "monai":
                engine = SupervisedTrainer(loss_function=mse, **common)
            else:
                engine = semi.SemiSupervisedTrainer(loss_function=terms, unlabeled=None, **common)
                engine.add_event_handler(
                    Events.ITERATION_COMPLETED,
                    lambda e: outputs.append(e.state.output["progress"]),
                )
            engine.run()
            weights.append(net.weight.detach().clone())
        torch.testing.assert_close(weights[0], weights[1])
        assert outputs == pytest.approx([i / 6 for i in range(6)])


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_gradient_share_handler_measures_each_weighted_term(bundle):
    """``GradientShareHandler`` reports ``w_t |dL_t| / (w_ref |dL_ref|)`` at its interval, before the step: a term
    twice the reference with weight 0.25 (read from the output, as a ramped weight) has share 0.5, a float term 0,
    a missing term nothing; the training step itself is unchanged."""
    from ignite.engine import Events

    semi = bundle_module(bundle, "semi_supervised")
    data = [{"image": torch.randn(4, 3), "label": torch.randn(4, 1)} for _ in range(4)]

    def terms(outputs, targets, unlabelled_outputs, teacher, progress):
        seg = ((outputs - targets) ** 2).mean()
        double = 2.0 * seg
        return {"loss": seg + 0.25 * double, "loss_seg": seg, "loss_double": double, "loss_const": 3.0,
                "double_weight": torch.tensor(0.25)}

    shares, weights = [], []
    for interval in (0, 2):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
        engine = semi.SemiSupervisedTrainer(
            device="cpu", max_epochs=1, train_data_loader=data, network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=terms, decollate=False)
        semi.GradientShareHandler(["loss_double", "loss_const", "loss_missing"], reference="loss_seg",
                                  weights={"loss_double": "double_weight"}, interval=interval).attach(engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: shares.append(
            {k: v for k, v in e.state.output.items() if k.startswith("grad_share")}))
        engine.run()
        weights.append(net.weight.detach().clone())
    assert shares[:4] == [{}] * 4  # interval 0: disabled
    assert shares[4] == {} and shares[6] == {}  # iterations 1 and 3
    for measured in (shares[5], shares[7]):
        assert measured.keys() == {"grad_share_double", "grad_share_const"}
        assert measured["grad_share_double"] == pytest.approx(0.5)
        assert measured["grad_share_const"] == 0.0
    torch.testing.assert_close(weights[0], weights[1])


SHARED_KEYS = {
    "": ["datalist", "dataset_dir", "device", "seed", "epochs", "epoch_length", "val_interval", "checkpoint_interval",
         "batch_size", "unlabeled_batch_size", "num_samples", "roi_size", "pixdim", "channels", "learning_rate",
         "weight_decay", "ema_decay", "consistency_weight", "consistency_rampup", "grad_share_interval", "ckpt_dir",
         "model_dir", "output_dir", "resume", "resume_checkpoint", "network_def", "network", "student_def", "student",
         "ema_network", "seg_loss", "loss_def", "loss", "optimizer", "lr_scheduler", "checkpoint", "train", "validate"],
    "train": ["deterministic_transforms", "random_transforms", "preprocessing", "dataset", "dataloader", "unlabeled",
              "inferer", "loss_terms", "handlers", "checkpoint_saver", "resume_loader", "trainer"],
    "train#unlabeled": ["random_transforms", "preprocessing", "records", "dataset", "stream"],
    "validate": ["preprocessing", "dataset", "dataloader", "inferer", "postprocessing", "handlers", "key_metric",
                 "evaluator"],
}


def test_both_bundles_name_the_same_concepts_alike():
    """One config contract: the keys a maintainer (and MONAI Label, the benchmark tools) reaches for exist under the
    same name in both bundles' ``train.json`` and ``inference.json``; ``loss`` is ``loss_def`` on the device as
    ``network`` is ``network_def`` and ``student`` is ``student_def``; the trainer trains ``student`` (which both
    ``multi_gpu_train.json`` wrap in DDP alike) and the evaluator validates ``network``, the served model."""
    for bundle in ("ceds_mediastinum", "cdugjl_liver"):
        config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
        for section, keys in SHARED_KEYS.items():
            node = config
            for part in filter(None, section.split("#")):
                node = node[part]
            missing = [k for k in keys if k not in node]
            assert not missing, f"{bundle}: {section or 'top level'} lacks {missing}"
        assert config["loss"] == "$@loss_def.to(@device)", bundle
        assert config["network"].startswith("$@network_def.to(@device"), bundle
        assert config["student"] == "$@student_def.to(@device)", bundle
        assert config["train"]["trainer"]["network"] == "@student", bundle
        assert config["validate"]["evaluator"]["network"] == "@network", bundle
        inference = json.loads((BUNDLES / bundle / "configs" / "inference.json").read_text())
        shared = ("network_def", "network", "preprocessing", "inferer", "postprocessing", "evaluator", "output_dir",
                  "modality_suffixes", "output_postfix", "sw_batch_size", "num_workers")
        assert not [k for k in shared if k not in inference], bundle
        assert inference["output_postfix"] == "seg", bundle
    ddp = [json.loads((BUNDLES / b / "configs" / "multi_gpu_train.json").read_text())["student"]
           for b in ("ceds_mediastinum", "cdugjl_liver")]
    assert ddp[0] == ddp[1] and ddp[0]["_target_"].endswith("DistributedDataParallel"), "one DDP strategy"


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
@pytest.mark.parametrize("config", ("train.json", "inference.json"))
def test_data_loader_workers_fit_the_machine(bundle, config):
    # PyTorch warns when a DataLoader asks for more workers than the machine has cores; one core stays with the
    # main process
    parser = ConfigParser()
    parser.read_config(BUNDLES / bundle / "configs" / config)
    workers = parser.get_parsed_content("num_workers")
    assert workers == 0 or 0 < workers <= (os.cpu_count() or 1) - 1
