"""RedundancyLens reductions: which decoder layers get them, with which parameters.

One frozen dataclass, :class:`Reductions`, is shared by the PyTorch reference, the graph builder,
the manifest and the FLOP accounting, so the four can never disagree on what "layer 3 is hollow
with a window of 256" means. The small integer rules that both the graph and the reference must
compute identically (how many probes, which tokens, how many channels) live here too.

Definitions: ../shared/METHODS.md ("Hollow Attention", "PAD-FFN").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlens.errors import RlensError

DEFAULT_HOLLOW_WINDOW = 256
"""R_A of a public re-implementation at LLaVA-1.5 scale (the paper's own default is not public)."""
DEFAULT_FFN_KEEP = 0.2
DEFAULT_PROBE_EVERY = 10


@dataclass(frozen=True)
class Reductions:
    """The reduced layers of one exported decoder and the parameters of each reduction.

    ``hollow_layers``: layers whose visual queries attend to the non-visual prefix and to the visual
    keys ``q - hollow_window < k <= q`` only. ``ffn_layers``: layers whose visual tokens use the
    ``ffn_keep`` share of FFN channels that ``V // probe_every`` probe tokens find most active
    (``ffn_keep = 0`` skips the FFN of visual tokens: residual only).
    """

    hollow_layers: tuple[int, ...] = ()
    hollow_window: int = DEFAULT_HOLLOW_WINDOW
    ffn_layers: tuple[int, ...] = ()
    ffn_keep: float = DEFAULT_FFN_KEEP
    probe_every: int = DEFAULT_PROBE_EVERY
    ranking: str | None = field(default=None, compare=False)
    """The ranking file the layers came from, if any (recorded, not used)."""

    def __post_init__(self) -> None:
        if self.hollow_window < 1:
            raise RlensError(f"--hollow-window must be at least 1, got {self.hollow_window}")
        if not 0.0 <= self.ffn_keep <= 1.0:
            raise RlensError(f"--ffn-keep must lie in [0, 1], got {self.ffn_keep}")
        if self.probe_every < 1:
            raise RlensError(f"--probe-every must be at least 1, got {self.probe_every}")
        for name, layers in (("hollow", self.hollow_layers), ("ffn", self.ffn_layers)):
            if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
                raise RlensError(f"--{name}-layers must be distinct non-negative layer indices, got {layers}")

    @property
    def active(self) -> bool:
        return bool(self.hollow_layers or self.ffn_layers)

    def check_layers(self, num_layers: int) -> None:
        """Refuse layer indices the model does not have."""
        for name, layers in (("hollow", self.hollow_layers), ("ffn", self.ffn_layers)):
            bad = [i for i in layers if i >= num_layers]
            if bad:
                raise RlensError(
                    f"--{name}-layers names layer(s) {bad}, but the model has {num_layers} "
                    f"decoder layers (0..{num_layers - 1})"
                )

    def is_hollow(self, layer: int) -> bool:
        return layer in self.hollow_layers

    def is_pad_ffn(self, layer: int) -> bool:
        return layer in self.ffn_layers


def ffn_keep_channels(ffn_keep: float, intermediate_size: int) -> int:
    """K = round(rho * d_ff), half up, at least 1 unless rho is 0 (the skip branch)."""
    if ffn_keep == 0:
        return 0
    return max(1, min(intermediate_size, int(ffn_keep * intermediate_size + 0.5)))


def num_probes(num_visual: int, probe_every: int) -> int:
    """P = max(1, V // s)."""
    return max(1, num_visual // probe_every)


def probe_indices(num_visual: int, probe_every: int) -> list[int]:
    """The probe tokens: ``round(linspace(0, V - 1, P))``, rounded half up in exact integer arithmetic.

    Integer arithmetic makes the graph (int64 ops) and the reference (Python ints) agree exactly,
    where a float linspace could round a ``.5`` either way.
    """
    p = num_probes(num_visual, probe_every)
    if p == 1:
        return [0]
    return [(2 * i * (num_visual - 1) + (p - 1)) // (2 * (p - 1)) for i in range(p)]


def parse_layers(spec: str, ranked: list[int] | None, num_layers: int, option: str) -> tuple[int, ...]:
    """``N`` (the first N of the ranked list) or ``i,j,k`` (explicit layers) -> layer indices."""
    spec = spec.strip()
    if not spec:
        return ()
    if "," not in spec and spec.isdigit() and ranked is not None:
        count = int(spec)
        if count > len(ranked):
            raise RlensError(f"{option} {count}: the ranking lists only {len(ranked)} layers")
        return tuple(ranked[:count])
    if "," not in spec and spec.isdigit() and ranked is None:
        raise RlensError(
            f"{option} {spec} is a count and needs a ranking: pass --ranking ranking.json or "
            f"--calib CALIB.jsonl, or list the layers as i,j,k"
        )
    try:
        layers = tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise RlensError(f"{option} takes a count N or a list of layers i,j,k, got '{spec}'") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise RlensError(f"{option} names layer(s) {bad}; the model has layers 0..{num_layers - 1}")
    return layers
