"""dicom-deid: de-identify DICOM at scale with Apache Beam.

Layers (imports point down only)::

    cli, options  ->  pipelines  ->  transforms  ->  engine modules  ->  data

The engine modules (``keys``, ``tags``, ``phi``, ``policy``, ``standard``, ``reader``,
``writer``, ``manifest`` ...) are plain Python on pydicom Datasets and bytes and never
import apache_beam.
"""

__version__ = "0.1.0"
