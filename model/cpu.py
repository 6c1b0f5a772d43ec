"""What this CPU runs natively: the one check both the trainer's autocast (model/engine.py) and
the tokenizer's bf16 opt-in (stages/tokenize.py) consult, kept apart from either so that a change
to the trainer does not invalidate the token stores."""
from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512 / AMX on x86, bf16 on Arm). Without
    them bf16 autocast is emulated: on a 2-core AVX2 EPYC a micro MIM step ran 11x slower than
    fp32 (bench/amp.py: 15.1 against 1.4 s at 28 px), against 1.49x faster with AVX512-BF16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN's check: judge by the ISA
        return torch.backends.cpu.get_cpu_capability() == "AVX512"
