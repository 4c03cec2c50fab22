"""Training signals from per-example gradients: the numerical core behind :func:`dynamics.probe`.

One concern per module, the math in each docstring:

* :mod:`.losses`      per-example losses ``l_i`` and task weights (transformers' token weighting);
* :mod:`.calls`       one recorded module call (inputs, outputs, gradient edges, output gradients);
* :mod:`.capture`     forward hooks that record those calls (and map FSDP's unsharded parameters back);
* :mod:`.graph`       autograd-graph walks: how often each parameter is used, inside a call and overall;
* :mod:`.layer_kinds` which per-layer treatment a module's own parameters can take;
* :mod:`.plan`        which path covers each parameter (factored, rule / module-local, exact);
* :mod:`.backward`    the backward passes to the captured outputs and the example-axis check;
* :mod:`.cache_key`   what a captured forward did, as the structure part of the verdict cache's key;
* :mod:`.example_axis` checks that dimension 0 of a captured tensor indexes the examples;
* :mod:`.row_map`     rows of several examples in one call: their examples read off the weighted pass;
* :mod:`.axis_cache`  reuse of those verdicts (and row maps) across probes of the same model and batch;
* :mod:`.products`    Linear / Embedding / Conv blocks of ``K``: ghost products or materialised gradients;
* :mod:`.layer_rules` closed-form per-example gradients of normalisation layers;
* :mod:`.module_grads` per-example gradients of any other module by a module-local vjp;
* :mod:`.gram_exact`  exact per-example autograd (fallback and reference);
* :mod:`.sharding`    sharded parameters (FSDP2, FSDP1, ZeRO-3): detection and gathering;
* :mod:`.gram`        ``K = G G^T`` assembled from all of the above;
* :mod:`.geometry`    task Gram ``W K W^T``: norms, cosines, conflict rate;
* :mod:`.spectrum`    empirical Fisher spectrum from ``K / n``: SE, rho, effective rank;
* :mod:`.noise_scale` gradient noise scale ``B_simple``;
* :mod:`.hessian`     top Hessian eigenvalue by Lanczos on Hessian-vector products.

Only torch is imported here (numpy nowhere, transformers never).
"""
