"""cxr14: multi-label chest X-ray classification on NIH ChestX-ray14, the library the pipeline's stages assemble.

One subpackage per phase of the pipeline, in the order the DAG runs them: `data` (the NIH layout, splits,
decoding, prepared arrays, the demo dataset), `model` (factory, checkpoints, inference), `training` (loss,
schedules, the loop, torchrun/DDP), `evaluation` (metrics, bootstrap, calibration, thresholds, subgroups,
expert labels, compare), `explanation` (Grad-CAM, localisation, sanity checks), `deployment` (ONNX export and
predict's engines). `runtime` is the plumbing every stage shares; `params` is the one params schema, `paths`
the pipeline's output locations, and `cli` the console commands (`cxr14-predict`, `cxr14-compare`).
"""

__version__ = "0.2.0"
