"""rstar_jax: rStar-Math (self-evolved deep thinking for small LMs) in JAX."""
from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"

setup(
    name="rstar_jax",
    version="0.1.0",
    description="rStar-Math in JAX/Flax: code-augmented MCTS, PPM and self-evolution rounds",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["rstar_jax*", "experiments*"]),
    install_requires=[
        f"jax=={JAX_VERSION}",
        f"jaxlib=={JAX_VERSION}",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "numpy==2.4.6",
        "ml-dtypes==0.6.0",
        "transformers==5.24.0",
        "tokenizers==0.23.3",
        "sentencepiece==0.2.3",
        "protobuf==7.36.2",
        "safetensors==0.8.0",
        "sympy==1.14.0",
        "math-verify==0.9.0",
        "latex2sympy2_extended==1.11.0",
        "antlr4-python3-runtime==4.13.2",
        "tensorflow-datasets==4.9.10",
        "importlib_resources==7.1.0",  # tfds needs it for builders inside packages (declared only for py<3.9)
        "array-record==0.8.6",
        "tensorboardX==2.6.5",
        "absl-py==2.5.1",
        # Evaluation plots (PNG, headless Agg backend) and matplotlib's own requirements, pinned.
        "matplotlib==3.10.7",
        "contourpy==1.3.3",
        "cycler==0.12.1",
        "fonttools==4.68.0",
        "kiwisolver==1.5.1",
        "pillow==13.0.0",
        "pyparsing==3.3.3",
        "python-dateutil==4.0.0",
    ],
    extras_require={
        # Parity tests compare against HF's PyTorch Qwen2 (CPU wheel).
        "test": ["pytest==9.0.3", "pytest-xdist==3.8.0", "execnet==2.1.2", "torch==2.13.0"],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "cuda": [f"jax[cuda12]=={JAX_VERSION}"],
        # experiments.bench.tree compares with mctx's muzero_policy for scale.
        "bench": ["mctx==0.0.6", "chex==0.1.92", "toolz==1.2.0"],
    },
)
