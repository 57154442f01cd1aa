"""How the daemon is reached: the control socket and its protocol, /metrics over HTTP."""
