"""torch.distributed for kdad: which rank this process is (torchrun's environment), the process
group (NCCL on GPUs, gloo on CPUs), BatchNorm over the global batch, and ``--nproc`` launching.

A process not started by torchrun is rank 0 of 1 and never touches torch.distributed.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from kdad.engine.pool import cores_per
from kdad.errors import KdadError


@dataclass(frozen=True)
class Rank:
    """This process's place among the ranks torchrun started (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local: int = 0  # rank on this node: picks the GPU

    @property
    def main(self) -> bool:
        """Rank 0 logs, shows progress and writes checkpoints."""
        return self.rank == 0


def current() -> Rank:
    """The rank from torchrun's RANK, WORLD_SIZE and LOCAL_RANK variables."""
    try:
        return Rank(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as e:
        raise KdadError(f"bad torchrun environment: {e}") from e


def resolve_device(name: str) -> torch.device:
    """ "auto" is a CUDA GPU when there is one (the rank's own under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", current().local)
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise KdadError(f"unknown device {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdadError(f"device {name!r} asked for, but no CUDA GPU is available")
    return dev


def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in Linux's /proc/cpuinfo; None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 in hardware: a CUDA GPU that supports it, or a
    CPU with AVX512-BF16 or AMX (read from Linux's /proc/cpuinfo; False where it cannot be
    read). Elsewhere bfloat16 is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool({"avx512_bf16", "amx_bf16"} & set((_cpuinfo("flags") or "").split()))


def describe_machine(device: torch.device) -> dict[str, str | int]:
    """Where a result was computed (the device, its name, torch, CPU threads), kept with the
    metrics so that timings and last-bit differences can be traced to a machine."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "name": name,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def ensure_group(device: torch.device) -> Rank:
    """Join the process group when there are several ranks (once per process): NCCL for CUDA
    devices, gloo for the CPU. Rendezvous is torchrun's (MASTER_ADDR, MASTER_PORT)."""
    r = current()
    if r.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return r


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op for a single process)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable plain data)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_reduce(x: Tensor) -> Tensor:
    """Differentiable sum over ranks. ``torch.distributed.nn``'s is deprecated in favour of the
    functional collectives, but those abort gloo ranks at exit in torch 2.13: keep the old one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return dist_nn.all_reduce(x)


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span the global batch of every rank, for CPU ranks
    on gloo: ``torch.nn.SyncBatchNorm`` refuses CPU tensors. Differentiable all-reduces
    (``torch.distributed.nn``) of per-channel sums make it compute what one process computes on
    the whole batch: biased variance to normalise, unbiased in the running estimate. Outside
    training or without a process group it is plain BatchNorm2d (same state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        count = x.new_tensor([x.numel() // c])
        total = _all_reduce(torch.cat([x.sum((0, 2, 3)), count]))  # (C + 1,)
        n = total[-1]
        mean = total[:-1] / n  # (C,)
        d = x - mean.view(1, c, 1, 1)
        var = _all_reduce((d * d).sum((0, 2, 3))) / n  # (C,) biased
        y = d * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * n / (n - 1).clamp(min=1), m)
        return y


def _to_cpu_sync(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a CPUSyncBatchNorm holding a copy of its
    parameters and buffers (convert before building the optimiser)."""
    if type(module) is nn.BatchNorm2d:
        like = next(t for t in (module.weight, module.running_mean) if t is not None)
        new = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, device=like.device, dtype=like.dtype,
        )  # fmt: skip
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _to_cpu_sync(child))
    return module


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch on several ranks: ``torch.nn.SyncBatchNorm`` on GPUs,
    CPUSyncBatchNorm on CPUs. Frozen (eval-mode) BatchNorm, as in the teacher, is unchanged in
    effect: both use running statistics outside training. State dict keys are unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_cpu_sync(model)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``kdad ARGV`` as ``nproc`` ranks on this machine with torchrun (standalone
    rendezvous); CPU ranks share the cores unless OMP_NUM_THREADS is set."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise KdadError(f"--nproc must be at least 1, got {nproc}")
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(cores_per(nproc))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "kdad", *argv]
    )
    try:
        run(args)
    except ChildFailedError:  # the failing rank printed its own error
        print(f"kdad: error: a rank of {nproc} failed (its error is above)", file=sys.stderr)
        return 1
    return 0
