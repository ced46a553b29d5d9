"""Proposals stage: class-agnostic 3D mask proposals for unlabelled images (`mass propose`).

Backends: ``supervoxel`` (CPU, no weights; default) and ``sam2`` (the paper's method, user-supplied checkpoint).
Storage: ``proposalsTr/<case>.b2nd`` (chunked blosc2 layers, read by crop) + ``<case>.json`` (table, geometry) per
case next to the raw images (see ``store``).
"""
