"""The pipeline's stages, one module each, every one with a ``run(cfg) -> counts`` entry point.

``synth -> catalog -> tile -> align -> annotate -> export -> train -> evaluate``. Each module declares its
:class:`~sarlang_ray.stages.runner.Stage` (inputs, the config keys that change its output, its body);
:mod:`sarlang_ray.stages.runner` holds what they share (fingerprints, skip / resume / redo, actor pools)
and :mod:`sarlang_ray.pipeline` chains them. Imports point one way: pipeline -> stages -> domain
modules (tiling, align, annotate, export, train, evaluate ...) -> tables / io / config.
"""

from sarlang_ray.stages.runner import ORDER, Stage, StageFailed, registry

__all__ = ["ORDER", "Stage", "StageFailed", "registry"]
