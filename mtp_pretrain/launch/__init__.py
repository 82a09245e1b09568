"""Launching training jobs on clusters (SLURM: `mtp-submit`, see docs/slurm.md)."""
