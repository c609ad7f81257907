"""The measurements of ``tools/benchmark.py``, grouped by what they measure.

``system``: the process and the machine (peak memory, CPU model, load, statistics, subprocesses);
``kernels``: FLOP counting, the matmul peak, memory bandwidth, the step's GEMMs and elementwise
kernels; ``training``: the lab's training step timed on real and in-memory batches, the allocator,
bfloat16 and torch.compile; ``data``: MFCC extraction, embedding, scoring and train.py's first epoch;
``models``: every network's training and embedding throughput, fp32 and bf16, against the best dense
kernel (matmul, conv1d, conv2d).

Each section is a function ``measure_<what>(bench)`` that reads the settings of a
``benchmark.Bench`` and writes into it (``bench.record``, ``bench.result``). Only
``tools/benchmark.py`` is a command; these modules have no ``main``.
"""
