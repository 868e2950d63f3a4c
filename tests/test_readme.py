"""The README's runnable blocks run: each block marked ``<!-- readme-test: NAME -->`` is executed here,
on the CPU, with the few strings that name real weights, a GPU or a full-size run replaced by a tiny
stand-in (every replaced string must occur in the block, so an edited README fails here until this
test follows it)."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(name: str) -> str:
    """The fenced block after ``<!-- readme-test: NAME -->``."""
    m = re.search(rf"<!-- readme-test: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", README, re.S)
    assert m, f"README.md has no block marked <!-- readme-test: {name} -->"
    return m.group(1)


def patched(text: str, replacements: dict) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, f"the README block no longer holds {old!r} exactly once"
        text = text.replace(old, new)
    return text


def test_every_marked_block_is_tested():
    names = set(re.findall(r"<!-- readme-test: ([a-z0-9-]+) -->", README))
    tested = {"core-api", "diffusers-1gpu", "diffusers-backend", "generate-1gpu", "launchers", "compact-search"}
    assert names == tested, f"marked in README.md but not run here (or the reverse): {sorted(names ^ tested)}"
    # the set-up commands stay as tests/test_packaging.py and .ci/run expect them
    assert "<!-- main-command -->" in README and "<!-- test-command -->" in README


def _sandbox(tmp_path) -> dict:
    """A working folder like a checkout (configs, launchers, generate.py linked), and an environment whose
    `python` is this interpreter, with the repository importable and no GPU visible."""
    for name in ("configs", "launchers", "generate.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # a wrapper, not a link: a link to a venv's interpreter outside the venv loses the venv
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    # the console scripts as `pip install` writes them: each calls its entry point of setup.cfg
    scripts = {"dist-compact-generate": "dist_compact.cli.generate:console", "dist-compact-launch": "launchers.launch:main",
               "dist-compact-search": "dist_compact.cli.search:main", "dist-compact-train": "dist_compact.cli.train:main"}
    for name, target in scripts.items():
        mod, func = target.split(":")
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c '
                                    f'"import sys; from {mod} import {func}; sys.exit({func}())" "$@"\n')
        (bin_dir / name).chmod(0o755)
    # sbatch stands in for SLURM: it checks the batch script it is given
    (bin_dir / "sbatch").write_text('#!/bin/bash\nhead -n 1 "$1" | grep -qx "#!/bin/bash" && echo "Submitted batch job 1"\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")]))
    return env


def _bash(script: str, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------- blocks
def test_core_api_block_runs_as_written(tmp_path):
    """As a user runs it: a fresh interpreter, no TRITON_INTERPRET (on a CPU the PyTorch path runs; the
    kernels under the interpreter are tested in test_sparse_attention.py)."""
    env = _sandbox(tmp_path)
    env.pop("TRITON_INTERPRET", None)
    (tmp_path / "core_api.py").write_text(block("core-api"))
    out = subprocess.run([sys.executable, "core_api.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.fullmatch(r"density (\d\.\d\d), output \(1, 1200, 4, 64\), mass rows sum to 1: True\n", out.stdout)
    assert m and 0.3 <= float(m.group(1)) <= 0.5, out.stdout


def test_launchers_block_prints_the_gpu_commands(tmp_path):
    env = _sandbox(tmp_path)
    out = _bash(block("launchers"), tmp_path, env)
    model = ("--config configs/models/wan2.1-t2v-14b.yaml --model-path checkpoints/Wan2.1-T2V-14B-Diffusers "
             "--prompt 'a corgi'")
    assert out.stdout.splitlines() == [
        f"torchrun --standalone --nproc-per-node 8 generate.py --config configs/cluster/1x8-ulysses.yaml {model}",
        "torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint node0:29500 "
        f"--rdzv-id dist_compact generate.py --config configs/cluster/2x8-hybrid.yaml {model}",
        "Submitted batch job 1",
    ]
    assert "this machine has no GPU" in out.stderr  # the note names the CPU fallback instead
    script = (tmp_path / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script and "#SBATCH --partition=gpu" in script


def test_generate_1gpu_block_resolves_its_configs(tmp_path):
    """Every config file and flag of the block resolves (the run itself needs the real weights; the
    diffusers path of generate.py runs on a tiny pipeline in tests/integrations/test_diffusers_integration.py)."""
    import yaml

    env = _sandbox(tmp_path)
    cmd = patched(block("generate-1gpu"), {"--compare-dense": "--compare-dense --print-config"})
    cfg = yaml.safe_load(_bash(cmd, tmp_path, env).stdout)
    assert cfg["model"]["kind"] == "diffusers" and cfg["model"]["pipeline"] == "WanPipeline"
    assert cfg["model"]["path"] == "checkpoints/Wan2.1-T2V-1.3B-Diffusers" and cfg["run"]["compare_dense"] is True
    assert cfg["sparsity"]["mode"] == "adaspa" and cfg["sparsity"]["sparsity"] == pytest.approx(0.8)
    assert cfg["run"]["prompt"] == "a corgi running on a beach"


def _run_wan_block(name: str, tmp_path, begin: str) -> dict:
    """Run the README block ``name`` on a tiny saved WanPipeline on the CPU (3 steps); its namespace."""
    from helpers import save_tiny_wan_pipeline

    folder = save_tiny_wan_pipeline(tmp_path / "tiny-wan")
    code = patched(block(name), {
        '"checkpoints/Wan2.1-T2V-1.3B-Diffusers"': repr(str(folder)),
        'torch_dtype=torch.bfloat16).to("cuda")': 'torch_dtype=torch.float32).to("cpu")',
        "height=480, width=832, num_frames=81, num_inference_steps=50":
            "height=64, width=64, num_frames=9, num_inference_steps=3, max_sequence_length=16",
        f"{begin}(50)": f"{begin}(3)",
    })
    scope: dict = {}
    exec(compile(code, f"README.md:{name}", "exec"), scope)
    assert len(scope["video"]) == 9
    return scope


def test_diffusers_1gpu_block_runs_on_a_tiny_pipeline(tmp_path, monkeypatch):
    pytest.importorskip("diffusers", reason="the [diffusers] extra")
    pytest.importorskip("imageio", reason="export_to_video writes through imageio ([video] extra)")
    from dist_compact import installed

    monkeypatch.chdir(tmp_path)
    scope = _run_wan_block("diffusers-1gpu", tmp_path, "state.begin")
    assert (tmp_path / "corgi.mp4").stat().st_size > 0
    assert installed(scope["pipe"].transformer) is not None  # the block-sparse processors ran


def test_diffusers_backend_block_runs_on_a_tiny_pipeline(tmp_path):
    pytest.importorskip("diffusers", reason="the [diffusers] extra")
    from dist_compact import installed

    scope = _run_wan_block("diffusers-backend", tmp_path, ".begin")
    handle = installed(scope["pipe"].transformer)
    assert handle is not None and scope["state"].step == 3
    # our attention ran in every layer at every step (3 steps, the guided and unguided forwards)
    steps = {(r.layer, r.step) for r in handle.stats.records}
    assert steps == {(l, s) for l in range(handle.num_layers) for s in range(3)}, sorted(steps)


def test_compact_search_block_captures_searches_and_runs(tmp_path):
    env = _sandbox(tmp_path)
    small = "--steps 2 --model.frames 4 --run.attn_backend torch --run.video false --run.progress false"
    script = patched(block("compact-search"), {
        "--capture-steps 4,8,12,16": f"--capture-steps 1 -- {small} --run.guidance 1.0",
        "--sparsity.compact_config my-compact.yaml": f"--sparsity.compact_config my-compact.yaml {small} "
                                                      "--output-dir out --name run",
    })
    out = _bash(script, tmp_path, env)
    from dist_compact.search.config_file import load_config

    assert load_config(str(tmp_path / "my-compact.yaml"), model="embedded", num_layers=8, num_heads=6).num_layers == 8
    assert (tmp_path / "reports" / "my-compact").is_dir()
    rep = json.loads((tmp_path / "out" / "run" / "report.json").read_text())
    assert rep["config"]["sparsity"]["mode"] == "compact+adaspa"
    assert rep["config"]["sparsity"]["compact_config"] == "my-compact.yaml"
    assert rep["sparse"]["attention"]["calls"]["sparse"] + rep["sparse"]["attention"]["calls"]["fused_search"] > 0
    assert out.stdout.splitlines()[-3].startswith(f"wrote {os.path.join('out', 'run')} (")


def test_the_set_up_commands_are_shell_lines():
    """The two set-up commands and the GPU install line parse as shell words (a typo in quoting would not)."""
    for marker in ("main-command", "test-command"):
        text = README.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
        line = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("```")][0]
        assert shlex.split(line)[:3] == ["pip", "install", "torch==2.13.0"]
    assert 'pip install torch==2.13.0 && pip install -e ".[video,diffusers]"' in README


def test_the_demo_section_shows_what_the_run_prints():
    """The console example's schedule line is the demo's, and the speed-up command is the report's."""
    from dist_compact.run.config import DEMO_SPARSITY
    from dist_compact.run.report import REAL_SPEEDUP_COMMAND
    from dist_compact.sparsity.config import describe_schedule

    assert f"\nschedule: {describe_schedule(DEMO_SPARSITY, 20)}\n" in README
    assert "\nspeed: speed-up vs dense not measured (add --compare-dense for a dense run from the same noise); " in README
    assert f"\n{REAL_SPEEDUP_COMMAND}\n" in README
