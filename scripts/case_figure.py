"""Overview figures of predicted cases: image, ground truth, prediction and uncertainty (or confidence) side by side.

Used by ``quickstart.py`` (one PNG per bundle) and ``benchmark_report.py figure`` (the typical test cases of
``docs/benchmarks.md``). Each row shows one case through the slice (last array axis) with the most ground-truth
tumour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Panel:
    """One row of a figure: 2D arrays of the same slice.

    Attributes:
        title: row title (bundle, case, slice).
        image: the input (CT, or the first MR sequence).
        label: ground truth (0/1).
        pred: predicted mask (0/1).
        extra: uncertainty (``K / S``) or confidence (``P(correct)``) in ``[0, 1]``.
        extra_name: ``"uncertainty"`` or ``"confidence"``.
    """

    title: str
    image: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    extra: np.ndarray
    extra_name: str


def slice_with_most(label: np.ndarray) -> int:
    """Index of the last-axis slice of ``label`` with the most foreground (the middle one if there is none)."""
    area = label.reshape(-1, label.shape[-1]).sum(0)
    return int(area.argmax()) if area.max() > 0 else label.shape[-1] // 2


def case_panel(title: str, image_file: str | Path, label_file: str | Path, pred_file: str | Path,
               extra_file: str | Path, extra_name: str) -> Panel:
    """Read one predicted case (NIfTI files in the same geometry) and cut it through :func:`slice_with_most`.

    Args:
        title: row title; the slice index is appended.
        image_file: input image (the first volume of a 4D file is shown).
        label_file: ground-truth mask.
        pred_file: predicted mask.
        extra_file: uncertainty or confidence map.
        extra_name: its name in the column title.

    Returns:
        the :class:`Panel`.
    """
    import nibabel as nib

    label = np.asarray(nib.load(str(label_file)).dataobj)
    image = np.asarray(nib.load(str(image_file)).dataobj)
    image = image.reshape(*image.shape[:3], -1)[..., 0] if image.ndim > 3 else image
    pred = np.asarray(nib.load(str(pred_file)).dataobj).reshape(label.shape)
    extra = np.asarray(nib.load(str(extra_file)).dataobj).reshape(label.shape)
    z = slice_with_most(label)
    return Panel(f"{title}, slice {z}", image[..., z], label[..., z], pred[..., z], extra[..., z], extra_name)


def draw(panels: list[Panel], path: str | Path) -> Path:
    """Draw ``panels`` as rows of four images (image, ground truth, prediction, uncertainty/confidence) to a PNG.

    Args:
        panels: the rows.
        path: the PNG to write (parent folders are created).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 4, figsize=(11, 2.8 * len(panels)), squeeze=False)
    for row, panel in zip(axes, panels):
        columns = ((panel.image, "image", "gray", None), (panel.label, "ground truth", "viridis", 1),
                   (panel.pred, "prediction", "viridis", 1), (panel.extra, panel.extra_name, "magma", 1))
        for ax, (img, name, cmap, vmax) in zip(row, columns):
            ax.imshow(np.rot90(img), cmap=cmap, vmin=None if vmax is None else 0, vmax=vmax)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        row[0].text(-0.05, 0.5, panel.title, transform=row[0].transAxes, rotation=90, va="center", ha="right",
                    fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
