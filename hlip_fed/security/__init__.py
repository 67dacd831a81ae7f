"""Key material for a federation: the consortium CA, the SuperLink's TLS certificate, site keys.

Two independent trust mechanisms protect the Fleet API. TLS (CA + server certificate) lets a
site verify it talks to the consortium's SuperLink; the site's EC key pair, enrolled by the
operator, lets the SuperLink verify which hospital is calling. The CA certificate is public
material, so holding it must never be enough to act as the operator (see
:mod:`hlip_fed.deploy.fleet_gateway`).
"""
