"""The graph of one exported stage: a stage network of either framework, rebuilt in PyTorch
from its canonical parameters, with named outputs and optionally the flip test inside.

Both export formats (ONNX through ``torch.onnx``, TorchScript) are written from this module,
so they hold the same computation. A Chainer stage gets here through the framework-free
parameter layout (``core.weights``), the exact route ``deeppose convert`` takes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..core.cascade import average_mirrored
from ..core.weights import architecture
from .torch_model import AlexNetRegressor, load_numpy_params


class StageGraph(torch.nn.Module):
    """``input`` (N, 3, S, S) float32 -> ``coords`` (N, J, 2), and ``log_scales`` (N, J, 2)
    for a network with the scale layer.

    With ``flip_in_graph`` every input goes through the network beside its mirror image (one
    batch of 2N) and the two predictions are combined by ``core.cascade.average_mirrored``,
    the formula ``deeppose predict`` applies, so a consumer gets the flip test without
    writing it."""

    def __init__(self, network: AlexNetRegressor, flip_permutation: Sequence[int],
                 flip_in_graph: bool, weighted: bool):
        super().__init__()
        self.network = network.eval()
        self.perm = [int(p) for p in flip_permutation]
        self.flip_in_graph = bool(flip_in_graph)
        self.weighted = bool(weighted) and network.uncertainty

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        j = self.network.num_joints
        coords = out[:, :2 * j].reshape(-1, j, 2)
        return coords, (out[:, 2 * j:].reshape(-1, j, 2) if self.network.uncertainty else None)

    def forward(self, x: torch.Tensor) -> Any:
        if self.flip_in_graph:
            n = x.shape[0]
            out = self.network(torch.cat((x, torch.flip(x, (3,)))), with_scales=True)
            coords, log_scales = average_mirrored(*self._split(out[:n]), *self._split(out[n:]),
                                                  self.perm, self.weighted, xp=torch)
        else:
            coords, log_scales = self._split(self.network(x, with_scales=True))
        return coords if log_scales is None else (coords, log_scales)


def stage_graph(params: dict[str, np.ndarray], meta: dict[str, Any],
                flip_permutation: Sequence[int], flip_in_graph: bool,
                flip_weights: str = "scales") -> StageGraph:
    """The :class:`StageGraph` of a stage's canonical parameters (any framework's
    ``read_params``) and its run.json, on the CPU in eval mode."""
    network = AlexNetRegressor(**architecture(meta), dropout=0.0)
    load_numpy_params(network, params)
    return StageGraph(network, flip_permutation, flip_in_graph, flip_weights == "scales").eval()


def example_input(graph: StageGraph, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random network input of the graph's size: what the exporters trace with and the
    export's self-check compares on."""
    size = graph.network.input_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def graph_outputs(graph: StageGraph, x: torch.Tensor) -> list[np.ndarray]:
    """The graph's outputs for ``x``, as NumPy arrays (coords, then log scales)."""
    with torch.no_grad():
        out = graph(x)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
