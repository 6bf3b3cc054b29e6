"""``python -m distill.train_lit``: train the LiT teacher's projections (probe) or fine-tune its towers (the command lives in :mod:`distill.pipeline.lit.train`; this entry point only runs it)."""
from distill.pipeline.cli import cli_main
from distill.pipeline.lit.train import main

if __name__ == "__main__":
    cli_main(main)
