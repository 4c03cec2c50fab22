"""Which per-layer path a module's own parameters can take on the fast path.

``module_kind`` names the treatment; :mod:`.plan` decides, per parameter, whether the recorded calls
prove that the treatment covers every use of it.
"""

from __future__ import annotations

from torch import nn

from dynamics.signals.layer_rules import rule_kind

FACTORED_KINDS = frozenset({"linear", "embedding", "conv"})


def module_kind(module: nn.Module) -> str:
    """How the fast path treats a module's own parameters.

    ``"linear"``, ``"embedding"``, ``"conv"`` (factored, :mod:`.products`): stock ``nn.Linear``,
    ``nn.Embedding`` (no max-norm renormalisation, no frequency scaling) and ``nn.Conv1d/2d``
    (zero padding, one group); a closed-form rule of :mod:`.layer_rules` (``"layernorm"``,
    ``"groupnorm"``, ``"rmsnorm"``, ``"llama_rmsnorm"``); ``"generic"`` (module-local vjp);
    ``"unsupported"`` (never re-run: an embedding that renormalises its weight in place).
    """
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Embedding) and forward is nn.Embedding.forward:
        if module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
            return "embedding"
        return "unsupported"  # renorm writes into the weight; frequency scaling couples examples
    if (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and forward in (nn.Conv1d.forward, nn.Conv2d.forward)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv"
    return rule_kind(module) or "generic"


def contains_unsupported(module: nn.Module) -> bool:
    """Re-running such a module would renormalise an embedding weight in place: never do that."""
    return any(module_kind(m) == "unsupported" for m in module.modules())
