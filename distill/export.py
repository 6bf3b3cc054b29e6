"""``python -m distill.export``: export a trained student (open_clip, ONNX, HF, safetensors) (the command lives in :mod:`distill.pipeline.export.main`; this entry point only runs it)."""
from distill.pipeline.cli import cli_main
from distill.pipeline.export.main import main

if __name__ == "__main__":
    cli_main(main)
