"""clipx: gradient clipping for JAX, as composable Optax transformations.

Clipping is scope x threshold x response: the transform is the scope
(global, per layer, per unit, per element), its argument the threshold (a
float, an Optax schedule, or an adaptive policy), and wrappers choose the
response (scale down, or skip the step).
"""

from clipx.clippy import ClippyState, clippy
from clipx.growth_limit import GrowthLimitState, growth_limit
from clipx.guards import (
  SkipNonfiniteState,
  SkipSpikesState,
  all_finite,
  skip_nonfinite,
  skip_spikes,
)
from clipx.layer_metadata import layer_axes_from_metadata
from clipx.norms import global_norm
from clipx.per_example import PerExampleClipState, PerExampleGrad, clipped_grad
from clipx.presets import adagc
from clipx.privacy import (
  AddNoiseState,
  PrivateQuantileState,
  add_noise,
  gradient_noise_multiplier,
  private_quantile,
)
from clipx.qk_clip import QKClipState, qk_clip
from clipx.rescaling import (
  EmaPeakState,
  LayerNormalizeState,
  OutlierRescaleState,
  ema_peak,
  normalize_by_layer_norm,
  rescale_outliers,
  stable_spam_clip,
)
from clipx.spam import SpamState, scale_by_spam, spam
from clipx.stable_adamw import StableAdamWClipState, stable_adamw_clip
from clipx.stats import ClipStats, NonfiniteStats, SkipStats, StatsReport, stats
from clipx.thresholds import (
  AutoClipState,
  EmaRatioState,
  QuantileState,
  ThresholdPolicy,
  WindowZScoreState,
  ZClipState,
  as_policy,
  autoclip,
  ema_ratio,
  quantile,
  window_zscore,
  zclip,
)
from clipx.transforms import (
  AdaptiveGradClipState,
  GlobalNormClipState,
  LayerNormClipState,
  ValueClipState,
  adaptive_grad_clip,
  clip_by_global_norm,
  clip_by_global_then_layer_norm,
  clip_by_layer_norm,
  clip_by_value,
  clip_tree,
  layer_groups,
  unit_axes,
)
from clipx.update_clipping import clip_by_block_rms

__version__ = "0.1.0"  # the one place it is written: pyproject.toml and CHANGELOG.md follow it

__all__ = [
  "AdaptiveGradClipState",
  "AddNoiseState",
  "AutoClipState",
  "ClipStats",
  "ClippyState",
  "EmaPeakState",
  "EmaRatioState",
  "GlobalNormClipState",
  "GrowthLimitState",
  "LayerNormClipState",
  "LayerNormalizeState",
  "NonfiniteStats",
  "OutlierRescaleState",
  "PerExampleClipState",
  "PerExampleGrad",
  "PrivateQuantileState",
  "QKClipState",
  "QuantileState",
  "SkipNonfiniteState",
  "SkipSpikesState",
  "SkipStats",
  "SpamState",
  "StableAdamWClipState",
  "StatsReport",
  "ThresholdPolicy",
  "ValueClipState",
  "WindowZScoreState",
  "ZClipState",
  "adagc",
  "adaptive_grad_clip",
  "add_noise",
  "all_finite",
  "as_policy",
  "autoclip",
  "clip_by_block_rms",
  "clip_by_global_norm",
  "clip_by_global_then_layer_norm",
  "clip_by_layer_norm",
  "clip_by_value",
  "clip_tree",
  "clipped_grad",
  "clippy",
  "ema_peak",
  "ema_ratio",
  "global_norm",
  "gradient_noise_multiplier",
  "growth_limit",
  "layer_axes_from_metadata",
  "layer_groups",
  "normalize_by_layer_norm",
  "private_quantile",
  "qk_clip",
  "quantile",
  "rescale_outliers",
  "scale_by_spam",
  "skip_nonfinite",
  "skip_spikes",
  "spam",
  "stable_adamw_clip",
  "stable_spam_clip",
  "stats",
  "unit_axes",
  "window_zscore",
  "zclip",
]
