"""echod: a TCP echo daemon that echoes in the kernel (BPF sockmap) or in user space (uvloop)."""

__version__ = "0.1.0"
