"""MEAMT-Net, the fixed edge branch, slice-wise inference and the multi-task loss of the liver bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bundle_module
from monai.data import MetaTensor

BUNDLE = "cdugjl_liver"
SMALL = (8, 16, 16, 32, 32)


@pytest.fixture(scope="module")
def nets():
    return bundle_module(BUNDLE, "networks")


@pytest.fixture(scope="module")
def edge():
    return bundle_module(BUNDLE, "edge")


def test_network_2d_train_and_eval(nets):
    torch.manual_seed(0)
    net = nets.MEAMTNet(in_channels=2, channels=SMALL)
    x = torch.rand(2, 2, 32, 48)
    out = net.train()(x)
    assert isinstance(out, dict)
    assert out["alpha"].shape == (2, 2, 32, 48) and (out["alpha"] >= 1).all()
    assert out["quant"].shape == (2, 3, 4)
    assert [f.shape[1:] for f in out["features"]] == [
        (8, 32, 48), (16, 16, 24), (16, 8, 12), (32, 4, 6), (32, 2, 3)
    ]
    assert [a.shape[1:] for a in out["attention"]] == [(16, 16, 24), (16, 8, 12), (32, 4, 6)]
    assert [e.shape[1:] for e in out["edges"]] == [(1, 16, 24), (1, 8, 12), (1, 4, 6)]
    out["alpha"].mean().backward()
    with torch.no_grad():
        pred = net.eval()(x)
    assert isinstance(pred, torch.Tensor) and pred.shape == (2, 2, 32, 48)
    assert torch.allclose(pred, net.forward_all(x)["alpha"])


def test_network_3d_with_h8_mamba(nets):
    net = nets.MEAMTNet(spatial_dims=3, in_channels=3, channels=(4, 8, 8, 8, 8), mamba_at_h8=True, quant_pool=2)
    with torch.no_grad():
        pred = net.eval()(torch.rand(1, 3, 32, 32, 16))
    assert pred.shape == (1, 2, 32, 32, 16)


def test_network_state_dict_has_no_edge_kernels(nets):
    net = nets.MEAMTNet(channels=SMALL)
    assert not [k for k in net.state_dict() if "edge_filter" in k]
    assert {type(m).__name__ for m in net.modules()} >= {"MambaLayer", "EdgeGuidedAttention", "EdgeFilter"}


@pytest.mark.parametrize("kind", ["sobel", "laplacian"])
def test_edge_filter_is_fixed_and_finds_a_step(edge, kind):
    filt = edge.EdgeFilter(2, 2, kind)
    assert list(filt.parameters()) == [] and not filt.weight.requires_grad
    x = torch.zeros(1, 2, 8, 8)
    x[:, :, :, 4:] = 1.0  # a vertical step between columns 3 and 4
    response = filt(x)
    assert response.shape == x.shape
    columns = response[0, 0].mean(0)
    assert torch.allclose(columns[[0, 1, 2, 5, 6, 7]], torch.zeros(6), atol=1e-2)
    expected = 4.0 if kind == "sobel" else 1.0  # Sobel: 1 + 2 + 1; Laplacian: one neighbour differs
    assert torch.allclose(columns[[3, 4]], torch.full((2,), expected), atol=1e-2)
    # both channels filtered independently (depthwise)
    x[:, 1] = 0
    assert filt(x)[0, 1].abs().max() < 1e-2


def test_edge_filter_3d(edge):
    x = torch.zeros(1, 1, 6, 6, 6)
    x[..., 3:] = 1.0
    response = edge.EdgeFilter(3, 1, "sobel")(x)[0, 0, 3, 3]
    assert response[2].item() == pytest.approx(16.0, abs=1e-2) and response[0].item() == pytest.approx(0, abs=1e-2)


def test_edge_guided_attention_shapes(edge):
    att = edge.EdgeGuidedAttention(2, 4)
    out, gate, logits = att(torch.rand(2, 4, 8, 8))
    assert out.shape == gate.shape == (2, 4, 8, 8) and logits.shape == (2, 1, 8, 8)
    assert ((gate > 0) & (gate < 1)).all()


def test_boundary_map(edge):
    label = torch.zeros(1, 1, 9, 9)
    label[..., 2:7, 2:7] = 1
    boundary = edge.boundary_map(label)
    assert boundary.sum().item() == 16  # the 5 x 5 square minus its 3 x 3 interior
    assert boundary[0, 0, 4, 4] == 0 and boundary[0, 0, 2, 4] == 1


class _ConstantQuantNet(torch.nn.Module):
    """A stand-in 2D network: alpha copies the input's first channel, quant is a fixed NIG in FOV units."""

    def __init__(self, nig):
        super().__init__()
        self.nig = torch.tensor(nig)

    def forward_all(self, x):
        assert x.shape[2] % 16 == 0 and x.shape[3] % 16 == 0
        alpha = torch.cat([x[:, :1] + 1, x[:, :1] + 2], dim=1)
        return {"alpha": alpha, "quant": self.nig.expand(x.shape[0], 3, 4)}


