"""Cluster YAML -> the command that starts the job: plain python, torchrun, multi-node torchrun, SLURM.

::

    python -m launchers --config configs/cluster/1x8-ulysses.yaml --dry-run -- generate.py --prompt "..."
    python launchers/launch.py --config configs/cluster/2x8-hybrid.yaml --node-rank 1 -- generate.py ...
    python -m launchers --config configs/cluster/2x8-hybrid.yaml --slurm -- generate.py ... > job.sbatch

What it runs, from the ``cluster`` section (:class:`dist_compact.run.config.ClusterConfig`; its
``ulysses x ring`` must equal ``nproc x nnodes``, else one clear error naming the file):

* one process in all (``nproc x nnodes == 1``): ``python SCRIPT ...`` (no torchrun);
* one node: ``torchrun --standalone --nproc-per-node N SCRIPT ...``;
* several nodes: ``torchrun --nnodes M --nproc-per-node N --node-rank R --rdzv-backend c10d
  --rdzv-endpoint ADDR:PORT --rdzv-id ID SCRIPT ...`` (run it on every node with its ``--node-rank``);
* ``--slurm``: a batch script (``#SBATCH`` one task per node, ``srun`` starting that torchrun on every
  node, the endpoint = the allocation's first node).

Fallbacks on the launching machine (one node only; GPUs counted with torch, or ``--gpus``):

* no GPU: gloo on CPU processes, the same degrees (``--cluster.device cpu --cluster.backend gloo``);
* one GPU but a config for more: single-GPU fallback, one plain ``python`` process with degrees 1
  (``--cluster.nproc 1 --cluster.ulysses 1 --cluster.ring 1``); a note says so on stderr;
* more than one GPU but fewer than ``nproc``: an error (choose a config for this node).

When SCRIPT is ``generate.py`` the cluster file is passed on as its first ``--config`` (so its
world-size check agrees with the launch), followed by the fallback overrides; other scripts get
their arguments unchanged. Every name that reaches a shell or a batch script (``--job-name``,
``--partition``, ``--time``, the config path, the script's arguments, the rendezvous id and host) is
checked first, one :class:`LaunchError` naming the option otherwise: no control characters (a
newline would start a new command in the batch script), a partition of SLURM's name characters, a
time in one of SLURM's forms; and everything is shell-quoted where it is written. ``--dry-run`` prints the command (or the batch script) instead of
running it; on a machine without GPUs it prints the command for a node with the config's GPUs
(what the cluster will run), and names the CPU fallback this machine would run on stderr (give
``--gpus N`` to plan for N GPUs instead). Reads files (a launcher); the library never does.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["LaunchError", "LaunchPlan", "plan_launch", "slurm_script", "load_cluster", "count_gpus", "check_text",
           "check_slurm_options", "main"]


class LaunchError(ValueError):
    """A cluster config or launch request that cannot run (the message says why and what to do)."""


#: SLURM's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
#: days-hours:minutes, days-hours:minutes:seconds; or no limit
_SLURM_TIME = re.compile(r"(\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|unlimited|infinite|INFINITE)")
#: a partition name, or a comma-separated list of them (SLURM takes the first that can run the job)
_SLURM_PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
#: a job name: the characters that need no quoting in a shell nor in sbatch's own reading of an
#: ``#SBATCH`` line (which knows double quotes and backslashes, not the shell's single quotes)
_SLURM_JOB_NAME = re.compile(r"[A-Za-z0-9_.+:@=,%/-]{1,200}")


def _shown(value: str, limit: int = 60) -> str:
    """``value`` for a one-line message: escaped, and cut after ``limit`` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def check_text(what: str, value: str) -> str:
    """``value`` itself, or a :class:`LaunchError` naming ``what`` when it is empty or holds a control
    character (in a batch script a newline starts a new command)."""
    from dist_compact._util import control_chars

    if not isinstance(value, str) or not value:
        raise LaunchError(f"{what} must be a non-empty string, got {value!r}")
    bad = control_chars(value)
    if bad:
        raise LaunchError(f"{what} {_shown(value)} contains control characters ({bad}); remove them (newlines, "
                          "tabs and escapes cannot go into a command line or a batch script)")
    return value


