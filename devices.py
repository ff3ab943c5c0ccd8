"""Where and how the step runs: the device and its precision, DDP processes and micro-batches
(each with its share of the global batch), and torch.compile, with a check that compile works
before the first step. The method is corruption.py's whatever is chosen here; the precision
and the split of the batch change the numerics and the random draws, not the recipe.
"""
import contextlib
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from machinery import FlagError, TrainError


def pick(choice):
    """The device that --device auto|cuda|cpu names: auto is CUDA where there is one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise FlagError("--device cuda but no CUDA device is available; use --device cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def setup_device(choice):
    """(device, rank, world). Under torchrun: one process per GPU (NCCL), or gloo on CPUs."""
    kind = pick(choice).type
    rank, world = 0, 1
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", torch.cuda.current_device()), rank, world
    return torch.device("cpu"), rank, world


def cpu_has_native_bf16():
    """AVX-512 BF16 or AMX: the CPU multiplies bf16 in hardware (torch's own checks)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def precision(device, amp=None, use_compile=None):
    """(amp, compile, why) for the step on this device; --amp and --compile (not None) win.
    CUDA: bf16 (fp16 where it has none) and compile. A CPU with native bf16: bf16 and compile
    (its bf16 matmuls run several times faster than float32). Other CPUs: eager float32, the
    fastest measured there (RESULTS.md "CPU speed")."""
    if device.type == "cuda":
        auto = "bf16" if torch.cuda.is_bf16_supported() else "fp16", True, "CUDA"
    elif cpu_has_native_bf16():
        auto = "bf16", True, "a CPU with native bf16"
    else:
        auto = "off", False, "a CPU without native bf16"
    if amp == "fp16" and device.type == "cpu":
        raise TrainError("--amp fp16 needs CUDA; use --amp bf16 or off on the CPU")
    chosen = (amp or auto[0], auto[1] if use_compile is None else use_compile)
    given = [f for f, v in (("--amp", amp), ("--compile", use_compile)) if v is not None]
    return (*chosen, auto[2] + (f"; {' and '.join(given)} given" if given else ""))


def autocast(device, amp):
    """The forward pass's autocast: bf16 or fp16, or none."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype, enabled=dtype is not None)


def noise_free_share(batch_size, r_t0, rank, world):
    """This rank's share of the int(B * r_t0) noise-free images of the global batch B."""
    n = int(batch_size * r_t0)
    return n // world + (rank < n % world)


def micro_batches(batch_size, r_t0, rank, world, accum):
    """This process's micro-batches: micro-batch i stands for rank rank * accum + i of
    world * accum, with its share of the batch and of the noise-free images. With accum > 1 the
    shares must be equal (one graph for every micro-batch)."""
    ranks = world * accum
    n0 = int(batch_size * r_t0)
    if accum > 1 and (batch_size % ranks or n0 % ranks):
        raise TrainError(f"--grad-accum {accum}{f' on {world} processes' if world > 1 else ''}: "
                         f"the batch of {batch_size} ({n0} noise-free) does not split into "
                         f"{ranks} equal micro-batches; pick a --grad-accum that divides both")
    return [SimpleNamespace(rank=rank * accum + i, last=i == accum - 1,
                            n0=noise_free_share(batch_size, r_t0, rank * accum + i, ranks))
            for i in range(accum)]


class DDP(DistributedDataParallel):
    """DDP that lends its network's attributes (patch_size, num_patches, num_classes), as
    torch.compile's wrapper does, so that the loss reads them through any wrapper."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def sync_grads(net, last):
    """The context of one micro-batch's forward and backward: under DDP, no_sync() for all but
    the last, so that gradients are averaged over the processes once per step."""
    ddp = getattr(net, "_orig_mod", net)
    return contextlib.nullcontext() if last or not isinstance(ddp, DDP) else ddp.no_sync()


def wrap(model, device, world, use_compile, idle_mask_token):
    """DDP (several processes) and torch.compile around the same weights."""
    if world > 1:
        # DDP must not talk in forward: ranks may run one forward or two (the model has no
        # buffers to sync). static_graph: the mask token gets no gradient on a rank with nothing
        # masked (find_unused_parameters walks only the last of two forwards, and fails).
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    static_graph=idle_mask_token)
    if use_compile:  # static shapes: each group of a UMD step has a fixed token count, so 2 graphs
        compile_preflight(device)  # no Triton or C compiler: one line now, not a traceback later
        model = torch.compile(model, dynamic=False)
    return model


_COMPILE_CHECKED = set()  # (device type, backend) pairs that passed compile_preflight


def compile_preflight(device, backend="inductor"):
    """Compile a tiny network on `device`, forward and backward, once per process: where the
    compiler stack cannot work (no Triton, no C compiler), stop with one line that names
    --no-compile instead of a long traceback at the first step."""
    if (device.type, backend) in _COMPILE_CHECKED:
        return
    nn = torch.nn
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1)).to(device)
    try:
        loss = torch.compile(net, backend=backend, dynamic=False, fullgraph=True)(
            torch.randn(8, 16, device=device)).square().mean()
        loss.backward()
        if not torch.isfinite(loss).item():
            raise RuntimeError("a non-finite result from a finite input")
    except Exception as e:  # the innermost cause says what is missing
        for _ in range(8):
            inner = getattr(e, "inner_exception", None) or e.__cause__
            if not isinstance(inner, Exception):
                break
            e = inner
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:240]
        raise TrainError(f"torch.compile does not work on this machine ({type(e).__name__}: "
                         f"{reason}); pass --no-compile to train without it") from None
    _COMPILE_CHECKED.add((device.type, backend))
