"""MedFusion: fusion of co-registered CT, MRI, PET and SPECT images and volumes.

The core library has no dependency on 3D Slicer. Layers, bottom up:

- ``medfusion.io``: reading and writing 2D images and 3D volumes (atomic writes).
- ``medfusion.geometry`` / ``medfusion.intensity`` / ``medfusion.color``: physical-space
  resampling, intensity normalisation, YCbCr luminance/chroma handling.
- ``medfusion.methods``: fusion methods (the bundle's CNN and classical baselines), all with
  one batch interface.
- ``medfusion.engine``: slice-wise streaming fusion of images and volumes.
- ``medfusion.metrics``: fusion quality metrics.
- ``medfusion.pacs``: DIMSE / DICOMweb query, retrieve, derived series and store.
- ``medfusion.report``: the evaluation report (``medfusion benchmark``).
- ``medfusion.cli``: the ``medfusion`` command line.
"""

__version__ = "0.1.0"
