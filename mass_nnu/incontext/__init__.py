"""In-context use of a pretrained MASS model, with no fine-tuning.

- ``segment``: ``mass segment``, new structures from one or a few annotated references;
- ``features``: ``mass embed``, frozen-encoder features pooled at several scales, one row per case;
- ``probe``: ``mass probe``, a cross-validated linear classifier on those features.
"""
