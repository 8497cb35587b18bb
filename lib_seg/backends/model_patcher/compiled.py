"""A model call that ``torch.compile`` runs (Forge Neo's built-in *Compile*, or any extension that
swaps in a compiled diffusion model): SEG's hooks, kernel wrappers and attention patches must not
meet a compiled graph. Dynamo does not guard on module hooks added after a graph was traced, and
Neo's ``guard_filter_fn`` preset drops the guards on ``transformer_options``: a graph traced
without SEG would silently run without its blur.

So SEG keeps its rows out of a compiled call (the webui's own rows stay compiled and untouched)
and evaluates the smoothed branch in an eager call of the same weights: Neo's built-in keeps the
uncompiled ``apply_model`` on the KModel as ``_orig_apply_model``; a diffusion model that is itself
an ``OptimizedModule`` has the eager one as ``_orig_mod``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

EAGER_APPLY_MODEL = "_orig_apply_model"  # where Neo's compile built-in keeps the eager apply_model
EAGER_MODULE = "_orig_mod"  # torch.compile's OptimizedModule: the module it compiles


def is_compiled(model) -> bool:
    """True when a call of ``model`` (a KModel) may run a compiled graph."""
    if model is None:
        return False
    if getattr(model, EAGER_APPLY_MODEL, None) is not None:
        return True
    return hasattr(getattr(model, "diffusion_model", None), EAGER_MODULE)


@contextlib.contextmanager
def eager(model) -> Iterator[None]:
    """Calls of ``model`` inside run eagerly, on the same weights; everything is put back on exit."""
    if not is_compiled(model):
        yield
        return
    restore = []
    try:
        eager_apply = getattr(model, EAGER_APPLY_MODEL, None)
        if eager_apply is not None:
            had_own = "apply_model" in vars(model)
            restore.append(("apply_model", vars(model).get("apply_model"), had_own))
            model.apply_model = eager_apply
        net = getattr(model, "diffusion_model", None)
        if hasattr(net, EAGER_MODULE):
            restore.append(("diffusion_model", net, True))
            object.__setattr__(model, "diffusion_model", getattr(net, EAGER_MODULE))
        yield
    finally:
        for name, value, had_own in reversed(restore):
            if had_own:
                object.__setattr__(model, name, value)
            else:
                delattr(model, name)
