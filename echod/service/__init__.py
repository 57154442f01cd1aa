"""The echo service in one process: admission, connections, modes, the self-check."""
