"""Running an exported model: the ONNX Runtime session and the metadata the export stage embeds.

No PyTorch here (nor pandas or scikit-learn): predict's ONNX engine imports this module, and a fresh process
predicting one image should spend its time on the image, not on imports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxr14.runtime.devices import cpu_count
from cxr14.runtime.errors import PipelineError

METADATA_KEY = "cxr14"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
FORMAT = 1  # version of the metadata layout; predict refuses files from a newer layout


def session(path: Path | str, providers: list[str] | None = None, threads: int | None = None,
            spin: bool = True) -> Any:
    """An ONNX Runtime session on the CPU (or `providers`), with this process's share of the cores. `spin=False`
    where other threads share the cores (predict's decoders): ONNX Runtime's idle workers then sleep instead of
    spinning between operators, and leave the cores to the threads that feed them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_count()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def read_metadata(session_or_path: Any) -> dict[str, Any]:
    """The `cxr14` metadata of an exported model (a path or an ONNX Runtime session), checked for what predict uses."""
    where = str(session_or_path)
    if isinstance(session_or_path, (str, Path)):
        session_or_path = session(session_or_path)
    props = session_or_path.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise PipelineError(f"{where}: no '{METADATA_KEY}' metadata; expected a model written by the export stage")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{where}: '{METADATA_KEY}' metadata is not JSON ({exc})") from None
    missing = [k for k in ("format", "classes", "image_size", "thresholds") if k not in meta]
    if missing:
        raise PipelineError(f"{where}: metadata lacks {', '.join(missing)}; expected the export stage's")
    if meta["format"] > FORMAT:
        raise PipelineError(f"{where}: metadata format {meta['format']} is newer than this cxr14 reads ({FORMAT}); "
                            "update cxr14")
    return meta
