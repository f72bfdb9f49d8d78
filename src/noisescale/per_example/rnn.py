"""nn.LSTM, nn.GRU and nn.RNN: exact per-example gradients by recomputing the recurrence.

The fused recurrent kernel keeps its gate activations to itself, so in the backward pass the rule
re-runs the recurrence step by step on the saved input (the whole batch at once, in float32 at
least) and asks autograd for the gradients of the gate pre-activations, δ(ih) = ∂L/∂(x_t W_ihᵀ +
b_ih) and δ(hh) = ∂L/∂(h_{t−1} W_hhᵀ + b_hh) at every step, given the gradients the module's outputs
received (the output sequence, h_n and, for an LSTM, c_n). Then, as for a Linear layer over the T
steps of an example, W_ih's per-example gradient is Σ_t δ(ih)_t x_tᵀ and W_hh's is Σ_t δ(hh)_t
h_{t−1}ᵀ (for LSTM and RNN δ(hh) = δ(ih); a GRU multiplies the candidate's hidden part by the reset
gate, so the two differ). It costs about one extra forward and backward of the recurrence (Opacus's
``DPLSTM`` pays the same by running its own cells in Python).

Supported: any number of layers, bidirectional, ``batch_first`` either way (the time-major layout
is handled, not refused), an initial state ``hx``, packed sequences (``PackedSequence``, sorted or
not), heads on the outputs or on h_n/c_n, an LSTM with projections (``proj_size > 0``: h_t =
W_hr (o_t ⊙ tanh c_t), whose per-example gradient is Σ_t δ(hr)_t (o_t ⊙ tanh c_t)ᵀ with δ(hr)_t
= ∂L/∂h_t). Refused: inter-layer ``dropout`` in training mode (the fused kernel's dropout masks
cannot be reproduced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.per_example.factors import DenseFactor, Factor, LinearFactor, _acc, acc_sum
from noisescale.per_example.registry import LayerRule, register_layer


def check(module: nn.RNNBase, name: str) -> None:
    if module.dropout > 0 and module.training and module.num_layers > 1:
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__} with dropout={module.dropout}): the fused "
            "kernel draws its dropout masks between layers internally, so per-example gradients "
            "cannot be recomputed with the same masks. Use dropout=0 and put nn.Dropout between "
            "single-layer modules (exact), or per_example=False"
        )


@dataclass
class _Saved:
    x: Tensor  # [N, T, I], batch first, padded with zeros past each length
    lengths: Tensor | None  # [N] for packed input
    hx: tuple[Tensor, ...] | None  # [L·D, N, H] each
    packed: PackedSequence | None  # the packed input's metadata (for the output's gradient)
    rows: Tensor | None = None


def _batch_size(module: nn.RNNBase, args: tuple, kwargs: dict[str, Any]) -> int:
    x = args[0] if args else kwargs["input"]
    if isinstance(x, PackedSequence):
        return int(x.batch_sizes[0])
    if x.dim() != 3:
        raise NoiseScaleInputError(
            f"{type(module).__name__} was called with an unbatched {x.dim()}-D input; call it "
            "with a batch (dim 0 = examples with batch_first=True)"
        )
    return int(x.shape[0 if module.batch_first else 1])


def _save(module: nn.RNNBase, args: tuple, kwargs: dict[str, Any], output: Any) -> _Saved:
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if hx is not None and not isinstance(hx, tuple):
        hx = (hx,)
    if isinstance(x, PackedSequence):
        padded, lengths = pad_packed_sequence(x, batch_first=True)
        return _Saved(padded.detach(), lengths.to(padded.device), _detach(hx), x)
    data = x.detach() if module.batch_first else x.detach().transpose(0, 1)
    return _Saved(data, None, _detach(hx), None)


def _detach(hx: tuple[Tensor, ...] | None) -> tuple[Tensor, ...] | None:
    return None if hx is None else tuple(h.detach() for h in hx)


def _outputs(module: nn.RNNBase, output: Any) -> list[Tensor]:
    out, hidden = output
    data = out.data if isinstance(out, PackedSequence) else out
    return [data, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def _batch_dims(module: nn.RNNBase) -> tuple[int, list[int]]:
    seq = 0 if module.batch_first else 1
    states = 2 if module.mode == "LSTM" else 1
    return seq, [seq] + [1] * states


def _select(module: nn.RNNBase, saved: _Saved, rows: Tensor) -> _Saved:
    hx = None if saved.hx is None else tuple(h.index_select(1, rows) for h in saved.hx)
    lengths = None if saved.lengths is None else saved.lengths.index_select(0, rows)
    return _Saved(saved.x.index_select(0, rows), lengths, hx, saved.packed, rows)


def _output_grad(module: nn.RNNBase, saved: _Saved, grad: Tensor | None, n: int) -> Tensor | None:
    """The output's gradient as [N, T, D·H], batch first, in the saved examples' order."""
    if grad is None:
        return None
    if saved.packed is not None:
        p = saved.packed
        packed = PackedSequence(grad, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        grad, _ = pad_packed_sequence(packed, batch_first=True, total_length=saved.x.shape[1])
    elif not module.batch_first:
        grad = grad.transpose(0, 1)
    return grad if saved.rows is None else grad.index_select(0, saved.rows)


def _step(
    mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None, c_feeds_h: bool = False
) -> tuple[Tensor, Tensor | None]:
    """One step of the recurrence from the gate pre-activations gi = x W_ihᵀ + b_ih and
    gh = h W_hhᵀ + b_hh: (h', c') (c' ``None`` but for an LSTM). ``c_feeds_h``: h' is computed
    from a detached c' (its gradient already holds the path through h': ATen's composite
    LSTMCell)."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_in_h = c_new.detach() if c_feeds_h else c_new
        return torch.sigmoid(o) * torch.tanh(c_in_h), c_new
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        return (1 - z) * torch.tanh(in_ + r * hn) + z * h, None
    pre = gi + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _weight(module: nn.Module, name: str) -> Tensor:
    """``module``'s parameter ``name`` (``None`` where it has none), as its forward used it.

    Under FSDP2 (``reshard_after_forward=True``) a layer whose output is the output of the
    module ``fully_shard`` wraps gets its output's gradient before FSDP2 gathers that module's
    parameters for the backward (FSDP2's hook on the output comes after the engine's): the
    parameter is still the sharded ``DTensor``, and the recurrence cannot be recomputed from
    it (until 2026-12-07 a raw "mixed torch.Tensor and DTensor" RuntimeError from the matrix
    product, the data-parallel fuzzer's seed 336)."""
    p = getattr(module, name, None)
    if p is not None and hasattr(p, "placements"):
        raise UnsupportedModuleError(
            f"{type(module).__name__}'s parameter '{name}' is still sharded by FSDP2 (a "
            "DTensor) when the gradient of the layer's output arrives, and its per-example "
            "gradients recompute the recurrence from its weights: the layer's output is the "
            "output of the module fully_shard wraps, whose parameters FSDP2 gathers for the "
            "backward only after noisescale's hook on that output has run. Pass "
            "reshard_after_forward=False to that fully_shard call, or apply fully_shard to "
            "the model's root only"
        )
    return p  # type: ignore[return-value]


