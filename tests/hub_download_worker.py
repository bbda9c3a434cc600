"""Run by test_hub_download.py in a fresh process (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at
import): for each hub id on the command line, `Reranker.from_pretrained(id)` and its scores of fixed pairs,
or the error it raised; one JSON line per id."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twolar_jax.reranker import Reranker  # noqa: E402

QUERIES = ["turing award", "turing award", "lobster"]
DOCS = ["the turing award", "lobster rolls", "paris is in france"]

for repo_id in sys.argv[1:]:
    try:
        rr = Reranker.from_pretrained(repo_id, batch_size=4, max_length=64, compile_cache=False)
        print(json.dumps({"repo": repo_id, "scores": rr.score_pairs(QUERIES, DOCS).tolist()}), flush=True)
    except Exception as e:  # the test asserts which error and what it says
        print(json.dumps({"repo": repo_id, "error": type(e).__name__, "message": str(e)}), flush=True)
