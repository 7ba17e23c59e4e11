"""Speed and memory benchmarks of the two bundles: selective scan, training iteration, full-volume inference and a
MONAI Label training round.

The benchmarks, each a subcommand that writes one JSON file ``<out_dir>/<benchmark>[_<tag>].json`` and prints a
short table:

- ``scan``: the liver bundle's CPU selective scans, the fused one compiled by numba
  (``scripts/selective_scan_fused.py``) and the pure-PyTorch chunked one (``scripts/selective_scan.py``:
  ``selective_scan_chunked``), each against the sequential reference
  ``selective_scan_ref``, forward + backward (``y.sum().backward()``) with the arguments MEAMT-Net's Mamba passes
  (``D``, ``z``, ``delta_bias``, ``delta_softplus=True``; ``A = -(1..N)``, step sizes in [0.001, 0.1]). Before any
  timing the two are checked to agree (outputs and every gradient, ``|a - b| <= atol + rtol * max|a|``, 1e-4
  each). With CUDA and ``mamba_ssm`` importable, ``mamba_ssm``'s ``selective_scan_fn`` is also compared with the
  chunked scan on the GPU; otherwise that row says ``"skipped: ..."``.
- ``iteration``: the time of one training iteration of each method against supervised-only training of the same
  network, through the real bundle configs (``configs/train.json`` + ``configs/cpu_demo.json``, read with
  ``monai.bundle.ConfigParser``) on phantom data (``scripts/phantoms.py``): the ``train#trainer`` engine runs one
  epoch of ``warmup + iterations`` iterations and every iteration is timed with ignite events; the first
  ``warmup`` are discarded. ``ceds_mediastinum``: ``supervised``, ``mean_teacher`` and ``ceds`` (the latter two in
  their semi-supervised phase: ``warmup 0``, ``confidence_interval 0``). ``cdugjl_liver``: ``supervised``
  (every SSL weight 0), ``mean_teacher`` (distillation weights 0, ``uncertainty_mask false``) and ``cdugjl``
  (the config's defaults, with a randomly initialised frozen teacher saved to ``teacher_ckpt``).
- ``inference``: full-volume inference of each bundle's network against a MONAI baseline under the same
  sliding-window settings: ``CEDSNet`` as ``configs/inference.json`` runs it (segmentation + confidence,
  ``scripts.inference.SegmentationWithConfidence``) against ``monai.networks.nets.VNet``, both through
  ``SlidingWindowInferer`` on a CT-sized volume (default 512 x 512 x 300); ``MEAMTNet`` through the bundle's
  ``SliceQuantInferer`` against a 2D ``monai.networks.nets.UNet`` of the same widths through ``SliceInferer`` (one
  whole, zero-padded slice per window, same slice batch) on a multi-sequence MRI volume (default 2 x 256 x 256 x 40).
  Network widths: ``cpu_demo`` (``configs/cpu_demo.json``) and/or ``paper`` (``configs/inference.json``); the
  sliding-window settings come from ``configs/inference.json`` unless given.
- ``monailabel``: one MONAI Label training round per bundle as the README runs it (its own server, random weights
  at the default widths, the phantom studies of one modality, ``max_epochs`` 1): the request's wall time and the
  files it leaves in ``models/`` (``scripts/speed_monailabel.py``; needs ``scripts/monailabel_env.sh``).
- ``all``: ``scan``, ``iteration`` and ``inference`` with their defaults.

Command line (python-fire)::

    python scripts/benchmark_speed.py scan [--lengths "[256,1024,4096,16384]"] [--repeats 5]
    python scripts/benchmark_speed.py iteration [--iterations 10] [--bundles "['cdugjl_liver']"]
    python scripts/benchmark_speed.py inference [--ct_shape "[512,512,300]"] [--ct_window_batches None]
    python scripts/benchmark_speed.py monailabel [--widths paper] [--bundles "['ceds_mediastinum']"]
    python scripts/benchmark_speed.py all [--out_dir docs/benchmarks/results/speed] [--tag h100]

Timing: ``time.perf_counter`` wall time; medians over the repeats, after warm-up runs. Everything is float32;
``inference`` runs on the CPU, ``iteration`` on the configs' device (CUDA if available). Other processes sharing
the cores make CPU timings noisy: compare ratios measured in the same run. When other jobs keep the cores busy,
``--threads 1`` avoids PyTorch's multi-threaded operations waiting for a descheduled thread, which slows code made
of many small operations (the scans) far more than convolutions.

Memory: peak resident set size (RSS) of a fresh process per measurement (spawned with ``multiprocessing``), read
from ``VmHWM`` in ``/proc/self/status``. ``resource.getrusage(...).ru_maxrss`` is not used: on Linux a child
process inherits its parent's high-water mark across ``fork``/``exec``, so it over-reports. The high-water mark is
reset (``/proc/self/clear_refs``) before the measured part, so ``*_peak_mb`` of ``scan`` is the increase of RSS
during the forward + backward passes over the inputs already in memory, and ``inference``'s ``peak_rss_gb`` is the
whole process's peak (Python, PyTorch, the network, the volume and the inference). On other systems the
``ru_maxrss`` of the fresh process is reported instead.

CT extrapolation: a CPU cannot run a 3D V-Net over 512 x 512 x 300 voxels in minutes, so by default the CT
networks run for real on the first ``ct_window_batches`` sliding-window batches only; every later batch is served
by the last real output (same shapes, so the inferer still allocates, aggregates and normalises the whole volume
for real: the peak RSS is that of a full run). The reported time is then the measured wall time plus, for every
served batch, the mean real forward time (the first, which pays one-off costs, left out when there are more):
``time_s = wall_s + served_batches * forward_s_mean`` (``extrapolated``
is true in such rows). ``--ct_window_batches None`` runs every window for real.

JSON schema (every file)::

    {"benchmark": "scan" | "iteration" | "inference",
     "command": "the exact command line",
     "environment": {"date_utc", "python", "torch", "monai", "platform", "cpu", "cpu_count", "torch_threads",
                     "load_average", "cuda", "gpu"},
     "settings": {the arguments of the subcommand},
     "rows": [{flat keys, see below}]}

Rows (times in seconds, lists are the raw timings of the repeats / iterations):

- scan: ``device``, ``method``, ``baseline``, ``status`` ("ok" or "skipped: ..."), ``length``, ``batch``,
  ``d_inner``, ``d_state``, ``chunk_size``, ``time_s``, ``baseline_time_s`` (medians), ``speedup``
  (``baseline_time_s / time_s``), ``times_s``, ``baseline_times_s``, ``peak_mb``, ``baseline_peak_mb``,
  ``max_abs_error``. CPU rows: method "chunked", baseline "ref"; GPU row: method "mamba_ssm", baseline "chunked"
  (peak memory there is ``torch.cuda.max_memory_allocated``).
- iteration: ``bundle``, ``method``, ``iteration_s`` (median, from the labelled batch in hand to the end of the
  iteration's handlers; unlabelled batches are drawn inside the iteration), ``step_s`` (median, including fetching
  the labelled batch), ``ratio`` (``iteration_s / iteration_s`` of ``supervised``), ``step_ratio``,
  ``iteration_min_s`` and ``min_ratio`` (the fastest iteration and its ratio: robust to other jobs stalling some
  iterations), ``iteration_times_s``, ``step_times_s`` (timed iterations only), ``warmup_times_s``,
  ``labelled_batch`` and ``unlabelled_batch`` (samples per iteration).
- inference: ``bundle``, ``volume`` ("ct" | "mri"), ``shape`` (channels first), ``widths`` ("cpu_demo" |
  "paper"), ``channels``, ``network``, ``baseline``, ``inferer``, ``roi_size``, ``sw_batch_size``, ``overlap``,
  ``time_s``, ``baseline_time_s`` (medians), ``time_ratio``, ``peak_rss_gb``, ``baseline_peak_rss_gb``,
  ``times_s``, ``baseline_times_s``, ``extrapolated``, ``baseline_extrapolated``, ``total_batches``,
  ``real_batches``, ``baseline_real_batches``.
"""

from __future__ import annotations

import fire

from speed_common import DEFAULT_OUT_DIR, peak_rss, reset_peak_rss
from speed_inference import WindowTimer, inference
from speed_iteration import IterationProfiler, iteration, profile
from speed_monailabel import monailabel
from speed_scan import scan, scan_agreement, scan_forward_backward, scan_inputs

__all__ = ["IterationProfiler", "WindowTimer", "inference", "iteration", "peak_rss", "profile", "reset_peak_rss",
           "monailabel", "run_all", "scan", "scan_agreement", "scan_forward_backward", "scan_inputs"]


def run_all(out_dir: str = DEFAULT_OUT_DIR, tag: str = "", threads: int | None = None) -> list[str]:
    """Run ``scan``, ``iteration`` and ``inference`` with their defaults; returns the three JSON paths."""
    return [
        scan(threads=threads, out_dir=out_dir, tag=tag),
        iteration(threads=threads, out_dir=out_dir, tag=tag),
        inference(threads=threads, out_dir=out_dir, tag=tag),
    ]


if __name__ == "__main__":
    fire.Fire({"scan": scan, "iteration": iteration, "profile": profile, "inference": inference,
               "monailabel": monailabel, "all": run_all})
