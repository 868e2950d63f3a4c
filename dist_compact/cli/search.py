"""The offline Compact searchs command line: ``dist-compact-search`` (also ``python -m dist_compact.cli.search``).

    # search one config from captured block-mass files (one per prompt; merged by union)
    dist-compact-search search mass_p0.pt mass_p1.pt --out configs/wan_compact.yaml \\
        --tau 0.9 [--lam 0.05] [--groups 0,1,2-3,4-7,8+] [--merge union|average] [--device cuda] \\
        [--report reports/wan_compact]

    # recall / density of a config on captures (CSV, PNG heatmaps, summary)
    dist-compact-search report --config configs/wan_compact.yaml --mass mass_p2.pt --out reports/p2

    # capture block-mass files from dense runs of the main job's model (one file per prompt);
    # every generate.py option and --section.key override after "--" applies
    dist-compact-search capture --out-dir captures --prompt "a red square moving left" \
        --prompt "a blue circle bouncing" --capture-steps 4,8,12,16 -- --config configs/cluster/cpu-demo.yaml

Mass files come from :class:`dist_compact.search.capture.MassStore.save` (``CaptureAttention`` during
a dense run of the model).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import List, Optional, Tuple

import torch

from ..search.capture import MassStore
from ..search.config_file import config_format, load_config, save_config
from ..search.offline import SearchSettings, search_stores
from ..search.quality import evaluate, write_report
from ..cmdline import OneLineParser


def parse_groups(text: Optional[str]) -> Optional[Tuple[Tuple[int, Optional[int]], ...]]:
    """``"0,1,2-3,4+"`` -> ``((0, 0), (1, 1), (2, 3), (4, None))``; ``None`` / ``"each"``: one per distance."""
    if text is None or text.strip() in ("", "each"):
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            if part.endswith("+"):
                out.append((int(part[:-1]), None))
            elif "-" in part:
                lo, hi = part.split("-")
                out.append((int(lo), int(hi)))
            else:
                out.append((int(part), int(part)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad group {part!r} in --groups {text!r}: use e.g. 0,1,2-3,4+") from None
    return tuple(out)


def _load_stores(paths: List[str]) -> List[MassStore]:
    return [MassStore.load(p) for p in paths]


def _sum(stores: List[MassStore]) -> MassStore:
    return functools.reduce(MassStore.merged, stores)


def _device(name: str) -> torch.device:
    """``--device``: auto, cpu, cuda or cuda:N, checked against this machine (one line otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name!r}: the search runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    return dev


