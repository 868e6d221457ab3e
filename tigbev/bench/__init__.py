"""``tigbev bench``: what distillation costs, with and without the teacher cache, measured side by side.

Every comparison is a ratio of measurements taken in the same run, interleaved (mode A, mode B, mode C, then again
in a rotated order), repeated ``repeats`` times, and summarised by medians, because the machines this runs on are
shared and noisy. Five sections (bench.json keys):

- ``step``: one student training step (forward + backward + optimiser, batch 1) with no distillation, TiG-BEV from
  the cache and TiG-BEV with the online teacher, on the same batches. Each mode lives in its own child process
  (spawned, so CUDA works), driven one step at a time by this process; its peak memory is the child's peak RSS on
  the CPU (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the whole process, model and data included) or
  ``torch.cuda.max_memory_allocated`` on a GPU. Batches are loaded before timing (in the child, no workers), so a
  step is pure training work; the online mode's LiDAR is loaded with the batch, as the DataLoader workers do.
- ``loader``: the cache's read time per sample against reading the same bytes, uncompressed, from a numpy memmap
  (the physical limit), in this process and through a DataLoader with 1..n workers; and the fraction of a real
  training step (cache mode, DataLoader with one worker) spent waiting for the next batch.
- ``extraction``: extraction samples/s (the steady loop of ``extract-teacher``) against the teacher's
  forward-only samples/s (read the sample's sweeps + frozen forward, sequentially, teacher already loaded) and its
  pure forward rate (points already in memory).
- ``storage``: bytes per sample per array, compression ratio and fidelity (relative error of the two TiG feature
  losses computed from the cache against the online teacher, same keypoints, a fixed random student map) of each
  storage option.
- ``growth``: extraction and training (cache mode, one epoch of batch-1 steps with one loader worker) time at 1x,
  2x and 4x samples, and camera-loader throughput with 1, 2 and 4 workers.

Outputs in ``out_dir``: ``bench.json``, ``bench.md`` (the tables), ``bench.png`` (step bars, growth lines, loader
throughput); intermediate data (synthetic dataset, random teacher, caches) in ``out_dir/work``.
"""

from tigbev.bench.config import GOALS, MODES, STORAGE_OPTIONS, BenchConfig, BenchResult
from tigbev.bench.report import markdown_tables, render
from tigbev.bench.runner import run

__all__ = ["GOALS", "MODES", "STORAGE_OPTIONS", "BenchConfig", "BenchResult", "markdown_tables", "render", "run"]
