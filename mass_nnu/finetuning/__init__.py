"""`mass finetune`: nnU-Net training from MASS-pretrained weights, label budgets, test-set evaluation."""
