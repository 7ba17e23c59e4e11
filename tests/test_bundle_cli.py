"""Both bundles against the MONAI bundle CLI, the way the model-zoo CI and users drive it.

Every command runs in a fresh subprocess from a working directory outside the bundle (``tmp_path``):
``verify_metadata`` against the 20240725 schema, ``verify_net_in_out``, ``ckpt_export`` (TorchScript) and
``onnx_export``; the exported networks are reloaded and compared with the eager PyTorch network on the same input.

``verify_net_in_out``, ``ckpt_export`` and ``onnx_export`` build ``network_def`` without running the config's
``initialize`` (which puts ``bundle_root`` on ``sys.path``), and ``--bundle_root`` alone does not make the bundle's
``scripts`` package importable (``ModuleNotFoundError: Cannot locate class or function path:
'scripts.networks...'``). They are therefore run with ``PYTHONPATH=<bundle root>``, as the model-zoo CI does.

The exports use a random initialisation of ``network_def`` at the ``cpu_demo.json`` widths, saved as
``models/model.pt`` in a copy of the bundle. ``cdugjl_liver``'s network is not scriptable (its Mamba layers), so it is
exported with ``--use_trace True --input_shape [1, 2, H, W]``; the trace runs the pure-PyTorch selective scan (the
CPU path, no ``mamba_ssm``) and is valid at the traced spatial size only (batch size may vary).

Tolerances (|exported - eager| <= atol + rtol * |eager|, element-wise): TorchScript atol = rtol = 1e-5;
onnxruntime (CPUExecutionProvider) atol = rtol = 1e-4.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLES, SCHEMA_MD5, meta_schema, run_cmd

BUNDLE_NAMES = ["ceds_mediastinum", "cdugjl_liver"]
TS_TOL = {"atol": 1e-5, "rtol": 1e-5}
ONNX_TOL = {"atol": 1e-4, "rtol": 1e-4}
# networks that torch.jit.script cannot compile: exported by tracing at a fixed input shape
TRACED = {"cdugjl_liver"}
# networks with Mamba layers, exported through the pure-PyTorch selective scan
MAMBA = {"cdugjl_liver"}

# Builds network_def from the configs, loads models/model.pt, and writes the eager, TorchScript and onnxruntime
# outputs for one seeded input (and the eager and TorchScript outputs for a batch of two) to an .npz file, with the
# number of Mamba modules in the network and whether mamba_ssm got imported.
COMPARE = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from monai.bundle import ConfigParser
    from monai.data import load_net_with_metadata

    bundle, shape, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    parser = ConfigParser()
    parser.read_config([f"{bundle}/configs/inference.json", f"{bundle}/configs/cpu_demo.json"])
    parser["bundle_root"] = bundle
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(f"{bundle}/models/model.pt", weights_only=True))
    net.eval()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    x2 = torch.rand([2, *shape[1:]], generator=torch.Generator().manual_seed(2))
    res = {}
    with torch.no_grad():
        res["eager"], res["eager_b2"] = net(x).numpy(), net(x2).numpy()
        if "ts" in sys.argv[4:]:
            extra_files = ["inference.json", "cpu_demo.json"]
            ts, meta, extra = load_net_with_metadata(f"{bundle}/models/model.ts", more_extra_files=extra_files)
            res["ts"], res["ts_b2"] = ts(x).numpy(), ts(x2).numpy()
            res["ts_meta"] = np.array(json.dumps({"version": meta.get("version"), "extra": sorted(extra)}))
    if "onnx" in sys.argv[4:]:
        import onnxruntime
        session = onnxruntime.InferenceSession(f"{bundle}/models/model.onnx", providers=["CPUExecutionProvider"])
        res["onnx"] = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    res["mamba_layers"] = np.array(sum("Mamba" in type(m).__name__ for m in net.modules()))
    res["mamba_ssm_imported"] = np.array("mamba_ssm" in sys.modules)
    np.savez(out, **res)
    """
)

# A random initialisation of network_def at the cpu_demo.json widths, saved as the bundle's models/model.pt.
INIT_WEIGHTS = textwrap.dedent(
    """
    import sys, torch
    from monai.bundle import ConfigParser

    bundle = sys.argv[1]
    parser = ConfigParser()
    parser.read_config([f"{bundle}/configs/inference.json", f"{bundle}/configs/cpu_demo.json"])
    parser["bundle_root"] = bundle
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), f"{bundle}/models/model.pt")
    """
)


def copy_bundle(name: str, dest: Path) -> Path:
    """Copy ``bundles/<name>`` to ``dest/<name>`` without run outputs, checkpoints and caches."""
    target = dest / name
    shutil.copytree(BUNDLES / name, target, ignore=shutil.ignore_patterns("__pycache__", "eval", "models"))
    (target / "models").mkdir()
    return target


