"""llama-adapter: LLaMA-Adapter with fused Triton zero-init prompt attention.

`kernels/` (Triton only) is installed as `llama_adapter.kernels`, never as a top-level `kernels` package:
that name belongs to an unrelated PyPI package that transformers can import.
"""

from setuptools import setup

setup(
    name="llama-adapter",
    version="0.1.0",
    description="LLaMA-Adapter (zero-init gated prompt attention) with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["llama_adapter", "llama_adapter.cli", "llama_adapter.kernels"],
    package_dir={"llama_adapter": "llama_adapter", "llama_adapter.kernels": "kernels"},
    package_data={"llama_adapter": ["demo_data/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "sentencepiece",
        "protobuf",
        "tiktoken",
        "tokenizers",
        "jinja2>=3.1",
        "numpy",
        "einops",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "transformers",
            "peft",
            "safetensors",
            "ruff==0.17.6",  # `make test` checks `ruff format`: the formatter's style changes between releases
            "matplotlib",
            "torchao>=0.18",
            "hypothesis",
        ],
        "quant": ["torchao>=0.18"],  # --quantize nf4|int8 (llama_adapter.quantize)
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["llama-adapter=llama_adapter.cli:main"]},
)
