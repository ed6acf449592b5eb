"""model_training: data importers, the FSU dataset, training entry points and evaluation.

Data side (this package's stable interface):

- :mod:`model_training.manifest`  one CSV row per study x level (``Row``, ``read_manifest``, ``write_manifest``,
  ``assign_splits``, ``support_table``).
- :mod:`model_training.importers`  SPIDER, RSNA 2024, hand-written manifests and phantoms -> manifest rows.
- :mod:`model_training.dataset`  ``FSUDataset``: cached FSU crops + Gaussian weight maps + augmentation.
- ``python -m model_training.data``  import-spider | import-rsna | import-manifest | import-phantom | support.

Never imports slicer, qt, ctk or vtk.
"""
