"""The studies: one module per study family, each holding its schema, run function, warm-up and figure
as a :class:`~studies.runs.Task`, and :data:`TASKS`, the registry gathered from them (the name a
study file's ``study.task`` gives -> its Task). The registry is passed to whatever needs it
(``studies.config.load_study(..., tasks=TASKS)``, ``studies.figures.draw``); nothing below this
package imports it.

* :mod:`~studies.catalogue.relaxation`: ``relaxation``
* :mod:`~studies.catalogue.gradient_accuracy`: ``gradient_accuracy``
* :mod:`~studies.catalogue.ep`: ``ep_bias``, ``ep_train`` (with the ``device`` section of
  :mod:`~studies.catalogue.devices`)
* :mod:`~studies.catalogue.pvrnn`: ``pvrnn_meta_prior``, ``pvrnn_er``
* :mod:`~studies.catalogue.dpm_gradients`: ``dpm_gradients``
* :mod:`~studies.catalogue.dpm_customise`: ``dpm_customise``
* :mod:`~studies.catalogue.drift`: ``drift`` (an ``ep_train`` classifier programmed on a drifting device)
* :mod:`~studies.catalogue.circuits`: ``circuit_train`` (a resistive network, EP or coupled learning,
  device variability)
* :mod:`~studies.catalogue.compare`: ``compare`` (every learning rule on the same circuit and devices,
  with what it costs on the hardware)
* :mod:`~studies.catalogue.local_rules`: ``local_rules`` (the rules of ``models.local`` beside EP under device
  effects)
* :mod:`~studies.catalogue.selftest`: ``selftest`` (exercises the sweep machinery in the tests)

A new study is one module here and one line below (and its TOML file in ``studies/configs``).
"""

from __future__ import annotations

from studies.catalogue import (circuits, compare, dpm_customise, dpm_gradients, drift, ep, gradient_accuracy, local_rules,
                               pvrnn, relaxation, selftest)

TASKS = {
    "relaxation": relaxation.TASK,
    "gradient_accuracy": gradient_accuracy.TASK,
    "ep_bias": ep.EP_BIAS,
    "ep_train": ep.EP_TRAIN,
    "pvrnn_meta_prior": pvrnn.META_PRIOR,
    "pvrnn_er": pvrnn.ERROR_REGRESSION,
    "dpm_gradients": dpm_gradients.TASK,
    "dpm_customise": dpm_customise.TASK,
    "drift": drift.TASK,
    "compare": compare.TASK,
    "circuit_train": circuits.TASK,
    "local_rules": local_rules.TASK,
    "selftest": selftest.TASK,
}
