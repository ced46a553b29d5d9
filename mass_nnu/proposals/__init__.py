"""Proposals stage: class-agnostic 3D mask proposals for unlabelled images (`mass propose`).

Backends: ``supervoxel`` (CPU, no weights; default) and ``sam2`` (the paper's method, user-supplied checkpoint).
Storage: one packed ``proposalsTr/<case>.npz`` per case next to the raw images (see ``store``).
"""
