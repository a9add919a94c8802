"""Which weights rmu and sspu train, per block layout: where the MLP writes into the residual stream.

Steering (steering.py) moves h_l, the output of block l, by training weights that write into the
residual stream. Two layouts of the MLP's write occur in the architectures people run:

* additive (Llama, Qwen2/3, Mistral, Phi-3, Mixtral, Qwen2-MoE):  h ← h + m,  m = W_down a
  The output projection W_down [d, i] sets both the direction and the size of the contribution.
* normalised (Gemma 2/3, OLMo 2: a "post-feedforward" RMSNorm):   h ← h + g ⊙ m / rms(m)
  (Gemma: (1 + g) ⊙ …). W_down now sets only the direction: per token the contribution's norm is
  √(Σ_j g_j² m̂_j²) with m̂ = m / rms(m), between √d·min|g| and √d·max|g|, and exactly √d·|g| when
  the gain is uniform. The input-side projections (gate/up, or Phi-3's fused gate_up) only change
  a, hence again only m's direction. The one weight on this path that sets the size is the norm's
  gain g, and the contribution is linear in the (effective) gain. So on these blocks the norm's
  gain trains together with W_down: W_down routes forget tokens' output into coordinates whose
  gain grows, retain tokens' output away from them (the retain term holds them).

Detection is by measurement on the model in hand, not by names:
1. one forward pass up to the block, with hooks on the block's direct children: the MLP is the last
   child called that holds a matrix (≥ 2-D parameter) and returns a tensor; a child called after it
   whose input is the MLP's output tensor itself, and whose parameters are all 1-D, is the norm
   applied to the MLP output (parameter-free children between, e.g. dropout, are followed);
2. passes with the MLP's output m scaled by α = 0, 10³, 10⁴ (h(α): the block output then):
   size_response = ‖h(10⁴) − h(10³)‖ / (9·10³·‖h(1) − h(0)‖) is 1 when m is added as it is and
   ≈ 0 when a norm removes its size (RMSNorm(10⁴m) = RMSNorm(10³m) once past ε).
Only when (2) says "normalised" and (1) found no norm (a forward that re-wraps the tensor in
between) does a name decide: a child named like `post_feedforward_layernorm` (the Gemma / OLMo 2
spelling), stated as `found_by: "name"` in the report.

Mixture-of-experts: expert weights stored as one 3-D parameter ([E, out, in]) are never a default
target (a per-expert update is what issue 16 leaves to an explicit `-O modules=experts\\.down_proj`);
the default is the MLP's dense output projection (Qwen2-MoE's shared expert), or, when the MLP has
none (Mixtral), the attention output projection, which writes into the same stream additively.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.walk import Blocks, block_linears, compile_pattern, find_blocks, is_linear_like, linear_names

NORMALISED_BELOW = 0.5  # size_response: 1 for an additive write, ~1e-3 or less through an RMSNorm
# Fallback only (see the module docstring): how post-MLP norms are spelled in transformers.
_POST_NORM_NAME = re.compile(r"post_(feedforward|ffn|mlp)_?(layer)?norm", re.IGNORECASE)


@dataclass(frozen=True)
class BlockLayout:
    block: int
    mlp: str | None  # block-relative path of the MLP ("mlp"); None when no child fits
    writer: str | None  # block-relative path of the MLP's dense output projection ("mlp.down_proj")
    post_norm: str | None  # block-relative path of the norm between the MLP and the residual add
    size_response: float | None  # ‖h(10⁴) − h(10³)‖ / (9·10³‖h(1) − h(0)‖), h(α): h_l with the MLP output × α
    found_by: str  # "forward" (hooks and measurement) or "name" (the fallback)
    attention_writer: str | None  # the last Linear to width d called outside the MLP (o_proj)
    experts: tuple[str, ...] = ()  # 3-D parameters inside the MLP, block-relative

    @property
    def normalised(self) -> bool:
        return self.size_response is not None and self.size_response < NORMALISED_BELOW

    def summary(self) -> dict:
        out = asdict(self)
        out["mlp_output"] = "normalised before the residual add" if self.normalised else "added as it is"
        return out


@dataclass
class Target:
    name: str  # checkpoint name, e.g. "model.layers.0.mlp.down_proj.weight"
    module: nn.Module  # the module owning the parameter
    param: str  # its attribute name: "weight", or "down_proj" for 3-D expert parameters
    why: str
    step: float = 1.0  # trains as W₀ + step·Δ (Δ the optimizer's variable): see `gain_step`

    @property
    def tensor(self) -> nn.Parameter:
        return getattr(self.module, self.param)


class _Stop(Exception):
    pass


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]


def _has_matrix(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters())


@torch.no_grad()
def _pass(model: nn.Module, block: nn.Module, input_ids: torch.Tensor, scale_mlp: nn.Module | None = None,
          factor: float = 1.0) -> dict:
    """One forward pass stopped after `block`, recording calls of its children and Linear layers.

    With `scale_mlp`, that module's output is multiplied by `factor` (the size probe)."""
    record: dict = {"children": [], "linears": [], "out": None}
    handles = []
    names = {id(m): n for n, m in block.named_modules() if n}
    children = dict(block.named_children())

    def pre(name):
        def hook(module, args, kwargs):
            record["children"].append([name, _tensors(args, kwargs), None])
        return hook

    def post(module, args, kwargs, out):
        for entry in reversed(record["children"]):
            if entry[0] == names[id(module)] and entry[2] is None:
                entry[2] = out
                break

    def linear(module, args, out):
        if isinstance(out, torch.Tensor):
            record["linears"].append((names[id(module)], out.shape[-1]))

    def done(module, args, out):
        record["out"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Stop

    try:
        for name, child in children.items():
            handles.append(child.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(child.register_forward_hook(post, with_kwargs=True))
        for module in block.modules():
            if module is not block and is_linear_like(module):
                handles.append(module.register_forward_hook(linear))
        if scale_mlp is not None:
            handles.append(scale_mlp.register_forward_hook(lambda m, a, out: out * factor))
        handles.append(block.register_forward_hook(done))
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return record


def probe_block(model: nn.Module, index: int, input_ids: torch.Tensor, blocks: Blocks | None = None) -> BlockLayout:
    """The layout of block `index`'s MLP write, measured on `input_ids` [B, L] (a couple of rows suffice)."""
    blocks = blocks or find_blocks(model)
    block = blocks.modules[index]
    children = dict(block.named_children())
    first = _pass(model, block, input_ids)
    d = first["out"].shape[-1]
    calls = first["children"]
    mlp_at = next((i for i in range(len(calls) - 1, -1, -1)
                   if isinstance(calls[i][2], torch.Tensor) and _has_matrix(children[calls[i][0]])), None)
    if mlp_at is None:
        return BlockLayout(index, None, None, None, None, "forward", None)
    mlp = calls[mlp_at][0]
    m = calls[mlp_at][2]  # [B, L, d] the MLP's output

    # Follow the MLP's output tensor through the children that consume it (as the same object).
    post_norm, follow = None, m
    for name, inputs, out in calls[mlp_at + 1:]:
        if not any(x is follow for x in inputs):
            continue
        params = list(children[name].parameters())
        if not params and isinstance(out, torch.Tensor):  # dropout and the like: keep following
            follow = out
            continue
        if params and all(p.dim() == 1 for p in params):
            post_norm = name
        break

    # h(α): h_l with the MLP output scaled by α. Additive: h(β) − h(α) = (β − α)·(h(1) − h(0)) exactly, at
    # any α, β. Through a norm, ‖h(β) − h(α)‖ stays bounded by the gain whatever β. Large α, β put the
    # norm past its ε even where the MLP output is tiny (a random-init MLP: mean square far below ε, where
    # the RMSNorm is still linear).
    def h(factor: float) -> torch.Tensor:
        return _pass(model, block, input_ids, scale_mlp=children[mlp], factor=factor)["out"].double()

    h1, h0 = first["out"].double(), h(0.0)
    for low, high in ((1e3, 1e4), (10.0, 100.0)):  # the second where float16 overflows at 10⁴
        response = float((h(high) - h(low)).norm() / ((high - low) * (h1 - h0).norm()).clamp_min(1e-30))
        if math.isfinite(response):
            break
    found_by = "forward"
    if response < NORMALISED_BELOW and post_norm is None:
        named = [n for n, c in children.items() if _POST_NORM_NAME.search(n) and list(c.parameters())
                 and all(p.dim() == 1 for p in c.parameters())]
        if named:
            post_norm, found_by = named[0], "name"
    if response >= NORMALISED_BELOW:
        post_norm = None  # a norm whose output is not what gets added (or a scale-preserving module)

    in_mlp = [(n, width) for n, width in first["linears"] if n.startswith(mlp + ".")]
    writer = next((n for n, width in reversed(in_mlp) if width == d), None)
    outside = [(n, width) for n, width in first["linears"] if not n.startswith(mlp + ".")]
    attention_writer = next((n for n, width in reversed(outside) if width == d), None)
    experts = tuple(f"{mlp}.{n}" for n, p in children[mlp].named_parameters() if p.dim() >= 3)
    return BlockLayout(index, mlp, writer, post_norm, response, found_by, attention_writer, experts)


@torch.no_grad()
def gain_step(norm: nn.Module, writer: nn.Module) -> float:
    """rms(effective gain) / rms(W_writer): how much larger the gain's step must be for Adam to move it by
    the same relative amount as the projection it scales.

    Adam moves every coordinate by about lr whatever its size, so a gain ≈ 1 (OLMo 2's w; Gemma's 1 + w,
    with w ≈ 0) trained beside a projection whose entries are ≈ 1/√in would change 10–100× more slowly,
    relatively, and the contribution's size would barely move in a few dozen steps. The effective gain
    is read off the norm itself: an RMSNorm maps the all-ones vector to (its ε aside) its gain [d].
    """
    weight = norm.weight
    gain = norm(torch.ones(1, weight.shape[0], dtype=weight.dtype, device=weight.device)).float().reshape(-1)  # [d]
    rms_gain = float(gain.pow(2).mean().sqrt())
    rms_writer = float(writer.weight.float().pow(2).mean().sqrt())
    if not (rms_gain > 0 and rms_writer > 0) or not torch.isfinite(gain).all():
        return 1.0  # not an RMSNorm-like gain (e.g. a LayerNorm, to which a constant vector is 0): plain steps
    return rms_gain / rms_writer


def _param_targets(block: nn.Module, prefix: str, pattern: str) -> list[Target]:
    """Norm gains and ≥ 3-D (expert) parameters of a block whose dotted path matches `pattern`."""
    found = []
    for path, module in block.named_modules():
        full = f"{prefix}.{path}" if path else prefix
        if is_linear_like(module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if (p.dim() >= 3 or (p.dim() == 1 and pname == "weight" and not list(module.children()))) \
                    and re.search(pattern, f"{full}.{pname}"):
                found.append(Target(f"{full}.{pname}", module, pname,
                                    "experts (targeted explicitly)" if p.dim() >= 3 else "norm gain (matched -O modules)"))
    return found


def update_blocks(model: nn.Module, update_layers: list[int] | None, layer: int) -> list[int]:
    n_blocks = len(find_blocks(model).modules)
    update = update_layers if update_layers is not None else list(range(max(layer - 2, 0), layer + 1))
    for index in update:
        if not 0 <= index < n_blocks:
            raise UsageError(f"-O update_layers has block {index}, out of range: the model has {n_blocks} blocks "
                             f"(0 … {n_blocks - 1})")
    return update


def explicit_targets(model: nn.Module, pattern: str, update: list[int]) -> list[Target]:
    """`-O modules=REGEX`: Linear layers (as before), and norm gains or 3-D expert parameters it names."""
    compile_pattern(pattern, "-O modules")
    blocks = find_blocks(model)
    targets = []
    for index in update:
        prefix = blocks.block_path(index)
        for path, module in block_linears(blocks.modules[index], prefix, pattern).items():
            targets.append(Target(f"{path}.weight", module, "weight", "matched -O modules"))
        targets += _param_targets(blocks.modules[index], prefix, pattern)
    if not targets:
        raise UsageError(f"-O modules='{pattern}' matched no Linear layer, norm or expert parameter in blocks {update}; "
                         f"the blocks hold: {', '.join(linear_names(blocks, update[0]))}")
    return targets


@dataclass
class Choice:
    targets: list[Target]
    layouts: list[BlockLayout]
    notes: list[str] = field(default_factory=list)

    @property
    def normalised(self) -> bool:
        """Every updated block normalises its MLP output (the steering scale follows this)."""
        return bool(self.layouts) and all(layout.normalised for layout in self.layouts)


def choose_targets(model: nn.Module, pattern: str | None, update: list[int], probe_ids: torch.Tensor) -> Choice:
    """The weights rmu / sspu train in blocks `update`: `pattern` when given, else per block layout."""
    blocks = find_blocks(model)
    layouts = [probe_block(model, i, probe_ids, blocks) for i in update]
    notes: list[str] = []
    if pattern is not None:
        targets = explicit_targets(model, pattern, update)
        names = {t.name for t in targets}
        for layout in layouts:
            if layout.normalised and layout.post_norm is not None:
                gain = f"{blocks.block_path(layout.block)}.{layout.post_norm}.weight"
                if gain not in names:
                    notes.append(f"block {layout.block} normalises its MLP output ({layout.post_norm}): the targeted "
                                 "weights can turn that contribution but not resize it; the default targets add the "
                                 "norm's gain")
        return Choice(targets, layouts, notes)

    targets = []
    for layout in layouts:
        prefix, block = blocks.block_path(layout.block), blocks.modules[layout.block]
        if layout.experts:
            notes.append(f"block {layout.block}: expert parameters {', '.join(layout.experts)} are not trained by "
                         "default; name them in -O modules to include them")
        if layout.writer is not None:
            targets.append(Target(f"{prefix}.{layout.writer}.weight", block.get_submodule(layout.writer), "weight",
                                  "MLP output projection: writes into the residual stream"))
        elif layout.attention_writer is not None:
            targets.append(Target(f"{prefix}.{layout.attention_writer}.weight",
                                  block.get_submodule(layout.attention_writer), "weight",
                                  "attention output projection: the MLP has no dense output projection (experts only)"))
        if layout.normalised:
            if layout.post_norm is None:
                notes.append(f"block {layout.block} normalises its MLP output but no norm module was found: "
                             "the targets can turn the contribution, not resize it")
            else:
                norm = block.get_submodule(layout.post_norm)
                step = gain_step(norm, block.get_submodule(layout.writer)) if layout.writer else 1.0
                targets.append(Target(f"{prefix}.{layout.post_norm}.weight", norm, "weight",
                                      "gain of the norm applied to the MLP output: the only weight that sets the "
                                      f"contribution's size (steps × {step:.3g}, rms(gain) / rms(W_down))", step))
    if not targets:
        raise UsageError(f"found no weight writing into the residual stream in blocks {update}; "
                         "name the layers to train with -O modules=REGEX")
    return Choice(targets, layouts, notes)


def writes_residual(target: Target, d: int) -> bool:
    """Whether the target's first output axis is the residual stream: [d] gains, [d, in] weights, [E, d, in] experts."""
    p = target.tensor
    return p.shape[1 if p.dim() >= 3 else 0] == d
