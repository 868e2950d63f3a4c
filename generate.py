"""Generate a video with block-sparse attention (the same as the ``dist-compact-generate`` command).

    python generate.py                                   # embedded tiny DiT, default prompt and sparsity
    python generate.py --prompt "a blue circle bouncing" --seed 3 --compare-dense
    torchrun --nproc-per-node 2 generate.py --config configs/cluster/cpu-demo.yaml
    python generate.py --config configs/cluster/1gpu.yaml --run.steps 30 --sparsity.sparsity 0.8

It stays at the root because users run ``torchrun --nproc-per-node 8 generate.py``; the command line
lives in :mod:`dist_compact.cli.generate`.
"""

import sys

from dist_compact.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
