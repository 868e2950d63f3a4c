"""Shared test helpers: tolerances relative to the low-precision error of PyTorch eager, and the small
random inputs several test files build (Compact configs, a tiny saved Wan pipeline)."""

import random

import torch

from dist_compact.patterns import CompactConfig, FrameGroup, HeadPattern, Window


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_close_to_golden(out, golden, eager_lowp=None, k=3.0, atol=1e-5, what="output"):
    """out vs float64 golden: error <= k * (error of eager PyTorch in the same dtype) + atol.

    NaN never passes. ``eager_lowp`` is the same computation done by PyTorch in the low precision.
    """
    assert not torch.isnan(out).any(), f"{what}: NaN in result"
    err = (out.double() - golden.double()).abs().max().item()
    base = 0.0 if eager_lowp is None else (eager_lowp.double() - golden.double()).abs().max().item()
    assert err <= k * base + atol, f"{what}: max abs error {err:.3g} > {k} x eager {base:.3g} + {atol:g}"


def tol_for(dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def child_env(**extra):
    """The environment for a child process that runs this checkout (not an installed copy), without
    any launcher variables of the parent; ``extra`` set on top."""
    import os
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels")]), OMP_NUM_THREADS="1", **extra)
    return env


def run_concurrently(cmds, timeout=300, **kw):
    """``subprocess.run(cmd, capture_output=True, text=True, **kw)`` for every command of ``cmds``, as many
    at a time as this process has cores (independent processes whose start-up, a torch import each, then
    overlaps); their ``CompletedProcess`` in the order given. ``kw``: keywords common to all (cwd, env)."""
    import os
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, min(len(cmds), cores))) as pool:
        return list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw),
                             cmds))


def cli_flags(pairs):
    """``[("run.steps", "3"), ...]`` -> ``["--run.steps", "3", ...]``: config overrides as command-line flags."""
    return [a for k, v in pairs for a in ("--" + k, v)]


def video_writers_installed() -> bool:
    """Whether the [video] extra is here (the README's test install has it; a bare GPU image may not), by
    the check generate.py runs before any compute."""
    from dist_compact.extras import MissingExtraError
    from dist_compact.run.report import check_writers

    try:
        check_writers()
    except MissingExtraError:
        return False
    return True


def eager_lowp_attention(q, k, v, mask=None, scale=None):
    """Masked attention as PyTorch eager computes it in the inputs' low precision, the way a flash
    kernel does: scores and softmax in float32 from the low-precision q and k, the probabilities
    rounded to the low precision before ``P @ V`` (float32 accumulate), the output rounded. Its error
    against the float64 golden is the reference error of :func:`assert_close_to_golden`.

    q ``[B, Sq, H, D]``, k / v ``[B, Sk, H, D]``; mask bool broadcastable to ``[B, H, Sq, Sk]``.
    Fully masked rows give 0.
    """
    lowp = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.einsum("bhqk,bkhd->bhqd", p.to(lowp).float(), v.float())
    out = torch.where(denom > 0, out / denom.clamp(min=1e-30), torch.zeros_like(out))
    return out.transpose(1, 2).to(lowp)


def random_window(rng, nh, nw):
    """A Compact window of random size (None = unbounded in that axis, 20% of the time)."""
    pick = lambda n: None if rng.random() < 0.2 else rng.randrange(0, n + 1)  # noqa: E731
    return Window(pick(nh), pick(nw))


def random_pattern(rng, nt=5, nh=4, nw=4):
    """Random groups over slab distances: gaps, 0-2 windows, bounded or open last group."""
    cuts = sorted(rng.sample(range(1, nt + 2), rng.randrange(0, 3)))
    bounds = [0] + cuts
    groups = []
    for i, lo in enumerate(bounds):
        last = i == len(bounds) - 1
        hi = (None if rng.random() < 0.5 else lo + rng.randrange(0, 2)) if last else bounds[i + 1] - 1
        k = rng.randrange(1 if lo == 0 else 0, 3)
        groups.append(FrameGroup(lo, hi, tuple(random_window(rng, nh, nw) for _ in range(k))))
    return HeadPattern(tuple(groups))


def random_config(seed, layers=2, heads=3, **kw):
    """A random CompactConfig of ``layers x heads`` patterns (seeded)."""
    rng = random.Random(seed)
    return CompactConfig(tuple(tuple(random_pattern(rng) for _ in range(heads)) for _ in range(layers)), **kw)


def save_tiny_wan_pipeline(folder):
    """A tiny WanPipeline (random weights, word-level tokenizer built offline) saved to ``folder``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in "a red blue square circle moving left right".split():
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8,
                                               relative_attention_max_distance=16))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(str(folder))
    return folder
