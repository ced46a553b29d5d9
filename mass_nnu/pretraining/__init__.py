"""`mass pretrain`: the MASS model around the nnU-Net backbone (model), its loss (loss), data, loop and export."""
