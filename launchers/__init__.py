"""Launch helpers: cluster YAML -> python / torchrun / multi-node torchrun / SLURM commands.

Installed with the package: ``dist-compact-launch --help`` or ``python -m launchers --help`` from any
directory (``python launchers/launch.py --help`` from a checkout). See :mod:`launchers.launch`.
"""