def _factors(
    module: nn.RNNBase, saved: _Saved, grads: tuple[Tensor | None, ...]
) -> dict[str, Factor]:
    n, steps = saved.x.shape[0], saved.x.shape[1]
    hidden = module.hidden_size
    directions = 2 if module.bidirectional else 1
    lstm, gru = module.mode == "LSTM", module.mode == "GRU"
    proj = getattr(module, "proj_size", 0)  # an LSTM's projection of h (0: none)
    state = proj or hidden  # h's size
    g_out = _output_grad(module, saved, grads[0], n)
    g_states = []
    for g in grads[1:]:
        if g is not None and saved.rows is not None:
            g = g.index_select(1, saved.rows)
        g_states.append(g)
    dtype = _acc(saved.x).dtype
    mask = None
    if saved.lengths is not None:
        mask = torch.arange(steps, device=saved.x.device)[None, :] < saved.lengths[:, None]

    ih_nodes: list[Tensor] = []
    hh_nodes: list[list[Tensor]] = []
    hr_nodes: list[list[Tensor]] = []  # the projected h of every step (proj_size > 0)
    raw_states: list[Tensor] = []  # o_t ⊙ tanh c_t, what the projection maps (proj_size > 0)
    seq_inputs: list[Tensor] = []
    prev_states: list[Tensor] = []
    finals_h: list[Tensor] = []
    finals_c: list[Tensor] = []
    with torch.enable_grad():
        layer_in = _acc(saved.x)
        for layer in range(module.num_layers):
            outs = []
            for direction in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih = _weight(module, "weight_ih" + sfx).detach().to(dtype)
                w_hh = _weight(module, "weight_hh" + sfx).detach().to(dtype)
                b_ih = _weight(module, "bias_ih" + sfx)
                b_hh = _weight(module, "bias_hh" + sfx)
                ih = layer_in @ w_ih.t()
                if b_ih is not None:
                    ih = ih + b_ih.detach().to(dtype)
                if not ih.requires_grad:
                    ih.requires_grad_(True)
                w_hr = None
                if proj:
                    w_hr = _weight(module, "weight_hr" + sfx).detach().to(dtype)
                k = layer * directions + direction
                h = _acc(saved.hx[0][k]) if saved.hx is not None else layer_in.new_zeros(n, state)
                c = None
                if lstm:
                    c = (
                        _acc(saved.hx[1][k])
                        if saved.hx is not None
                        else layer_in.new_zeros(n, hidden)
                    )
                hs: list[Tensor | None] = [None] * steps
                prevs: list[Tensor | None] = [None] * steps
                hh_list: list[Tensor] = []
                hr_list: list[Tensor] = []
                raws: list[Tensor | None] = [None] * steps
                order = range(steps - 1, -1, -1) if direction else range(steps)
                for t in order:
                    prevs[t] = h.detach()
                    hh = h @ w_hh.t()
                    if b_hh is not None:
                        hh = hh + b_hh.detach().to(dtype)
                    if gru:
                        if not hh.requires_grad:  # the first step from a constant state
                            hh.requires_grad_(True)
                        hh_list.append(hh)
                    h_new, c_new = _step(module.mode, ih[:, t], hh, h, c)
                    if w_hr is not None:
                        raws[t] = h_new.detach()
                        h_new = h_new @ w_hr.t()
                        hr_list.append(h_new)
                    if mask is not None:
                        keep = mask[:, t : t + 1]
                        h = torch.where(keep, h_new, h)
                        if lstm:
                            c = torch.where(keep, c_new, c)
                        hs[t] = torch.where(keep, h_new, torch.zeros_like(h_new))
                    else:
                        h = h_new
                        if lstm:
                            c = c_new
                        hs[t] = h_new
                if direction:  # time order
                    hh_list.reverse()
                    hr_list.reverse()
                outs.append(torch.stack(hs, 1))  # type: ignore[arg-type]
                ih_nodes.append(ih)
                hh_nodes.append(hh_list)
                hr_nodes.append(hr_list)
                if w_hr is not None:
                    raw_states.append(torch.stack(raws, 1))  # type: ignore[arg-type]
                seq_inputs.append(layer_in.detach())
                prev_states.append(torch.stack(prevs, 1))  # type: ignore[arg-type]
                finals_h.append(h)
                if lstm:
                    finals_c.append(c)  # type: ignore[arg-type]
            layer_in = torch.cat(outs, 2) if directions == 2 else outs[0]
        outputs, grad_outputs = [], []
        if g_out is not None:
            outputs.append(layer_in)
            grad_outputs.append(g_out.to(dtype))
        if len(g_states) > 0 and g_states[0] is not None:
            outputs.append(torch.stack(finals_h))
            grad_outputs.append(g_states[0].to(dtype))
        if lstm and len(g_states) > 1 and g_states[1] is not None:
            outputs.append(torch.stack(finals_c))
            grad_outputs.append(g_states[1].to(dtype))
        hr_targets = [t for hl in hr_nodes for t in hl]
        targets = list(ih_nodes) + [t for hl in hh_nodes for t in hl] + hr_targets
        found = torch.autograd.grad(outputs, targets, grad_outputs, allow_unused=True)
    d_ih = [_zero_if_none(g, t) for g, t in zip(found[: len(ih_nodes)], ih_nodes, strict=True)]
    rest = list(found[len(ih_nodes) : len(found) - len(hr_targets)])
    hr_rest = list(found[len(found) - len(hr_targets) :])
    out: dict[str, Factor] = {}
    for k in range(len(ih_nodes)):
        layer, direction = divmod(k, directions)
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        if gru:
            count = len(hh_nodes[k])
            parts, rest = rest[:count], rest[count:]
            d_hh = torch.stack(
                [_zero_if_none(g, t) for g, t in zip(parts, hh_nodes[k], strict=True)], 1
            )
        else:
            d_hh = d_ih[k]
        params = {
            "weight_ih" + sfx: LinearFactor(seq_inputs[k], d_ih[k]),
            "weight_hh" + sfx: LinearFactor(prev_states[k], d_hh),
            "bias_ih" + sfx: DenseFactor(acc_sum(d_ih[k], 1)),
            "bias_hh" + sfx: DenseFactor(acc_sum(d_hh, 1)),
        }
        if proj:
            count = len(hr_nodes[k])
            parts, hr_rest = hr_rest[:count], hr_rest[count:]
            d_hr = torch.stack(
                [_zero_if_none(g, t) for g, t in zip(parts, hr_nodes[k], strict=True)], 1
            )
            params["weight_hr" + sfx] = LinearFactor(raw_states[k], d_hr)
        for name, factor in params.items():
            p = getattr(module, name, None)
            if p is not None and p.requires_grad:
                out[name] = factor
    return out


