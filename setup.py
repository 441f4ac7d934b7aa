"""vans_jax: VANS (Video-as-Answer) in JAX/Flax, with Joint-GRPO training."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.5",
    "flax>=0.12",
    "optax",
    "orbax-checkpoint",
    "grain",
    "ml_collections",
    "clu",
    "tensorboardX",  # TensorBoard event files for the clu metric writer, without TensorFlow
    "transformers>=4.50",
    "safetensors",
    "numpy",
    "ml_dtypes",
    "pillow",
    "av",
    "rouge-score",
    "scipy",
    "filelock",   # JAX's compilation-cache lock (apps.compile_cache sets a size limit, which turns it on)
]
TFDS = ["tensorflow-datasets"]  # builder only; no TensorFlow needed (array_record format)
APP = ["gradio>=5"]  # `vans-jax serve`, the web demo (imported only by it)
TEST = TFDS + APP + [
    "selenium",           # the browser tests drive Debian's chromium (+ chromium-driver, from apt: .ci/run)
    "tensorboard",        # its event reader reads back the training media summaries
    "pytest",
    "pytest-xdist",       # pytest.ini runs the suite on two workers
    # The CPU build of torch: an unpinned torch pulls several GB of CUDA packages.
    "torch==2.13.0",
    "diffusers",
]

setup(
    name="vans_jax",
    version="0.1.0",
    description="VANS (Video-as-Answer) in JAX/Flax: Qwen2.5-VL + Wan2.1 with Joint-GRPO",
    packages=find_packages(include=["vans_jax", "vans_jax.*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={"test": TEST, "tfds": TFDS, "app": APP},
    entry_points={"console_scripts": ["vans-jax=vans_jax.apps.cli:main"]},
)
