"""im2col for 2-D Convs on sampled output positions (numpy), shared by LSQ statistics and refits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir


@dataclass(frozen=True)
class ConvGeometry:
    kernel: Tuple[int, int]
    strides: Tuple[int, int]
    dilations: Tuple[int, int]
    pads: Tuple[int, int, int, int]   # top, left, bottom, right

    @property
    def padded(self) -> bool:
        return any(self.pads)


def geometry(node: gs.Node, weight_shape: Sequence[int], x_shape: Optional[Sequence[int]]
             ) -> Optional[ConvGeometry]:
    """Geometry of a dense 2-D Conv, None for other ranks or unresolvable SAME padding."""
    if len(weight_shape) != 4:
        return None
    at = ir.conv_attrs(node, weight_shape)
    p = ir.explicit_pads(at, None if x_shape is None else x_shape[2:])
    if p is None:
        return None
    return ConvGeometry(at.kernel, at.strides, at.dilations, p)  # type: ignore[arg-type]


def out_hw(g: ConvGeometry, h: int, w: int) -> Tuple[int, int]:
    ho = (h + g.pads[0] + g.pads[2] - g.dilations[0] * (g.kernel[0] - 1) - 1) // g.strides[0] + 1
    wo = (w + g.pads[1] + g.pads[3] - g.dilations[1] * (g.kernel[1] - 1) - 1) // g.strides[1] + 1
    return ho, wo


def sample_positions(g: ConvGeometry, x_shape: Sequence[int], n: int, rng: np.random.Generator,
                     saliency: Optional[np.ndarray] = None) -> np.ndarray:
    """(m, 3) distinct output positions (batch, oh, ow), m = min(n, all positions); with a
    ``saliency`` map (batch 1) partly drawn in proportion to it (see saliency.cell_weights)."""
    ho, wo = out_hw(g, int(x_shape[2]), int(x_shape[3]))
    total = int(x_shape[0]) * ho * wo
    p = None
    if saliency is not None and int(x_shape[0]) == 1:
        from .saliency import cell_weights
        p = cell_weights(saliency, ho, wo)
    flat = rng.choice(total, size=min(n, total), replace=False, p=p)
    return np.stack(np.unravel_index(flat, (int(x_shape[0]), ho, wo)), axis=1)


def patches(g: ConvGeometry, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """im2col rows (len(pos), C*kh*kw) in the order of W.reshape(Cout, -1), float64."""
    xp = np.pad(x, ((0, 0), (0, 0), (g.pads[0], g.pads[2]), (g.pads[1], g.pads[3])))
    rows = pos[:, 1:2] * g.strides[0] + np.arange(g.kernel[0]) * g.dilations[0]
    cols = pos[:, 2:3] * g.strides[1] + np.arange(g.kernel[1]) * g.dilations[1]
    c = np.arange(x.shape[1])
    p = xp[pos[:, 0, None, None, None], c[None, :, None, None], rows[:, None, :, None],
           cols[:, None, None, :]]
    return p.reshape(len(pos), -1).astype(np.float64)
