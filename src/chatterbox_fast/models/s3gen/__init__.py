"""S3Gen: speech tokens -> 24 kHz waveform (flow: tokens -> mel; HiFT: mel -> wav)."""

from .encoder import ConformerEncoderConfig, UpsampleConformerEncoder
from .estimator import ConditionalDecoder, EstimatorConfig
from .flow import FLOW_KEYMAP, CausalCFM, FlowConfig, S3GenFlow, cosine_t_span, solve_euler_cfg
from .s3gen import S3GEN_CONSUMED_ELSEWHERE, S3Gen, S3GenConfig

__all__ = [
    "FLOW_KEYMAP",
    "CausalCFM",
    "ConditionalDecoder",
    "ConformerEncoderConfig",
    "EstimatorConfig",
    "FlowConfig",
    "S3GEN_CONSUMED_ELSEWHERE",
    "S3Gen",
    "S3GenConfig",
    "S3GenFlow",
    "UpsampleConformerEncoder",
    "cosine_t_span",
    "solve_euler_cfg",
    # HiFT vocoder (hift.py) re-exports go here.
]
