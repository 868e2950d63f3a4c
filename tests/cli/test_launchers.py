"""launchers/: the command lines generated for every cluster YAML (dry run), fallbacks, SLURM, errors."""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's launchers/, whether or not an install put another on the path

from launchers.launch import LaunchError, load_cluster, plan_launch, slurm_script  # noqa: E402

CLUSTER = ROOT / "configs" / "cluster"
GEN = ["generate.py", "--prompt", "a cat"]


def plan(name, gpus, **kw):
    path = f"configs/cluster/{name}.yaml"
    return plan_launch(load_cluster(str(ROOT / path)), path, GEN, gpus=gpus, python="python", **kw)


# (config, gpus on the node) -> the exact command line
EXPECTED = {
    ("1x4-ulysses", 8): "torchrun --standalone --nproc-per-node 4 generate.py --config configs/cluster/1x4-ulysses.yaml "
                        "--prompt 'a cat'",
    ("1x8-ulysses", 8): "torchrun --standalone --nproc-per-node 8 generate.py --config configs/cluster/1x8-ulysses.yaml "
                        "--prompt 'a cat'",
    ("1x8-hybrid", 8): "torchrun --standalone --nproc-per-node 8 generate.py --config configs/cluster/1x8-hybrid.yaml "
                       "--prompt 'a cat'",
    # single-GPU fallback: one plain process, degrees 1
    ("1x8-ulysses", 1): "python generate.py --config configs/cluster/1x8-ulysses.yaml --cluster.nproc 1 "
                        "--cluster.ulysses 1 --cluster.ring 1 --prompt 'a cat'",
    # gloo fallback: the same degrees on CPU processes
    ("1x8-hybrid", 0): "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 8 generate.py --config "
                       "configs/cluster/1x8-hybrid.yaml --cluster.device cpu --cluster.backend gloo --prompt 'a cat'",
    ("1x4-ulysses", 0): "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 generate.py --config "
                        "configs/cluster/1x4-ulysses.yaml --cluster.device cpu --cluster.backend gloo --prompt 'a cat'",
}


@pytest.mark.parametrize("name,gpus", list(EXPECTED), ids=[f"{n}-gpus{g}" for n, g in EXPECTED])
def test_single_node_command_lines(name, gpus):
    p = plan(name, gpus)
    assert p.shell() == EXPECTED[(name, gpus)]
    assert p.mode == ("python" if gpus == 1 else "torchrun")
    assert bool(p.notes) == (gpus < 2)


@pytest.mark.parametrize("name", ["cpu-demo", "1gpu"])
def test_main_job_cluster_files(name):
    """cpu-demo runs 2 gloo processes anywhere; 1gpu is one plain python process."""
    if not (CLUSTER / f"{name}.yaml").is_file():
        pytest.skip(f"configs/cluster/{name}.yaml is not in this checkout")
    for gpus in (0, 1, 8):
        p = plan(name, gpus)
        if name == "1gpu":
            assert p.argv == ("python", "generate.py", "--config", "configs/cluster/1gpu.yaml", "--prompt", "a cat")
        else:
            assert p.argv[:4] == ("torchrun", "--standalone", "--nproc-per-node", "2") and not p.notes


def test_every_shipped_cluster_file_gives_a_command():
    for path in sorted(CLUSTER.glob("*.yaml")):
        cluster = load_cluster(str(path))
        kw = {"node_rank": 0} if cluster.nnodes > 1 else {}
        p = plan_launch(cluster, str(path), GEN, gpus=cluster.nproc, **kw)
        assert "generate.py" in p.argv and str(path) in p.argv


def test_two_nodes_use_c10d_rendezvous():
    p = plan("2x8-hybrid", None, node_rank=1)
    assert p.shell() == (
        "torchrun --nnodes 2 --nproc-per-node 8 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint node0:29500 "
        "--rdzv-id dist_compact generate.py --config configs/cluster/2x8-hybrid.yaml --prompt 'a cat'"
    )
    p = plan("2x8-hybrid", None, node_rank=0, master_addr="10.0.0.5", master_port=6000, rdzv_id="job7")
    assert "--rdzv-endpoint 10.0.0.5:6000 --rdzv-id job7" in p.shell()
    with pytest.raises(LaunchError, match="--node-rank"):
        plan("2x8-hybrid", None)
    with pytest.raises(LaunchError, match="outside 0..1"):
        plan("2x8-hybrid", None, node_rank=2)


def test_slurm_script_runs_torchrun_on_every_node():
    path = "configs/cluster/2x8-hybrid.yaml"
    text = slurm_script(load_cluster(str(ROOT / path)), path, ["generate.py", "--prompt", "a cat's toy"],
                        partition="gpu")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu"):
        assert want in lines
    srun = [ln for ln in lines if ln.startswith("srun ")]
    assert len(srun) == 1
    # what each node's shell runs, with the SLURM variables expanded as bash would
    words = shlex.split(srun[0])
    assert words[:4] == ["srun", "--ntasks-per-node=1", "bash", "-c"]
    env = dict(os.environ, SLURM_NODEID="1", HEAD_NODE="gpu-a01", SLURM_JOB_ID="42")
    out = subprocess.run(["bash", "-c", words[4].replace("exec torchrun", "printf '%s\\n' torchrun")], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "1", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", "gpu-a01:29500", "--rdzv-id", "42", "generate.py", "--config", path,
                   "--prompt", "a cat's toy"]


