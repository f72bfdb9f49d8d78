"""Partitions of a model's trainable parameters, for per-group noise scales (``groups=``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import NoiseScaleInputError

__all__ = ["parameter_groups"]


def parameter_groups(
    model: nn.Module,
    groups: bool | str | Mapping[str, Any] | None,
    optimizer: torch.optim.Optimizer | None,
    params: list[nn.Parameter],
) -> tuple[list[str], list[list[nn.Parameter]]]:
    """Names and members of the parameter groups: a partition of the trainable ``params``."""
    if groups is None or groups is False:
        return [], []
    tracked = {id(p) for p in params}
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, str] = {}
    members: dict[str, list[nn.Parameter]] = {}

    def put(group: str, p: nn.Parameter, *, shared_ok: bool) -> None:
        if id(p) not in tracked:
            return
        if id(p) in owner:
            if owner[id(p)] != group and not shared_ok:
                raise NoiseScaleInputError(
                    f"parameter '{names.get(id(p), '?')}' is in groups {owner[id(p)]!r} and "
                    f"{group!r}; each parameter must be in one group"
                )
            return
        owner[id(p)] = group
        members.setdefault(group, []).append(p)

    if groups is True or groups == "children":
        root = model
        # a DistributedDataParallel-style wrapper holds the real model as its only child
        while (
            isinstance(getattr(root, "module", None), nn.Module) and len(list(root.children())) == 1
        ):
            root = root.module
        for name, child in root.named_children():
            for p in child.parameters():
                put(name, p, shared_ok=True)  # a tied parameter belongs to its first user
        top = list(root.parameters(recurse=False))
        if "(top)" in members and any(id(p) in tracked and id(p) not in owner for p in top):
            raise NoiseScaleInputError(
                _same_name(
                    "(top)",
                    "a child module and the model's own parameters",
                    "pass groups= as a mapping of your own names",
                )
            )
        for p in top:
            put("(top)", p, shared_ok=True)
    elif groups == "param_groups":
        if optimizer is None:
            raise NoiseScaleInputError(
                "groups='param_groups' needs the optimizer: pass optimizer= or precondition="
            )
        seen: dict[str, int] = {}
        for i, g in enumerate(optimizer.param_groups):
            name = str(g.get("name", f"param_group_{i}"))
            if name in seen:
                # (until 2026-12-07 the two were merged into one group without a word)
                raise NoiseScaleInputError(
                    _same_name(
                        name,
                        f"the optimizer's param_groups {seen[name]} and {i}",
                        'give each param group its own "name" key',
                    )
                )
            seen[name] = i
            for p in g["params"]:
                put(name, p, shared_ok=False)
    elif isinstance(groups, Mapping):
        modules = dict(model.named_modules())
        by_name = dict(model.named_parameters())
        keys: dict[str, Any] = {}
        for group in groups:
            if str(group) in keys:
                raise NoiseScaleInputError(
                    _same_name(str(group), f"the keys {keys[str(group)]!r} and {group!r}", _RENAME)
                )
            keys[str(group)] = group
        for group, spec in groups.items():
            items = [spec] if isinstance(spec, str | nn.Module | Tensor) else list(spec)
            for item in items:
                if isinstance(item, str):
                    if item not in by_name and item not in modules:
                        raise NoiseScaleInputError(
                            f"group {group!r}: {item!r} names no parameter or module of the model"
                        )
                    item = by_name.get(item, modules.get(item))
                if isinstance(item, nn.Module):
                    for p in item.parameters():
                        put(str(group), p, shared_ok=False)
                elif isinstance(item, Tensor):
                    if id(item) not in tracked:
                        raise NoiseScaleInputError(
                            f"group {group!r} holds a tensor that is not a trainable parameter "
                            "of the model"
                        )
                    put(str(group), item, shared_ok=False)
                else:
                    raise NoiseScaleInputError(
                        f"group {group!r}: expected parameters, modules or their names, got "
                        f"{type(item).__name__}"
                    )
            if str(group) not in members:
                # (its estimate would be missing from estimate_groups() without a word)
                raise NoiseScaleInputError(
                    f"group {group!r} holds no trainable parameter (all of them are frozen): "
                    "its estimate would be missing; drop it from groups=, or unfreeze them"
                )
    else:
        raise NoiseScaleInputError(
            "groups must be True, 'children', 'param_groups' or a mapping {name: [parameters, "
            f"modules or names]}}, got {groups!r}"
        )
    rest = [p for p in params if id(p) not in owner]
    if rest and "(other)" in members:
        raise NoiseScaleInputError(
            _same_name("(other)", "a group of groups= and the parameters it leaves out", _RENAME)
        )
    if rest:
        members.setdefault("(other)", []).extend(rest)
    return list(members), list(members.values())


_RENAME = (
    "give each key of the mapping its own name ('(other)' names the parameters the mapping "
    "leaves out)"
)


def _same_name(name: str, what: str, fix: str) -> str:
    """Why two groups would share ``name``: their parameters would be merged into one group,
    whose estimate would be read as either's (until 2026-12-07 they were, without a word)."""
    return (
        f"groups=: {what} are both named {name!r}, so their parameters would be merged into one "
        f"group {name!r} and its estimate read as either's; {fix}"
    )
