"""Re-exports the MASS trainers for nnU-Net's trainer lookup (``nnUNetv2_train ... -tr nnUNetTrainerMASS``)."""
from mass_nnu.finetuning.trainer import (  # noqa: F401
    nnUNetTrainerMASS,
    nnUNetTrainerMASS_1epoch,
    nnUNetTrainerMASS_2epochs,
    nnUNetTrainerMASS_50epochs,
    nnUNetTrainerMASS_100epochs,
    nnUNetTrainerMASS_250epochs,
    nnUNetTrainerMASS_frozenEncoder,
    nnUNetTrainerMASS_noMirroring,
)
