"""Local learning rules on the substrate (issue 20): rules that need no backward pass through the whole
circuit, each a :class:`models.train.Rule` registered in :data:`models.train.RULES` when its module is
imported (importing this package imports them all).

* :mod:`models.local.noprop`: NoProp, discrete-time (``noprop_dt``) and continuous-time (``noprop_ct``)
* :mod:`models.local.pc`: predictive coding as relaxation (``predictive_coding``)
"""

from . import noprop, pc  # noqa: F401  (registers the rules)
