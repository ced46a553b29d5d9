"""Folder put on nnUNet_extTrainer (see mass_nnu.workspace): nnU-Net imports its modules by bare name."""
