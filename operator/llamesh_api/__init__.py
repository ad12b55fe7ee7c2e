"""llamesh's shared vocabulary: resource models, config and cookbook loading, the Store.

Every role (operator, agent, gateway) imports this package; it imports none of them.
It does no I/O at import time and owns no background work.
"""

__version__ = "0.1.0"
