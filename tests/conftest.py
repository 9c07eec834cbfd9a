"""Session-wide test settings.

Every Ray instance the tests start (in this process or in the subprocesses
they spawn, which inherit the environment) binds to loopback only: by default
Ray advertises the host's interface address and routes its traffic over it.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
