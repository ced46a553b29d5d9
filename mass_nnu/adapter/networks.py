"""The plans' network, built by nnU-Net's own builder, and the decoder internals MASS drives.

MASS needs three things from an nnU-Net U-Net: the encoder (returns one skip per stage), the decoder's
up-sampling convolutions (``transpconvs``) and its conv stages (``stages``). ``seg_layers`` stay in the
state dict (stock ``-pretrained_weights`` skips them) but MASS does not use them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from mass_nnu.errors import MassError


@dataclass(frozen=True)
class UNetParts:
    """What MASS reads from a built nnU-Net U-Net. ``output_channels``/``strides`` are per encoder stage."""
    encoder: object
    transpconvs: object
    stages: object
    output_channels: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    conv_dim: int


def configuration_manager(plans: dict, configuration: str):
    manager = PlansManager(plans)
    if configuration not in manager.available_configurations:
        raise MassError(f"plans '{manager.plans_name}': no configuration '{configuration}' "
                        f"(available: {', '.join(manager.available_configurations)})")
    return manager.get_configuration(configuration)


def build_network(plans: dict, configuration: str, num_input_channels: int, num_output_channels: int = 1,
                  deep_supervision: bool = True):
    """The network nnU-Net's trainer builds for these plans (``nnUNetTrainer.build_network_architecture``)."""
    return build_from_configuration(configuration_manager(plans, configuration), num_input_channels,
                                    num_output_channels, deep_supervision)


def build_from_configuration(manager, num_input_channels: int, num_output_channels: int = 1,
                             deep_supervision: bool = True):
    """``build_network`` from an nnU-Net ``ConfigurationManager`` (what trainers and the predictor hold)."""
    return get_network_from_plans(manager.network_arch_class_name, manager.network_arch_init_kwargs,
                                  manager.network_arch_init_kwargs_req_import, num_input_channels,
                                  num_output_channels, allow_init=True, deep_supervision=deep_supervision)


def unet_parts(network) -> UNetParts:
    """Encoder and decoder submodules of a PlainConvUNet / ResidualEncoderUNet (any UNetDecoder-based net)."""
    decoder = getattr(network, "decoder", None)
    encoder = getattr(network, "encoder", None)
    if not isinstance(decoder, UNetDecoder) or encoder is None or not getattr(encoder, "return_skips", False):
        raise MassError(f"network {type(network).__name__}: MASS needs a U-Net with nnU-Net's UNetDecoder and an "
                        f"encoder that returns skips (PlainConvUNet, ResidualEncoderUNet)")
    strides = tuple(tuple(int(s) for s in (st if isinstance(st, (list, tuple)) else [st] * convert_conv_op_to_dim(
        encoder.conv_op))) for st in encoder.strides)
    return UNetParts(encoder=encoder, transpconvs=decoder.transpconvs, stages=decoder.stages,
                     output_channels=tuple(int(c) for c in encoder.output_channels), strides=strides,
                     conv_dim=convert_conv_op_to_dim(encoder.conv_op))


def deep_supervision_scales(plans: dict, configuration: str) -> list[list[float]]:
    """nnU-Net's ``_get_deep_supervision_scales``: one scale per decoder output, full resolution first."""
    pools = configuration_manager(plans, configuration).pool_op_kernel_sizes
    return [list(map(float, s)) for s in 1 / np.cumprod(np.vstack(pools), axis=0)][:-1]
