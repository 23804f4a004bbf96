"""One accelerator per job: which device a job computes on, and its base-weight precision.

Snakemake's local executor counts ``gpu`` resources but does not say *which*
GPU a job may use, so four ``gpu=1`` jobs under ``--resources gpu=4`` would all
land on ``cuda:0``. Each job here claims a free device with an exclusive
``flock`` on a lock file named after the physical device; the kernel releases the
lock when the process ends, killed or not, so a crashed job never leaves a device
claimed. Under SLURM (one allocated GPU, ``CUDA_VISIBLE_DEVICES`` set) the job
simply takes it.

Determinism on CUDA (docs/gpu.md): the backward passes (training, per-sample gradients) and k-means run
inside :func:`deterministic_algorithms`, PyTorch's deterministic mode (strict: the memory-efficient and
flash attention backward then sum in a fixed order instead of with atomics, ``index_add_`` sorts,
cuDNN attention is not chosen), so the same job on the same GPU model and software stack repeats bit
for bit. An op without a deterministic CUDA implementation raises in strict mode; callers catch that
(:func:`is_nondeterminism_error`), log it and go on in warn-only mode, where that job is no longer
bit-repeatable. What stays different across GPU models, library versions, batch sizes and CPU vs GPU
is float rounding, never a dropped sample or a changed seed.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOCK_DIR_ENV = "CLUSTERUCB_GPU_LOCK_DIR"
# cuBLAS is deterministic on one stream only with one of these workspace configs (PyTorch refuses GEMMs in
# deterministic mode otherwise); read by PyTorch at each GEMM, so setting it before the first one suffices.
CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")

_held: dict[int, int] = {}  # claimed device index -> open lock file descriptor (kept for the process's life)


def base_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"config key 'precision.base_dtype': {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def default_lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"clusterucb-gpu-locks-{os.getuid()}")


def physical_ids(device_count: int, visible: str | None) -> list[str]:
    """The physical name of each visible device index (``CUDA_VISIBLE_DEVICES`` maps index -> physical)."""
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return names[:device_count] if len(names) >= device_count else [str(i) for i in range(device_count)]


def claim_device_index(
    device_count: int, lock_dir: str | Path, visible: str | None = None, wait_s: float = 3600.0, poll_s: float = 2.0
) -> int:
    """Lock and return the index of a free device among ``device_count``; waits (up to ``wait_s``) while all are taken."""
    if device_count < 1:
        raise ValueError("no device to claim")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    names = physical_ids(device_count, visible)
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        for index, name in enumerate(names):
            if index in _held:
                continue
            fd = os.open(lock_dir / f"gpu-{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _held[index] = fd
            return index
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"all {device_count} GPUs stayed claimed for {wait_s:.0f} s (locks in {lock_dir}); is --resources gpu= larger than the GPU count?"
            )
        if not announced:
            log.warning("all %d GPUs are claimed by other jobs; waiting (locks in %s)", device_count, lock_dir)
            announced = True
        time.sleep(poll_s)


def release_device_index(index: int) -> None:
    fd = _held.pop(index, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def device() -> torch.device:
    """This job's device: CPU without CUDA; the only visible GPU; else a GPU no other job holds."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    os.environ.setdefault(CUBLAS_ENV, CUBLAS_DETERMINISTIC[0])  # before the job's first GEMM creates its cuBLAS handle
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda:0")
    if _held:
        return torch.device(f"cuda:{next(iter(_held))}")
    index = claim_device_index(count, default_lock_dir(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    torch.cuda.set_device(index)
    log.info("claimed cuda:%d of %d visible GPUs", index, count)
    return torch.device(f"cuda:{index}")


@contextmanager
def deterministic_algorithms(device, strict: bool = True):
    """PyTorch's deterministic algorithms for the duration, on CUDA only (CPU kernels are deterministic already).

    ``strict=False`` is warn-only mode: ops without a deterministic implementation warn instead of raising
    (and run non-deterministically), the fallback after :func:`is_nondeterminism_error`. The previous mode is
    restored on exit.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    workspace = os.environ.setdefault(CUBLAS_ENV, CUBLAS_DETERMINISTIC[0])
    if workspace not in CUBLAS_DETERMINISTIC:
        log.warning(
            "%s=%s is not one of %s: cuBLAS is not deterministic, so deterministic mode is warn-only",
            CUBLAS_ENV,
            workspace,
            CUBLAS_DETERMINISTIC,
        )
        strict = False
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def is_nondeterminism_error(error: BaseException) -> bool:
    """An op refused by strict deterministic mode (it has no deterministic CUDA implementation)."""
    return isinstance(error, RuntimeError) and "does not have a deterministic implementation" in str(error)


def release_memory(device) -> None:
    """After an out-of-memory error has been handled (outside its ``except``, so its traceback no longer holds
    the failed batch's tensors): collect what is unreachable and hand the allocator's cached blocks back."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