def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


_RULE = LayerRule(
    _factors,
    save=_save,
    check=check,
    params=None,  # every parameter the module owns
    outputs=_outputs,
    batch_dims=_batch_dims,
    batch_size=_batch_size,
    native_layout=True,
    select=_select,
    name="RNN",
)
for _type in (nn.LSTM, nn.GRU, nn.RNN):
    register_layer(_type, _RULE)


# -- cells: nn.LSTMCell, nn.GRUCell, nn.RNNCell ------------------------------------------------
#
# A cell is one step of the recurrence, called by the user's own loop (once per time step, the
# state of one call fed to the next). Each call is measured like a Linear pair: the gate
# pre-activations x W_ihᵀ + b_ih and h W_hhᵀ + b_hh are recomputed from the saved input and
# state, and autograd gives their gradients from those the call's outputs received; the calls
# of one pass then add up as any layer called several times does (with the cross terms).


def _cell_batch_size(module: nn.RNNCellBase, args: tuple, kwargs: dict[str, Any]) -> int:
    x = args[0] if args else kwargs["input"]
    if x.dim() != 2:
        raise NoiseScaleInputError(
            f"{type(module).__name__} was called with an unbatched {x.dim()}-D input; call it "
            "with a batch (dim 0 = examples)"
        )
    return int(x.shape[0])


