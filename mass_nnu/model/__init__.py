"""The MASS model, shared by pretraining, fine-tuning and in-context use.

- ``building_blocks/``: attention, task encoding at one scale, query conditioning, the dynamic head;
- ``mass_model``: ``MASSModel`` around the exact nnU-Net network of the plans, and ``TaskTokens``;
- ``loss``: the in-context Dice + BCE loss;
- ``references``: annotated references -> task tokens (``Reference``, ``encode_tasks``);
- ``artifacts``: the pretrained folder, its files, export and loading.
"""
