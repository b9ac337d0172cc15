"""
Numbers the MQTT connector's two halves share.
"""

# Events handed to the reactor per turn: large enough to amortise a hop,
# small enough that a burst from the broker does not starve other work.
BATCH = 1000

# Seconds before the same connection problem is logged again (with how
# often it happened meanwhile): paho retries with back-off, forever.
PROBLEM_RELOG = 600.0

# CONNACK reason codes that mean the credentials were refused.
_AUTH_REFUSED = {0x86: "Bad user name or password", 0x87: "Not authorized", 0x8C: "Bad authentication method"}
