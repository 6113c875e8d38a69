"""The pipeline's stages, one module each, every one with a ``run(cfg) -> counts`` entry point.

``synth -> catalog -> tile -> align -> annotate -> export -> train -> evaluate``. Each module declares its
:class:`~sarlang_ray.stages.stage.Stage` (inputs, the config keys that change its output, its body) and runs
its work through :func:`sarlang_ray.stages.execution.map`. What they share has three homes:
:mod:`~sarlang_ray.stages.stage` (fingerprints, skip / resume / redo, markers, the registry),
:mod:`~sarlang_ray.stages.cluster` (the Ray connection and the storage check) and
:mod:`~sarlang_ray.stages.execution` (how work items run: tasks or an actor pool, the manifest);
:mod:`sarlang_ray.pipeline` chains them. Imports point one way: pipeline -> stages -> domain
modules (tiling, align, annotate, export, train, evaluate ...) -> tables / io / config.
"""

from sarlang_ray.stages.stage import ORDER, Stage, StageFailed, registry

__all__ = ["ORDER", "Stage", "StageFailed", "registry"]
