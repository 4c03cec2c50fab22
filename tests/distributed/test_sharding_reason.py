"""``sharding_reason``: None where probes work (whole parameters, FSDP2 / FSDP1 orig params / ZeRO-3), a reason otherwise."""

from __future__ import annotations

import pytest
from torch import nn

from dynamics import probe
from dynamics.integrations.distributed import sharding_reason
from tests import tiny_models as tm


def test_whole_parameters_need_no_reason():
    assert sharding_reason(tm.mlp()) is None
    assert sharding_reason(None) is None


def test_fsdp1_flat_parameters_are_refused_with_the_fix():
    model = tm.mlp()
    model.head.weight._is_flat_param = True  # what FSDP1's flat parameters carry (use_orig_params=False)
    reason = sharding_reason(model)
    assert reason is not None and "use_orig_params=True" in reason
    batch, task_ids = tm.mlp_batch()
    with pytest.raises(ValueError, match="use_orig_params=True"):
        probe(model, batch, task_ids=task_ids)


def test_a_wrapper_named_like_fsdp_alone_does_not_switch_probes_off():
    class FullyShardedDataParallel(nn.Module):  # FSDP1 with use_orig_params=True keeps plain parameters
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    assert sharding_reason(FullyShardedDataParallel(tm.mlp())) is None
