"""Serve the repository's bundles with a local MONAI Label 0.8.5 server (offline, CPU).

The server runs in the separate venv made by ``scripts/monailabel_env.sh`` (default ``.venv-monailabel``); this
script itself needs only the standard library, ``fire`` and, for ``--cpu_demo``/``--random_weights``/phantom
studies, ``monai``/``nibabel``/``scipy`` (present in both venvs). What ``serve`` does:

1. ``build_app``: copies the ``monaibundle`` sample app out of the installed wheel
   (``monailabel apps --download --name monaibundle``) to ``<work_dir>/apps/monaibundle`` and puts each bundle at
   ``<app>/model/<bundle name>`` (a copy without ``eval/`` and checkpoints other than ``models/model.pt``, or a
   symlink with ``--link``). MONAI Label infers the task from the folder name; both names fall back to
   "segmentation". The app's ``main.py`` is ``scripts/monailabel_app.py`` (the sample's becomes ``sample_main.py``):
   the sample app whose DICOMweb datastore also stacks the sequences of one study for a multi-sequence bundle (the
   liver bundle's T2WI and DWI). With ``--cpu_demo`` the bundle's ``configs/cpu_demo.json`` overlay is merged into
   the copy's ``inference.json`` and ``train.json`` (MONAI Label reads one config file each and never merges
   overlays), so weights trained with the overlay (``scripts/quickstart.py``) fit the network. With
   ``--random_weights`` a bundle without ``models/model.pt`` gets a randomly initialised ``network_def`` state dict
   (a smoke test only).
2. ``studies`` (when no ``--studies`` folder is given): writes tiny phantom studies: CT volumes (with labels in
   ``labels/final``, MONAI Label's local datastore layout) and liver MRI volumes as single 4-D NIfTI files
   ``[x, y, z, 2]`` holding T2WI and DWI (the liver bundle's 2-channel input; ``EnsureChannelFirstd`` moves the
   last axis to the channel axis).
3. ``start``: runs ``python -m monailabel.main start_server`` on 127.0.0.1 with ``zoo_source github`` (anything but
   ``monaihosting``, which lists the online model zoo even for local bundles) and ``sam2 false``, in its own process
   group, logs to ``<work_dir>/server.log``, waits until ``GET /info/`` answers and records URL and PID in
   ``<work_dir>/server.json``. ``serve`` then waits for Ctrl-C (or returns with ``--detach``); ``stop`` ends the
   process group recorded there.

``--studies_dir`` may also be a DICOMweb URL (e.g. ``http://127.0.0.1:8042/dicom-web`` of the Orthanc that
``scripts/pacs.py`` starts): MONAI Label then lists the PACS's CT series (its default search filter), downloads and
converts a series to NIfTI when it is used, keeps that cache in ``<work_dir>/dicomweb-cache`` and stores every
final label back as a DICOM SEG, written by dcmqi's ``itkimage2segimage``, which ``scripts/monailabel_env.sh`` puts
into the MONAI Label venv from PyPI's ``dcmqi``, encoding every slice (:func:`ensure_dcmqi` checks it is there).

Examples (from the repository root)::

    bash scripts/monailabel_env.sh
    python scripts/monailabel_server.py serve --cpu_demo              # after scripts/quickstart.py trained both
    python scripts/monailabel_server.py serve --random_weights --detach --port 8010
    python scripts/monailabel_server.py stop
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("ceds_mediastinum", "cdugjl_liver")
DEFAULT_VENV = REPO / ".venv-monailabel"
DEFAULT_WORK_DIR = REPO / "outputs" / "monailabel"
QUICKSTART_DIR = REPO / "outputs" / "quickstart"  # scripts/quickstart.sh's default --out_dir


def _as_list(value: str | list | tuple) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` (fire passes either) as a list of names."""
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]


def _venv_python(venv: str | os.PathLike) -> Path:
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} not found: create it with `bash scripts/monailabel_env.sh`")
    return python


