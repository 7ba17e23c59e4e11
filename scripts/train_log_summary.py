"""Per-window means of the values a bundle's training log reports, to compare runs without reading their logs.

MONAI's ``StatsHandler`` writes one line per logged iteration, ``Epoch: E/N, Iter: I/L -- name: value ...``
(``loss_seg``, ``loss_distill_kl``, ``grad_share_consistency``, ...). ``summary`` groups those lines into windows of
``window`` iterations (iteration ``(E - 1) * L + I``) and prints each name's mean per window, one row per log, so
that runs of one benchmark compare side by side:

    python scripts/train_log_summary.py summary \\
        outputs/benchmarks/cpu/cdugjl_liver/accuracy/r010_supervised_s0/train.log \\
        outputs/benchmarks/cpu/cdugjl_liver/accuracy/r010_cdugjl_s0/train.log --names "['loss_seg']"

Names are matched as prefixes (``grad_share`` selects every ``grad_share_*``).
"""

from __future__ import annotations

import re
from pathlib import Path

import fire

LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- (.*)")
VALUE = re.compile(r"(\w+): ([-+\d.eE]+|nan|inf)")


def window_means(log: str | Path, window: int = 400) -> dict[str, list[float]]:
    """Mean of every logged value per window of iterations.

    Args:
        log: a ``train.log`` written by the bundle's ``StatsHandler``.
        window: iterations per window.

    Returns:
        ``{name: [mean of window 1, mean of window 2, ...]}``; a window without a value of that name is ``nan``.
    """
    sums: dict[str, dict[int, list[float]]] = {}
    for line in Path(log).read_text(errors="replace").splitlines():
        match = LINE.search(line)
        if not match:
            continue
        epoch, it, length, values = int(match[1]), int(match[2]), int(match[3]), match[4]
        slot = ((epoch - 1) * length + it - 1) // window
        for name, value in VALUE.findall(values):
            total = sums.setdefault(name, {}).setdefault(slot, [0.0, 0])
            total[0] += float(value)
            total[1] += 1
    last = max((s for per in sums.values() for s in per), default=-1)
    return {name: [per[s][0] / per[s][1] if s in per else float("nan") for s in range(last + 1)]
            for name, per in sorted(sums.items())}


def summary(*logs: str, window: int = 400, names: list[str] = ("loss_seg", "grad_share")) -> None:
    """Print, for each name and log, its mean per window of ``window`` iterations.

    Args:
        logs: training logs to compare.
        window: iterations per window.
        names: name prefixes to print.
    """
    table = {}
    for log in logs:
        means = window_means(log, window)
        table[log] = {n: v for n, v in means.items() if any(n.startswith(p) for p in names)}
    for name in sorted({n for per in table.values() for n in per}):
        print(f"{name} (mean per {window} iterations)")
        for log, per in table.items():
            if name in per:
                print(f"  {' / '.join(f'{v:.4g}' for v in per[name])}   {log}")


if __name__ == "__main__":
    fire.Fire({"summary": summary})
