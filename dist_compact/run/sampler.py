"""The flow-matching Euler sampler of the embedded and random-weight runs.

:func:`sample` calls ``model(x, t, text)`` once per step (the conditional and unconditional inputs as one
batch under classifier-free guidance), sets the step of the model's
:class:`~dist_compact.integrations.core.DenoisingState` before each forward (what its installed
attention reads), times every step (device synchronised, :func:`sync`), and stops with
:class:`NonFiniteLatentsError` naming the step as soon as the latents hold a NaN / Inf.

Latent layout: ``[batch, channels, frames, height, width]`` float32; for the embedded model the
latents are RGB pixels in ``[-1, 1]``. Time runs from ``t = 1`` (noise) to ``t = 0`` (data);
the model predicts the velocity ``dx/dt`` (rectified flow, as Wan / HunyuanVideo).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from ..integrations.core import DenoisingState

__all__ = ["NonFiniteLatentsError", "SampleResult", "flow_timesteps", "sample", "sync"]

# the run's logger: the runner (dist_compact.run.runner) attaches each rank's log file to it
log = logging.getLogger("dist_compact.run")


class NonFiniteLatentsError(FloatingPointError):
    """The latents became NaN / Inf during denoising (the message names the step)."""


def flow_timesteps(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """float32 ``[steps + 1]`` times from 1 to 0; ``shift > 1`` spends more steps near the noise.

    ``t' = shift * t / (1 + (shift - 1) * t)`` on a uniform grid (the SD3 / Wan time shift).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.to(device=device, dtype=torch.float32)


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so wall times measure it; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SampleResult:
    """Output of :func:`sample`.

    Attributes:
        latents: float32 ``[B, C, F, H, W]`` at ``t = 0``.
        step_seconds: wall time of every step (device synchronised).
    """

    latents: torch.Tensor
    step_seconds: List[float] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.step_seconds))


def sample(model, text: torch.Tensor, noise: torch.Tensor, *, steps: int, guidance: float = 1.0,
           shift: float = 1.0, state: Optional[DenoisingState] = None, progress: bool = False,
           null_text: Optional[torch.Tensor] = None,
           on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
           step_labels: Optional[Sequence[str]] = None) -> SampleResult:
    """Flow-matching Euler sampling from ``noise`` (``t = 1``) to data (``t = 0``).

    Args:
        model: ``model(x, t, text) -> velocity`` (e.g. :class:`EmbeddedDiT`, its attention already
            installed).
        text: int64 ``[B, L]`` prompt token ids; ``null_text`` the unconditional ids (default: zeros,
            the empty prompt).
        noise: float32 ``[B, C, F, H, W]`` initial latents.
        steps, shift: number of Euler steps and the time shift (:func:`flow_timesteps`).
        guidance: classifier-free guidance scale; ``!= 1`` runs the conditional and unconditional
            inputs as one batch of ``2B`` and uses ``v_u + guidance * (v_c - v_u)``.
        state: the :class:`DenoisingState` the model's installed attention reads its step from
            (``begin(steps)`` here, then the step before each forward); None: the model keeps none.
        progress: show a tqdm bar (callers pass True on rank 0 only).
        on_step: called as ``on_step(step, latents)`` after every step (tests, previews).
        step_labels: what each step does (:func:`step_kinds`), shown beside the progress bar while
            the step runs, so a slow search step is seen as one.

    Raises:
        NonFiniteLatentsError: the latents hold NaN / Inf after a step (the message names it).
    """
    if state is not None:
        state.begin(steps)
    device = noise.device
    ts_cpu = flow_timesteps(steps, shift)
    ts = ts_cpu.to(device)
    t_host = ts_cpu.tolist()  # for messages: no device read per step
    x = noise.float()
    B = x.shape[0]
    cfg_on = guidance != 1.0
    if cfg_on:
        null = torch.zeros_like(text) if null_text is None else null_text
        text_in = torch.cat([text, null], 0)
    else:
        text_in = text
    bar = None
    if progress:
        from tqdm import tqdm

        # smoothing=0: the rate (and so the ETA) is the mean over all steps so far; tqdm's default
        # moving average made the ETA jump several-fold at every search step (~8x a sparse step on
        # the demo) and fall back after it
        bar = tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, dynamic_ncols=True, smoothing=0)
    result = SampleResult(latents=x)
    try:
        with torch.no_grad():
            for i in range(steps):
                if bar is not None and step_labels is not None:
                    bar.set_postfix_str(f"step {i}: {step_labels[i]}")
                sync(device)
                t0 = time.perf_counter()
                if state is not None:
                    state.step = i
                t = ts[i].expand(B)
                if cfg_on:
                    v = model(torch.cat([x, x], 0), torch.cat([t, t], 0), text_in).float()
                    v_c, v_u = v.chunk(2, 0)
                    v = v_u + guidance * (v_c - v_u)
                else:
                    v = model(x, t, text_in).float()
                x = x + (ts[i + 1] - ts[i]) * v
                bad = ~torch.isfinite(x)
                if bool(bad.any()):
                    raise NonFiniteLatentsError(
                        f"step {i} of {steps} (t={t_host[i]:.4f}): the latents contain "
                        f"{int(bad.sum())} NaN/Inf values of {x.numel()}; stopping the run"
                    )
                sync(device)
                result.step_seconds.append(time.perf_counter() - t0)
                log.info("step %d/%d t=%.4f: %.4f s", i, steps, t_host[i], result.step_seconds[-1])
                if on_step is not None:
                    on_step(i, x)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result.latents = x
    return result
