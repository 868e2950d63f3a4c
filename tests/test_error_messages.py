"""The table of bad inputs and their one-line messages in docs/errors.md, checked against what the code
prints today (run ``python tests/test_error_messages.py`` to rewrite the table after a deliberate change).

Every case runs the real entry point (generate's, train's and search's ``main``, the launcher, the
library call) on a hostile input and takes the one line it prints or raises; paths are shown as DIR
(a scratch folder) and WEIGHTS (a small weights file). Cases that need a machine without CUDA are
skipped on a GPU machine, their rows kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import sys
from typing import Callable, Dict, List, Tuple

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
BEGIN, END = "<!-- cases:begin -->", "<!-- cases:end -->"
NO_CUDA = "needs no CUDA"

#: id -> (what the input is, needs, function(dir, weights) -> the one line)
CASES: Dict[str, Tuple[str, str, Callable]] = {}


def case(cid: str, what: str, needs: str = ""):
    def add(fn):
        CASES[cid] = (what, needs, fn)
        return fn
    return add


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _one_line(fn, *args) -> str:
    """What ``fn(*args)`` prints on stderr (or raises as SystemExit text): exactly one line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            fn(*args)
        except SystemExit as e:
            if isinstance(e.code, str):
                err.write(e.code + "\n")
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _generate(d, weights, *argv, **env) -> str:
    from dist_compact.cli.generate import main

    base = ["--model-path", str(weights), "--model.frames", "4", "--model.height", "16", "--model.width", "16",
            "--steps", "2", "--run.progress", "false", "--run.video", "false", "--output-dir", str(d / "out")]
    with _env(**env):
        return _one_line(main, base + list(argv))


