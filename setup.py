"""nlpress: compress NLP models in JAX/Flax (precision, quantization, pruning, distillation, module
replacement) and ship them to GPUs through ONNX and TensorRT.

The version bounds admit what was tested (see constraints.txt for the exact set); ``make install`` installs
with those constraints.
"""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "absl-py>=2.5,<3",
    "ml-collections>=1.1,<2",
    "transformers>=5.24,<6",  # tokenizers and configs only: v5 has no Flax models
    "tokenizers>=0.23,<0.24",
    "datasets>=5.2,<6",
    "safetensors>=0.8,<0.9",
    "numpy>=2.4,<3",
    "tqdm>=4.70,<5",
    "matplotlib>=3.11,<4",
    "onnx>=1.23,<1.24",
    "onnxruntime>=1.32,<1.33",
    "tensorboardX>=2.6.5,<3",  # TensorBoard event files without TensorFlow
]

setup(
    name="nlpress",
    version="0.1.0",
    description="Compress NLP models in JAX/Flax and ship them to GPUs",
    python_requires=">=3.11",
    packages=find_packages(include=["compression*", "models*", "experiments*"]),
    install_requires=CORE,
    extras_require={
        # jax2onnx: a second JAX -> ONNX converter, used only as a differential oracle for ours in tests.
        "test": ["pytest>=9,<10", "pytest-xdist>=3.8,<4", "jax2onnx>=0.13,<0.14"],
        # CPU PyTorch, only as a parity oracle in tests and the peer in benchmarks; never imported at run time.
        "torch": ["torch>=2.13,<2.16"],
        "tensorrt": ["tensorrt>=10", "cuda-python"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
    },
)
