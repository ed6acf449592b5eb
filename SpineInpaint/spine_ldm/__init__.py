"""spine_ldm: the SpineInpaint backend (no slicer/qt imports, ever).

Inpaint lumbar-spine pathology in sagittal T2 MRI with a latent diffusion model
whose per-voxel noise level follows a Gaussian weight around a landmark
(Hansen et al.). The one public entry point is :func:`spine_ldm.pipeline.inpaint`.
"""
__version__ = "0.1.0"