def _raised(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the case
        text = str(e)
        assert "\n" not in text, text
        return f"{type(e).__name__}: {text}"
    raise AssertionError("no error")


# ---------------------------------------------------------------------------------------------- generate
@case("config-binary", "`--config` a file of binary bytes")
def _(d, w):
    (d / "bin.yaml").write_bytes(bytes(range(256)))
    return _generate(d, w, "--config", str(d / "bin.yaml"))


@case("config-directory", "`--config` a directory")
def _(d, w):
    (d / "folder.yaml").mkdir()
    return _generate(d, w, "--config", str(d / "folder.yaml"))


@case("include-directory", "`include:` naming a directory")
def _(d, w):
    (d / "folder").mkdir()
    (d / "inc.yaml").write_text("include: folder\n")
    return _generate(d, w, "--config", str(d / "inc.yaml"))


@case("duplicate-section", "a config with `run:` twice (YAML merged them silently)")
def _(d, w):
    (d / "dup.yaml").write_text("run:\n  steps: 3\nmodel:\n  frames: 4\nrun:\n  seed: 2\n")
    return _generate(d, w, "--config", str(d / "dup.yaml"))


@case("floats", "`guidance: 1e300`, `shift: 1.0e300`, `sparsity: 8e-1` in a file (refused as strings)")
def _(d, w):
    from dist_compact.run.loader import load_run_config

    (d / "f.yaml").write_text("run:\n  guidance: 1e300\n  shift: 1.0e300\nsparsity:\n  sparsity: 8e-1\n")
    cfg = load_run_config([d / "f.yaml"])
    return (f"accepted: run.guidance = {cfg.run.guidance!r}, run.shift = {cfg.run.shift!r}, "
            f"sparsity.sparsity = {cfg.sparsity.sparsity!r} (and `--run.guidance 1e300` on the command line)")


@case("include-diamond", "`include:` a diamond 21 levels deep (41 files, each included twice; it hung)")
def _(d, w):
    import dist_compact.run.loader as loader
    from dist_compact.run.loader import load_run_config

    for i in range(21):
        for side in "ab":
            text = f"include: [d{i + 1}a.yaml, d{i + 1}b.yaml]\n" if i < 20 else f"run: {{seed: {i}}}\n"
            (d / f"d{i}{side}.yaml").write_text(text)
    reads = []
    real = loader._read_mapping
    loader._read_mapping = lambda p: reads.append(p) or real(p)
    try:
        cfg = load_run_config([d / "d0a.yaml"])
    finally:
        loader._read_mapping = real
    return f"accepted: {len(reads)} files, each read once (run.seed = {cfg.run.seed})"


@case("seed-2**70", "`--seed 1180591620717411303424` (2**70)")
def _(d, w):
    return _generate(d, w, "--seed", str(2 ** 70))


@case("name-newline", "`--name` with a newline")
def _(d, w):
    return _generate(d, w, "--name", "a\nb")


@case("name-300", "`--name` of 300 characters")
def _(d, w):
    return _generate(d, w, "--name", "x" * 300)


@case("steps", "`--steps 100000`")
def _(d, w):
    return _generate(d, w, "--steps", "100000")


@case("video-memory", "`--model.frames 4096 --model.height 16384 --model.width 16384` (on the CPU)")
def _(d, w):
    line = _generate(d, w, "--model.frames", "4096", "--model.height", "16384", "--model.width", "16384",
                     "--cluster.device", "cpu")
    return re.sub(r"but [\d.]+ GiB are free", "but N GiB are free", line)


@case("output-dir-file", "`--output-dir` an existing file")
def _(d, w):
    (d / "a_file").write_text("x")
    return _generate(d, w, "--output-dir", str(d / "a_file"))


@case("model-path-directory", "`--model-path` a directory")
def _(d, w):
    return _generate(d, w, "--model-path", str(d))


def _weights_with(d, name, config_text=None, shape=None):
    import safetensors.torch as st

    from dist_compact.models.embedded import _FORMAT, load_embedded, sha256_of

    model = load_embedded(d / "w" / "small.safetensors")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shape is not None:
        sd["patch_embed.weight"] = torch.zeros(shape)
    path = d / f"{name}.safetensors"
    st.save_file(sd, str(path), metadata={"format": _FORMAT, "config": config_text or model.config.to_json()})
    (d / f"{name}.safetensors.sha256").write_text(f"{sha256_of(path)}  {path.name}\n")
    return path


def _small_config(**change):
    from dist_compact.models.embedded import EmbeddedConfig

    cfg = json.loads(EmbeddedConfig(dim=64, depth=2, heads=2, frames=4, height=16, width=16).to_json())
    return json.dumps({**cfg, **change})


@case("weights-metadata-not-json", "weights whose metadata config is not JSON")
def _(d, w):
    return _generate(d, w, "--model-path", str(_weights_with(d, "notjson", "{depth: 2")))


@case("weights-metadata-list", "weights whose metadata config is a JSON list")
def _(d, w):
    return _generate(d, w, "--model-path", str(_weights_with(d, "list", "[64, 2]")))


@case("weights-rope-theta-string", "weights whose metadata has `\"rope_theta\": \"1000\"`")
def _(d, w):
    return _generate(d, w, "--model-path", str(_weights_with(d, "theta", _small_config(rope_theta="1000"))))


@case("weights-larger-than-tensors", "weights whose metadata says 10**9 blocks (it was built before any check)")
def _(d, w):
    return _generate(d, w, "--model-path", str(_weights_with(d, "deep", _small_config(depth=10 ** 9))))


@case("weights-wrong-shape", "weights with a tensor of the wrong shape")
def _(d, w):
    return _generate(d, w, "--model-path", str(_weights_with(d, "shape", shape=(3, 3))))


@case("weights-pending-checksum", "weights renamed into place, their checksum not (a training save killed between "
                                  "its renames)")
def _(d, w):
    from dist_compact.models.embedded import pending_checksum_path, sha256_of

    path = _weights_with(d, "pending", shape=(3, 3))  # new weights (their content does not matter here)
    pending_checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n")
    (d / "pending.safetensors.sha256").write_text(f"{'0' * 64}  {path.name}\n")  # the previous save's
    return _generate(d, w, "--model-path", str(path))


@case("compact-config-binary", "`--sparsity.compact_config` a file of binary bytes (the message named no file)")
def _(d, w):
    (d / "cc.yaml").write_bytes(bytes(range(256)))
    return _generate(d, w, "--sparsity.mode", "compact", "--sparsity.compact_config", str(d / "cc.yaml"))


@case("diffusers-without-path", "`--model.kind diffusers` without `--model-path`")
def _(d, w):
    from dist_compact.cli.generate import main

    return _one_line(main, ["--model.kind", "diffusers", "--model.name", "wan2.1-t2v-14b", "--model.pipeline",
                            "WanPipeline", "--output-dir", str(d / "out")])


@case("attn-backend-triton-cpu", "`--run.attn_backend triton` on a CPU (it was checked after the model loaded)", NO_CUDA)
def _(d, w):
    return _generate(d, w, "--run.attn_backend", "triton", TRITON_INTERPRET=None)


@case("cluster-device-cuda", "`--cluster.device cuda` without a GPU", NO_CUDA)
def _(d, w):
    return _generate(d, w, "--cluster.device", "cuda")


@case("world-size-abc", "`WORLD_SIZE=abc`")
def _(d, w):
    return _generate(d, w, WORLD_SIZE="abc")


@case("master-port-abc", "`MASTER_PORT=abc` in a hand-made 2-process environment")
def _(d, w):
    return _generate(d, w, "--config", str(ROOT / "configs/cluster/cpu-demo.yaml"), WORLD_SIZE="2", RANK="0",
                     LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="abc", TORCHELASTIC_RUN_ID=None)


@case("stale-rank", "`RANK=1 WORLD_SIZE=2` left in a shell, one process, `--seed -1` (nothing was printed)")
def _(d, w):
    return _generate(d, w, "--seed", "-1", RANK="1", WORLD_SIZE="2", TORCHELASTIC_RUN_ID=None)


@case("alias-bomb", "a 9-level YAML alias bomb as `run.prompt` (the line was 1.26 GB)")
def _(d, w):
    levels = "abcdefghi"
    lines = [f"{levels[0]}: &{levels[0]} [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip(levels, levels[1:])]
    text = "\n".join("  " + ln for ln in lines)
    (d / "bomb.yaml").write_text(f".anchors:\n{text}\nrun:\n  prompt: *i\n")
    return _generate(d, w, "--config", str(d / "bomb.yaml"))


# ---------------------------------------------------------------------------------------------- other commands
def _search(*argv) -> str:
    from dist_compact.cli.search import main

    return _one_line(lambda: sys.exit(main(list(argv))))


def _mass(d) -> pathlib.Path:
    from dist_compact.layout import VideoLayout
    from dist_compact.search.capture import MassStore

    path = d / "mass.pt"
    MassStore.for_layout(VideoLayout(2, 8, 8, tile=(1, 4, 4), text_tokens=4), 1, 2, model="tiny").save(str(path))
    return path


@case("search-device-cuda", "`search --device cuda` on a CPU", NO_CUDA)
def _(d, w):
    return _search("search", str(_mass(d)), "--out", str(d / "c.yaml"), "--device", "cuda")


@case("search-out-missing-folder", "`search --out` into a missing folder")
def _(d, w):
    return _search("search", str(_mass(d)), "--out", str(d / "missing" / "c.yaml"), "--device", "cpu")


@case("capture-steps", "`capture --capture-steps a,b` (the option was not named)")
def _(d, w):
    return _search("capture", "--out-dir", str(d), "--prompt", "a cat", "--capture-steps", "a,b")


@case("train-resume-text", "`train --resume` a text file")
def _(d, w):
    from dist_compact.models.train import main

    (d / "notes.txt").write_text("not a checkpoint\n")
    return _one_line(main, ["--resume", str(d / "notes.txt"), "--out", str(d / "t.safetensors")])


@case("train-heads-5", "`train --heads 5`")
def _(d, w):
    from dist_compact.models.train import main

    return _one_line(main, ["--heads", "5", "--out", str(d / "t.safetensors")])


def _slurm(*options) -> str:
    from launchers.launch import main

    return _one_line(main, ["--config", str(ROOT / "configs/cluster/2x8-hybrid.yaml"), "--slurm", *options, "--",
                            "generate.py"])


@case("slurm-job-name", "`launchers --slurm --job-name $'x\\ntouch pwned'`")
def _(d, w):
    return _slurm("--job-name", "x\ntouch pwned")


@case("slurm-partition", "`launchers --slurm --partition 'gpu;touch pwned'`")
def _(d, w):
    return _slurm("--partition", "gpu;touch pwned")


@case("slurm-time", "`launchers --slurm --time $'1:00\\ntouch pwned'`")
def _(d, w):
    return _slurm("--time", "1:00\ntouch pwned")


# ---------------------------------------------------------------------------------------------- library
@case("blockindex-float", "`BlockIndex(counts, indices.float(), ...)` (float block numbers were truncated)")
def _(d, w):
    from dist_compact import BlockIndex

    return _raised(lambda: BlockIndex(torch.ones(1, 1, 2, dtype=torch.int32), torch.tensor([[[[0.0], [1.7]]]]), 32, 2))


@case("scale-nan", "`block_sparse_attention(..., scale=nan)` (also inf, 0, < 0; every entry point)")
def _(d, w):
    from dist_compact import BlockIndex, block_sparse_attention

    q = torch.randn(1, 64, 2, 32)
    return _raised(lambda: block_sparse_attention(q, q, q, BlockIndex.full(1, 2, 2, 2, 32), scale=float("nan")))


# ---------------------------------------------------------------------------------------------- the table
def _normalise(text: str, d: pathlib.Path, weights: pathlib.Path) -> str:
    return text.replace(str(weights), "WEIGHTS").replace(str(d), "DIR")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def measure(d: pathlib.Path, weights: pathlib.Path, ids=None) -> Dict[str, str]:
    out = {}
    for cid, (_, needs, fn) in CASES.items():
        if ids is not None and cid not in ids:
            continue
        sub = d / cid
        sub.mkdir()
        (sub / "w").mkdir()
        for f in weights.parent.iterdir():
            (sub / "w" / f.name).write_bytes(f.read_bytes())
        out[cid] = _normalise(fn(sub, sub / "w" / weights.name), sub, sub / "w" / weights.name)
    return out


def render(messages: Dict[str, str]) -> str:
    rows = ["| case | input | one line (stderr, or the exception) |", "| --- | --- | --- |"]
    rows += [f"| {cid} | {_cell(CASES[cid][0])} | `` {_cell(messages[cid])} `` |" for cid in CASES]
    return "\n".join(rows)


def documented() -> Dict[str, str]:
    text = DOC.read_text()
    table = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    out = {}
    for line in table.strip().splitlines()[2:]:
        cells = re.split(r"(?<!\\)\|", line)[1:-1]
        out[cells[0].strip()] = cells[2].strip()[3:-3].replace("\\|", "|")
    return out


@pytest.mark.parametrize("cid", list(CASES))
def test_documented_message_is_what_the_code_says(cid, tmp_path, small_weights):
    needs = CASES[cid][1]
    if needs == NO_CUDA and torch.cuda.is_available():
        pytest.skip("the case needs a machine without CUDA")
    doc = documented()
    assert cid in doc, f"{cid} is missing from docs/errors.md: run `python tests/test_error_messages.py`"
    got = measure(tmp_path, small_weights, {cid})[cid]
    assert got == doc[cid], f"docs/errors.md is out of date for {cid}: run `python tests/test_error_messages.py`"


def test_the_table_has_no_other_rows():
    assert list(documented()) == list(CASES)


def test_fault_lines_are_documented():
    """The lines of the process faults (asserted word for word in tests/parallel/test_faults.py) are in the doc."""
    import importlib.util
    import sys

    def load(rel):  # a test module of a sub-folder (the one pytest imported, else a fresh copy)
        path = pathlib.Path(__file__).resolve().parent / rel
        if path.stem in sys.modules:
            return sys.modules[path.stem]
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    test_cli_failures, test_faults = load("cli/test_cli_failures.py"), load("parallel/test_faults.py")
    test_run_folder = load("run/test_run_folder.py")

    text = DOC.read_text()
    for line in [*test_faults.DOCUMENTED, test_cli_failures.CTRL_C_LINE, test_run_folder.FULL_DISK_LINE]:
        assert line in text, line


def _write_table() -> None:
    """Rewrite docs/errors.md's table from what the code prints now."""
    import tempfile

    from dist_compact.models.embedded import EmbeddedConfig, EmbeddedDiT, save_embedded

    with tempfile.TemporaryDirectory() as t:
        d = pathlib.Path(t)
        torch.manual_seed(0)
        save_embedded(EmbeddedDiT(EmbeddedConfig(dim=64, depth=2, heads=2, frames=4, height=16, width=16)),
                      d / "w" / "small.safetensors")
        (d / "cases").mkdir()
        table = render(measure(d / "cases", d / "w" / "small.safetensors"))
    text = DOC.read_text()
    DOC.write_text(text[:text.index(BEGIN) + len(BEGIN)] + "\n" + table + "\n" + text[text.index(END):])
    print(f"rewrote the table of {DOC} ({len(CASES)} cases)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _write_table()
