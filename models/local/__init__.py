"""Local learning rules on the substrate (issue 20): rules that need no backward pass through the whole
network, as :class:`models.train.Rule` s that :func:`models.train.train` accepts and
:data:`models.train.RULES` names. One module per rule family; importing this package registers them.

* :mod:`models.local.ccl`: counter-current learning (``counter_current``)
* :mod:`models.local.forward_forward`: Forward-Forward (``forward_forward``)
* :mod:`models.local.noprop`: NoProp, discrete-time (``noprop_dt``) and continuous-time (``noprop_ct``)
* :mod:`models.local.pc`: predictive coding as relaxation (``predictive_coding``)
"""

from . import ccl, forward_forward, noprop, pc  # noqa: F401  (registers the rules in models.train.RULES)
