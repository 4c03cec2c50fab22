"""Training-side hooks: per-task losses every step, probes on a schedule, the run store.

* :mod:`~dynamics.integrations.hf`: ``DynamicsCallback`` and ``attach`` for the HF Trainer (the
  only module here that imports transformers);
* :mod:`~dynamics.integrations.loop`: ``LoopRecorder`` for plain PyTorch loops;
* :mod:`~dynamics.integrations.recorder`: the framework-agnostic core both use;
* :mod:`~dynamics.integrations.task_ids`, :mod:`~dynamics.integrations.loss_meter`,
  :mod:`~dynamics.integrations.probe_batch`, :mod:`~dynamics.integrations.distributed`: its parts.

Imports are left to the user (``from dynamics import attach, LoopRecorder``) so that importing this
package pulls in neither transformers nor the probe.
"""
