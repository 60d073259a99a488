"""PACS access: query, retrieve, fuse and store studies over DIMSE or DICOMweb.

Modules, each with one job:

- :mod:`~medfusion.pacs.config`: PACS nodes from a TOML or YAML file.
- :mod:`~medfusion.pacs.dimse`: C-ECHO, C-FIND, C-GET, C-MOVE and C-STORE (pynetdicom).
- :mod:`~medfusion.pacs.dicomweb`: QIDO-RS, WADO-RS and STOW-RS (requests).
- :mod:`~medfusion.pacs.selection`: pick series by UID or by modality / description rules.
- :mod:`~medfusion.pacs.derived`: build the derived (fused) DICOM series.
- :mod:`~medfusion.pacs.workflow`: find, retrieve, fuse, build, store; batches over studies.

Nothing here logs patient identifiers: studies and series are named by their UIDs only.
"""