@dataclass
class _CellSaved:
    x: Tensor  # [N, I]
    h: Tensor | None  # [N, H]
    c: Tensor | None  # [N, H] (LSTMCell)
    # an LSTMCell's h' computed from its returned c' (ATen's composite lstm_cell, on the CPU):
    # the gradient the hook on c' receives then includes the path through h'
    c_feeds_h: bool = False
    rows: Tensor | None = None


def _cell_save(
    module: nn.RNNCellBase, args: tuple, kwargs: dict[str, Any], output: Any
) -> _CellSaved:
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    h, c = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
    c_feeds_h = (
        isinstance(output, tuple)
        and output[0].grad_fn is not None
        and output[0].grad_fn is not output[1].grad_fn  # (one fused node: CUDA's kernel)
        and _reaches(output[0].grad_fn, output[1].grad_fn)
    )
    return _CellSaved(
        x.detach(), None if h is None else h.detach(), None if c is None else c.detach(), c_feeds_h
    )


def _reaches(node: Any, target: Any, depth: int = 4) -> bool:
    """Whether autograd node ``target`` is among ``node``'s inputs within ``depth`` steps."""
    if node is target:
        return True
    if node is None or depth == 0:
        return False
    return any(_reaches(n, target, depth - 1) for n, _ in node.next_functions)


