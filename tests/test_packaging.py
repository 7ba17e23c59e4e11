"""Release zips (``scripts/package_bundle.py``) and the model-zoo download route back to a working bundle.

The integration test builds a bundle's zip with the packaging CLI, serves it from ``python -m http.server`` bound
to 127.0.0.1, downloads and unpacks it with ``python -m monai.bundle download --name <bundle> --url ...`` into a
fresh folder, checks ``ConfigWorkflow(inference.json).check_properties() == []`` there in a fresh process (and in
the unpacked zip without weights), and runs inference on one phantom case with the packaged weights.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import nibabel as nib
import pytest

import package_bundle
from conftest import BUNDLES, REPO, run_cmd

DATA = {"ceds_mediastinum": "ct_data", "cdugjl_liver": "liver_data"}
NO_PROXY = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

# A random initialisation of network_def at the cpu_demo.json widths, saved as the bundle's models/model.pt.
INIT_WEIGHTS = textwrap.dedent(
    """
    import sys, torch
    from monai.bundle import ConfigParser

    bundle = sys.argv[1]
    sys.path.insert(0, bundle)
    parser = ConfigParser()
    parser.read_config([f"{bundle}/configs/inference.json", f"{bundle}/configs/cpu_demo.json"])
    parser["bundle_root"] = bundle
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), f"{bundle}/models/model.pt")
    """
)

# check_properties() of inference.json for each "<bundle root>=<with weights: 0|1>" given, after initialize(), with
# the JSON overrides of argv[1] (the dataset), one bundle after another as MONAI Label loads them: the previous
# bundle's `scripts` package is unloaded first. A bundle without weights is initialised with its "load_pretrain"
# switch off where it has one (model-zoo convention); one with weights gets the cpu_demo.json overlay its weights
# were made with. Prints one JSON list of the missing properties per bundle.
CHECK_PROPERTIES = textwrap.dedent(
    """
    import json, sys
    from monai.bundle import ConfigParser, ConfigWorkflow

    missing, dataset = [], json.loads(sys.argv[1])
    for arg in sys.argv[2:]:
        root, weights = arg.rsplit("=", 1)
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
        configs, override = [f"{root}/configs/inference.json"], dict(dataset)
        if weights == "1":
            configs.append(f"{root}/configs/cpu_demo.json")
        elif "load_pretrain" in ConfigParser.load_config_file(configs[0]):
            override["load_pretrain"] = False
        workflow = ConfigWorkflow(
            config_file=configs, meta_file=f"{root}/configs/metadata.json", logging_file=f"{root}/configs/logging.conf",
            workflow_type="infer", bundle_root=root, **override,
        )
        workflow.initialize()
        missing.append(workflow.check_properties())
        while root in sys.path:
            sys.path.remove(root)
    print("MISSING=" + json.dumps(missing))
    """
)


def zip_names(path: str) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def version_of(bundle: Path) -> str:
    return json.loads((bundle / "configs" / "metadata.json").read_text())["version"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def http_server(tmp_path):
    """Serve ``tmp_path / 'dist'`` on 127.0.0.1; yields ``(folder, base url)``, stops the server afterwards."""
    folder = tmp_path / "dist"
    folder.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("http.server did not start")
                time.sleep(0.2)
        yield folder, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("name", sorted(DATA))
def test_zip_layout(name, tmp_path):
    """Model-zoo layout, ``<name>_v<version>.zip``, no caches/run outputs/extra checkpoints, reproducible bytes."""
    bundle = tmp_path / "src" / name
    shutil.copytree(BUNDLES / name, bundle, ignore=shutil.ignore_patterns("__pycache__", "eval", "models"))
    for junk in ("eval/events.out.tfevents.1", "scripts/__pycache__/networks.cpython-311.pyc",
                 "models/checkpoint.pt", "models/model_best.pt", "configs/monailabel_train.json", "models/model.ts"):
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_bytes(b"junk")

    bare = package_bundle.package_bundle(str(bundle), out_dir=str(tmp_path / "bare"), weights=True)
    assert Path(bare).name == f"{name}_v{version_of(bundle)}.zip"
    names = zip_names(bare)
    assert all(n.startswith(f"{name}/") for n in names)
    for required in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                     "configs/logging.conf", "configs/cpu_demo.json", "scripts/__init__.py", "docs/README.md"):
        assert f"{name}/{required}" in names, required
    assert f"{name}/models/" in names
    generated = (".pyc", "monailabel_train.json")
    assert not [n for n in names if "__pycache__" in n or "/eval/" in n or n.endswith(generated)]
    assert not [n for n in names if n.startswith(f"{name}/models/") and n != f"{name}/models/"], "no weights yet"

    (bundle / "models" / "model.pt").write_bytes(b"weights")
    with_weights = package_bundle.package_bundle(str(bundle), out_dir=str(tmp_path / "w"), weights=True)
    without = package_bundle.package_bundle(str(bundle), out_dir=str(tmp_path / "nw"), weights=False)
    assert [n for n in zip_names(with_weights) if n.startswith(f"{name}/models/")] == [
        f"{name}/models/", f"{name}/models/model.pt"]
    assert zip_names(without) == names
    assert Path(without).read_bytes() == Path(bare).read_bytes(), "same bundle, same bytes"


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(DATA))
def test_download_check_properties_and_infer(name, request, tmp_path, http_server):
    """Package (CLI) -> serve -> ``monai.bundle download --url`` -> check_properties -> inference with its weights."""
    data = request.getfixturevalue(DATA[name])
    dist, base_url = http_server
    src = tmp_path / "src" / name
    shutil.copytree(BUNDLES / name, src, ignore=shutil.ignore_patterns("__pycache__", "eval", "models"))
    (src / "models").mkdir()
    run_cmd([sys.executable, "-c", INIT_WEIGHTS, str(src)], cwd=tmp_path, timeout=300)
    zips = {}
    for weights in (True, False):
        out = dist / ("weights" if weights else "bare")
        run_cmd([sys.executable, str(REPO / "scripts" / "package_bundle.py"), str(src), "--out_dir", str(out),
                 "--weights", str(weights)], cwd=tmp_path, timeout=120)
        zips[weights] = f"{out.name}/{name}_v{version_of(src)}.zip"

    # the zip with weights through the download CLI; the one without, unpacked the same way in-process
    root = tmp_path / "downloaded" / name
    run_cmd([sys.executable, "-m", "monai.bundle", "download", "--name", name, "--url", f"{base_url}/{zips[True]}",
             "--bundle_dir", str(root.parent)], cwd=tmp_path, timeout=120, env=NO_PROXY)
    bare = tmp_path / "unpacked_bare" / name
    with zipfile.ZipFile(dist / zips[False]) as archive:
        archive.extractall(bare.parent)
    for folder, weights in ((root, True), (bare, False)):
        assert (folder / "configs" / "metadata.json").is_file()
        assert (folder / "models" / "model.pt").is_file() == weights

    dataset = json.dumps({"dataset_dir": str(data), "datalist": str(data / "datalist_20.json")})
    proc = run_cmd([sys.executable, "-c", CHECK_PROPERTIES, dataset, f"{root}=1", f"{bare}=0"], cwd=tmp_path,
                   timeout=120)
    missing = json.loads(proc.stdout.split("MISSING=")[-1].strip().splitlines()[0])
    assert missing == [[], []], missing

    case = json.loads((data / "datalist_20.json").read_text())["test"][0]
    image = [str(data / p) for p in case["image"]] if isinstance(case["image"], list) else str(data / case["image"])
    out_dir = tmp_path / "predictions"
    configs = repr([str(root / "configs" / c) for c in ("inference.json", "cpu_demo.json")])
    run_cmd([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(root),
             "--data", repr([{"image": image}]), "--output_dir", str(out_dir)], cwd=tmp_path, timeout=300,
            env={"OMP_NUM_THREADS": "2"})
    segs = sorted(out_dir.rglob("*_seg.nii.gz"))
    assert len(segs) == 1, segs
    reference = nib.load(image[0] if isinstance(image, list) else image)
    assert nib.load(segs[0]).shape[:3] == reference.shape[:3]
