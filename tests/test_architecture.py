"""A checkpoint carries its architecture: training writes ``network.json`` beside the weights, ``inference.json``
builds the matching network from it without an overlay, and a checkpoint that still does not fit gets an error
that names the checkpoint, the argument and the fix (``scripts/architecture.py``, the same in both bundles)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

import batch_infer
from batch_infer import BatchOptions
from bundle_imports import use_bundle
from conftest import BUNDLES, cpu_demo_checkpoint

CT, LIVER = "ceds_mediastinum", "cdugjl_liver"
# the config path of each bundle's handler that loads models/model.pt for inference
INFERENCE_LOADER = {CT: "checkpointloader", LIVER: "handlers#0"}


def _parser(bundle: str, files: list[str], **pairs) -> ConfigParser:
    use_bundle(bundle)
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f) for f in files])
    parser["bundle_root"] = str(BUNDLES / bundle)
    for key, value in pairs.items():
        parser[key] = value
    return parser


def _train_run(bundle: str, models) -> dict:
    return cpu_demo_checkpoint(BUNDLES / bundle, models)


@pytest.mark.parametrize("bundle", [CT, LIVER])
def test_checkpoint_builds_its_own_network_without_an_overlay(bundle, tmp_path):
    models = tmp_path / "models"
    recorded = _train_run(bundle, models)
    demo = json.loads((BUNDLES / bundle / "configs" / "cpu_demo.json").read_text())
    assert recorded["channels"] == demo["channels"] and recorded["pixdim"] == demo["pixdim"]
    parser = _parser(bundle, ["inference.json"], checkpoint=str(models / "model.pt"))
    assert parser.get_parsed_content("channels") == demo["channels"]  # not the paper widths of inference.json
    assert parser.get_parsed_content("pixdim") == demo["pixdim"]
    network = parser.get_parsed_content("network_def")
    loader = parser.get_parsed_content(INFERENCE_LOADER[bundle])
    loader(Engine(lambda engine, batch: None))  # raises on any missing or mis-shaped weight
    saved = torch.load(models / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in network.state_dict().items())


@pytest.mark.parametrize("bundle", [CT, LIVER])
def test_without_a_record_the_error_names_checkpoint_weight_and_overlay(bundle, tmp_path):
    models = tmp_path / "models"
    _train_run(bundle, models)
    (models / "network.json").unlink()
    parser = _parser(bundle, ["inference.json"], checkpoint=str(models / "model.pt"))
    loader = parser.get_parsed_content(INFERENCE_LOADER[bundle])
    with pytest.raises(ValueError) as error:
        loader(Engine(lambda engine, batch: None))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{models / 'model.pt'} does not fit the network: no network.json beside it")
    assert "channels=[64, 128" in message or "channels=[16, 32" in message  # the paper widths the config built
    assert "weights differ in shape, first " in message and "configs/cpu_demo.json" in message


@pytest.mark.parametrize("bundle", [CT, LIVER])
def test_an_override_against_the_record_is_named(bundle, tmp_path):
    models = tmp_path / "models"
    recorded = _train_run(bundle, models)
    wide = [2 * c for c in recorded["channels"]]
    parser = _parser(bundle, ["inference.json"], checkpoint=str(models / "model.pt"), channels=wide)
    expected = f"channels: trained with {recorded['channels']}, the config builds {wide}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        parser.get_parsed_content(INFERENCE_LOADER[bundle])(Engine(lambda engine, batch: None))


def test_batch_infer_reports_the_explanation_not_torchs_first_line(ct_data, tmp_path):
    """The README's batch inference with quick-start-like weights and no overlay: before, the only message was
    "Error(s) in loading state_dict for CEDSNet:"; now it says what to do (no case is started)."""
    models = tmp_path / "models"
    _train_run(CT, models)
    (models / "network.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(batch_infer.WorkflowError, match="does not fit the network: .* Fix: pass the overlay"):
        batch_infer.run_batch(str(BUNDLES / CT), str(ct_data / "datalist_100.json"), str(out),
                              BatchOptions(str(models / "model.pt"), device="cpu", progress=False))
    assert not out.exists() or not [p for p in out.iterdir() if p.is_dir()]
