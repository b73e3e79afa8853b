"""Loaded by every Python process the tests start (tests/netguard is on their PYTHONPATH)."""

import loopback_guard

loopback_guard.install()
