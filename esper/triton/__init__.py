"""Triton backend: a blueprint becomes a few fused Triton kernels (forward and
backward) around cuBLAS/cuDNN matmuls, compiled ahead of time for an explicit GPU
target and launched from shipped binaries. Importing this package loads neither
torch nor triton; ``esper.triton.backend`` registers the ``triton`` backend."""
