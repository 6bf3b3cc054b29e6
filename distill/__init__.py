"""mmdistill: distil large image-text teachers into small dual-encoder students.

The public Python API, imported on first use (``import distill`` loads none of torch, the
registries or the pipeline)::

    import distill

    distill.list_losses()                      # sorted names; list_losses("*kl*") filters (fnmatch)
    cache = distill.run_cache(distill.CacheSettings(), distill.CacheJob(teacher_spec, data, "runs/cache"))
    result = distill.train(distill.TrainRunConfig.resolve("cpu", layers=[{...}]))
    scores = distill.evaluate(str(result.student), data, split="test")
    distill.export_student(result.student, "runs/export", "onnx")

Building blocks: ``create_teacher(spec)``, ``create_student(name, **options)``,
``create_loss(name, dims, **cfg)``, ``create_balancer(name, loss_names, **cfg)``, ``load_student(path)``,
``TeacherCache(folder)``; ``load_plugins(modules)`` imports modules that register more of them. The
lists: ``list_teachers``, ``list_students``, ``list_losses``, ``list_balancers``, ``list_formats``,
``list_presets``. The same commands on the command line: ``mmdistill cache|train|eval|export|lit|list``.

``distill.evaluate`` is the function; the command modules (``python -m distill.evaluate``, ...) are
for ``-m`` only (importing ``distill.evaluate`` as a module would replace the attribute).
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_API: dict[str, str] = {
    "train": "distill.pipeline.train.main",
    "TrainResult": "distill.pipeline.train.main",
    "TrainRunConfig": "distill.pipeline.train.config",
    "run_cache": "distill.pipeline.cache.run",
    "CacheResult": "distill.pipeline.cache.run",
    "CacheSettings": "distill.pipeline.cache.settings",
    "CacheJob": "distill.pipeline.cache.settings",
    "evaluate": "distill.pipeline.evaluate",
    "EvalResult": "distill.pipeline.evaluate",
    "export_student": "distill.pipeline.export.main",
    "ExportResult": "distill.pipeline.export.main",
    "load_student": "students.io",
    "save_student": "students.io",
    "TeacherCache": "distill.core.cache",
    "create_teacher": "distill.core.registry",
    "create_student": "distill.core.registry",
    "create_loss": "distill.core.registry",
    "create_balancer": "distill.core.registry",
    "load_plugins": "distill.core.registry",
    "list_teachers": "distill.core.registry",
    "list_students": "distill.core.registry",
    "list_losses": "distill.core.registry",
    "list_balancers": "distill.core.registry",
    "list_formats": "distill.core.registry",
}
_RENAMED = {"list_presets": ("distill.pipeline.train.config", "presets")}

__all__ = sorted([*_API, *_RENAMED])


def __getattr__(name: str) -> Any:  # PEP 562: import the defining module on first use
    if name in _API:
        module, attr = _API[name], name
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
    else:
        raise AttributeError(f"module 'distill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
