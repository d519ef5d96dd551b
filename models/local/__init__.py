"""Local learning rules on the substrate: rules that need no backward pass through the network, as
:class:`models.train.Rule` s that :func:`models.train.train` accepts and :data:`models.train.RULES`
names. One module per rule family; importing this package registers them."""

from . import ccl, forward_forward  # noqa: F401  (registers the rules in models.train.RULES)
