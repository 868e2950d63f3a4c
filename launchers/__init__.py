"""Launch helpers: cluster YAML -> python / torchrun / multi-node torchrun / SLURM commands.

Run from the repository root (not installed with the package): ``python -m launchers --help`` or
``python launchers/launch.py --help``. See :mod:`launchers.launch`.
"""
