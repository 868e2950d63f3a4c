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

Outputs: ``search --out`` replaces the config file it names; a report folder that already holds a
report, or a capture folder that already holds a ``mass_<i>.pt`` or ``runs/capture-<i>`` of this
command, is refused before anything runs. Every input is checked first, and a command writes its
whole output or, on a failure, nothing (what it wrote is removed again). Errors are one line: exit 2
for a bad input, 1 for a failed run or write.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from typing import Dict, List, Optional, Tuple

import torch

from ..search.capture import MassStore
from ..search.config_file import config_format, load_config, save_config
from ..search.offline import SearchSettings, search_stores
from ..search.quality import QualityReport, evaluate, report_paths, write_report
from ..run.report import OutputError
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
    """The mass files, each holding captured attention mass (a file without any is refused: it would
    search an all-dense config or report nothing)."""
    stores = []
    for path in paths:
        store = MassStore.load(path)
        if not bool((store.total[store.captured] > 0).any()):
            raise ValueError(f"{path}: holds no captured attention mass (no layer recorded a step); capture it "
                             "again with --capture-steps among the run's steps")
        stores.append(store)
    return stores


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


def _name_max(folder: str) -> int:
    """The longest file name (bytes) the file system of ``folder`` takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


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
    name, limit = os.path.basename(path).encode(), _name_max(parent)
    if len(name) > limit:
        raise ValueError(f"{option} {path}: the file name has {len(name)} bytes, more than the {limit} this file "
                         "system takes; choose a shorter name")


def _report_folder(option: str, path: str) -> None:
    """``path`` can take a new quality report: a folder (or none yet) without report files of its own
    (checked before the search; an earlier report is never overwritten)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path} is a file, not a folder; give a folder for quality.csv / quality.png / "
                         "quality.txt (it is created if missing)")
    taken = [p.name for p in report_paths(path).values() if os.path.lexists(p)]
    if taken:
        raise ValueError(f"{option} {path} already holds {', '.join(taken)} (an earlier report); choose another "
                         "folder or remove them")
    # the deepest folder that exists must take new entries
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise ValueError(f"{option} {path}: {folder} is a file, not a folder; choose another path")
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {folder} is not writable; choose another path")
    _names_fit(option, path)


def _names_fit(option: str, path: str) -> None:
    """Every name in the folder path ``path`` fits this file system (one ValueError line otherwise)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    limit = _name_max(folder)
    for part in os.path.normpath(path).split(os.sep):
        if len(part.encode()) > limit:
            raise ValueError(f"{option} {path}: the name {part[:40]}... has {len(part.encode())} bytes, more than "
                             f"the {limit} this file system takes; choose a shorter name")


def _remove(path: str) -> None:
    """Remove a file or folder this command made (nothing if it is gone)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _missing_folders(path: str) -> List[str]:
    """``path`` and its parents that do not exist yet, deepest first (removed again on a failure)."""
    out, folder = [], os.path.abspath(path)
    while not os.path.lexists(folder):
        out.append(folder)
        folder = os.path.dirname(folder)
    return out