def test_other_scripts_get_their_arguments_unchanged():
    p = plan_launch(load_cluster(str(CLUSTER / "1x4-ulysses.yaml")), "c.yaml", ["benchmarks/model_forward.py", "--small"],
                    gpus=4)
    assert p.argv == ("torchrun", "--standalone", "--nproc-per-node", "4", "benchmarks/model_forward.py", "--small")


def test_degrees_that_do_not_multiply_to_the_gpu_count(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {nproc: 8, nnodes: 1, ulysses: 4, ring: 1}\n")
    with pytest.raises(LaunchError, match=r"bad.yaml.*ulysses x ring = 4 x 1 = 4 ranks, but the world size is 8.* = 8"):
        load_cluster(str(bad))
    bad.write_text("cluster: {nproc: 8, nnodes: 2, ulysses: 8, ring: 1}\n")
    with pytest.raises(LaunchError, match="= 16"):
        load_cluster(str(bad))
    # the CLI: one line on stderr, exit code 2, nothing run
    out = subprocess.run([sys.executable, "-m", "launchers", "--config", str(bad), "--dry-run", "--", *GEN],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("launchers: error: ") and "bad.yaml" in out.stderr and len(out.stderr.splitlines()) == 1


def test_too_few_gpus_for_the_node_is_an_error():
    with pytest.raises(LaunchError, match="asks for 8 GPUs per node but this node has 4"):
        plan("1x8-ulysses", 4)


def test_cli_dry_run_prints_the_command(monkeypatch, capsys):
    from helpers import run_concurrently

    entries = (["-m", "launchers"], ["launchers/launch.py"])
    for out in run_concurrently([[sys.executable, *argv, "--config", "configs/cluster/1x8-ulysses.yaml", "--gpus", "8",
                                  "--dry-run", "--", *GEN] for argv in entries], cwd=ROOT):
        assert out.returncode == 0, out.stderr
        assert out.stdout == EXPECTED[("1x8-ulysses", 8)] + "\n"
    code, _, err = _launchers_here(["--config", "configs/cluster/1x8-ulysses.yaml", "--dry-run"], ROOT, monkeypatch,
                                   capsys)
    assert code == 2 and "no script to launch" in err


def test_dry_run_without_gpus_prints_the_gpu_command(monkeypatch, capsys):
    """On a machine without GPUs a dry run shows what the GPU node will run; the CPU fallback is named
    on stderr (it is what running here would do)."""
    import launchers.launch as launch

    monkeypatch.setattr(launch, "count_gpus", lambda: 0)
    assert launch.main(["--config", "configs/cluster/1x8-ulysses.yaml", "--dry-run", "--", *GEN]) == 0
    out, err = capsys.readouterr()
    assert out == EXPECTED[("1x8-ulysses", 8)] + "\n"
    assert err == ("launchers: this machine has no GPU; the command below is for a node with 8 GPUs. Run here "
                   "without --dry-run, it falls back to: OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 8 "
                   "generate.py --config configs/cluster/1x8-ulysses.yaml --cluster.device cpu --cluster.backend gloo "
                   "--prompt 'a cat'\n")
    # a one-process config gives the same command either way: no note
    assert launch.main(["--config", "configs/cluster/1gpu.yaml", "--dry-run", "--", *GEN]) == 0
    out, err = capsys.readouterr()
    assert out == f"{sys.executable} generate.py --config configs/cluster/1gpu.yaml --prompt 'a cat'\n" and err == ""
    # --gpus 0 asks for this machine's plan explicitly: the CPU fallback, as before
    assert launch.main(["--config", "configs/cluster/1x8-hybrid.yaml", "--gpus", "0", "--dry-run", "--", *GEN]) == 0
    out, err = capsys.readouterr()
    assert out == EXPECTED[("1x8-hybrid", 0)] + "\n" and "no GPU on this machine" in err

    # a real launch on this machine runs the fallback
    ran = []
    monkeypatch.setattr(launch.subprocess, "call", lambda argv, env: ran.append(argv) or 0)
    assert launch.main(["--config", "configs/cluster/1x8-ulysses.yaml", "--", *GEN]) == 0
    assert ran and "--cluster.device" in ran[0] and "gloo" in ran[0]


# ---------------------------------------------------------------------------------------------- hostile input
INJECTIONS = {
    "job-name-newline": (["--job-name", "x\ntouch {pwned}"], "--job-name"),
    "job-name-substitution": (["--job-name", "$(touch {pwned})"], "--job-name"),
    "job-name-quote": (["--job-name", "a'; touch {pwned}; '"], "--job-name"),
    "partition-newline": (["--partition", "gpu\ntouch {pwned}"], "--partition"),
    "partition-semicolon": (["--partition", "gpu;touch {pwned}"], "--partition"),
    "time-newline": (["--time", "02:00:00\ntouch {pwned}"], "--time"),
    "time-word": (["--time", "$(touch {pwned})"], "--time"),
    "script-arg-newline": (["--", "generate.py", "--prompt", "a\ntouch {pwned}"], "argument 3 after '--'"),
    "rdzv-id-newline": (["--rdzv-id", "x\ny"], "--rdzv-id"),
}


def _launchers_here(args, cwd, monkeypatch, capsys):
    """``python -m launchers ARGS`` run in this process (its ``__main__`` module and its ``sys.exit``, by
    runpy): (exit code, stdout, stderr). A fresh interpreter costs a torch import (seconds on a 2-core
    machine) per call; the launcher as a process is run by the tests above and below."""
    import runpy

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["launchers", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        runpy.run_module("launchers", run_name="__main__", alter_sys=True)
    out, err = capsys.readouterr()
    return ended.value.code, out, err


@pytest.mark.parametrize("case", list(INJECTIONS))
def test_slurm_injection_attempts_fail_with_one_line(tmp_path, case, monkeypatch, capsys):
    """Every attempt to put a command into the batch script is refused before anything is written:
    exit 2, nothing on stdout, one line on stderr naming the option."""
    pwned = tmp_path / "pwned"
    extra, option = INJECTIONS[case]
    extra = [a.replace("{pwned}", str(pwned)) for a in extra]
    script = extra[extra.index("--"):] if "--" in extra else ["--", *GEN]
    own = extra[:extra.index("--")] if "--" in extra else extra
    code, stdout, stderr = _launchers_here(["--config", "configs/cluster/2x8-hybrid.yaml", "--slurm", *own, *script],
                                           ROOT, monkeypatch, capsys)
    assert code == 2 and stdout == "", (stdout, stderr)
    assert len(stderr.splitlines()) == 1 and stderr.startswith(f"launchers: error: {option} "), stderr
    assert not pwned.exists()


def test_config_path_with_a_newline_is_refused(tmp_path):
    """A real cluster file whose name holds a newline (it would end the script's comment line)."""
    evil = tmp_path / "c\ntouch pwned\n.yaml"
    evil.write_text((CLUSTER / "2x8-hybrid.yaml").read_text())
    with pytest.raises(LaunchError, match=r"^--config .* control characters \(\\n\)"):
        slurm_script(load_cluster(str(evil)), str(evil), GEN)
    out = subprocess.run([sys.executable, "-m", "launchers", "--config", str(evil), "--slurm", "--", *GEN],
                         cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1
    assert "--config" in out.stderr and not (tmp_path / "pwned").exists()


def test_generated_batch_script_runs_no_injected_command(tmp_path):
    """Shell characters that are allowed (in arguments and the config path) stay data: the whole batch
    script runs under bash with stand-ins for scontrol / srun / torchrun, and torchrun receives every
    argument verbatim while no injected command runs."""
    pwned = tmp_path / "pwned"
    hostile = f"a cat'; touch {pwned}; echo \"$(touch {pwned})\" `touch {pwned}` $HOME"
    cfg_path = tmp_path / "my $(touch pwned) cluster's.yaml"
    cfg_path.write_text((CLUSTER / "2x8-hybrid.yaml").read_text())
    text = slurm_script(load_cluster(str(cfg_path)), str(cfg_path), ["generate.py", "--prompt", hostile],
                        job_name="run-1.a+b@c", partition="gpu,debug", time_limit="1-00:30:00")
    assert len(text.splitlines()) == 13  # one line per directive / command, whatever the values
    bindir = tmp_path / "bin"
    bindir.mkdir()
    args_file = tmp_path / "torchrun.args"
    stubs = {"scontrol": "#!/bin/bash\necho node-a\n",
             "srun": "#!/bin/bash\nshift\nexec \"$@\"\n",  # drop --ntasks-per-node=1, run the rest
             "torchrun": f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {shlex.quote(str(args_file))}\n"}
    for name, body in stubs.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    (tmp_path / "job.sbatch").write_text(text)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-a", SLURM_NODEID="0",
               SLURM_JOB_ID="7")
    subprocess.run(["bash", str(tmp_path / "job.sbatch")], cwd=tmp_path, env=env, check=True, timeout=60)
    got = args_file.read_text().split("\n")[:-1]
    assert got[-5:] == ["generate.py", "--config", str(cfg_path), "--prompt", hostile]
    assert got[got.index("--rdzv-endpoint") + 1] == "node-a:29500"
    assert not pwned.exists() and not (tmp_path / "pwned").exists()
    directives = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --job-name=run-1.a+b@c" in directives and "#SBATCH --partition=gpu,debug" in directives
    assert "#SBATCH --time=1-00:30:00" in directives


@pytest.mark.parametrize("value", ["02:00:00", "30", "30:00", "1-0", "1-12:00", "2-00:00:00", "UNLIMITED"])
def test_slurm_time_forms_accepted(value):
    path = "configs/cluster/2x8-hybrid.yaml"
    assert f"#SBATCH --time={value}\n" in slurm_script(load_cluster(str(ROOT / path)), path, GEN, time_limit=value)
