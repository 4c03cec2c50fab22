"""Forward hooks that record the calls of the modules owning the chosen parameters (and of their ancestors).

During the probe's single forward pass, forward hooks record every call of the modules that own a
chosen parameter directly, and of their ancestors, as a :class:`~.calls.ModuleCall`: the call's
inputs, its output tensors and the autograd *gradient edge* of each output. One backward pass of
``L = sum_i l_i`` to those edges (:mod:`.backward`) then yields, for every captured call,
``dy = dL/dy``, whose row ``i`` equals ``d l_i / d y_i`` when row ``i`` belongs to example ``i``
(examples do not interact: the probe runs in eval mode). Which path then computes each
parameter's per-example gradients is decided by :mod:`.plan`.

**Sharded parameters.** Under FSDP2 (``fully_shard``) and FSDP1 the tensor a module uses in its
forward is not the registered (sharded) parameter: FSDP swaps in an unsharded parameter (FSDP2) or a
view of the unsharded flat parameter (FSDP1) for the forward. The hooks record, per call, the
tensors the module actually used (``ModuleCall.used``) and map each back to the chosen parameter
(:attr:`Capture.canon`), so the coverage check counts the graph edges into those, and the products
need only the call's inputs and output gradients, which every rank holds whole. DeepSpeed ZeRO-3
gathers into the registered parameter itself, so nothing needs mapping there; its partitioned
parameter has an empty ``shape`` outside the forward, hence :meth:`Capture.shape`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from dynamics.signals.calls import ModuleCall, flat_leaves, tensor_leaves
from dynamics.signals.layer_kinds import module_kind
from dynamics.signals.sharding import is_dtensor, is_fsdp1, is_zero3


class Capture:
    """Forward hooks on the owners of ``params`` and their ancestors; use as a context manager."""

    def __init__(self, model: nn.Module, params: list[Tensor], n: int | None = None):
        self.model = model
        self.n = n  # examples: given, broadcast embedding lookups are expanded to n rows (see _hook)
        self.expanded = 0
        self.params = params
        self.pids = {id(p) for p in params}
        self.calls: dict[int, list[ModuleCall]] = defaultdict(list)
        self.owners: dict[int, list[nn.Module]] = defaultdict(list)
        self.parent: dict[int, nn.Module] = {}
        # module id -> {attribute name: chosen param id} for the chosen parameters it owns directly
        self.slots: dict[int, dict[str, int]] = defaultdict(dict)
        self.canon: dict[int, int] = {pid: pid for pid in self.pids}  # used tensor / view node -> param
        self.targets: set[int] = set(self.pids)
        self.shapes: dict[int, torch.Size] = {}
        self._names: dict[int, dict[int, str]] = {}
        self._handles: list[Any] = []
        self._keep: list[Any] = []  # alias objects held, so that their ids stay unique
        self._prefix: dict[int, list[str]] = defaultdict(list)
        self._pnames: dict[int, list[str]] = defaultdict(list)
        for prefix, m in model.named_modules(remove_duplicate=False):
            self._prefix[id(m)].append(prefix)
            for child in m.children():
                self.parent.setdefault(id(child), m)
            for name, p in m._parameters.items():
                if p is not None and id(p) in self.pids:
                    if m not in self.owners[id(p)]:
                        self.owners[id(p)].append(m)
                    self.slots[id(m)][name] = id(p)
                    self._pnames[id(p)].append(f"{prefix}.{name}" if prefix else name)
        hooked: dict[int, nn.Module] = {}
        for mods in self.owners.values():
            for m in mods:
                while m is not None and id(m) not in hooked:
                    hooked[id(m)] = m
                    m = self.parent.get(id(m))
        self.hooked = hooked

    def __enter__(self) -> Capture:
        for m in self.hooked.values():
            self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        kind = module_kind(module)
        replaced = False
        if kind == "embedding" and self.n is not None and self.n > 1:
            replaced, args, output = self._expand_broadcast(args, output)
        leaves = flat_leaves(output)
        grad_idx, edges = [], []
        for k, t in enumerate(leaves):
            if isinstance(t, Tensor) and t.requires_grad and t.grad_fn is not None:
                grad_idx.append(k)
                edges.append(torch.autograd.graph.get_gradient_edge(t))
        if not edges:
            return output if replaced else None
        used = {}
        for name, pid in self.slots.get(id(module), {}).items():
            t = getattr(module, name, None)
            if isinstance(t, Tensor):
                used[name] = t
                self._alias(t, pid)
        ins = tensor_leaves(args, kwargs)
        self.calls[id(module)].append(
            ModuleCall(
                module=module,
                kind=kind,
                args=args,
                kwargs=kwargs,
                out_leaves=leaves,
                grad_idx=grad_idx,
                edges=edges,
                in_versions=[(t, t._version) for t in ins],
                boundary={id(t.grad_fn) for t in ins if t.grad_fn is not None},
                out_versions=[t._version if isinstance(t, Tensor) else -1 for t in leaves],
                used=used,
            )
        )
        return output if replaced else None

    def _expand_broadcast(self, args: tuple, output: Any) -> tuple[bool, tuple, Any]:
        """An embedding looked up with ids shared by all examples (position ids of shape (1, T)).

        Its output (1, T, d) is broadcast over the examples downstream, so its gradient is the sum
        over examples and holds no per-example rows. Expanded to (n, T, d) (a view with the same
        values, so the forward computes the same numbers), the broadcast happens inside autograd's
        expand node instead, and the gradient at the expanded output has one row per example; the
        ids are expanded alike, and the embedding takes the factored path like any other. Should
        the model's code not accept the expanded shape, the probe runs the forward again without.
        """
        ids = args[0] if args else None
        n = self.n
        assert n is not None
        if not (
            isinstance(output, Tensor)
            and isinstance(ids, Tensor)
            and ids.dim() >= 1
            and ids.shape[0] == 1
            and output.dim() == ids.dim() + 1
            and output.shape[0] == 1
        ):
            return False, args, output
        self.expanded += 1
        return True, (ids.expand(n, *ids.shape[1:]), *args[1:]), output.expand(n, *output.shape[1:])

    def _alias(self, t: Tensor, pid: int) -> None:
        """Map the tensor a module used to the chosen parameter it stands for (FSDP's unsharded one)."""
        self.shapes[pid] = t.shape  # whole during the forward, also under ZeRO-3
        if id(t) == pid:
            return
        alias = t.grad_fn if t.grad_fn is not None else t  # FSDP1: a view of the flat parameter
        self.canon[id(alias)] = pid
        self.targets.add(id(alias))
        self._keep.append(alias)

    @property
    def one_backward(self) -> bool:
        """Whether the sharding allows only one backward pass per forward.

        FSDP1 (modules use views of a flat parameter) and ZeRO-3 free the gathered parameters
        after the first backward and gather them again only in the next forward.
        """
        return any(not isinstance(a, Tensor) for a in self._keep) or any(is_zero3(p) for p in self.params)

    def leaf_of(self, p: Tensor) -> Tensor | None:
        """The leaf tensor whose gradient is ``p``'s whole gradient: ``p``'s unsharded stand-in, or ``p``.

        None when the forward used a view of a larger tensor (FSDP1's flat parameter), under ZeRO-3
        (its parameters are released after the first backward), or when no alias was recorded for a
        sharded ``p``.
        """
        for alias in self._keep:
            if self.canon.get(id(alias)) == id(p):
                return alias if isinstance(alias, Tensor) and alias.grad_fn is None else None
        return None if is_dtensor(p) or is_fsdp1(p) or is_zero3(p) else p

    def shape(self, p: Tensor) -> torch.Size:
        """The whole shape of ``p`` (as the forward used it; a ZeRO-3 partition is empty outside it)."""
        ds_shape = getattr(p, "ds_shape", None)
        default = torch.Size(ds_shape) if ds_shape is not None else p.shape
        return self.shapes.get(id(p), default)

    def names_in(self, module: nn.Module, p: Tensor) -> list[str]:
        """Attribute names under which ``module`` owns ``p`` directly."""
        return [name for name, pid in self.slots.get(id(module), {}).items() if pid == id(p)]

    def ancestors(self, module: nn.Module) -> list[nn.Module]:
        out = []
        m = self.parent.get(id(module))
        while m is not None:
            out.append(m)
            m = self.parent.get(id(m))
        return out

    def param_name(self, module: nn.Module, p: Tensor) -> str:
        """Name of ``p`` relative to ``module`` (for ``functional_call``), as registered before the forward."""
        for prefix in self._prefix.get(id(module), []):
            for full in self._pnames.get(id(p), []):
                if not prefix:
                    return full
                if full.startswith(prefix + "."):
                    return full[len(prefix) + 1 :]
        raise KeyError("parameter not found under module")