def _clean_env(venv: str | os.PathLike) -> dict:
    """Environment for MONAI Label subprocesses: the venv first on PATH, no PYTHONPATH leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(Path(venv).resolve())
    env["PATH"] = f"{Path(venv).resolve() / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def merge_overlay(bundle_dir: str | os.PathLike, overlay: str = "configs/cpu_demo.json") -> list[str]:
    """Merge a top-level overlay into the bundle's ``inference.json`` and ``train.json`` in place.

    The merge is what ``monai.bundle run --config_file "['<config>', '<overlay>']"`` does: top-level keys of the
    overlay replace those of the config. The overlay file itself is left in place.

    Args:
        bundle_dir: the (copied) bundle folder to edit.
        overlay: the overlay, relative to ``bundle_dir``.

    Returns:
        the config files that were rewritten.
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    written = []
    for name in ("inference.json", "train.json"):
        config = bundle_dir / "configs" / name
        if config.exists():
            parser = ConfigParser()
            parser.read_config([str(config), str(bundle_dir / overlay)])
            ConfigParser.export_config_file(parser.config, str(config), indent=4)
            written.append(str(config))
    return written


_RANDOM_WEIGHTS = """
import sys, torch
from monai.bundle import ConfigParser
sys.path.insert(0, '.')
parser = ConfigParser()
parser.read_config('configs/inference.json')
parser['bundle_root'] = '.'
torch.manual_seed(0)
net = parser.get_parsed_content('network_def', instantiate=True)
torch.save(net.state_dict(), 'models/model.pt')
"""


def random_weights(bundle_dir: str | os.PathLike, venv: str | os.PathLike = DEFAULT_VENV) -> str:
    """Save a randomly initialised ``network_def`` state dict as ``<bundle_dir>/models/model.pt``.

    Runs in a subprocess of the MONAI Label venv (the bundle's ``scripts`` package must not clash with other
    ``scripts`` modules of the caller). Returns the checkpoint path.
    """
    bundle_dir = Path(bundle_dir).resolve()
    (bundle_dir / "models").mkdir(exist_ok=True)
    subprocess.run(
        [str(_venv_python(venv)), "-c", _RANDOM_WEIGHTS], cwd=bundle_dir, env=_clean_env(venv), check=True
    )
    return str(bundle_dir / "models" / "model.pt")


def served_weights(name: str, cpu_demo: bool, weights_dir: str | os.PathLike | None = QUICKSTART_DIR) -> Path | None:
    """The ``model.pt`` a copied bundle is served with: the bundle's own ``models/model.pt`` if it has one, else,
    with ``cpu_demo``, the quick start's ``<weights_dir>/<name>/models/model.pt`` (trained at the ``cpu_demo``
    widths, so only with them); ``None`` when there is neither.

    Raises:
        FileNotFoundError: only quick-start weights exist and ``cpu_demo`` is off (they would not fit the configs).
    """
    own = REPO / "bundles" / name / "models" / "model.pt"
    if own.exists():
        return own
    quick = Path(weights_dir) / name / "models" / "model.pt" if weights_dir else None
    if quick is None or not quick.exists():
        return None
    if not cpu_demo:
        raise FileNotFoundError(f"{name}: the only weights are the quick start's {quick}, trained at the cpu_demo "
                                "widths: serve with --cpu_demo")
    return quick


