"""pcbench: a benchmark suite for point-cloud deep learning on a CUDA-free, pure-torch neighbour core."""

__version__ = "0.1.0"
