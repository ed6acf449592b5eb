"""Importers: native dataset layouts -> manifest rows (:class:`model_training.manifest.Row`).

- :func:`import_spider`   SPIDER (images/*.mha, masks/*.mha, radiological_gradings.csv)
- :func:`import_rsna`     RSNA 2024 Lumbar Spine (train_images/ DICOM + CSVs); writes one NRRD per series
- :func:`import_manifest` a hand-written manifest CSV, validated against the image headers
- :func:`import_phantoms` synthetic phantom studies (``spine_ldm.phantom``) with a chosen pathology mix

Every importer returns rows with ``split=""``; call :func:`model_training.manifest.assign_splits` next.
"""
from __future__ import annotations

from .common import ImageHeader, SkipLog


def __getattr__(name):  # lazy: importing one importer must not import pydicom / the phantom generator
    if name == "import_spider":
        from .spider import import_spider
        return import_spider
    if name == "import_rsna":
        from .rsna import import_rsna
        return import_rsna
    if name == "import_manifest":
        from .generic import import_manifest
        return import_manifest
    if name == "import_phantoms":
        from .phantom import import_phantoms
        return import_phantoms
    raise AttributeError(name)


__all__ = ["import_spider", "import_rsna", "import_manifest", "import_phantoms", "ImageHeader", "SkipLog"]
