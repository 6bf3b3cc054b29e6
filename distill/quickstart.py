"""``python -m distill.quickstart``: the end-to-end quickstart on the bundled sample (the command lives in :mod:`distill.pipeline.quickstart`; this entry point only runs it)."""
from distill.pipeline.cli import cli_main
from distill.pipeline.quickstart import main

if __name__ == "__main__":
    cli_main(main)
