"""Training-side hooks: per-task losses every step, probes on a schedule, the run store.

Adapters (what users import):

* :mod:`~dynamics.integrations.hf`: ``DynamicsCallback``, ``attach`` and ``evaluate_per_task`` for
  the HF Trainer and its subclasses (the only module here that imports transformers);
* :mod:`~dynamics.integrations.loop`: ``LoopRecorder`` for plain PyTorch loops.

The framework-agnostic core, one concern per module:

* :mod:`~dynamics.integrations.config`: ``RecorderConfig``, the options every adapter shares;
* :mod:`~dynamics.integrations.recorder`: ``Recorder``, which wires the parts below together;
* :mod:`~dynamics.integrations.loss_meter`: per-task training losses of every optimizer step;
* :mod:`~dynamics.integrations.probe_scheduler`: when to probe, on which batch, at which parameters;
* :mod:`~dynamics.integrations.store_sink`: rows into the run store (rank 0);
* :mod:`~dynamics.integrations.scores`: evaluation curves and final scores;
* :mod:`~dynamics.integrations.task_ids`, :mod:`~dynamics.integrations.probe_batch`,
  :mod:`~dynamics.integrations.distributed`: task ids in the data, the held probe batch, ranks.

Imports are left to the user (``from dynamics import attach, LoopRecorder``) so that importing this
package pulls in neither transformers nor the probe.
"""
