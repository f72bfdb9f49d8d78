"""Exact per-example squared gradient norms |∇θ ℓ_i|², from hooks, without per-example gradients.

The package, layer by layer:

* :mod:`~.engine` — construction (the plan, the hooks installed, pause and removal) and small
  accessors; nine mixins of :class:`PerExampleNorms` hold the rest: :mod:`~.opening` (a pass
  opened by the model's forward, its output taken as the targets), :mod:`~.layer_hooks` (the
  hooks on each measured layer), :mod:`~.row_checks` (are the rows a forward meets the
  examples?), :mod:`~.backward` (sub-batch products, shared calls and meetings: each use's
  gradient routed to its parameters), :mod:`~.collect` (the parameter hooks, every use of every
  parameter summed, collection), :mod:`~.settle` (each pass's norms kept, withheld or refused
  after the backward),
  :mod:`~.traced` (the hooks under ``torch.compile``), :mod:`~.example_check` (the audit's
  re-runs: do the model's rows follow its examples?) and :mod:`~.grad_watch` (``.grad``
  changed outside the engine); and modules of their own: :mod:`~.passes` (what one pass
  records, :class:`PassNorms`), :mod:`~.messages` (refusals whose cause lies outside the layer
  that met it), :mod:`~.pass_checks` (checks across a step's passes), :mod:`~.graph` (reading
  autograd's graph, the audit's batched backward) and :mod:`~.values` (the hooks' arguments
  and outputs);
* :mod:`~.registry` — the rule protocol and :func:`register_layer`, the public extension point;
* :mod:`~.shared` — parameters and shared calls followed to where they meet the batch;
* :mod:`~.audit` — the proof that the factors add up and are attributed to the right examples;
* :mod:`~.factors` — compact exact forms of per-example gradients;
* one module per layer family, each registering itself: :mod:`~.linear` (``nn.Linear``,
  Hugging Face ``Conv1D``), :mod:`~.conv`, :mod:`~.embedding` (``Embedding``, ``EmbeddingBag``),
  :mod:`~.norms`, :mod:`~.rnn` (``LSTM``, ``GRU``, ``RNN``);
* :mod:`~.fallback` — torch.func for operations without a rule;
* :mod:`~.compiled` — the hooks under ``torch.compile``: operations of the compiled graph;
* :mod:`~.sqnorms` — :class:`per_example_sqnorms`, the engine as a context manager.
"""

from __future__ import annotations

from noisescale.per_example import conv, embedding, linear, norms, rnn  # noqa: F401 (register)
from noisescale.per_example.engine import LOSS_REDUCTIONS, PerExampleNorms
from noisescale.per_example.factors import weighted_sqnorm
from noisescale.per_example.passes import PassNorms
from noisescale.per_example.registry import (
    LayerRule,
    register_layer,
    rule_for,
    supported_layers,
    unregister_layer,
)
from noisescale.per_example.sqnorms import per_example_sqnorms

__all__ = [
    "LOSS_REDUCTIONS",
    "LayerRule",
    "PassNorms",
    "PerExampleNorms",
    "per_example_sqnorms",
    "register_layer",
    "rule_for",
    "supported_layers",
    "unregister_layer",
    "weighted_sqnorm",
]
