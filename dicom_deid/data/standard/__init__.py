"""Package data: DICOM standard tables (see README.md). Generated; do not edit."""
