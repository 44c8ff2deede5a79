"""What this machine computes fast (CPU flags, GPU compute capability): `auto` precision."""

from __future__ import annotations

import tensorflow as tf

# CPU instruction sets with bfloat16 matmuls (Intel AMX, AVX512-BF16).
BFLOAT16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# GPUs from Ampere (compute capability 8.0) on have bfloat16 tensor cores.
BFLOAT16_GPU_CAPABILITY = (8, 0)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of this machine's CPU (empty where /proc/cpuinfo is missing)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """The compute capability of each GPU TensorFlow sees (`(0, 0)` where it is not reported)."""
    gpus = tf.config.list_physical_devices("GPU")
    details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
    return [tuple(d.get("compute_capability", (0, 0))) for d in details]


def has_fast_bfloat16() -> bool:
    """Whether bfloat16 matmuls are fast here: on every GPU if there are any, else on the CPU."""
    capabilities = gpu_compute_capabilities()
    if capabilities:
        return all(c >= BFLOAT16_GPU_CAPABILITY for c in capabilities)
    return bool(cpu_flags() & BFLOAT16_CPU_FLAGS)


def resolve_precision(precision: str) -> str:
    """`training.precision` with `auto` resolved.

    `auto` is `mixed_bfloat16` where bfloat16 matmuls are fast: a CPU with AMX-BF16 or
    AVX512-BF16 (there the multi30k_lstm model trains 1.4x as fast as in float32, see
    bench/train.py) or a GPU of compute capability 8.0 or more; else `float32`.
    """
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if has_fast_bfloat16() else "float32"
