"""Helpers shared by the test modules, one module per concern (test modules import these and the
fixtures of ``tests/conftest.py``, never each other):

    paths         the repository and the shared Flickr8k folder
    data          tiny on-disk datasets and JPEGs
    teachers      tiny open_clip configs, a word tokenizer, the teacher contract check
    toy_teachers  toy teachers (``--plugin tests.helpers.toy_teachers``)
    students      the tiny ``vit`` student settings and captions
    caches        building toy-teacher caches, reference teacher outputs, folder snapshots
    training      tiny training runs: CLI arguments, simulated kills, poisoned targets, one step
    train_hooks   a ``--plugin`` that slows or poisons training in a subprocess
    procs         subprocess helpers: free ports, the log behind the slow-mark guard
    examples      running ``examples/*.sh`` and checking their outputs
    benchmarks    tiny benchmark settings and the benchmark runner
"""
