"""``python -m benchmarks.gpu_check``: see :mod:`benchmarks.gpu_check` and :func:`benchmarks.gpu_check.runner.main`."""

import sys

from benchmarks.gpu_check.runner import main

if __name__ == "__main__":
    sys.exit(main())
