"""`mass plan`: the one owner of "plans and preprocessed data exist".

- ``plan``: fingerprint, ResEnc planning and preprocessing of datasets, ``ensure_plans`` for later stages, the
  summary table;
- ``transfer``: a target dataset's plans written into another dataset (same architecture, own normalisation);
- ``raw_checks``: case-by-case checks of a raw dataset before nnU-Net reads it;
- ``otsu_labels``: foreground labels for unlabelled cohorts (nnU-Net's fingerprint needs a label per case).
"""
