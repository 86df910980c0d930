"""How many clients a round picks: a count, or a share of the pool (as Flower's fraction_fit).

One definition for the API's validation and for the ledger's choice of clients.
"""

import math

# 0.3 * 10 is 3.0000000000000004 in floating point: a share that names a whole number of
# clients must not round up to one more.
_FLOAT_SLACK = 1e-9


def clients_in_round(
    pool: int, *, clients_per_round: int, client_fraction: float | None, min_clients: int
) -> int:
    """The clients a round picks among `pool` candidates: ceil(fraction * pool), never
    fewer than min_clients, when a fraction is set; else clients_per_round. Never more
    than the pool."""
    if client_fraction is None:
        wanted = clients_per_round
    else:
        wanted = max(min_clients, math.ceil(client_fraction * pool - _FLOAT_SLACK))
    return min(wanted, pool)
