"""Packaging: every package is listed in setup.cfg, nothing installs a top-level `kernels`, the console
scripts work after `pip install -e .` from any directory, and the CPU paths need no Triton."""

import configparser
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _listed():
    return {p.strip() for p in _cfg()["options"]["packages"].split() if p.strip()}


def test_every_package_is_listed():
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "dist_compact").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    found |= {"dist_compact_kernels", "launchers"}
    assert found == _listed(), f"setup.cfg [options] packages must list exactly {sorted(found)}"


def test_no_top_level_kernels_module():
    assert "kernels" not in _listed()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/ must stay a plain folder: a package there would shadow Hugging Face's `kernels`"
    )
    mapping = _cfg()["options"]["package_dir"]
    assert "dist_compact_kernels = kernels/dist_compact_kernels" in mapping


def test_kernels_package_imports_beside_a_kernels_module(tmp_path, monkeypatch):
    """A regular top-level `kernels` package (as Hugging Face's) wins over our plain folder."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("HF_KERNELS = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))  # the repository root first, as when running generate.py
    import sys

    ours = lambda: [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]  # noqa: E731
    for name in ours():
        monkeypatch.delitem(sys.modules, name)
    try:
        hf = importlib.import_module("kernels")
        assert getattr(hf, "HF_KERNELS", False)
        import dist_compact_kernels

        assert hasattr(dist_compact_kernels, "block_sparse_fwd")
    finally:  # the stand-in must not stay imported: later imports of Hugging Face's kernels would get it
        for name in ours():
            del sys.modules[name]


def test_no_side_effects_at_import(monkeypatch):
    import os
    import subprocess
    import sys

    code = "import os, dist_compact; print(sorted(os.environ) == sorted(eval(os.environ['SNAP'])))"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["SNAP"] = ""
    env["SNAP"] = repr(sorted(env))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True" and out.stderr == ""


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    cmd = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("```")]
    assert len(cmd) == 1, "the README test-command block must hold one command line"
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert cmd[0].strip() in ci, ".ci/run must run the README's test command exactly"


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    """Each optional import site says which extra of setup.cfg installs what is missing."""
    import sys


    from dist_compact.extras import EXTRAS, MissingExtraError, install_hint, require

    extras = set(_cfg()["options.extras_require"])
    assert set(EXTRAS) <= extras, f"extras named to users but not in setup.cfg: {sorted(set(EXTRAS) - extras)}"
    assert install_hint("diffusers") == 'pip install "dist_compact[diffusers]" (from a checkout: pip install -e ".[diffusers]")'
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        install_hint("gpu")
    with pytest.raises(MissingExtraError, match=r"feature X needs the \[usp\] extra \(dist_compact_no_such_mod is not "
                                                r"installed\): pip install \"dist_compact\[usp\]\""):
        require("dist_compact_no_such_mod", "usp", "feature X")

    from dist_compact.run import report
    from dist_compact.models.adapters.wan import WanAdapter
    from dist_compact.models.published import build_transformer

    for mod in ("diffusers", "imageio"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import mod` raises ImportError
    with pytest.raises(ImportError, match=r"needs the \[diffusers\] extra .*dist_compact\[diffusers\]"):
        WanAdapter.matches(object())
    with pytest.raises(ImportError, match=r"random-weight Wan / HunyuanVideo transformers needs the \[diffusers\]"):
        build_transformer("wan", {}, "cpu", None, None)
    with pytest.raises(ImportError, match=r"writing the video .* needs the \[video\] extra"):
        report.check_writers()


def test_random_model_without_diffusers_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    """docs/usage.md's CPU example after the main command alone (no [diffusers]): one error line naming the extra."""
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    spec = importlib.util.spec_from_file_location("generate_main", ROOT / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rc = gen.main(["--config", str(ROOT / "configs/models/hunyuanvideo-random.yaml"), "--model.size", "small",
                   "--model.frames", "13", "--model.height", "128", "--model.width", "192", "--model.tile", "1,4,4",
                   "--cluster.device", "cpu", "--cluster.backend", "gloo", "--run.attn_backend", "torch", "--steps", "3",
                   "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert 'needs the [diffusers] extra (diffusers is not installed): pip install "dist_compact[diffusers]"' in err
    assert list(tmp_path.iterdir()) == []


CONSOLE_SCRIPTS = {"dist-compact-generate": "usage: dist-compact-generate", "dist-compact-launch": "usage:",
                   "dist-compact-search": "usage: dist-compact-search", "dist-compact-train": "usage:"}


def test_console_scripts_are_declared():
    scripts = {line.split("=")[0].strip(): line.split("=")[1].strip()
               for line in _cfg()["options.entry_points"]["console_scripts"].splitlines() if line.strip()}
    assert set(scripts) == set(CONSOLE_SCRIPTS)
    for target in scripts.values():  # every entry point names a function that exists
        mod, func = target.split(":")
        assert callable(getattr(importlib.import_module(mod), func)), target


def _pip_works() -> bool:
    import subprocess
    import sys

    try:
        import venv  # noqa: F401
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_pip_install_editable_then_every_console_script_from_another_directory(tmp_path):
    """`pip install -e .` into a fresh environment, then each console script's --help (and `python -m
    launchers`) from a directory outside the checkout: the installed entry points, not the working tree."""
    import os
    import subprocess
    import sys
    import sysconfig

    if not _pip_works():
        pytest.skip("pip, venv or setuptools is not available here")
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, pyyaml, setuptools, ...) come from this environment, as plain paths: its own
    # .pth files (an editable install of another checkout among them) are not run
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write("\n".join(sorted(here)) + "\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                              "--no-build-isolation", "--no-index", "-q", "-e", str(ROOT)],
                             capture_output=True, text=True, timeout=600, env=clean)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from helpers import run_concurrently

    # the six commands are independent: they run as many at a time as there are cores
    where, *procs, proc = run_concurrently(
        [[str(py), "-c", "import dist_compact, launchers; print(dist_compact.__file__); print(launchers.__file__)"]]
        + [[str(env_dir / "bin" / script), "--help"] for script in CONSOLE_SCRIPTS]
        + [[str(py), "-m", "launchers", "--help"]], cwd=elsewhere, env=clean)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(line.startswith(str(ROOT)) for line in where.stdout.split()), where.stdout
    for (script, usage), p in zip(CONSOLE_SCRIPTS.items(), procs):
        assert p.returncode == 0 and usage in p.stdout, (script, p.stderr[-2000:])
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_cpu_paths_run_without_triton():
    """Where Triton has no wheels it is not installed (setup.cfg's marker): the package imports and the
    CPU op runs the PyTorch reference."""
    import subprocess
    import sys

    code = ("import sys, importlib.util\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'triton' else real(n, *a)\n"
            "sys.modules['triton'] = None\n"
            "import torch, dist_compact\n"
            "from dist_compact import BlockIndex, block_sparse_attention, dense_attention\n"
            "q = torch.randn(1, 32, 2, 16)\n"
            "out = block_sparse_attention(q, q, q, BlockIndex.full(1, 2, 2, 2, 16))\n"
            "assert torch.allclose(out, dense_attention(q, q, q, block_size=16, backend='torch'), atol=1e-6)\n"
            "import dist_compact.cli.generate, dist_compact.run.generation\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = [line for line in _cfg()["options"]["install_requires"].splitlines() if "triton" in line]
    assert marker and "platform_system" in marker[0]
