"""INT8 QDQ quantization behind the insert-qdq pass: calibrate -> choose parameters -> insert.

- ``targets``: what ort-cpu and tensorrt want (types, INT8 ops, shared ranges), with the measurements
  behind the ort-cpu rules; ``cost``: per-Conv INT8-vs-float timing on this machine;
- ``placement``: which layers/ops run INT8 and which tensors get Q/DQ (decode tail kept float);
- ``ranges`` and ``act_range``: calibration statistics -> per-tensor ranges (auto method,
  activation-aware ranges for tensors read only by SiLU/Sigmoid/ReLU, shared and derived ranges);
- ``bias_correction``: each INT8 Conv's own mean output error removed from its bias;
- ``rewrite``: the Q/DQ insertion and weight/bias quantization (the only mutating stage);
- ``sensitivity``, ``mixed``, ``accuracy``: one-session sensitivity ranking, mixed precision
  against ``max_drop``, and the guard that keeps the pass inside its LOSSY contract;
- ``pipeline``: :class:`Quantizer`, holding what does not change between plans.
"""
