"""Batches of files registered in Slicer: each pair loaded into the scene, registered, its outputs written to
a folder of its own (as a unit) and a metrics.csv for the batch; the nodes kept or removed."""

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence

from ACSGRegistrationLib.outputs import DEFAULT_OUTPUTS

from .conversion import loadVolumeFile, removeNode
from .inputs import pairArguments


def registerFiles(register, pairs: Sequence, outputFolder: Optional[str] = None, keepNodes: bool = True,
                  stopOnError: bool = True, progress: Optional[Callable[[int, int], None]] = None,
                  outputs: Sequence[str] = DEFAULT_OUTPUTS, **options) -> List[Dict]:
    """Register pairs of files with ``register`` (the logic's, given ``options``: checkpoint, device,
    refineSteps). Each pair is a dict with ``fixed``, ``moving`` (image paths) and optionally
    ``fixedSegmentation``, ``movingSegmentation`` (label map paths), ``fixedLabel``, ``movingLabel``,
    ``name``. With ``outputFolder`` every pair's ``outputs`` (names of ``ACSGRegistrationLib.outputs.OUTPUTS``;
    by default the warped image and label, the transform, the Jacobian map and the metrics, as ``acsgreg
    register`` writes) go to ``outputFolder/<name>`` and a ``metrics.csv`` summarises the batch.

    Returns one dict per pair: ``name``, ``metrics``, ``folding``, ``seconds``, ``paths`` (files written),
    ``output`` (the RegistrationOutput; its nodes are removed from the scene when ``keepNodes`` is False)
    and ``error`` (None, or the message of a pair that failed when ``stopOnError`` is False).
    """
    rows = []
    for k, pair in enumerate(pairs):
        a = pairArguments(pair)
        name = a.get("name") or f"{k:03d}_" + os.path.basename(str(a["moving"])).split(".")[0] + "_to_" \
            + os.path.basename(str(a["fixed"])).split(".")[0]
        loaded, output = {}, None
        try:
            loaded["fixed"] = loadVolumeFile(a["fixed"])
            loaded["moving"] = loadVolumeFile(a["moving"])
            for key in ("fixedSegmentation", "movingSegmentation"):
                if a.get(key):
                    loaded[key] = loadVolumeFile(a[key], labelmap=True)
            output = register(loaded["fixed"], loaded["moving"], loaded.get("fixedSegmentation"),
                              loaded.get("movingSegmentation"), a.get("fixedLabel"), a.get("movingLabel"), show=False,
                              name=name, **options)
            paths = output.result.save(os.path.join(outputFolder, name), outputs) if outputFolder else {}
            rows.append({"name": name, "metrics": output.metrics, "folding": output.folding,
                         "seconds": output.seconds, "paths": paths, "output": output, "error": None})
        except Exception as exc:
            if stopOnError:
                raise
            logging.error(f"ACSGRegistration: pair {name} failed: {exc}")
            rows.append({"name": name, "metrics": None, "folding": None, "seconds": 0.0, "paths": {},
                         "output": None, "error": str(exc)})
        finally:
            if not keepNodes:
                for node in list(loaded.values()) + (list(output.nodes().values()) if output else []):
                    removeNode(node)
        if progress is not None:
            progress(k + 1, len(pairs))
    if outputFolder:
        from ACSGRegistrationLib.geometry import write_csv
        from ACSGRegistrationLib.metrics import table_row
        write_csv([table_row(r["metrics"], r["folding"], name=r["name"], seconds=round(r["seconds"], 3),
                             error=r.get("error") or "") for r in rows], os.path.join(outputFolder, "metrics.csv"))
    return rows
