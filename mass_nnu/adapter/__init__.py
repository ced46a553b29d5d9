"""The one adapter layer between mass-nnu and nnU-Net's internals (nnunetv2 2.8.x).

Every import of ``nnunetv2`` / ``dynamic_network_architectures`` / ``batchgeneratorsv2`` internals lives in
this package, so a change of nnU-Net version touches only these modules:

- ``datasets``: dataset IDs, folders, dataset.json, plans files, split files
- ``planning``: fingerprint, ResEnc planners, plan transfer, preprocessing
- ``networks``: building the plans' network, deep-supervision scales, decoder internals
- ``training``: trainer construction, pretrained-weights loading, final validation
- ``inference``: preprocessing of single images, sliding-window helpers, evaluation
"""
