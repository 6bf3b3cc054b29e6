"""``python -m distill.train_student``: train a student against a teacher cache (the command lives in :mod:`distill.pipeline.train.main`; this entry point only runs it)."""
from distill.pipeline.cli import cli_main
from distill.pipeline.train.main import main

if __name__ == "__main__":
    cli_main(main)
