"""Test-wide environment: offline hubs and the Triton interpreter, set before anything imports triton.
The repository root is on sys.path through pytest.ini (`pythonpath = .`) or an installed package."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
