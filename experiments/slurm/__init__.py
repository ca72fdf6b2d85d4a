"""SLURM jobs for experiments.train (``python -m experiments.slurm.submit``)."""