def _remove_empty(folders: List[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            pass


def _write_outputs(config, path: str, report: Optional[QualityReport] = None,
                   report_dir: Optional[str] = None) -> Optional[Dict[str, str]]:
    """Write ``config`` to ``path`` (replaced if it exists) and ``report`` to ``report_dir``: both or, on a
    failure, neither (the config goes under a temporary name beside ``path`` until the report is out).
    A failure to write is one :class:`OutputError` naming the output."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem[:200]}.{os.getpid()}.tmp{ext}")
    made = _missing_folders(report_dir) if report is not None else []
    option, target, paths = "--out", path, None
    try:
        save_config(config, tmp)
        if report is not None:
            option, target = "--report", report_dir
            paths = write_report(report, report_dir)
        option, target = "--out", path
        os.replace(tmp, path)
    except BaseException as e:
        for p in [tmp, *(paths or {}).values()]:
            _remove(p)
        _remove_empty(made)
        if isinstance(e, OSError):
            raise OutputError(f"{option} {target}: cannot write it ({e.strerror or e}); choose another path") from None
        raise
    return paths


def parse_steps(text: str) -> List[int]:
    """``--capture-steps 4,8,12`` -> ``[4, 8, 12]`` (argparse names the option when it fails)."""
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of step numbers; use e.g. 4,8,12") from None
    if not steps or any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of step numbers >= 0; use e.g. 4,8,12")
    return steps


def capture_configs(prompts: List[str], generate_args: List[str], steps: Optional[List[int]], out_dir: str):
    """The run config of every prompt's dense run, all checked before anything runs or is written: the
    options, the model, every prompt's words, the capture steps and that ``out_dir`` holds no earlier
    capture. Returns ``(configs, model)`` (the embedded model, loaded on the CPU)."""
    import dataclasses

    from .generate import parse_generate_args
    from ..models.embedded import load_embedded, shipped_weights

    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder; give a folder for mass_<i>.pt (it is "
                         "created if missing)")
    _names_fit("--out-dir", out_dir)
    cfgs = []
    for i, prompt in enumerate(prompts):
        cfg, _ = parse_generate_args(list(generate_args) + ["--prompt", prompt, "--name", f"capture-{i}"])
        if cfg.model.kind != "embedded":
            raise ValueError(f"capture from the CLI runs the embedded model, not model.kind {cfg.model.kind!r}; for "
                             "diffusers models use sparsify(..., attention_factory=...) with CaptureAttention "
                             "(docs/usage.md)")
        # the dense run writes its clip like any run, beside the capture (out_dir/runs/capture-<i>); the
        # capture is what we keep
        cfgs.append(dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, mode="dense"),
                                        run=dataclasses.replace(cfg.run, compare_dense=False,
                                                                output_dir=os.path.join(out_dir, "runs"))))
    run_steps = cfgs[0].run.steps
    beyond = sorted(s for s in steps or () if s >= run_steps)
    if beyond:
        raise ValueError(f"--capture-steps {','.join(map(str, beyond))}: the runs have {run_steps} denoising steps "
                         f"(0..{run_steps - 1}); choose steps in that range")
    taken = [name for i in range(len(prompts)) for name in (f"mass_{i}.pt", os.path.join("runs", f"capture-{i}"))
             if os.path.lexists(os.path.join(out_dir, name))]
    if taken:
        raise ValueError(f"--out-dir {out_dir} already holds {', '.join(taken)} (an earlier capture); choose another "
                         "--out-dir or remove them")
    mc = cfgs[0].model
    model = load_embedded(mc.path or str(shipped_weights(mc.name)), device="cpu")
    for cfg in cfgs:
        model.tokenizer.encode(cfg.run.prompt)
    model.video_layout(mc.frames, mc.height, mc.width, mc.tile)
    return cfgs, model


def capture_run(cfg, model, steps: Optional[List[int]]) -> Tuple[Optional[str], MassStore]:
    """One dense run of ``cfg`` (from :func:`capture_configs`) with :class:`CaptureAttention` in every
    layer; returns the run folder (None off rank 0) and the filled :class:`MassStore`."""
    from ..run.generation import run_generation
    from ..search.capture import CaptureAttention

    mc = cfg.model
    layout = model.video_layout(mc.frames, mc.height, mc.width, mc.tile)
    store = MassStore.for_layout(layout, model.config.depth, model.config.heads, model=mc.name)

    def factory(num_layers, sparsity, compact, sp):
        layers = [CaptureAttention(i, store, steps) for i in range(num_layers)]
        return [sp.wrap(a) for a in layers] if sp is not None else layers

    return run_generation(cfg, attention_factory=factory).folder, store


def capture(prompts: List[str], generate_args: List[str], steps: Optional[List[int]], out_dir: str) -> List[str]:
    """Capture one mass file per prompt into ``out_dir`` (``mass_<i>.pt``, its run in ``runs/capture-<i>``);
    returns the files written (none off rank 0). All or nothing: on a failure, what this command
    wrote is removed again."""
    cfgs, model = capture_configs(prompts, generate_args, steps, out_dir)
    made = _missing_folders(os.path.join(out_dir, "runs"))
    written: List[str] = []
    try:
        for i, cfg in enumerate(cfgs):
            folder, store = capture_run(cfg, model, steps)
            if folder is None:  # not rank 0
                continue
            written.append(folder)
            if not bool((store.total[store.captured] > 0).any()):
                raise ValueError(f"prompt {cfg.run.prompt!r}: no attention mass was captured; check --capture-steps")
            path = os.path.join(out_dir, f"mass_{i}.pt")
            try:
                store.save(path)
            except OSError as e:
                raise OutputError(f"--out-dir {out_dir}: cannot write {path} ({e.strerror or e})") from None
            written.append(path)
    except BaseException:
        for path in reversed(written):
            _remove(path)
        _remove_empty(made)
        raise
    return [p for p in written if p.endswith(".pt")]


def _capture_errors() -> tuple:
    """The failures of a capture's dense runs that are one line (as ``dist-compact-generate`` prints them)."""
    from ..models.embedded import WeightsError
    from ..parallel import ParallelConfigError, ParallelMismatchError
    from ..parallel.coordinator import ParallelLoadError
    from ..parallel.watch import RankFailure
    from ..run.runner import WorldSizeError
    from ..run.sampler import NonFiniteLatentsError

    return (WeightsError, NonFiniteLatentsError, WorldSizeError, ParallelConfigError, ParallelMismatchError,
            ParallelLoadError, RankFailure, OutputError, FileExistsError, ImportError)


def _load_config(path: str, store: MassStore):
    """``report --config``: the Compact config, fit to ``store``; a file the parser chokes on is one
    ValueError naming it."""
    try:
        return load_config(path, num_layers=store.num_layers, num_heads=store.num_heads)
    except (RecursionError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{path}: not a valid Compact config ({reason}); give a file written by "
                         "`dist-compact-search search`") from None


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

    expected: tuple = (OutputError,)
    try:
        if args.cmd == "capture":
            expected = _capture_errors()
            extra = [a for a in args.generate_args if a != "--"]
            for path in capture(args.prompt, extra, args.capture_steps, args.out_dir):
                print(f"wrote {path}")
        elif args.cmd == "search":
            device = _device(args.device)
            config_format(args.out)
            _writable_file("--out", args.out)
            if args.report:
                _report_folder("--report", args.report)
            stores = _load_stores(args.mass)
            settings = SearchSettings(tau=args.tau, lam=args.lam, groups=args.groups)
            config, results = search_stores(stores, settings, device=device, model=args.model,
                                            merge=args.merge)
            rep = evaluate(config, _sum(stores)) if args.report else None
            paths = _write_outputs(config, args.out, rep, args.report)
            for path, res in zip(args.mass if args.merge == "union" else ["(sum)"], results):
                print(f"{path}: {res.summary()}")
            print(f"wrote {args.out}: {config.num_layers} layers x {config.num_heads} heads")
            if rep is not None:
                print(rep.summary())
                print("report: " + ", ".join(paths.values()))
        else:
            _report_folder("--out", args.out)
            stores = _load_stores(args.mass)
            store = _sum(stores)
            config = _load_config(args.config, store)
            rep = evaluate(config, store)
            try:
                paths = write_report(rep, args.out)
            except OSError as e:
                raise OutputError(f"--out {args.out}: cannot write it ({e.strerror or e}); choose another "
                                  "folder") from None
            print(rep.summary())
            print("report: " + ", ".join(paths.values()))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    except expected as e:
        print(f"error: {e}", file=sys.stderr)
        getattr(e, "end_silent", lambda: None)()  # a rank failure: its silent ranks, after the line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
