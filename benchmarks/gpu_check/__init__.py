"""One time-boxed GPU session: ``python -m benchmarks.gpu_check [--out DIR] [--tiny] [--budget-s 420]``.

Four phases by default, each boxed so that the whole run (Python start included) ends within ``--budget-s``;
time a phase leaves unused goes to the later ones. Each result is printed when it is measured and
everything so far is written to ``DIR/gpu_check.json`` after every result, so a kill loses nothing.
The last thing printed is one markdown table of all results (also ``DIR/gpu_check.md``).

1. ``device``: GPU facts and two ceilings: bf16 matmul TFLOP/s (8192^3) and device copy GB/s.
2. ``train_step``: samples/s of training steps of the paper model (its own forward, BCE loss and
   RMSprop from ``configure_optimizers``, timed through :mod:`benchmarks.train_step`) on random
   batches (batch 4 as in the paper, 16 and 32) for fp32, bf16 autocast, + channels_last, RMSprop
   for-loop / foreach / fused, three other ways to compute the 4x upsample + BCE tail, and
   torch.compile; MFU against the measured matmul rate, peak memory, and the largest batch that fits.
3. ``data``: synthetic data generated here (``--data-dir``), DataModule throughput with the device
   augmentation path for 4, 8 and 15 workers against the GPU step, and device against CPU decoding.
4. ``paper_run``: a short bf16-mixed ``pytorch_lightning.Trainer`` run of the paper config on that
   data; ``DIR/paper_run.ckpt`` (bf16 weights, readable by ``lightning_vrn.models.load_model``).
5. ``fused`` (not in the default ``--phases``): the loss from the full-size logits against the fused
   loss (``model.fused_loss``): their check, samples/s and peak memory at batch 4 (fp32), 32 and 256
   (bf16), and the fused loss at 512.
6. ``compile`` (not in the default ``--phases``): cuDNN benchmark mode off against on, CUDA graphs
   (``mode="reduce-overhead"``) at the paper's batch 4, the whole model + loss under ``torch.compile``
   (default mode) at batch 256 with the plain and the fused loss, and at batch 32.
   ``--phases device,fused,compile --budget-s 590`` runs the rows no session has measured yet.

Imports nothing that needs OmegaConf, Open3D or W&B (the GPU machine has none of them).
``--tiny`` runs every phase at a tiny size on the CPU (tests/test_gpu_check.py).

Modules: :mod:`~benchmarks.gpu_check.sizes` (what differs between the paper run and ``--tiny``),
:mod:`~benchmarks.gpu_check.budget` (phase reserves, deadlines, the hard limit),
:mod:`~benchmarks.gpu_check.context` (the session's state), :mod:`~benchmarks.gpu_check.report`
(result rows, ``gpu_check.json`` and ``gpu_check.md``), :mod:`~benchmarks.gpu_check.steps` (the
training-step settings and their timing), one ``phase_*`` module per phase, and
:mod:`~benchmarks.gpu_check.runner` (the command line and the driver).
"""

import time

START = time.perf_counter()  # the budget counts from the package's first import, imports included