def build_app(
    work_dir: str = str(DEFAULT_WORK_DIR),
    bundles: str | list = ",".join(BUNDLES),
    link: bool = False,
    cpu_demo: bool = False,
    random_weights_if_missing: bool = False,
    venv: str = str(DEFAULT_VENV),
    weights_dir: str | None = str(QUICKSTART_DIR),
) -> str:
    """Create ``<work_dir>/apps/monaibundle`` with the bundles in its ``model/`` folder; return the app folder.

    Args:
        work_dir: folder for the app, the phantom studies, the log and ``server.json``.
        bundles: names of folders under ``<repo>/bundles`` to serve.
        link: symlink the repository bundles instead of copying them (training through MONAI Label then writes
            checkpoints into ``bundles/<name>/models``); cannot be combined with ``cpu_demo``.
        cpu_demo: merge ``configs/cpu_demo.json`` into the copy's ``inference.json`` and ``train.json``.
        random_weights_if_missing: give a bundle without ``models/model.pt`` random weights (smoke tests only).
        venv: the MONAI Label venv (``scripts/monailabel_env.sh``).
        weights_dir: the quick start's output folder, whose weights a copied bundle without its own is served with
            (:func:`served_weights`).
    """
    if link and cpu_demo:
        raise ValueError("--cpu_demo edits the bundle's configs: it needs a copy, not --link")
    app = Path(work_dir).resolve() / "apps" / "monaibundle"
    if not (app / "sample_main.py").exists():
        if not (app / "main.py").exists():
            subprocess.run(
                [str(_venv_python(venv)), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle",
                 "--output", str(app.parent)],
                env=_clean_env(venv), check=True, stdout=subprocess.DEVNULL,
            )
        (app / "main.py").rename(app / "sample_main.py")
    shutil.copy2(REPO / "scripts" / "monailabel_app.py", app / "main.py")  # the sample app + multi-sequence studies
    for name in _as_list(bundles):
        source, target = REPO / "bundles" / name, app / "model" / name
        if not (source / "configs" / "inference.json").exists():
            raise FileNotFoundError(f"{source} is not a bundle (no configs/inference.json)")
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            target.symlink_to(source, target_is_directory=True)
        else:
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("eval", "models", "__pycache__"))
            (target / "models").mkdir()
            # --random_weights without --cpu_demo: a smoke test at the configs' widths, which the quick start's
            # weights do not fit, so they are not looked for
            quick_dir = weights_dir if cpu_demo or not random_weights_if_missing else None
            weights = served_weights(name, cpu_demo, quick_dir)
            if weights is not None:
                shutil.copy2(weights, target / "models" / "model.pt")
                if (weights.parent / "network.json").is_file():  # the architecture the weights were trained with
                    shutil.copy2(weights.parent / "network.json", target / "models" / "network.json")
                print(f"[monailabel] {name}: serving {weights}")
            if cpu_demo:
                merge_overlay(target)
        if random_weights_if_missing and not (target / "models" / "model.pt").exists():
            random_weights(target, venv)
        if not (target / "models" / "model.pt").exists():
            print(f"[monailabel] warning: {target}/models/model.pt missing: MONAI Label will ignore {name} "
                  "(run bash scripts/quickstart.sh and serve with --cpu_demo, or pass --random_weights)")
    return str(app)


def studies(
    work_dir: str = str(DEFAULT_WORK_DIR),
    n_ct: int = 2,
    n_liver: int = 2,
    labelled: str | list = "ct",
    seed: int = 0,
) -> str:
    """Write phantom studies for MONAI Label's local datastore; return the studies folder.

    The phantom datasets are generated under ``<work_dir>/phantoms/{ct,liver}`` (``scripts/phantoms.py``); the
    studies folder ``<work_dir>/studies`` gets ``ct_XXX.nii.gz`` (int16 HU) and ``liver_XXX.nii.gz`` (float32,
    4-D ``[x, y, z, 2]`` = T2WI, DWI on the T2WI grid), and for the kinds named in ``labelled`` the tumour label
    under ``labels/final/<same file name>``. Labels of the other kind stay in ``phantoms/<kind>/labelsTr`` (e.g.
    to be submitted later with ``PUT /datastore/label``).

    Args:
        work_dir: parent folder of ``phantoms/`` and ``studies/`` (both are recreated).
        n_ct: number of CT cases (0 for none).
        n_liver: number of liver MRI cases (0 for none).
        labelled: ``"ct"``, ``"liver"``, ``"ct,liver"`` or ``""``: kinds whose labels go to ``labels/final``.
        seed: phantom seed.
    """
    import nibabel as nib
    import numpy as np

    import phantoms

    work_dir = Path(work_dir).resolve()
    labelled = _as_list(labelled) if labelled else []
    out, phantom_dir = work_dir / "studies", work_dir / "phantoms"
    for folder in (out, phantom_dir):
        shutil.rmtree(folder, ignore_errors=True)
    (out / "labels" / "final").mkdir(parents=True)
    if n_ct:
        ct = phantom_dir / "ct"
        phantoms.mediastinal_ct(str(ct), n_cases=n_ct, seed=seed, size=64, n_slices=48)
        for image in sorted((ct / "imagesTr").glob("*.nii.gz")):
            shutil.copy2(image, out / image.name)
            if "ct" in labelled:
                shutil.copy2(ct / "labelsTr" / image.name, out / "labels" / "final" / image.name)
    if n_liver:
        liver = phantom_dir / "liver"
        phantoms.liver_mri(str(liver), n_cases=n_liver, seed=seed, size=64, n_slices=8)
        for label in sorted((liver / "labelsTr").glob("*.nii.gz")):
            case = label.name[: -len(".nii.gz")]
            t2w = nib.load(liver / "imagesTr" / f"{case}_t2w.nii.gz")
            dwi = nib.load(liver / "imagesTr" / f"{case}_dwi.nii.gz")
            stacked = np.stack([t2w.get_fdata(dtype=np.float32), dwi.get_fdata(dtype=np.float32)], axis=-1)
            nib.save(nib.Nifti1Image(stacked, t2w.affine), out / label.name)
            if "liver" in labelled:
                shutil.copy2(label, out / "labels" / "final" / label.name)
    return str(out)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_dicomweb(studies: str) -> bool:
    """Whether ``studies`` is a DICOMweb URL rather than a folder (MONAI Label's own test)."""
    return str(studies).startswith(("http://", "https://"))


