from setuptools import find_packages, setup

setup(
    name="tvgeo_jax",
    version="0.1.0",
    description="Task-vector geometry, merging and representation analysis of fine-tuned "
                "BERT-family encoders in JAX/Flax.",
    packages=find_packages(include=["tvgeo_jax", "tvgeo_jax.*", "experiments", "benchmarks"]),
    # The embedded base shipped with the package (tvgeo_jax.embedded.SHIPPED_DIR).
    package_data={"tvgeo_jax": ["assets/embedded_base/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "huggingface_hub>=0.25",
        "safetensors>=0.4",
        "numpy>=1.26",
        "scipy>=1.13",
        "scikit-learn>=1.5",
        "absl-py>=2.1",
        "matplotlib>=3.8",
        "adjustText>=1.1",
        "umap-learn>=0.5.7",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is pinned to the CPU build that the project's machines carry on disk:
        # an unpinned torch (pulled in by peft) would download a multi-GB CUDA build.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "peft>=0.13", "chex>=0.1.87",
                 "tensorboard>=2.15"],
    },
)