def test_slice_inferer_physical_units():
    inferers = bundle_module(BUNDLE, "inferers")
    nig = [[0.5, 2.0, 3.0, 0.01], [0.25, 2.0, 3.0, 0.01], [0.1, 2.0, 3.0, 0.001]]
    affine = torch.tensor(np.diag([0.8, 1.2, 5.0, 1.0]))
    volume = MetaTensor(torch.rand(1, 2, 40, 30, 5), affine=affine[None])
    volume.is_batch = True
    out = inferers.SliceQuantInferer(spatial_dim=2, sw_batch_size=2)(volume, _ConstantQuantNet(nig))
    assert out.shape == (1, 2, 40, 30, 5)
    assert torch.allclose(out.as_tensor()[0, 0], volume.as_tensor()[0, 0] + 1)  # cropped back exactly
    quant = out.meta["quant"]
    assert quant.shape == (1, 5, 3, 4)
    # padded to 48 x 32 (4 + 4 rows, 1 + 1 columns): centre = fraction * padded extent - leading pad
    gx, gy, area = quant[0, 0, :, 0].tolist()
    assert gx == pytest.approx(0.5 * 48 * 0.8 - 4 * 0.8)
    assert gy == pytest.approx(0.25 * 32 * 1.2 - 1 * 1.2)
    assert area == pytest.approx(0.1 * 48 * 0.8 * 32 * 1.2)
    assert quant[0, 0, 0, 3].item() == pytest.approx(0.01 * (48 * 0.8) ** 2)  # beta scales with the square
    post = inferers.ExtractQuantificationd("pred")({"pred": out[0]})
    assert post["quant"].shape == (5, 3, 4)


class _InputRecorder(_ConstantQuantNet):
    def forward_all(self, x):
        self.seen = x
        return super().forward_all(x)


def test_slice_inferer_pads_with_the_border_not_the_mean():
    """The padding repeats the slice's border (air), not zeros (the mean intensity of a normalised image)."""
    inferers = bundle_module(BUNDLE, "inferers")
    volume = torch.full((1, 1, 40, 30, 1), -2.0)  # a normalised slice whose border is dark air
    volume[:, :, 10:30, 10:20] = 1.0
    net = _InputRecorder([[0.5, 2.0, 3.0, 0.01]] * 3)
    inferers.SliceQuantInferer()(volume, net)
    assert net.seen.shape[2:] == (48, 32)
    assert (net.seen == -2.0).sum() == (net.seen < 0).sum() == 48 * 32 - 20 * 10  # no zero frame
    inferers.SliceQuantInferer(padding_mode="constant")(volume, net)
    assert (net.seen == 0).sum() == 48 * 32 - 40 * 30


def test_multitask_loss_and_prepare_batch():
    trainer = bundle_module(BUNDLE, "trainer")
    nets = bundle_module(BUNDLE, "networks")
    net = nets.MEAMTNet(channels=SMALL).train()
    image = MetaTensor(torch.rand(2, 2, 32, 32), affine=torch.tensor(np.diag([1.5, 1.5, 1.0]))[None].repeat(2, 1, 1))
    image.is_batch = True
    label = torch.zeros(2, 1, 32, 32)
    label[0, :, 10:20, 12:18] = 1
    batch = {
        "image": image,
        "label": label,
        "quant": torch.tensor([[22.5, 22.5, 90.0], [0.0, 0.0, 0.0]]),
        "quant_mask": torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]),
    }
    inputs, targets = trainer.MultiTaskPrepareBatch()(batch, "cpu")
    assert torch.allclose(targets["spacing"], torch.full((2, 2), 1.5))
    losses = bundle_module(BUNDLE, "losses")
    loss_fn = losses.MultiTaskLoss(quant_weight=0.5, edge_weight=0.2)
    terms = loss_fn.supervised_terms(net(inputs), targets, 1.0)
    assert set(terms) == {"seg", "quant", "edge"}
    result = loss_fn(net(inputs), targets)
    assert set(result) == {"loss", "loss_seg", "loss_quant", "loss_edge"}
    result["loss"].backward()
    assert torch.isfinite(result["loss"])
    assert set(losses.MultiTaskLoss(edge_weight=0.0).supervised_terms(net(inputs), targets, 1.0)) == {"seg", "quant"}


def test_quantification_error_metric():
    metrics = bundle_module(BUNDLE, "metrics")
    label = torch.zeros(1, 10, 10, 3)
    label[0, 2:4, 4:8, 1] = 1  # slice 1: 2 x 4 pixels, centre index (2.5, 5.5)
    label = MetaTensor(label, affine=torch.tensor(np.diag([2.0, 0.5, 4.0, 1.0])))
    quant = torch.zeros(3, 3, 4)
    quant[1, :, 0] = torch.tensor([2.5 * 2.0 + 3.0, 5.5 * 0.5 + 4.0, 8 * 1.0 + 10.0])
    centre = metrics.QuantificationErrorMetric("centre")
    centre([quant], [label])
    assert centre.aggregate().item() == pytest.approx(5.0)
    area = metrics.QuantificationErrorMetric("area")
    area([quant], [label])
    assert area.aggregate().item() == pytest.approx(10.0)