def ensure_dcmqi(venv: str | os.PathLike = DEFAULT_VENV) -> Path:
    """The ``itkimage2segimage`` wrapper of the MONAI Label venv, which encodes every slice of a DICOM SEG.

    ``scripts/monailabel_env.sh`` installs dcmqi and writes the wrapper (dcmqi's binary with ``--skip 0``; the
    script says why); a venv made by an older recipe gets a clear error instead of MONAI Label's own download.

    Returns:
        the wrapper, ``<venv>/bin/itkimage2segimage``.
    """
    tool = Path(venv).resolve() / "bin" / "itkimage2segimage"
    if not (tool.is_file() and "--skip 0" in tool.read_text(errors="ignore")):
        raise RuntimeError(f"{venv} has no itkimage2segimage with --skip 0 (dcmqi's DICOM SEG writer for a DICOMweb "
                           "datastore): run bash scripts/monailabel_env.sh to update it.")
    return tool


def dicomweb_env(venv: str | os.PathLike, work_dir: Path) -> dict:
    """Environment for a server on a DICOMweb datastore: dcmqi's SEG writer (:func:`ensure_dcmqi`), and the cache of
    downloaded series and labels in ``<work_dir>/dicomweb-cache`` (MONAI Label's default is in ``~/.cache``)."""
    ensure_dcmqi(venv)
    return {**_clean_env(venv), "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work_dir / "dicomweb-cache")}


def start(
    app: str,
    studies_dir: str,
    models: str | list = ",".join(BUNDLES),
    host: str = "127.0.0.1",
    port: int = 8000,
    work_dir: str = str(DEFAULT_WORK_DIR),
    venv: str = str(DEFAULT_VENV),
    timeout: float = 300,
) -> dict:
    """Start ``monailabel start_server`` in its own process group and wait until ``GET /info/`` answers.

    ``studies_dir`` is a folder or a DICOMweb URL (then see :func:`dicomweb_env`).

    Returns ``{"url", "pid", "log"}`` (also written to ``<work_dir>/server.json``). Raises ``RuntimeError``
    with the log tail if the server exits or does not answer within ``timeout`` seconds (it is stopped then).
    """
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / "server.log"
    cmd = [
        str(_venv_python(venv)), "-m", "monailabel.main", "start_server",
        "--app", str(app), "--studies", str(studies_dir), "--host", host, "--port", str(port),
        "--conf", "models", ",".join(_as_list(models)),
        "--conf", "zoo_source", "github",  # anything but "monaihosting": local bundles, no model-zoo listing
        "--conf", "sam2", "false",
        "--conf", "preload", "false",
    ]
    env = dicomweb_env(venv, work_dir) if is_dicomweb(studies_dir) else _clean_env(venv)
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=app, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{host}:{port}"
    info = {"url": url, "pid": proc.pid, "log": str(log)}
    (work_dir / "server.json").write_text(json.dumps(info, indent=2))
    return wait_until_answers(proc, f"{url}/info/", log, "MONAI Label server", timeout, info)


def wait_until_answers(proc: subprocess.Popen, url: str, log: Path, name: str, timeout: float, info: dict) -> dict:
    """Wait until ``GET url`` answers 200 and return ``info``; stop ``proc``'s process group if it does not.

    Raises:
        RuntimeError: ``proc`` exited, or ``url`` did not answer within ``timeout`` seconds (with the log tail).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return info
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    stop_pid(proc.pid)
    raise RuntimeError(f"{name} did not answer within {timeout} s:\n{log.read_text()[-6000:]}")


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (reaps it if it is a finished child of this process)."""
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished != pid
    except ChildProcessError:  # not a child of this process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def stop_pid(pid: int, timeout: float = 30) -> bool:
    """Stop the server's process group (SIGINT, then SIGTERM, then SIGKILL); return False if it was not running."""
    if not _alive(pid):
        return False
    pgid = os.getpgid(pid)
    for sig, wait in ((signal.SIGINT, timeout / 2), (signal.SIGTERM, timeout / 2), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.2)
    return True


def stop(work_dir: str = str(DEFAULT_WORK_DIR)) -> str:
    """Stop the server recorded in ``<work_dir>/server.json`` by its process group."""
    record = Path(work_dir).resolve() / "server.json"
    if not record.exists():
        return f"no {record}: nothing to stop"
    info = json.loads(record.read_text())
    stopped = stop_pid(int(info["pid"]))
    record.unlink()
    return f"stopped MONAI Label server pid {info['pid']}" if stopped else f"pid {info['pid']} was not running"


def serve(
    work_dir: str = str(DEFAULT_WORK_DIR),
    bundles: str | list = ",".join(BUNDLES),
    studies_dir: str | None = None,
    cpu_demo: bool = False,
    random_weights: bool = False,
    link: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    venv: str = str(DEFAULT_VENV),
    detach: bool = False,
    labelled: str = "ct",
) -> None:
    """Build the app, write phantom studies unless ``--studies_dir`` (a folder or a DICOMweb URL) is given, start
    the server and wait.

    MONAI Label trains on every labelled study of its datastore, so the phantom studies carry the labels of one
    modality at a time: ``labelled="ct"`` (default) for a CEDS training round, ``"liver"`` for a CdUgJL one.

    Prints the URL and PID. Without ``--detach`` it waits until Ctrl-C and then stops the server; with
    ``--detach`` it returns and ``python scripts/monailabel_server.py stop --work_dir <work_dir>`` stops it.
    """
    app = build_app(work_dir, bundles, link=link, cpu_demo=cpu_demo, random_weights_if_missing=random_weights,
                    venv=venv)
    if studies_dir is None:
        studies_dir = studies(work_dir, labelled=labelled)
    served = [b for b in _as_list(bundles) if (Path(app) / "model" / b / "models" / "model.pt").exists()]
    if not served:
        raise FileNotFoundError(f"no bundle has weights: neither bundles/<name>/models/model.pt nor, with --cpu_demo, "
                                f"the quick start's {QUICKSTART_DIR}/<name>/models/model.pt exists; run bash "
                                "scripts/quickstart.sh and serve with --cpu_demo, or pass --random_weights")
    info = start(app, studies_dir, served, host=host, port=port, work_dir=work_dir, venv=venv)
    print(f"MONAI Label at {info['url']} (pid {info['pid']}, log {info['log']}), models: {', '.join(served)}")
    if detach:
        return
    try:
        while _alive(info["pid"]):
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        print(stop(work_dir))


if __name__ == "__main__":
    fire.Fire({"serve": serve, "stop": stop, "build_app": build_app, "studies": studies, "start": start,
               "merge_overlay": merge_overlay, "random_weights": random_weights})
