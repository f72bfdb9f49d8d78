"""The engine's refusals that name a cause found outside the layer that met it: parameters
added after the tracker, a submodule called alone, reentrant checkpointing, a loss term
computed from the parameters (AdaLoRA's penalty, a mixture of experts' auxiliary loss),
examples mixed in the model."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.utils import parametrize

from noisescale.per_example.embedding import SPARSE_ADAM
from noisescale.per_example.graph import _MirroredCheckpoint
from noisescale.per_example.passes import PassNorms
from noisescale.per_example.registry import overridden_method, rule_class


def new_parameters_message(names: Sequence[str]) -> str:
    """The refusal of trainable parameters the tracker was not built on."""
    return (
        f"parameters {list(names[:6])}{'…' if len(names) > 6 else ''} were added to the model or "
        "replaced by new Parameter objects after the tracker (or PerExampleNorms) was created (a "
        "layer re-created or added, a Parameter assigned to a module's attribute — a bare "
        "scale used as `out * self.scale` —, resize_token_embeddings(), peft adapters, "
        "load_state_dict(..., assign=True), "
        "model.to() with torch.__future__.set_overwrite_module_params_on_conversion(True), "
        "FSDP2's fully_shard(), a parametrization or reparametrization removed — "
        "torch.nn.utils.parametrize.remove_parametrizations, remove_weight_norm, "
        "remove_spectral_norm, prune.remove —, which leaves a new parameter in the originals' "
        "place): the tracker would leave them out of every norm. Create the tracker (or "
        "PerExampleNorms) after the model is built, moved, loaded, wrapped and reparametrized "
        "as it will be trained"
    )


def loss_kind_message(
    declared: str, passes: Sequence[PassNorms], accumulated: bool = False, evenly: bool = False
) -> str | None:
    """A backward from a plain sum over the examples under ``loss_reduction="mean"``, or from a
    plain mean under ``"sum"`` (loss_watch.py, audited steps), with more than one example: the
    refusal's text; else ``None``. ``accumulated``: a step of several micro-batches, where a
    kind that came through a numeric factor is not held against the declaration (the factor
    may be the loop's: Lightning's 1/k with k equal to the batch size by coincidence, n/total
    — a review, 2026-12-06). ``evenly``: what the mean counted, every example has as many of
    (a model's own token mean over sequences that count as many tokens each): a plain mean over
    the examples of each one's own mean, held to the declaration."""
    for p in passes:
        if p.batch_size < 2 or p.loss_kind is None or p.loss_kind == declared:
            continue
        if accumulated and p.loss_kind_factored:
            continue
        counted = p.loss_kind_counted is not None and bool(p.loss_kind_counted)
        if p.loss_kind == "mean" and counted and not evenly:
            # the root is a mean over what it counts — x[mask].mean() over unevenly picked
            # rows, a cross-entropy's ignored targets — (scaled, or two such added), not over
            # the examples: a sum divided by a count, as (x * m).sum() / m.sum() is, which
            # "sum" takes as given (until 2026-12-06 refused as a plain mean over the
            # examples, a hunt; a plain mean with a counted term beside it is still held to
            # the declaration, a review; the audited steps this runs on read back anyway)
            continue
        if declared == "mean" and p.loss_kind == "sum":
            return (
                "the loss is a plain sum over the examples (loss.sum(), reduction='sum', "
                "losses.backward(torch.ones_like(losses))), but "
                "loss_reduction='mean' (the default) says it is their mean: every per-example "
                f"norm (and a tracker's |G|² and tr Σ) would come out N² = {p.batch_size**2} "
                "times too large (B_simple too, when the batch size changes). Pass "
                "loss_reduction='sum', or average the loss over the examples. Nothing of this "
                "step was recorded"
            )
        if declared == "sum" and p.loss_kind == "mean":
            return (
                "the loss is a plain mean over the examples (loss.mean(), reduction='mean', "
                "a backward with a gradient of 1/N per example), "
                "but loss_reduction='sum' says it is their sum: every per-example norm (and a "
                f"tracker's |G|² and tr Σ) would come out N² = {p.batch_size**2} times too "
                "small. Pass loss_reduction='mean' (the default), or sum the loss over the "
                "examples. Nothing of this step was recorded"
            )
    return None


def class_weighted_message(passes: Sequence[PassNorms]) -> str | None:
    """A step whose loss is a cross-entropy or NLL with class weights averaged over the batch's
    summed weights (``reduction="mean"``, loss_watch.py, audited steps): the refusal's text;
    else ``None``."""
    for p in passes:
        if p.class_weighted is not None and bool(p.class_weighted):
            return (
                "the loss is averaged over the batch's summed weights — a cross-entropy (or "
                "NLL) with class weights (weight=, reduction='mean'), or a weighted sum divided "
                "by the weights' sum, (w * losses).sum() / w.sum() —: that divisor depends on the "
                "examples drawn, so the step's gradient is a ratio whose noise the examples' "
                "norms do not give without bias (on a frozen model with weights 1, 8, 0.1 and "
                "8 examples a step, B_simple read 54% high, its interval excluding the truth). "
                "Weigh the examples yourself and average over them — (w[y] * "
                "F.cross_entropy(out, y, reduction='none')).mean(), or the weighted sum divided "
                "by a constant — or use per_example=False with accumulation micro-batches"
            )
    return None


def counted_mean_message(declared: str, passes: Sequence[PassNorms]) -> str | None:
    """A step whose loss, under ``loss_reduction="mean"``, is averaged over what it counts —
    not over the examples (loss_watch.py flags it on audited steps: a cross-entropy's ignored
    targets, a sum divided by a mask's sum, a mean over rows picked unevenly; a Hugging Face
    classifier's own ``labels=`` loss with labels of -100, noisescale.tokens): the refusal's
    text; else ``None``.

    Its divisor depends on the examples drawn, so the tracker's reading of each pass as a
    mean over its examples — each example's gradient rescaled by N/(counted) — is a
    per-example "loss" whose weight depends on the others drawn, and the micro-batches that
    each divide by their own count are no big batch for eq. A.2. Until 2026-12-06 it was
    measured so without a word (a hunt: a hand-written token mean over -100 padding read
    B_simple +30% / −20% with one or two micro-batches of 4, +7% / −8% at 16; a classifier's
    own loss with a quarter of its labels -100, +58% at 4 and +10.5% at 16 over 1,000 steps,
    intervals excluding the truth), while the one-shot norms refused it. The same for a
    Hugging Face model's own token loss that is one term of the loss backpropagated (read
    over the examples, :mod:`noisescale.tokens`) where its sequences count different numbers
    of tokens. Not refused: a Hugging Face model's own loss over tokens, whose weights are
    measured, and a cross-entropy over ``ignore_index`` targets none of which is ignored (a
    plain mean)."""
    if declared != "mean":
        return None
    for p in passes:
        if p.batch_size < 2 or p.units_error:
            continue  # (a pass whose units are refused: its own message says why, _weights_of)
        units = p.units
        if (
            units is not None
            and units.measured
            and units.one_term
            and p.forward_watched
            and bool((units.counts != units.counts.reshape(-1)[:1]).any())
        ):
            return (
                "the model's own loss (labels=) is one term of the loss backpropagated "
                "(another term beside out.loss computed from the outputs: a z-loss, DPO with "
                "an NLL term α·out.loss), so the step is read over the examples — but that "
                "term is a mean over the micro-batch's counted tokens and its sequences count "
                "different numbers of them (-100 on padding): each sequence's weight depends "
                "on the others drawn, and B_simple would come out biased as for a token mean "
                "written by hand (a hunt: +30% and −20% with one and two micro-batches of 4 "
                "sequences). Compute that term yourself from the logits, per example (each "
                "sequence's token mean, then the mean over the examples), or compute the whole "
                "loss over tokens yourself with loss_reduction='token_mean' and "
                "tracker.count_tokens(labels). Nothing of this step was recorded"
            )
        if units is not None and units.measured:
            if (
                p.forward_watched
                and units.ignored is not None
                and bool(units.ignored)
                and units.unit == "example"
            ):
                return (
                    "the model's own loss (labels=, through its loss_function) averages the "
                    "examples whose label is not -100, not the examples fed: that count "
                    "depends on the examples drawn, so loss_reduction='mean' (the default) "
                    "reads each example's gradient rescaled by N/(labelled) and the step's "
                    "gradient as a big batch of examples, and B_simple comes out biased (a "
                    "hunt: +58% at 4 examples a micro-batch, +10.5% at 16, a quarter of the "
                    "labels -100, intervals excluding the truth). Declare the mean over the "
                    "labelled examples: loss_reduction='token_mean' — the labels= loss is then "
                    "measured per labelled example (the estimate's unit 'tokens' counts the "
                    "labelled examples; .to('examples') gives it per example fed) —, or "
                    "compute the loss yourself as a mean over the examples fed, "
                    "F.cross_entropy(logits, labels, reduction='sum') / len(labels) (the "
                    "unlabelled ones weigh 0). Nothing of this step was recorded"
                )
            if not units.one_term:
                continue
        counted = p.counted_mean is not None and bool(p.counted_mean)
        if p.counted_inside is not None and p.label_counts is None and units is None:
            # (inside the forward: a loss the model computes itself — SimMIM's masked mean, a
            # BERT classifier's CrossEntropyLoss over labels of -100 —; where labels= counts
            # decide, the token watcher refuses or measures it)
            counted = counted or bool(p.counted_inside)
        if counted:
            return (
                "the loss is averaged over what it counts, not over the examples — a "
                "cross-entropy / NLL whose targets include ignore_index (-100: padding tokens, "
                "unlabelled examples), a token mean written by hand "
                "(F.cross_entropy(logits.flatten(0, 1), labels.flatten()), with label_smoothing "
                "or not, transformers' LabelSmoother in a loop of your own), a sum divided by "
                "a mask's sum, (losses * m).sum() / m.sum(), or a mean over rows picked from "
                "the examples so that some have more rows than others (o[mask] with masks of "
                "different sizes; per-sequence pieces of a packed stream of tokens, "
                "tok.split(lens), whose sizes are not each example's rows in order: compute "
                "each sequence's term on the padded [N, T] grid, (tok * mask).sum(1) / "
                "mask.sum(1)) —, while loss_reduction='mean' (the default) takes it for a "
                "mean over the examples. Its divisor depends on the examples drawn, so each "
                "example's share is no gradient of its own and the micro-batches' gradients "
                "no big batch: B_simple comes out biased (a hunt: +30% and −20% with one and "
                "two micro-batches of 4 sequences, intervals excluding the truth). For a "
                "noise scale per token, declare it: loss_reduction='token_mean' and "
                "tracker.count_tokens(labels) after each forward (the labels the loss counts, "
                "shifted as the loss shifts them; a Hugging Face model called with labels= "
                "has its loss measured, and tracker.wrap_label_smoother(LabelSmoother(...)) "
                "measures transformers' label smoother); for one per example, average each "
                "example's own terms (reduction='none', then each example's mean) and then the "
                "examples, or use reduction='sum' divided by the number of examples. Nothing "
                "of this step was recorded"
            )
    return None


def own_labels_message(declared: str, passes: Sequence[PassNorms]) -> str | None:
    """A step under ``loss_reduction="sum"`` whose loss is a Hugging Face classifier's own
    ``labels=`` loss computed in its forward (BERT's ``CrossEntropyLoss``, not through its
    ``loss_function``) with labels of -100 (:attr:`PassNorms.counted_labels`): the refusal's
    text; else ``None`` (under ``"mean"`` :func:`counted_mean_message` refuses it).

    That loss is a mean over the labelled examples, each weighing 1/(labelled), a count that
    depends on the others drawn: no sum over the examples, and not a definition of the user's
    to take as given (a hand-written ``(ℓ·m).sum() / m.sum()`` is). Until 2026-12-07 it was
    taken as given under ``"sum"``: the one-shot norms C² below each example's own loss (C the
    examples labelled; 0.75 off at C = 2) without a word, the tracker's estimate as biased as
    under ``"mean"`` (a fuzz hunt)."""
    if declared != "sum":
        return None
    if not any(p.counted_labels is not None and bool(p.counted_labels) for p in passes):
        return None
    return (
        "the model computed its loss itself from labels= of one class per example (BERT's "
        "classifier: a CrossEntropyLoss in its forward, not through its loss_function), and "
        "some labels are -100: that loss is a mean over the examples whose label is not -100, "
        "each weighing 1/(their count), which depends on the examples drawn — not a sum over "
        "the examples, as loss_reduction='sum' says, and not a mean over the examples fed, so "
        "neither the norms of each example's own loss nor an unbiased B_simple can be read "
        "from it (GradientNoiseTracker records nothing of such a step). Compute the loss "
        "yourself from the logits without passing labels= to the model: "
        "F.cross_entropy(out.logits, labels, reduction='sum') / len(labels) with "
        "loss_reduction='mean' (each example's own cross-entropy, 0 for one labelled -100), "
        "or reduction='sum' with loss_reduction='sum'; with GradientNoiseTracker, "
        "loss_reduction='token_mean' and tracker.count_tokens(labels) for a noise scale per "
        "labelled example"
    )


def submodule_called_message(lead: str, model: nn.Module, label: str) -> str:
    """The refusal of a step in which a layer ran with gradients enabled outside a forward of
    the measured ``model`` (:attr:`PerExampleNorms.unopened`); ``lead`` names the fix."""
    return (
        f"{lead} ({type(model).__name__}), or give it the module you call: layer '{label}' "
        "ran with gradients enabled outside a forward of that model — a submodule called by "
        "itself, model.model(...) with a loss of your own on its output, as fused "
        "linear-cross-entropy losses and custom heads do, or model.forward(...) called "
        "directly, which skips the model's hooks — and noisescale opens each pass at the "
        "model's forward. Wrap the submodule and the loss in one module and measure that, or "
        "measure the submodule (its parameters only)"
    )


# the cause first: what the engine met in a reentrant recomputation follows from it
_REENTRANT_LEAD = (
    "this step ran activation checkpointing with use_reentrant=True, which recomputes the "
    "forward and backpropagates it in a backward of its own, out of the per-example engine's "
    "reach. Use torch.utils.checkpoint(..., use_reentrant=False) (in transformers: "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
    "False}), its default), or per_example=False"
)


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers layer of ``model`` checkpoints its forward with
    ``use_reentrant=True`` (``gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    {"use_reentrant": True})``): its recomputation may run none of the engine's hooks (peft's
    IA3, VeRA and LoKr, whose parameters are followed from the model's own forward), so the
    pass is not marked (:meth:`PerExampleNorms._hook_pass`) and a refusal would not name it."""
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        func = func.original if isinstance(func, _MirroredCheckpoint) else func
        if isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is True:
            return True
    return False


def _input_sizes_clause(pass_: PassNorms) -> str:
    """Where the model's own inputs disagree on their leading size (text queries per image:
    ``input_ids`` [N·Q, T] beside ``pixel_values`` [N, …]), what noisescale took for the number
    of examples, and that such a model is not measured per example; else ``""``."""
    if pass_.inputs is None:
        return ""
    args, kwargs = pass_.inputs
    named = [(f"argument {i}", v) for i, v in enumerate(args)] + list(kwargs.items())
    sizes = [(name, int(v.shape[0])) for name, v in named if isinstance(v, Tensor) and v.dim()]
    if len({size for _, size in sizes if size > 1}) < 2:  # (a [1, T] input is broadcast)
        return ""
    listed = ", ".join(f"{name} {size}" for name, size in sizes)
    # (where the count came from: the first input, or another whose size an embedding bag's
    # offsets gave it — until 2026-12-06 always said "from the first", a hunt: a TorchRec
    # layout's flat ids [18] beside its offsets [10])
    source = next((name for name, size in sizes if size == pass_.batch_size), None)
    if source is None:
        source = "the bags of an embedding-bag call"
    elif source == sizes[0][0]:
        source = f"the first, {source}"
    return (
        f" The model's inputs disagree on their leading size ({listed}); noisescale took "
        f"{pass_.batch_size}, from {source}, for the number of examples. A model whose "
        "examples have several rows in one input and one in another (several text queries "
        "per image) is not measured per example: use per_example=False."
    )


# (a flattened call whose input has no autograd history: _flattened_hint names it, and the
# refusal then leads with its fix, not with how to lay the rows out)
NO_HISTORY = "carries no autograd history"


def _flattened_hint(size: int, n: int, no_history: bool = False) -> str:
    """What a leading size that is a multiple of the batch's most likely means. ``no_history``:
    the layer treats positions alike, and its input has no autograd history from which the
    flattening could be read (the layers before it frozen: LoRA on a frozen Swin's windows,
    refused until 2026-12-07 as if the rows' layout were the cause, a fuzz hunt)."""
    if n < 1 or size <= n or size % n:
        return ""
    if no_history:
        return (
            f" — {size} = {n} × {size // n}, and that input {NO_HISTORY} (the layers before "
            "it are frozen, or it was computed without gradients), so whether its rows are "
            f"each example's {size // n} in turn — a frozen Swin's windows, x.reshape(-1, D) "
            "of a batch-first [N, T, D] — cannot be read from how it was computed. Make the "
            "model's input require gradients (pixel_values.requires_grad_(); a transformers "
            "text model's token ids: model.enable_input_require_grads()): the frozen layers' "
            "outputs then carry that history, and the layer is measured exactly; or train a "
            "layer before it, or use per_example=False"
        )
    return (
        f" — {size} = {n} × {size // n}: if the examples were flattened together with another "
        "dimension, noisescale can tell which example a row belongs to only for a layer that "
        "treats positions alike (Linear, Conv1D, LayerNorm, RMSNorm) on rows that are each "
        "example's in turn (x.reshape(-1, D) of a batch-first [N, T, D], as OPT's feed-forward "
        "block does); elsewhere it needs the examples along dim 0 of the input"
    )


def _auxiliary_loss_cause(model: nn.Module, logits_only: bool = False) -> str | None:
    """A Hugging Face mixture of experts trained with its routers' auxiliary loss: the
    load-balancing loss multiplies the batch's mean routing fractions by its mean router
    probabilities, over every token of the batch together (and Switch Transformers' z-loss is
    a mean over them too), so it combines examples — the audit fails on it, and its findings
    alone would name a generic cause. ``logits_only``: the model returned its router logits
    and no loss (no labels, so it added no auxiliary loss itself): those logits, one row per
    token of the batch, are what the audit met, whether or not the user's loss uses them."""
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if not getattr(config, "output_router_logits", False):
            continue
        coefs = {
            key: value
            for key in ("router_aux_loss_coef", "router_z_loss_coef")
            if isinstance(value := getattr(config, key, None), (int, float)) and value
        }
        if not coefs:
            continue
        where = f"'{name}.config'" if name else "the model's config"
        set_ = ", ".join(f"{k}={v:g}" for k, v in coefs.items())
        if logits_only:
            return (
                f"This model returns its routers' logits ({where}: output_router_logits=True, "
                f"{set_}), one row per token of the whole batch, which noisescale cannot "
                "attribute to examples; it returned no loss (no labels=), so it added no "
                "auxiliary loss itself. If your loss does not use the router logits, set "
                "output_router_logits=False (or return only the logits from a wrapper): the "
                "model is then measured exactly. If it adds their auxiliary loss, that loss "
                "combines examples (the batch's mean routing fractions times its mean router "
                "probabilities) and no example has a gradient of its own: measure with "
                "per_example=False and two or more gradient-accumulation micro-batches a step"
                " (a language model's own loss from labels=: call it with num_items_in_batch=n, "
                "n the step's counted tokens, in every micro-batch — each micro-batch's own "
                "token mean weighs them by counts that depend on the data, which micro-batch "
                "norms alone cannot measure without bias)."
            )
        return (
            f"This model returns its routers' logits and, given labels, adds their auxiliary "
            f"loss to its loss ({where}: output_router_logits=True, {set_}), computed from the "
            "routing of every token of the batch together (a load-balancing loss: the batch's "
            "mean routing fractions times its mean router probabilities): that loss combines "
            "examples, so no example has a gradient of its own. Measure this model with "
            "per_example=False and two or more gradient-accumulation micro-batches a step "
            "(each micro-batch's loss, its auxiliary loss included, is then a group of its "
            "own; call the model with num_items_in_batch=n, n the step's counted tokens, in "
            "every micro-batch: each micro-batch's own token mean weighs them by counts that "
            "depend on the data, which micro-batch norms alone cannot measure without bias), "
            "or, if it is not trained with the auxiliary loss, with output_router_logits=False."
        )
    return None


def _qualified(cls: type) -> str:
    """``peft.tuners.gralora.layer.Linear``: a class by its module, as a user imports it."""
    module, name = cls.__module__, cls.__qualname__
    return name if module in ("builtins", "__main__") else f"{module}.{name}"


def _penalty_cause(model: nn.Module) -> str | None:
    """peft's AdaLoRA: whenever the model returns a loss (called with ``labels=``), its forward
    adds ``orth_reg_weight`` × the orthogonality penalty |P Pᵀ − I| of every ``lora_A`` and
    ``lora_B`` to it — a term computed from those parameters alone, of no example, which the
    audit finds as a use outside any layer (or, when a rank equals the batch's size, as a table
    of that size meeting a constant). It is named whatever its weight: at 0 the penalty still
    runs, with a zero gradient."""
    for name, module in model.named_modules():
        if type(module).__name__ != "AdaLoraModel":
            continue
        configs = getattr(module, "peft_config", None)
        adapter = getattr(module, "trainable_adapter_name", None)
        config = configs.get(adapter) if isinstance(configs, dict) else None
        weight = getattr(config, "orth_reg_weight", None)
        if not isinstance(weight, (int, float)):
            continue
        where = f"'{name}'" if name else "the model"
        return (
            f"This is peft's AdaLoRA ({where}, adapter '{adapter}', orth_reg_weight={weight:g}): "
            "when the model returns a loss (called with labels=), its forward adds the "
            "orthogonality penalty |P Pᵀ − I| of every lora_A and lora_B to it"
            + (" (at weight 0 it still runs, with a zero gradient)" if weight == 0 else "")
            + ", a term "
            "computed from those parameters alone that belongs to no example, so the step has "
            "no per-example gradients. Call the model without labels= and compute the loss "
            "from its logits (peft then adds no penalty: train without it), or, to keep it, "
            "measure with per_example=False and two or more gradient-accumulation "
            "micro-batches a step (each micro-batch's gradient then carries the penalty's, "
            "and B_simple is that of the penalised objective; a language model's loss over "
            "tokens then needs num_items_in_batch=n, the step's counted tokens, in every "
            "micro-batch's call)."
        )
    return None


def _ambiguous_message(pass_: PassNorms) -> str:
    origin, op, shared, other, kind, lookup = pass_.ambiguous[0]
    labels = sorted({s.label for s in origin.sources})
    n = pass_.batch_size
    if lookup:
        # (until 2026-12-06 the message below, led by a coincidence that is not the cause, a
        # hunt: a VQ-VAE's codebook looked up by its flattened latents' argmin)
        return (
            f"rows of {labels} looked up by integer indices of {lookup} = {n} × {lookup // n} "
            f"rows, then viewed to shape {list(shared)}, meet the batch row by row in the "
            f"operation '{op}' only through a tensor without autograd history of shape "
            f"{list(other)}: a codebook looked up by flattened indices (a vector quantizer's "
            "codebook[cdist(z.reshape(-1, D), codebook).argmin(-1)].view_as(z), or "
            "F.embedding / an nn.Embedding on those indices: VQ-VAE, VQGAN). Indices carry no "
            "autograd history, so noisescale cannot tell which example each looked-up row "
            "belongs to. View the indices to the examples' layout before the lookup — "
            "codebook[idx.view(z.shape[:-1])], F.embedding(idx.view(z.shape[:-1]), codebook), "
            "or the nn.Embedding called on idx.view(z.shape[:-1]): each example's own rows, "
            f"measured exactly — or use per_example=False. (If the table's {n} rows are not the "
            "examples' but a size that equals the batch's by coincidence, use another batch "
            "size.)"
        )
    picked = pass_.picked_input
    if kind in ("loss", "output") and picked is not None and picked[0] in labels:
        # (a batch reordered inside the forward and put back, a(x[order]) … c(h[inv]): until
        # 2026-12-06 refused naming targets and constants, a hunt)
        return (
            f"the input rows of layer '{picked[0]}' ({picked[1]}) were picked inside "
            "the model's forward, so noisescale took that layer for one shared by every "
            f"example, and its output ({labels}, of shape {list(shared)}) met the batch in the "
            f"loss in the operation '{op}'. If the forward reorders its input (x[order], "
            "sorted by a key) and puts the rows back (h[order.argsort()]), sort the batch "
            "outside the model — pass it, and its targets, in the sorted order — so that each "
            "layer's rows are the examples in order; otherwise pick one row per example in "
            "order (h[torch.arange(N), t]), or use per_example=False"
        )
    found = next(
        ((s.label, pass_.dim1_inputs[id(s)]) for s in origin.sources if id(s) in pass_.dim1_inputs),
        None,
    )
    if found is not None:
        used, dim1 = found
        # (until 2026-12-06 a time-major activation upstream was refused as a meeting in the
        # loss, whose fix — pass the targets to the forward — does not help, a hunt)
        return (
            f"a tensor computed from {labels}, of shape {list(shared)}, met the batch in the "
            f"operation '{op}' only after '{used}' was used on a tensor of shape "
            f"{list(dim1)}, whose dim 1 has the batch's size ({n}) and dim 0 does not. If its "
            "examples lie along dim 1 and not dim 0 — a time-major or heads-first activation: "
            "a scan stacked with torch.stack(hs, 0) as [T, N, D], the output of "
            "nn.LSTM/GRU/RNN(batch_first=False) scaled or normalised before it is transposed "
            "back, attention's heads moved first as [H, N, T, d] —, that is the cause: "
            "noisescale reads the examples along dim 0, so it took that tensor for one shared "
            "by every example, and a parameter used on it has no per-example split it can "
            "follow. Keep dim 0 the examples (torch.stack(hs, 1), transpose back before the "
            "layer or the parameter, heads as [N, H, T, d]: the same function, measured "
            "exactly), or use per_example=False"
        )
    buffer = next(
        (pass_.buffer_rows[id(s)] for s in origin.sources if id(s) in pass_.buffer_rows), None
    )
    if buffer is not None and kind != "loss":
        name, shape = buffer
        return (
            f"a tensor computed from {labels} and the model's buffer '{name}' (shape "
            f"{list(shape)}), of shape {list(shared)}, has the batch's size ({n}) in dim 0 and "
            f"meets, row by row in the operation '{op}', only a tensor without autograd "
            f"history of shape {list(other)}. noisescale takes the model's buffers for tensors "
            "that hold no example, whatever their leading size (a mask, a position table), so "
            "it cannot tell whether these rows are the examples'. If the buffer carries a "
            "state from the previous batch (truncated BPTT: stream i continues in row i), keep "
            f"it out of the buffers — a plain attribute, self.{name} = h.detach(), or an "
            "argument of forward, out, h = model(x, h): measured exactly — or use "
            "per_example=False"
        )
    flat = [
        s.call
        for s in origin.sources
        if s.call is not None and s.call.size > n > 0 and s.call.size % n == 0
    ]
    if flat and kind not in ("loss", "output"):
        # (until 2026-12-06 the message below, its tensor said to be computed from parameters
        # alone, a table's: HF-style flattened beams whose token ids of N·B rows, made in the
        # forward by a beam search's topk, were embedded as they are — a hunt)
        # (the first of them: the call on rows of its own, not on an earlier one's output)
        first = next((c for c in flat if "used directly" not in c.why), flat[-1])
        lead = (
            f"layer '{first.label}' was called on {first.size} = {n} × {first.size // n} rows "
            f"that noisescale cannot tell to be each example's in turn ({first.why}), and was "
            f"treated as shared by all examples; what it computed, through {labels}, met the "
            f"batch row by row in the operation '{op}' only through a tensor without autograd "
            f"history of shape {list(other)}"
        )
        if NO_HISTORY in first.why:
            return lead  # (its fix named in the cause)
        return (
            f"{lead}. Call it on rows that show the examples' layout, "
            f"[{n}, {first.size // n}, …] flattened: a view of a batch-first tensor, "
            "x.reshape(-1, D), not a copy of a time-major one; token ids of flattened beams "
            f"embedded batch-first, emb(tok.view({n}, -1)).flatten(0, 1), not emb(tok) on "
            f"their {first.size} rows (ids carry no autograd history to prove their order) — "
            "the rows of a Linear, a cell or a cat along the features after it are then "
            "followed —, or use per_example=False"
        )
    if kind == "output":
        return (
            f"the model's output of shape {list(shared)}, computed through {labels}, whose "
            "rows noisescale did not take for the examples', met the batch after the forward "
            f"returned (in the loss), in the operation '{op}', only through tensors not "
            f"computed from the model's outputs with the batch's size ({n}) in dim 0, such as "
            f"{list(other)}: targets, labels, or constants. The examples reached it in a "
            "layout noisescale did not follow — their rows flattened together and put back by "
            "an index (a batch of graphs' or particle systems' nodes: h[src], index_add), "
            "one example at a time in a Python loop joined by torch.cat (cat([f(x[i:i+1]) "
            "for i in range(N)])), the batch transposed into columns for a product or a solve "
            "(torch.linalg.solve(M, z.T).T) —, or it is a table the model returns, computed "
            "from parameters, whose size equals the batch's by coincidence; noisescale cannot "
            "tell which row is which example's (a loss computed inside the forward is refused "
            "alike). Keep the examples along dim 0 through the model (a batched torch.bmm in "
            "place of a loop over the examples), register a rule for the module that computes "
            "it (noisescale.register_layer), or use per_example=False (a table: combine it "
            "with the model's per-example outputs first)"
        )
    if kind == "loss":
        return (
            f"a tensor computed from {labels} alone, of shape {list(shared)}, met the batch "
            f"after the model's forward returned (in the loss), in the operation '{op}', only "
            "through tensors not computed from the model's outputs with the batch's size "
            f"({n}) in dim 0, such as {list(other)}: targets, labels, or constants. noisescale "
            "cannot tell whether their dim 0 is the examples (targets, labels) or a size that "
            "happens to equal the batch's (a fixed table with as many rows as examples, "
            "positions arange(T) with T = N), and no audit reaches the loss. Compute this "
            "inside the model's forward (pass the targets to it, as Hugging Face models take "
            "labels=), combine it with the model's per-example outputs first, keep "
            "parameters out of the loss (the optimizer's weight decay for penalties), or use "
            "per_example=False"
        )
    return (
        f"a tensor computed from {labels} alone, of shape {list(shared)}, has the "
        f"batch's size ({n}) in dim 0 and meets, row by row in the operation '{op}', "
        f"only a tensor without autograd history of shape {list(other)} (input data or a "
        "mask). noisescale cannot tell whether its rows are the examples' or a table whose "
        "size happens to equal the batch's (a single example's forward would broadcast the "
        f"whole table over it). If it is such a table, use a batch size other than {n} or "
        "keep the table's rows apart from the examples' dimension. If its rows are the "
        "examples' — they reached it in a layout noisescale did not follow, moved out of "
        "dim 0 for a batched product and back (RecurrentGemma's gates, a baddbmm over "
        "[heads, N·T, width]), or a codebook looked up by indices the examples chose, which "
        "carry no history (a vector quantizer's argmin: VQ-VAE, VQGAN, diffusers' VQModel), "
        "and another batch size is refused alike — register a rule for "
        "the module that computes it (noisescale.register_layer), or use per_example=False"
    )


# (the loss watch's reason for an output whose example dimension two of its sizes leave
# ambiguous: _coupled_message leads with that, not with a loss that combines the examples)
SIZES_COINCIDE = "more than one dimension, none of them the examples' known one"


# (a view that merges values picked one by one — masked_select's flat result — into rows the
# pick was not seen to keep whole: _coupled_message leads with that)
ROWS_UNPROVEN = (
    "merged values picked one by one (torch.masked_select's flat result) into rows, with a "
    "mask not seen to pick whole rows, so whether each row holds one example's values is not "
    "known"
)


# (an operation that ordered the examples by value — topk, sort — or accumulated along them:
# _coupled_message names the detached-index form of a selection by the losses)
RAN_ALONG = "ran along the examples"


# (an exception inside one of the loss watch's own rules: noisescale's fault, which
# _coupled_message names as such — until 2026-12-07 it was led as a loss that combines the
# examples, a ZeroDivisionError on an empty view among them, a fuzz hunt)
RULE_FAILED = "in noisescale's rule"


# (a CTC given an output whose examples the watch holds in dim 0, at T = N: a time-major
# model's layer applied to its [T, N, …] activations, measured as if batch-first —
# _coupled_message leads with that, not with a loss that combines the examples)
CTC_AT_T_EQUAL_N = (
    "'aten._ctc_loss' took dim 1 of its log-probabilities [T, N, C] for the examples, where "
    "noisescale read them in dim 0 (T equals the batch's N)"
)


def _coupled_message(pass_: PassNorms, time_major: list[str] | None = None) -> str:
    """``time_major``: the labels of the model's time-major layers (``batch_first=False``)."""
    layers = ", ".join(f"'{label}'" for label in time_major or [])
    if CTC_AT_T_EQUAL_N in (pass_.coupled or ""):
        # (until 2026-12-06 led as a loss combining the examples, offering per_example=False
        # only, while at T ≠ N the same model is refused naming the time-major layer, a hunt)
        return (
            "noisescale cannot tell which dimension holds the examples: "
            f"{pass_.coupled}, and the backward started from the result. At T = N a "
            "time-major activation [T, N, …] cannot be told from a batch-first one"
            + (f": the model's time-major layers ({layers}) return one, and" if layers else ";")
            + " a layer applied to it as it is — an output Linear on nn.LSTM(batch_first=False)'s "
            "output — is measured as if dim 0 held the examples (with T ≠ N it is refused, "
            "naming it). Keep dim 0 the examples: build the recurrent layers with "
            "batch_first=True (or transpose their output to [N, T, …] before the next layer), "
            "and transpose the log-probabilities for the CTC only, log_probs.transpose(0, 1); "
            "a batch-first output [N, T, C] given to F.ctc_loss as it is is read time-major "
            "and combines the examples. Or use per_example=False"
        )
    if f"{RULE_FAILED})" in (pass_.coupled or ""):
        return (
            f"noisescale failed to follow the loss: {pass_.coupled}, and the backward started "
            "from the result. That is an error of noisescale's own, not a sign that the loss "
            "combines the examples: please report it with the loss's code. Meanwhile "
            "per_example=False measures the step (the noise scale from micro-batch or replica "
            "gradients)"
        )
    if ROWS_UNPROVEN in (pass_.coupled or ""):
        return (
            "noisescale cannot tell whether the loss keeps the examples apart: "
            f"{pass_.coupled}, and the backward started from the result. Pick whole rows: "
            "a boolean index, t[attention_mask], or torch.masked_select(t, "
            "attention_mask.unsqueeze(-1).expand_as(t)).view(-1, t.size(-1)) with the mask "
            "expanded (not copied) over the last dimension — both followed —, or use "
            "per_example=False"
        )
    if SIZES_COINCIDE in (pass_.coupled or ""):
        # (until 2026-12-06 led as a loss combining the examples: an ensemble's outputs
        # stacked member-first, [E, N, d] with N = d, whose loss combines nothing; a hunt)
        return (
            "noisescale cannot tell which dimension holds the examples: "
            f"{pass_.coupled}, and the backward started from the result. Two of its sizes "
            "equal the batch's by coincidence (an ensemble's outputs stacked member-first, "
            "[E, N, d] with N = d), or the loss combines the "
            "examples. A batch of another size tells: if it is measured, that was the cause — "
            "keep dim 0 of the model's outputs the examples (torch.stack(..., dim=1)) to "
            "measure any batch size; otherwise use per_example=False"
        )
    if any(f"'aten.{op}' {RAN_ALONG}" in (pass_.coupled or "") for op in ("topk", "sort")):
        # (until 2026-12-06 led as a loss combining the examples, the detached-index form of
        # the same gradient unnamed: hard-example mining, a hunt)
        return (
            f"noisescale does not follow the loss through values ordered along the examples: "
            f"{pass_.coupled}, and the backward started from the result. A selection of the "
            "examples by their losses — hard-example mining, pe.topk(K).values.sum() / N, "
            "pe.sort(descending=True)[0][:K] — has the gradient of the selected examples' "
            "terms: pick them with a detached index, pe[pe.detach().topk(K).indices].sum() / N "
            "(the same gradient, measured exactly). A loss that combines the examples by their "
            "order (a ranking loss over the batch) has no per-example gradients: use "
            "per_example=False"
        )
    return (
        "the loss combines the examples, so they have no per-example gradients for noisescale "
        f"to measure: {pass_.coupled}, and the backward "
        "started from the result. Per-example norms are defined for a loss that is a sum (or "
        "mean) of per-example terms, Σ_i ℓ_i(output_i); a contrastive loss with in-batch "
        "negatives, a pairwise term between two forwards' outputs, or a normalization by the "
        "batch's statistics is not one (the gradient reaching example i's output depends on "
        "the others'). Use per_example=False (the noise scale from micro-batch or replica "
        "gradients), or detach the batch-level quantity if it is meant as a constant weight"
        + (
            f". (The model has time-major layers ({layers}): if its output is time-major, "
            "[T, N, …] with T = N, noisescale read its dim 0 as the examples — a layer applied "
            "to their output as it is was measured so —, and a loss over each example's time "
            "steps (a CTC written by hand) then reads as one over several examples. Keep dim "
            "0 the examples, batch_first=True; with T ≠ N the layer is refused by name.)"
            if layers
            else ""
        )
    )


def _experts_setting(model: nn.Module | None) -> str | None:
    """The experts kernel a transformers model's config asks for (``None`` elsewhere)."""
    return getattr(getattr(model, "config", None), "_experts_implementation", None)


def _follows_experts_setting(module: object) -> bool:
    """Whether an experts module follows ``experts_implementation``: transformers'
    ``@use_experts_implementation`` gives its class these attributes; experts written by hand
    (DBRX's) have neither."""
    return hasattr(module, "is_concatenated") and hasattr(module, "has_gate")


def _tensordot_hint(op: str) -> str:
    """``torch.tensordot`` is followed in one form (shared.py ``_tensordot``); any other is
    refused as an operation without a rule, with the form that works named."""
    if op != "tensordot":
        return ""
    return (
        ". torch.tensordot is followed with the per-example tensor first, its dim 0 (the "
        "examples) not contracted, and the shared one second (tensordot(h, w, dims=([1], [0]))); "
        "write it so, or as an einsum led by the examples' index "
        "(torch.einsum('nchw,co->nhwo', h, w)) or a matmul"
    )


def _experts_hint(op: str, scope: nn.Module | None = None, model: nn.Module | None = None) -> str:
    """transformers' mixture-of-experts kernels: ``experts_implementation="grouped_mm"`` (its
    default where torch has ``_grouped_mm``) runs every expert in one grouped product over the
    tokens routed to it, and ``"eager"`` loops over the experts indexing the tokens routed to
    each; neither has a per-example rule, and ``"batched_mm"`` is followed. ``scope``: the
    module where the parameters met the batch (a router, an experts module); ``model``: the
    model, whose config says which kernel it runs. Advice that would change nothing is not
    given: a model already on ``"batched_mm"`` (what met the batch is outside the batched
    product, e.g. GPT-OSS's expert biases, gathered per token and added in place), experts
    written by hand that do not follow the setting (DBRX's)."""
    if "grouped_mm" in op:
        return (
            ". This is transformers' grouped expert product (experts_implementation="
            "'grouped_mm', the default for mixtures of experts): build the model with "
            "experts_implementation='batched_mm', which noisescale measures exactly"
        )
    name = type(scope).__name__ if scope is not None else ""
    if not any(word in name for word in ("Expert", "Router", "Moe", "MoE", "SparseMoe")):
        return ""
    if _experts_setting(model) == "batched_mm":
        return (
            f". '{name}' belongs to a mixture of experts that already runs transformers' "
            "batched expert product (experts_implementation='batched_mm'), which noisescale "
            f"follows for the expert weights; what meets the batch here ('{op}') is outside "
            "it and has no per-example rule (expert biases gathered per token, a router's own "
            "operations): register a rule for the module, or use per_example=False"
        )
    if "Expert" in name and not _follows_experts_setting(scope):
        return (
            f". '{name}' is a mixture of experts written by hand (it does not follow "
            "transformers' experts_implementation, so that setting would not change it): "
            "register a rule for it (noisescale.register_layer), or use per_example=False"
        )
    return (
        f". '{name}' belongs to a mixture of experts: with transformers' models, build it "
        "with experts_implementation='batched_mm', which noisescale measures exactly"
    )


#: Why a step with a backward with create_graph=True through the model is refused (the
#: engine's collect; the tracker's check of .grad, which would otherwise blame a clip).
SECOND_ORDER = (
    "a backward with create_graph=True (a gradient penalty or double backward) "
    "ran through the model before the parameters' gradients were computed; "
    "per-example norms do not include its second-order terms. Use "
    "per_example=False with two or more gradient-accumulation micro-batches a step "
    "(micro-batch norms are exact there; so is loss.backward(create_graph=True) for a "
    "Hessian-based optimizer — AdaHessian, Sophia-H —, whose per-example norms noisescale "
    "does not take). A create_graph computation whose "
    "gradients do not go into the parameters' .grad (GradNorm's task weights, a logged "
    "gradient norm) goes under `with tracker.paused():`"
)


def transform_message(layer: str) -> str:
    """Why gradients computed under a torch.func transform are refused (``layer``: the first
    layer met running under it)."""
    return (
        "compute the step's gradients with loss.backward() on an ordinary forward: layer "
        f"'{layer}' ran under a torch.func transform (torch.func.grad, vjp, jvp or vmap around "
        "functional_call(model, ...) or the model), whose gradients noisescale cannot measure "
        "per example — its hooks see the transform's wrapped tensors, not the batch. "
        "functional_call with the model's own parameters and .backward() is measured; a "
        "torch.func.jvp whose tangent is only a target (a stop-gradient, as in MeanFlow or "
        "consistency models) is measured when it runs under torch.no_grad() and the loss's "
        "output comes from a plain forward"
    )


def forward_transform_message(where: str) -> str:
    """Why a torch.func transform entered inside the model's forward is refused; ``where``
    names what the engine met under it (a layer, parameters used directly)."""
    return (
        f"{where} ran under torch.vmap (or another torch.func transform: grad, vjp, jvp) "
        "entered inside the model's forward — a per-sequence scan vmapped over the examples, "
        "a position-wise map vmapped over time (in_dims=1). noisescale does not follow "
        "functorch transforms inside the forward: its hooks would see the transform's wrapped "
        "tensors, not the batch's examples. Write the batched form without torch.vmap (a "
        "loop-free batched operation: x @ W on [N, T, D], x * a broadcast over the examples, "
        "a loop over time on the whole batch), or use per_example=False"
    )


def forward_ad_message(where: str) -> str:
    """Why forward-mode AD through the model is refused; ``where`` names the layer."""
    return (
        f"{where} ran on forward-mode AD dual numbers (torch.autograd.forward_ad, a "
        "directional derivative in a physics-informed loss, a JVP target): a loss on their "
        "tangents reaches the weights through a path noisescale's per-example rules do not "
        "follow (a tangent-weighted term was measured 17% off without a word on steps between "
        "audits until 2026-12-06). If the loss uses the tangent only as a target (a "
        "stop-gradient, MeanFlow's or a consistency model's), compute it under torch.no_grad() "
        "and the primal by a plain forward; otherwise use per_example=False with two or more "
        "gradient-accumulation micro-batches a step (micro-batch norms are exact there)"
    )


def nested_message(where: str) -> str:
    """Why a nested tensor (``torch.nested``) met by the engine is refused; ``where`` says
    where (the model's input, a layer's)."""
    return (
        f"{where} is a nested tensor (torch.nested, e.g. layout=torch.jagged: examples of "
        "different lengths in one tensor); noisescale's per-example rules read the examples "
        "along a dense dim 0 and do not follow nested tensors. Pad the examples to one length "
        "with a mask, or use per_example=False (micro-batch norms, which any layer gives)"
    )


def freed_by_fsdp_message() -> str:
    """Why a tensor computed from parameters alone is refused where FSDP2 freed what its
    graph saved."""
    return (
        "noisescale carries the per-example gradients of a tensor computed from parameters "
        "alone (shared by the examples until it meets the batch: a repeat, an expand, a "
        "broadcast) back to those parameters through what the forward saved (its layers' "
        "inputs, its part of the graph), and FSDP2 has already freed the unsharded parameters "
        "saved there (resharded after the forward, or after their own module's backward, "
        "before this gradient arrived); such a model is not measured per example under FSDP2. "
        "Use per_example=False (the micro-batch and local sources, which any model gives)"
    )


UNRERUN = "the output permutation check could not re-run the model"


def unrerun_warning(why: str) -> str:
    """The warning of an audit whose permutation check could not run (said once per engine)."""
    return (
        f"noisescale: {why}. A model output has the batch's size along two dimensions, so the "
        "audit runs the model again without gradients and in evaluation mode, on its inputs and "
        "on them with the examples permuted, to see that the output's rows follow the examples; "
        "without that check, examples mixed inside the model (a loss or a statistic over the "
        "batch computed in the forward, a time-major output) would be measured without a "
        "further word. Let the model's forward run under torch.no_grad() in evaluation mode, "
        "use a batch size no other dimension of its outputs has, or use per_example=False"
    )


def loss_side_message(names: Sequence[str]) -> str:
    """A backward that reached parameters ``names`` from outside the model's forward
    (graph.loss_side_params)."""
    return (
        f"the backward reached parameters {list(names)} read outside the model's forward, in a "
        "term of the loss (a weight penalty such as λ·|w|², a regulariser switched on at some "
        "step — whatever its value, a coefficient of 0 or a hinge not yet active included): "
        "such a term's gradient is no example's, and the per-example norms would leave it out "
        "without a word. Use the optimizer's weight_decay instead of a penalty in the loss; "
        "return a parameter that weighs the examples' losses (a temperature, Kendall's "
        "uncertainty weights) from the model's forward, where it is followed; where a part of "
        "the model is called in the loss code (a second tower, a head) and uses a parameter "
        "directly (x * self.scale, not through a layer), call that part inside the model's "
        "forward, where its uses are followed per example; or use per_example=False"
    )


def loss_side_unchecked_message() -> str:
    """Why a step whose loss, outside the model's forward, was too large to walk is withheld
    (graph.loss_side_params)."""
    from noisescale.per_example.graph import _MAX_LOSS_WALK

    return (
        f"the loss's autograd graph outside the model's forward has more than {_MAX_LOSS_WALK:,} "
        "nodes (a loss built in a long Python loop), too many to check for a term that reads "
        "the parameters directly (a weight penalty, whose gradient is no example's): this "
        "step's per-example norms are withheld. Compute the loss inside the model's forward "
        "(its nodes are not walked), or with fewer operations (vectorised over the loop), or "
        "use per_example=False"
    )


def sparse_grad_message(param: str) -> str:
    """Why a parameter given a sparse gradient is refused (``param``: its name)."""
    return (
        f"parameter '{param}' received a sparse gradient (F.embedding(..., sparse=True) or "
        "F.embedding_bag(..., sparse=True) on it, or another operation with sparse gradients); "
        "sparse gradients are not supported, in any mode (per_example=False reads dense "
        "gradients too): look it up with sparse=False (nn.Embedding(..., sparse=True) is "
        "refused by name when the tracker is made)" + SPARSE_ADAM
    )


def ruleless_hint(module: nn.Module | None) -> str:
    """Why ``module``, of a type with a per-example rule, was not measured by it: it overrides
    a method of the rule's class (:func:`~noisescale.per_example.registry.overridden_method`),
    or an old reparametrization's pre-hook (``prune``, the deprecated ``weight_norm`` and
    ``spectral_norm``) computes a weight of it — a clause for a refusal that names the module,
    or ``""``."""
    from noisescale.per_example.engine import _old_reparametrized  # (import cycle)

    found = None if module is None else rule_class(module)
    if found is None:
        return ""
    base, name = found[0].__name__, type(module).__name__
    override = overridden_method(module)
    if override is not None:
        return (
            f". {name} does not take the per-example rule of {base}: {override} overrides a "
            f"method of {base}, with which its forward may compute something else than what "
            f"the rule was written for; if it computes what {base} does, register {base}'s "
            f"rule for it: noisescale.register_layer({name}, "
            f"noisescale.per_example.rule_for(layer)), layer a plain {base}"
        )
    if _old_reparametrized(module):
        return (
            f". A weight of this {name} is computed in a forward pre-hook (torch.nn.utils.prune, "
            f"the deprecated nn.utils.weight_norm or spectral_norm), and {base}'s per-example "
            "rule takes its weights as parameters of its own: it does not apply to a "
            "reparametrized one. Remove the reparametrization (prune.remove, "
            "remove_weight_norm, remove_spectral_norm), or use per_example=False"
        )
    return ""


def parametrized_layer(scope: nn.Module | None, model: nn.Module) -> nn.Module | None:
    """The layer whose parametrized weight was followed to ``scope`` — a parametrization's
    ParametrizationList (where the weight is computed), or the parametrized layer itself —,
    or ``None``."""
    if isinstance(scope, parametrize.ParametrizationList):
        return next(
            (
                m
                for m in model.modules()
                if parametrize.is_parametrized(m)
                and any(lst is scope for lst in m.parametrizations.values())
            ),
            None,
        )
    return scope if scope is not None and parametrize.is_parametrized(scope) else None


def parametrized_message(label: str, layer: nn.Module, params: list[str], op: str) -> str:
    """The refusal of a parametrized layer whose parameters meet the batch in an operation
    without a per-example rule (a weight-normed Bilinear, GRUCell or LSTM)."""
    names = list(layer.parametrizations)
    found = rule_class(layer)
    kind = type(layer).__name__
    rule = (
        f"{found[0].__name__}'s per-example rule takes its weights as parameters of its own and "
        "does not apply to a parametrized one"
        if found is not None
        else "no layer rule applies to a parametrized module"
    )
    return (
        f"layer '{label}' ({kind}) has {'its ' + ', '.join(names)} computed by a "
        "parametrization (torch.nn.utils.parametrize: weight_norm, orthogonal, spectral_norm or "
        f"one of your own), and its parameters {params} meet the batch in the operation "
        f"'{op}', which has no per-example rule: {rule}, nor does the torch.func fallback take "
        "a parametrization's parameters. Remove the parametrization "
        f"(torch.nn.utils.parametrize.remove_parametrizations(layer, '{names[0]}')), or use "
        "per_example=False (micro-batch norms need no per-example attribution)"
    )


def mixed_pick_message(where: str, how: str) -> str:
    """Why a step whose ``where`` (a layer's input, the model's output) holds ``how``, rows
    picked along the examples by an index not them in order (graph._mixed_pick), is refused."""
    return (
        f"{where} holds {how} (u - v[idx], cat([u, v[idx]], 1), torch.where(c, v, v[idx]), "
        "a mixup h·λ + h[perm]·(1 − λ)): the forward mixes examples — an example's result "
        "reads another example's row, so its gradient is not its own, and which example's "
        "changes with the data. Compute each example's result from its own rows (a positive "
        "or a context taken from the examples in order), or measure with per_example=False"
    )