def check_slurm_options(job_name: str, time_limit: str, partition: Optional[str]) -> None:
    """One :class:`LaunchError` naming the option when a SLURM option is not a plain value of its kind."""
    check_text("--job-name", job_name)
    if not _SLURM_JOB_NAME.fullmatch(job_name):
        raise LaunchError(f"--job-name {_shown(job_name)} is not a plain job name; use at most 200 letters, digits "
                          "and _ . + : @ = , % / - (no spaces, quotes or shell characters)")
    check_text("--time", time_limit)
    if not _SLURM_TIME.fullmatch(time_limit):
        raise LaunchError(f"--time {_shown(time_limit)} is not a SLURM time limit; use minutes, HH:MM:SS or "
                          "D-HH:MM:SS (e.g. 02:00:00)")
    if partition is not None:
        check_text("--partition", partition)
        if not _SLURM_PARTITION.fullmatch(partition):
            raise LaunchError(f"--partition {_shown(partition)} is not a partition name; use letters, digits, "
                              "'_', '-', '.' (several: comma-separated)")


@dataclass(frozen=True)
class LaunchPlan:
    """One node's launch.

    Attributes:
        argv: the command, as an argument list.
        env: environment variables to set for it (on top of the caller's).
        mode: ``"python"``, ``"torchrun"`` or ``"torchrun-multinode"``.
        notes: what was decided and why (printed on stderr).
    """

    argv: Tuple[str, ...]
    env: Dict[str, str] = field(default_factory=dict)
    mode: str = "torchrun"
    notes: Tuple[str, ...] = ()

    def shell(self) -> str:
        """The command as one shell line (environment assignments first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        cmd = " ".join(shlex.quote(a) for a in self.argv)
        return f"{env} {cmd}" if env else cmd


def load_cluster(path: str):
    """The :class:`~dist_compact.run.config.ClusterConfig` of a YAML file (its includes merged).

    Raises:
        LaunchError: the file is missing or malformed, or its degrees do not multiply to
            ``nproc x nnodes`` (the message names the file).
    """
    from dist_compact.run.config import ConfigError
    from dist_compact.run.loader import load_run_config

    try:
        return load_run_config([path]).cluster
    except ConfigError as e:
        raise LaunchError(str(e)) from e


def count_gpus() -> int:
    """CUDA devices visible to this process (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _is_generate(script: str) -> bool:
    return os.path.basename(script) == "generate.py"


def _script_args(script_args: Sequence[str], config_path: str, overrides: Sequence[str]) -> List[str]:
    if not script_args:
        raise LaunchError("no script to launch: put it after '--', e.g. -- generate.py --prompt '...'")
    check_text("--config", str(config_path))
    script, rest = script_args[0], list(script_args[1:])
    if _is_generate(script):
        return [script, "--config", config_path, *overrides, *rest]
    return [script, *rest]


def plan_launch(cluster, config_path: str, script_args: Sequence[str], *, gpus: Optional[int] = None,
                node_rank: Optional[int] = None, master_addr: Optional[str] = None,
                master_port: Optional[int] = None, rdzv_id: str = "dist_compact",
                python: str = sys.executable) -> LaunchPlan:
    """The command for this node (see the module doc for the rules).

    Args:
        cluster: a :class:`~dist_compact.run.config.ClusterConfig`.
        config_path: the cluster file (passed on to ``generate.py``).
        script_args: ``[script, args...]``.
        gpus: GPUs on this node (default: counted with torch; ignored for multi-node plans).
        node_rank: this node's rank (required when ``cluster.nnodes > 1``).
        master_addr, master_port: the rendezvous endpoint (default: the cluster file's).
        rdzv_id: the rendezvous id shared by all nodes of one job.
        python: the interpreter for single-process runs.
    """
    n, nodes = cluster.nproc, cluster.nnodes
    check_text("--rdzv-id", rdzv_id)
    if nodes > 1:
        if node_rank is None:
            raise LaunchError(f"{config_path}: {nodes} nodes: give this node's --node-rank (0..{nodes - 1}), or "
                              "use --slurm for a batch script")
        if not 0 <= node_rank < nodes:
            raise LaunchError(f"--node-rank {node_rank} is outside 0..{nodes - 1} for {config_path}")
        addr = check_text("--master-addr", master_addr or cluster.master_addr)
        port = master_port or cluster.master_port
        argv = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(n), "--node-rank", str(node_rank),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr}:{port}", "--rdzv-id", rdzv_id,
                *_script_args(script_args, config_path, [])]
        return LaunchPlan(tuple(argv), mode="torchrun-multinode")
    if gpus is None:
        gpus = count_gpus()
    notes: List[str] = []
    overrides: List[str] = []
    wants_gpu = cluster.device != "cpu"
    if wants_gpu and gpus == 0:
        if cluster.device == "cuda" or cluster.backend == "nccl":
            overrides += ["--cluster.device", "cpu", "--cluster.backend", "gloo"]
        if n > 1 or overrides:
            notes.append(f"no GPU on this machine: {n} CPU process(es) with gloo (same degrees: ulysses "
                         f"{cluster.ulysses} x ring {cluster.ring})")
    elif wants_gpu and gpus == 1 and n > 1:
        overrides += ["--cluster.nproc", "1", "--cluster.ulysses", "1", "--cluster.ring", "1"]
        notes.append(f"one GPU on this machine but {config_path} asks for {n}: single-GPU fallback, one "
                     "process with ulysses 1 x ring 1")
        n = 1
    elif wants_gpu and 1 < gpus < n:
        raise LaunchError(f"{config_path} asks for {n} GPUs per node but this node has {gpus}; use a cluster config "
                          f"with nproc <= {gpus} (e.g. configs/cluster/1x4-ulysses.yaml)")
    args = _script_args(script_args, config_path, overrides)
    if n == 1:
        return LaunchPlan((python, *args), mode="python", notes=tuple(notes))
    argv = ["torchrun", "--standalone", "--nproc-per-node", str(n), *args]
    # CPU processes share the cores: one thread each (torchrun's own default, without its warning)
    env = {"OMP_NUM_THREADS": "1"} if (gpus == 0 or cluster.device == "cpu") else {}
    return LaunchPlan(tuple(argv), env=env, mode="torchrun", notes=tuple(notes))