def _cell_select(module: nn.RNNCellBase, saved: _CellSaved, rows: Tensor) -> _CellSaved:
    def take(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.index_select(0, rows)

    return _CellSaved(take(saved.x), take(saved.h), take(saved.c), saved.c_feeds_h, rows)  # type: ignore[arg-type]


def _cell_rows(module: nn.Module) -> bool:
    """A cell treats its rows alike, as a Linear does: the examples may come flattened together
    with another dimension, [N·S, I] — Slot Attention's ``gru(upd.reshape(-1, D),
    slots.reshape(-1, D))`` — each example's S rows in turn (``LayerRule.flattened``; the
    engine sums the factors of an example's rows)."""
    return True


def _cell_outputs(module: nn.RNNCellBase, output: Any) -> list[Tensor]:
    return list(output) if isinstance(output, tuple) else [output]


def _cell_factors(module: nn.RNNCellBase, saved: _CellSaved, grads: tuple) -> dict[str, Factor]:
    x, h, c = saved.x, saved.h, saved.c
    if saved.rows is not None:  # (a subset of the examples: the engine selected the inputs)
        grads = tuple(None if g is None else g.index_select(0, saved.rows) for g in grads)
    dtype = _acc(x).dtype
    x = _acc(x)
    n, hidden = x.shape[0], module.hidden_size
    h = x.new_zeros(n, hidden) if h is None else h.to(dtype)
    lstm = isinstance(module, nn.LSTMCell)
    if lstm:
        c = x.new_zeros(n, hidden) if c is None else c.to(dtype)

    def pre(inp: Tensor, name: str) -> Tensor:
        w = _weight(module, "weight_" + name).detach().to(dtype)
        b = _weight(module, "bias_" + name)
        out = inp @ w.t()
        if b is not None:
            out = out + b.detach().to(dtype)
        return out.requires_grad_(True)

    if lstm or isinstance(module, nn.GRUCell):
        mode = "LSTM" if lstm else "GRU"
    else:
        mode = "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"
    with torch.enable_grad():
        gi, gh = pre(x, "ih"), pre(h, "hh")
        h_new, c_new = _step(mode, gi, gh, h, c, saved.c_feeds_h)
        outs = [h_new] if c_new is None else [h_new, c_new]
        pairs = [(o, g.to(dtype)) for o, g in zip(outs, grads, strict=False) if g is not None]
        if not pairs:
            return {}
        found = torch.autograd.grad(
            [o for o, _ in pairs], [gi, gh], [g for _, g in pairs], allow_unused=True
        )
    d_ih, d_hh = (_zero_if_none(g, t) for g, t in zip(found, (gi, gh), strict=True))
    params = {
        "weight_ih": LinearFactor(x[:, None], d_ih[:, None]),
        "weight_hh": LinearFactor(h[:, None], d_hh[:, None]),
        "bias_ih": DenseFactor(d_ih),
        "bias_hh": DenseFactor(d_hh),
    }
    return {
        name: f
        for name, f in params.items()
        if getattr(module, name, None) is not None and getattr(module, name).requires_grad
    }


_CELL_RULE = LayerRule(
    _cell_factors,
    save=_cell_save,
    params=None,
    outputs=_cell_outputs,
    batch_size=_cell_batch_size,
    native_layout=True,  # (several outputs: (h, c) of an LSTMCell, each with its gradient)
    select=_cell_select,
    flattened=_cell_rows,
    name="RNN cell",
)
for _type in (nn.LSTMCell, nn.GRUCell, nn.RNNCell):
    register_layer(_type, _CELL_RULE)