def input_shape(bundle: Path) -> list[int]:
    """``[1, C, *patch]``: channels from the metadata, spatial size from ``cpu_demo.json``."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    demo = json.loads((bundle / "configs" / "cpu_demo.json").read_text())
    return [1, meta["network_data_format"]["inputs"]["image"]["num_channels"], *demo["roi_size"]]


def bundle_cli(command: str, bundle: Path, *args: str, cwd: Path, cpu_demo: bool = True):
    """``python -m monai.bundle <command> network_def`` on ``bundle`` with ``PYTHONPATH=<bundle>``, from ``cwd``."""
    configs = [str(bundle / "configs" / "inference.json")]
    if cpu_demo:
        configs.append(str(bundle / "configs" / "cpu_demo.json"))
    cmd = [sys.executable, "-m", "monai.bundle", command, "network_def", "--meta_file",
           str(bundle / "configs" / "metadata.json"), "--config_file", repr(configs), "--bundle_root", str(bundle)]
    return run_cmd([*cmd, *args], cwd=cwd, timeout=300, env={"PYTHONPATH": str(bundle), "OMP_NUM_THREADS": "2"})


def compare(bundle: Path, shape: list[int], cwd: Path, *formats: str) -> dict:
    """Run :data:`COMPARE` in a subprocess and return its arrays."""
    out = cwd / "outputs.npz"
    run_cmd([sys.executable, "-c", COMPARE, str(bundle), json.dumps(shape), str(out), *formats], cwd=cwd,
            timeout=300, env={"PYTHONPATH": str(bundle), "OMP_NUM_THREADS": "2"})
    with np.load(out) as data:
        return dict(data)


@pytest.fixture(scope="module", params=BUNDLE_NAMES)
def bundle_with_weights(request, tmp_path_factory) -> Path:
    """A copy of the bundle whose ``models/model.pt`` is a seeded random ``network_def`` at cpu_demo widths."""
    work = tmp_path_factory.mktemp(f"cli_{request.param}")
    bundle = copy_bundle(request.param, work)
    run_cmd([sys.executable, "-c", INIT_WEIGHTS, str(bundle)], cwd=work, timeout=300, env={"PYTHONPATH": str(bundle)})
    return bundle


@pytest.mark.integration
@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_verify_metadata(name, tmp_path):
    """``verify_metadata`` against the local copy of the 20240725 schema (md5-checked, so nothing is downloaded)."""
    proc = run_cmd([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
                    str(BUNDLES / name / "configs" / "metadata.json"), "--filepath", str(meta_schema()),
                    "--hash_val", SCHEMA_MD5], cwd=tmp_path, timeout=120)
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_verify_net_in_out(name, tmp_path):
    """``verify_net_in_out`` on the shipped ``inference.json`` (default widths), input size 32 per axis (``--n 2``)."""
    proc = bundle_cli("verify_net_in_out", BUNDLES / name, "--n", "2", "--device", "cpu", cwd=tmp_path,
                      cpu_demo=False)
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


@pytest.mark.integration
def test_ckpt_export_torchscript(bundle_with_weights, tmp_path):
    """``ckpt_export`` with the default paths under ``--bundle_root`` (models/model.pt -> models/model.ts).

    The TorchScript module, reloaded with its embedded metadata, must match the eager network within
    atol = rtol = 1e-5 at batch sizes 1 and 2. ``cdugjl_liver`` is traced (``--use_trace True --input_shape``).
    """
    bundle, shape = bundle_with_weights, input_shape(bundle_with_weights)
    trace = ["--use_trace", "True", "--input_shape", json.dumps(shape)] if bundle.name in TRACED else []
    bundle_cli("ckpt_export", bundle, *trace, cwd=tmp_path)
    assert (bundle / "models" / "model.ts").is_file()

    res = compare(bundle, shape, tmp_path, "ts")
    assert res["eager"].shape == res["ts"].shape
    np.testing.assert_allclose(res["ts"], res["eager"], **TS_TOL)
    np.testing.assert_allclose(res["ts_b2"], res["eager_b2"], **TS_TOL)
    assert not res["mamba_ssm_imported"], "the CPU path must not import mamba_ssm"
    if bundle.name in MAMBA:
        assert res["mamba_layers"] > 0, "the exported network must contain its Mamba layers"
    meta = json.loads(str(res["ts_meta"]))
    assert meta["version"] == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert {"inference.json", "cpu_demo.json"} <= set(meta["extra"])


@pytest.mark.integration
def test_onnx_export_onnxruntime(bundle_with_weights, tmp_path):
    """``onnx_export`` (torch.onnx, fixed input shape); onnxruntime matches eager within atol = rtol = 1e-4."""
    bundle, shape = bundle_with_weights, input_shape(bundle_with_weights)
    onnx_file = bundle / "models" / "model.onnx"
    bundle_cli("onnx_export", bundle, "--filepath", str(onnx_file), "--ckpt_file", str(bundle / "models" / "model.pt"),
               "--input_shape", json.dumps(shape), cwd=tmp_path)
    assert onnx_file.is_file()

    res = compare(bundle, shape, tmp_path, "onnx")
    assert res["eager"].shape == res["onnx"].shape
    np.testing.assert_allclose(res["onnx"], res["eager"], **ONNX_TOL)
    assert not res["mamba_ssm_imported"], "the CPU path must not import mamba_ssm"
    if bundle.name in MAMBA:
        assert res["mamba_layers"] > 0, "the exported network must contain its Mamba layers"