def slurm_script(cluster, config_path: str, script_args: Sequence[str], *, job_name: str = "dist_compact",
                 time_limit: str = "02:00:00", partition: Optional[str] = None, cpus_per_task: int = 16,
                 master_port: Optional[int] = None) -> str:
    """A SLURM batch script: one task per node, each running torchrun with c10d rendezvous.

    The rendezvous endpoint is the allocation's first node (``scontrol show hostnames``), the node
    rank ``$SLURM_NODEID`` and the rendezvous id ``$SLURM_JOB_ID``, all read when the job runs.

    Raises:
        LaunchError: a job name, time, partition, path or argument that is not a plain value
            (:func:`check_slurm_options`, :func:`check_text`); nothing is written then.
    """
    n, nodes = cluster.nproc, cluster.nnodes
    check_slurm_options(job_name, time_limit, partition)
    port = master_port or cluster.master_port
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise LaunchError(f"--master-port must be an int in [1, 65535], got {port!r}")
    if not isinstance(cpus_per_task, int) or cpus_per_task < 1:
        raise LaunchError(f"cpus_per_task must be an int >= 1, got {cpus_per_task!r}")
    for i, arg in enumerate(script_args, 1):
        if arg:  # an empty argument is a value like any other (e.g. --prompt '')
            check_text(f"argument {i} after '--'", arg)
    args = _script_args(script_args, config_path, [])
    # $VARS stay unquoted so the task's shell expands them; everything else is quoted
    torchrun = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(n), "--node-rank", '"$SLURM_NODEID"',
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f'"$HEAD_NODE:{port}"', "--rdzv-id", '"$SLURM_JOB_ID"']
    inner = " ".join(torchrun) + " " + " ".join(shlex.quote(a) for a in args)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={shlex.quote(job_name)}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={n}" if cluster.device != "cpu" else "#SBATCH --gpus-per-node=0",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time_limit}",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        f"# generated by launchers/launch.py from {shlex.quote(str(config_path))}: ulysses {cluster.ulysses} x ring {cluster.ring} "
        f"= {nodes} node(s) x {n} process(es)",
        "set -euo pipefail",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export HEAD_NODE",
        f"srun --ntasks-per-node=1 bash -c {shlex.quote('exec ' + inner)}",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from dist_compact.cmdline import OneLineParser

    p = OneLineParser(
        prog="python -m launchers",
        description="Turn a cluster YAML into the command that starts a job (python / torchrun / SLURM).",
        epilog="Everything after '--' is the script and its arguments, e.g. -- generate.py --prompt 'a cat'.",
    )
    p.add_argument("--config", required=True, metavar="YAML", help="cluster config (configs/cluster/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the command (or batch script), do not run it")
    p.add_argument("--slurm", action="store_true", help="write a SLURM batch script to stdout (implies no run)")
    p.add_argument("--node-rank", type=int, help="this node's rank (multi-node configs)")
    p.add_argument("--master-addr", help="rendezvous host (default: the config's master_addr)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: the config's master_port)")
    p.add_argument("--rdzv-id", default="dist_compact", help="rendezvous id, the same on every node")
    p.add_argument("--gpus", type=int, help="GPUs on this node (default: counted with torch)")
    p.add_argument("--job-name", default="dist_compact", help="SLURM job name")
    p.add_argument("--time", default="02:00:00", help="SLURM time limit")
    p.add_argument("--partition", help="SLURM partition")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, script_args = argv[:cut], argv[cut + 1:]
    else:
        own, script_args = argv, []
    args = build_parser().parse_args(own)
    try:
        check_text("--config", args.config)
        check_text("--rdzv-id", args.rdzv_id)
        if args.master_addr is not None:
            check_text("--master-addr", args.master_addr)
        cluster = load_cluster(args.config)
        if args.slurm:
            sys.stdout.write(slurm_script(cluster, args.config, script_args, job_name=args.job_name,
                                          time_limit=args.time, partition=args.partition,
                                          master_port=args.master_port))
            return 0
        kw = dict(node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
                  rdzv_id=args.rdzv_id)
        gpus = args.gpus if args.gpus is not None else count_gpus()
        plan = plan_launch(cluster, args.config, script_args, gpus=gpus, **kw)
        if args.dry_run and args.gpus is None and gpus == 0 and cluster.device != "cpu" and cluster.nnodes == 1:
            # a dry run on a laptop or login node is asked what the GPU cluster will run, not what
            # this machine's CPU fallback would: print the command for a node with the config's GPUs
            target = plan_launch(cluster, args.config, script_args, gpus=cluster.nproc, **kw)
            if target.shell() != plan.shell():
                print(f"launchers: this machine has no GPU; the command below is for a node with {cluster.nproc} "
                      f"GPUs. Run here without --dry-run, it falls back to: {plan.shell()}", file=sys.stderr)
            print(target.shell())
            return 0
    except LaunchError as e:
        print(f"launchers: error: {e}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"launchers: {note}", file=sys.stderr)
    if args.dry_run:
        print(plan.shell())
        return 0
    env = dict(os.environ, **plan.env)
    return subprocess.call(list(plan.argv), env=env)


if __name__ == "__main__":
    sys.exit(main())
