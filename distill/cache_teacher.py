"""``python -m distill.cache_teacher``: run a frozen teacher once and write its outputs to a sharded cache (the command lives in :mod:`distill.pipeline.cache.main`; this entry point only runs it)."""
from distill.pipeline.cli import cli_main
from distill.pipeline.cache.main import main

if __name__ == "__main__":
    cli_main(main)
