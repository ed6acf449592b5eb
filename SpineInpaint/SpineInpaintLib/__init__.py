"""Slicer glue for the SpineInpaint module.

Everything here runs inside the 3D Slicer Python process (or headless ``slicer-core`` for tests):

- ``parameters``: the module parameters (a dataclass persisted in a ``vtkMRMLScriptedModuleNode``).
- ``nodes``: volume node + markups -> backend input file and arguments (RAS -> LPS), backend outputs ->
  new scalar volume nodes with the input's geometry and provenance attributes.
- ``runner``: the local backend as a background process speaking the CLI JSON-lines protocol.
- ``remote``: client of the ``spine-ldm serve`` HTTP backend, with the same polling interface as ``runner``.
- ``worker``: the warm local backend, a persistent ``spine-ldm serve`` on 127.0.0.1 reached through ``remote``.
- ``dependencies``: first-use dependency check / install (torch through the PyTorch extension).
- ``level``: FSU-level suggestion from the landmark and known disc centres.
- ``models``: the versioned model list (Models.json) with sha256 status.
- ``layout``: compare layout (input | sample 1..K) with linked slices centred on the landmark.
- ``logic``: ``InpaintLogic``, usable from the Python console and PythonSlicer scripts without the widget.
- ``sampledata``: the synthetic phantom (volume + labelled disc centres + landmark), also in Sample Data.
- ``tasks``: background tasks (hashing, downloads, imports, connection test) polled from the GUI's timer.
- ``rating``: logic of the reader-study panel (module ``SpineInpaintRating``).

Nothing in this package imports torch, qt or ctk at import time: the heavy work always runs in the
backend process (``spine-ldm``) or on a remote server. Submodules are imported lazily by the caller
(``from SpineInpaintLib.logic import InpaintLogic``) so that importing the package is free.
"""

#: Oldest 3D Slicer release the extension supports (also in the top-level CMakeLists.txt ``find_package(Slicer ...)``
#: and the README; ``Testing/test_extension_index.py`` keeps the three equal).
MINIMUM_SLICER_VERSION = "5.10"

SUBMODULES = ("parameters", "nodes", "tasks", "runner", "remote", "worker", "dependencies", "level", "models",
              "layout", "logic", "sampledata", "rating")
