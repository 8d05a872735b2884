"""cxr14: multi-label chest X-ray classification on NIH ChestX-ray14, the library the pipeline's stages assemble.

Modules, by what they serve: `nih` (the 14 classes, label table, split lists), `params` (the params.yaml
schema), `paths` (the pipeline's outputs), `common` (errors, atomic writes, progress), `images`
(decoding), `boxes` (the expert box list), `splits`, `arrays` (prepared arrays), `data` (batches),
`model` (factory, weights, checkpoints), `engine` and `training` (steps and loop), `metrics`,
`evaluation`, `calibration`, `predictions`, `gradcam`, `localisation`, `explanations`, `demo` and
`phantom` (the synthetic dataset), `predict` (the `cxr14-predict` command).
"""

__version__ = "0.2.0"
