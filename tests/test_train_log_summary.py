"""scripts/train_log_summary.py: per-window means of what a training log reports."""

from __future__ import annotations

import math

import pytest
import train_log_summary  # pytest.ini puts scripts/ on the path


def test_window_means_group_iterations_across_epochs(tmp_path, capsys):
    log = tmp_path / "train.log"
    lines = ["2026-12-04 01:00:00,000 - INFO - Epoch[1] Metrics -- val_mean_dice: 0.5000"]
    for epoch in (1, 2):  # 3 iterations per epoch: iterations 1-3 and 4-6
        for it in (1, 2, 3):
            step = (epoch - 1) * 3 + it
            extra = f" grad_share_kl: {step / 10:.4f}" if step % 2 == 0 else ""
            lines.append(f"2026-12-04 01:00:0{it},000 - INFO - Epoch: {epoch}/2, Iter: {it}/3 -- "
                         f"loss: {step:.4f}{extra} loss_seg: {2 * step:.4f} ")
    log.write_text("\n".join(lines) + "\n")
    means = train_log_summary.window_means(log, window=4)
    assert means["loss"] == [2.5, 5.5]  # iterations 1-4, then 5-6
    assert means["loss_seg"] == [5.0, 11.0]
    assert means["grad_share_kl"] == pytest.approx([0.3, 0.6])  # iterations 2 and 4, then 6
    assert set(means) == {"loss", "loss_seg", "grad_share_kl"}  # the validation line is not an iteration
    train_log_summary.summary(str(log), window=4, names=["grad_share"])
    out = capsys.readouterr().out
    assert "grad_share_kl (mean per 4 iterations)" in out and "0.3 / 0.6" in out and "loss_seg" not in out
    per_iteration = train_log_summary.window_means(log, window=1)["grad_share_kl"]
    assert len(per_iteration) == 6 and math.isnan(per_iteration[0]) and per_iteration[1] == 0.2  # not logged: nan