def _writable_file(option: str, path: str) -> None:
    """``path`` can be written as a file: its folder exists and it is not a folder (checked before the
    search, so no result is lost at the end)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory; give a file name, e.g. {os.path.join(path, 'compact.yaml')}")
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: its folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path}: its folder {parent} is not writable; choose another path")


def parse_steps(text: str) -> List[int]:
    """``--capture-steps 4,8,12`` -> ``[4, 8, 12]`` (argparse names the option when it fails)."""
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of step numbers; use e.g. 4,8,12") from None
    if not steps or any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of step numbers >= 0; use e.g. 4,8,12")
    return steps


def capture_run(prompt: str, generate_args: List[str], steps: Optional[List[int]], out_dir: str,
                index: int) -> Optional[str]:
    """One dense run of the main job's model on ``prompt`` with :class:`CaptureAttention` in every
    layer; rank 0 saves the :class:`MassStore` as ``out_dir/mass_<index>.pt`` (returned)."""
    import dataclasses
    import os

    from .generate import parse_generate_args
    from ..models.embedded import load_embedded, shipped_weights
    from ..run.generation import run_generation
    from ..search.capture import CaptureAttention

    cfg, _ = parse_generate_args(list(generate_args) + ["--prompt", prompt, "--name", f"capture-{index}"])
    if cfg.model.kind != "embedded":
        raise ValueError(f"capture from the CLI runs the embedded model, not model.kind {cfg.model.kind!r}; for "
                         "diffusers models use sparsify(..., attention_factory=...) with CaptureAttention "
                         "(docs/usage.md)")
    # the dense run writes its clip like any run, beside the capture (out_dir/runs/capture-<i>); the
    # capture is what we keep
    cfg = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, mode="dense"),
                              run=dataclasses.replace(cfg.run, compare_dense=False,
                                                      output_dir=os.path.join(out_dir, "runs")))
    model = load_embedded(cfg.model.path or str(shipped_weights(cfg.model.name)), device="cpu")
    layout = model.video_layout(cfg.model.frames, cfg.model.height, cfg.model.width, cfg.model.tile)
    store = MassStore.for_layout(layout, model.config.depth, model.config.heads, model=cfg.model.name)

    def factory(num_layers, sparsity, compact, sp):
        layers = [CaptureAttention(i, store, steps) for i in range(num_layers)]
        return [sp.wrap(a) for a in layers] if sp is not None else layers

    res = run_generation(cfg, attention_factory=factory)
    if res.folder is None:  # not rank 0
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"mass_{index}.pt")
    store.save(path)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    ap = OneLineParser(prog="dist-compact-search", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="search a Compact config from captured mass files")
    s.add_argument("mass", nargs="+", help="MassStore files (.pt), e.g. one per prompt")
    s.add_argument("--out", required=True, help="config file to write (.yaml / .json)")
    s.add_argument("--tau", type=float, default=0.9, help="recall floor (default 0.9)")
    s.add_argument("--lam", type=float, default=None,
                   help="stop a head when recall lost per density saved exceeds this (default: off)")
    s.add_argument("--groups", type=parse_groups, default=None,
                   help="slab-distance groups, e.g. 0,1,2-3,4+ (default: one per distance)")
    s.add_argument("--merge", choices=("union", "average"), default="union",
                   help="several files: union of per-file configs (default) or one search on their sum")
    s.add_argument("--model", default=None, help="model name to record (default: from the mass files)")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    s.add_argument("--report", default=None, help="also write a quality report (on all files) to this folder")
    c = sub.add_parser("capture", help="dense runs of the main job's model that record block-mass files")
    c.add_argument("--out-dir", required=True, help="folder for mass_<i>.pt, one per prompt")
    c.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    c.add_argument("--capture-steps", default=None, type=parse_steps,
                   help="denoising steps to record, e.g. 4,8,12 (default: every step)")
    c.add_argument("generate_args", nargs=argparse.REMAINDER,
                   help="after --: generate.py options / --section.key overrides")
    r = sub.add_parser("report", help="recall / density of a config on captured mass files")
    r.add_argument("--config", required=True)
    r.add_argument("--mass", nargs="+", required=True)
    r.add_argument("--out", required=True, help="folder for quality.csv / quality.png / quality.txt")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "capture":
            steps = args.capture_steps
            extra = [a for a in args.generate_args if a != "--"]
            for i, prompt in enumerate(args.prompt):
                path = capture_run(prompt, extra, steps, args.out_dir, i)
                if path:
                    print(f"wrote {path}")
        elif args.cmd == "search":
            device = _device(args.device)
            config_format(args.out)
            _writable_file("--out", args.out)
            stores = _load_stores(args.mass)
            settings = SearchSettings(tau=args.tau, lam=args.lam, groups=args.groups)
            config, results = search_stores(stores, settings, device=device, model=args.model,
                                            merge=args.merge)
            save_config(config, args.out)
            for path, res in zip(args.mass if args.merge == "union" else ["(sum)"], results):
                print(f"{path}: {res.summary()}")
            print(f"wrote {args.out}: {config.num_layers} layers x {config.num_heads} heads")
            if args.report:
                rep = evaluate(config, _sum(stores))
                paths = write_report(rep, args.report)
                print(rep.summary())
                print("report: " + ", ".join(paths.values()))
        else:
            stores = _load_stores(args.mass)
            store = _sum(stores)
            config = load_config(args.config, num_layers=store.num_layers, num_heads=store.num_heads)
            rep = evaluate(config, store)
            paths = write_report(rep, args.out)
            print(rep.summary())
            print("report: " + ", ".join(paths.values()))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
