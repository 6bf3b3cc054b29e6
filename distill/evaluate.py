"""``python -m distill.evaluate``: zero-shot retrieval evaluation (Recall@1/5/10, RSUM) (the command lives in :mod:`distill.pipeline.evaluate`; this entry point only runs it)."""
from distill.pipeline.cli import cli_main
from distill.pipeline.evaluate import main

if __name__ == "__main__":
    cli_main(main)
