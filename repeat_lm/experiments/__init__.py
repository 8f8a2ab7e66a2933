"""Experiments as gin sweeps: expand a grid into named runs, run them (locally or on a cluster), collect one table.

Modules: `sweep` (the `sweep.Grid` language of experiment gins, run names), `compose` (each run's self-contained
gin), `status` (ROOT/RUN/status.json), `runner` (runs them: local subprocesses, TPU VM, SLURM), `collect` (the
results table), `launch_local` (one job as N local processes). See docs/experiments.md.
"""
