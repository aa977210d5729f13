"""torch.compile of the training models (config `train.compile`) and the other settings of a fast step.

    train.compile: auto      "regional" on CUDA, off elsewhere (the default)
                   regional  compile the repeated transformer layer (`modeling.backbone.SDPAEncoderLayer`):
                             every layer of both towers and both models runs the same compiled code, so
                             compile time is that of one layer per distinct call (vision / text, last layer
                             or not, training / evaluation), not of 4 x 12 layers
                   full      compile each TRPRModel as a whole (longer compile; graph breaks where the
                             fused heads' top-k selection and the loss kernels leave the graph)
                   false     eager (also "off")

What the compiled layers change: elementwise work around the matrix products (LayerNorm, quick-GELU,
residual adds, autocast casts) is fused by Inductor; the products stay cuBLAS / SDPA. Numerics change
at float rounding level only (fused kernels reorder float operations), so the eager CPU demo keeps its
numbers by running eagerly ("auto" on the CPU).

TF32 (`fast_math`) is scoped to the training forward (`engine.step.encode_view`, the ALR pass's encoding),
never set process-wide.
"""
from __future__ import annotations

import contextlib

import torch

from trpr.configs import COMPILE_MODES
from trpr.kernels.precision import matmul_precision
from trpr.modeling.backbone import SDPAEncoderLayer

# distinct compiled variants of the one layer code: {vision, text} x {last layer, other} x {train, eval},
# text lengths (dynamic after the first change) and evaluation batch sizes: well above dynamo's default 8
RECOMPILE_LIMIT = 64


def resolve_compile_mode(setting, device) -> str:
    """config train.compile (a mode name, or false) -> "regional" | "full" | "off" on `device`."""
    if setting is False or setting == "off":
        return "off"
    if setting not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of auto, regional, full, false; got {setting!r}")
    if setting == "auto":
        return "regional" if torch.device(device).type == "cuda" else "off"
    return setting


def compile_model(model: torch.nn.Module, mode: str, backend: str = "inductor") -> int:
    """Compile `model` (a TRPRModel, or any module holding SDPAEncoderLayer layers) in place, before it is
    wrapped by DDP: mode "regional" compiles every SDPAEncoderLayer (`nn.Module.compile`: the module keeps
    its parameters and state-dict names), "full" the whole module, "off" nothing. backend: a
    torch.compile backend ("aot_eager" traces without code generation, for tests).
    Returns the number of modules compiled."""
    if mode == "off":
        return 0
    if mode not in ("regional", "full"):
        raise ValueError(f"compile mode must be regional, full or off, got {mode!r}")
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
    if mode == "full":
        model.compile(backend=backend)
        return 1
    layers = [module for module in model.modules() if isinstance(module, SDPAEncoderLayer)]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def fast_math_enabled(device) -> bool:
    """Whether `fast_math` turns TF32 on for `device`: on CUDA only (the CPU demo keeps its numbers)."""
    return torch.device(device).type == "cuda"


def fast_math(device) -> contextlib.AbstractContextManager:
    """A context for the model's forward only: on CUDA, float32 matrix products may use TF32 tensor cores
    (the few products that autocast leaves in float32, e.g. the attention row of the fused heads);
    nothing on the CPU. Scoped, not global: the loss slabs and retrieval scores (`trpr.kernels`, which
    force "highest" in any case) and every evaluation (validation in the trainer, eval_3rtpr.py) run
    outside it, so that validation and eval_3rtpr.py score a checkpoint with the same products."""
    if not fast_math_enabled(device):
        return contextlib.nullcontext()
    return matmul_precision("high")
